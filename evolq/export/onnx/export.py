"""The public entry points: ``export_onnx`` (a ``QModel`` as a QDQ graph) and
``export_float_onnx`` (a float model, for comparison)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import ExportError
from ...qnn.qmodel import QModel
from ..files import check_path, example_input, write_file
from .exporter import Exporter, export_mode
from .graph import lower, trace
from .weights import INT4_OPSET

__all__ = ["export_onnx", "export_float_onnx", "MIN_OPSET", "INT4_OPSET", "MAX_OPSET"]

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
MAX_OPSET = 21


def _check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (per-axis QuantizeLinear needs "
                          f"{MIN_OPSET}, 4-bit weights {INT4_OPSET}), got {opset!r}")


def export_onnx(qmodel: QModel, path, *, opset: int = 21, example: torch.Tensor | None = None,
                bias_correction: str = "weights", channel_factors: str = "fold", pack: str = "auto") -> Path:
    """Write ``qmodel`` as an ONNX QDQ model to ``path`` (atomically: no partial file).

    Args:
        qmodel: a calibrated ``QModel`` (``prepare_model``, ``quantize_model``, ``load_quantized``).
        path: the ``.onnx`` file to write.
        opset: ONNX opset, 13..21; weights of 4 bits or fewer are stored as uint4/int4 and need 21.
        example: an input to trace with (default: zeros of the model's input size, batch 1);
            the batch dimension is dynamic in the exported graph.
        bias_correction: where weight bias correction (``QuantConfig.bias_correction``) goes.
            ``"weights"`` (default): ``(DequantizeLinear(W) - mu_q) * r + mu`` per output channel, the
            quantizer's own float operations, so the weights equal the PyTorch model's bit for bit;
            onnxruntime then runs those layers in float. ``"output"``: the ratio ``r`` folded into the
            weight scale and the shift added to the layer's output (``t * sum(input)``), so that the
            DequantizeLinear feeds the MatMul/Conv directly (integer kernels where onnxruntime fuses
            them); equal up to float rounding.
        channel_factors: Linear inputs with per-channel factors (outlier-aware preset). ``"fold"``
            (default): the deployed form, factors in the integer weights, zero-points in the bias, the
            input dequantized per tensor. ``"divide"``: the PyTorch model's own operations, the input
            quantized and dequantized per channel and the dequantized weights divided by the factors
            (no cancellation between a large zero-point bias and the product).
        pack: ``"auto"`` (default) stores 2-, 3-, 5-, 6- and 7-bit weights bit-packed in uint8 bytes
            (``bits`` per weight: the packed size ``evolq allocate`` reports) with constant nodes that
            unpack them into an 8-bit DequantizeLinear, which runtimes fold once at load; ``"none"``
            stores every width in its container (uint4/int4 for 2-4 bits, uint8/int8 above).

    Returns the path. Raises ``ExportError`` (one line) for a model that was never
    calibrated, a quantizer or layer with no ONNX form (log2 probabilities among them), a
    bad opset or path.
    """
    import onnx

    if not isinstance(qmodel, QModel):
        raise ExportError(f"export_onnx takes a QModel, got {type(qmodel).__name__}")
    _check_opset(opset)
    if bias_correction not in ("weights", "output"):
        raise ExportError(f"bias_correction must be 'weights' or 'output', got {bias_correction!r}")
    if channel_factors not in ("fold", "divide"):
        raise ExportError(f"channel_factors must be 'fold' or 'divide', got {channel_factors!r}")
    if pack not in ("auto", "none"):
        raise ExportError(f"pack must be 'auto' or 'none', got {pack!r}")
    path = check_path(path)
    exporter = Exporter(qmodel, opset, bias_correction, channel_factors, pack)
    x = example_input(qmodel, example)
    model = qmodel.model
    was_training = model.training
    model.eval()
    try:
        with export_mode(qmodel, exporter):
            try:
                blob = trace(model, x, opset)
            except ExportError:
                raise
            except Exception as e:
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ExportError(f"torch.onnx could not trace the model: {msg}") from None
    finally:
        model.train(was_training)
    proto = lower(onnx.load_from_string(blob), exporter.plan)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # pragma: no cover - a lowering bug
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).splitlines()[0][:200]}") from None
    return write_file(path, proto.SerializeToString())


def export_float_onnx(model: nn.Module, path, *, opset: int = 21, example: torch.Tensor | None = None) -> Path:
    """A float (unquantized) model as ONNX, for comparison with the QDQ export."""
    import onnx

    _check_opset(opset)
    path = check_path(path)
    x = example if example is not None else example_input(QModel(model, [], ""), None)
    model.eval()
    try:
        blob = trace(model, x, opset)
    except Exception as e:
        raise ExportError(f"torch.onnx could not trace the model: {str(e).splitlines()[0][:200]}") from None
    return write_file(path, onnx.load_from_string(blob).SerializeToString())
