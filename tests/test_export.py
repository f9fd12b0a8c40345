"""ONNX QDQ export: tiny random models round-trip through onnxruntime with the PyTorch
model's top-1, the graph holds integer weights and one Q/DQ pair per activation
quantizer, and bad input gives one-line errors (exit code 2) and no file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny_models import randomize_bn, tiny_levit, tiny_swin, tiny_torchvision_vit  # noqa: E402  (tests/tiny_models.py)

from evolq import QuantConfig, prepare_model, save_quantized  # noqa: E402
from evolq.adapters import wrap_model  # noqa: E402
from evolq.cli import main  # noqa: E402
from evolq.errors import EvolQError, ExportError  # noqa: E402
from evolq.export import check_onnx, export_onnx  # noqa: E402
from evolq.io import replace_hooks  # noqa: E402
from evolq.quant import Quantizer  # noqa: E402

TP = onnx.TensorProto


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def tiny_cnn(seed=0):
    """tf_efficientnet_lite0 (depthwise and TF "same"-padded convs) with non-trivial BatchNorms."""
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval(), seed)


def images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def act_quantizers(qmodel):
    return [n for n, q in qmodel.model.named_modules()
            if isinstance(q, Quantizer) and getattr(q, "kind", "") != "weight"]


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    assert isinstance(excinfo.value, EvolQError)
    return msg


def no_files(folder):
    return [p.name for p in folder.iterdir()] == []


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset,w_bits", [("fq-vit", 8), ("outlier-aware", 4)])
def test_tiny_vit_round_trip(tmp_path, preset, w_bits):
    x = images(48)
    q = prepare_model(tiny_vit(), x[:24], QuantConfig.preset(preset, w_bits=w_bits, a_bits=8))
    path = export_onnx(q, tmp_path / "vit.onnx", example=x[:1])
    with torch.no_grad():
        ref = q.model(x[24:])
    got = run_ort(path, x[24:])  # batch 24: the batch dimension is dynamic
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # equal up to float32 reassociation: most samples to ~1e-7; a rounding tie that float
    # reassociation tips the other way (folded zero-points) changes one integer in a sample
    row_diff = (got - ref).abs().amax(1)
    assert row_diff.median().item() < 1e-5 * ref.abs().max().item()
    res = check_onnx(q, path, x[24:], torch.zeros(24, dtype=torch.long), batch_size=7)
    assert res["agreement"] == 100.0 and res["images"] == 24 and "top1_onnx" in res

    model = onnx.load(str(path))
    kinds = ops(path)
    # one QuantizeLinear per activation quantizer (each runs once per forward in a ViT)
    assert kinds.count("QuantizeLinear") == len(act_quantizers(q))
    assert "Log2" not in "".join(kinds) and not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    ints = {t.name: t for t in model.graph.initializer if t.data_type in (TP.UINT4, TP.INT4, TP.UINT8, TP.INT8)}
    floats = [t for t in model.graph.initializer if t.data_type == TP.FLOAT]
    qkv = ints["blocks.0.attn.qkv.weight.quantized"]
    assert list(qkv.dims) == [48, 144]  # (in, out): feeds the MatMul directly
    assert qkv.data_type == (TP.UINT4 if w_bits == 4 else TP.UINT8)
    assert max(int(np.prod(t.dims)) for t in floats) < 48 * 48  # no float weight matrix left
    # LayerNorm inputs: PTF, per-axis along the channels
    ln_q = next(n for n in model.graph.node if n.name == "blocks.0.norm1.input_quant/QuantizeLinear")
    assert any(a.name == "axis" for a in ln_q.attribute)
    scale = next(t for t in model.graph.initializer if t.name == ln_q.input[1])
    assert list(scale.dims) == [48]


def test_outlier_aware_folds_factors_and_zero_points(tmp_path):
    """Channel-factor inputs: quantized per channel, dequantized per tensor with zero-point 0
    (the factors are in the integer weights, the zero-points in the bias)."""
    x = images(32)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("outlier-aware", w_bits=8, a_bits=8))
    path = export_onnx(q, tmp_path / "vit.onnx", example=x[:1])
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.name == "blocks.0.mlp.fc2.input_quant/DequantizeLinear")
    qn = next(n for n in model.graph.node if n.name == "blocks.0.mlp.fc2.input_quant/QuantizeLinear")
    assert list(inits[qn.input[1]].dims) == [192] and list(inits[qn.input[2]].dims) == [192]
    assert list(inits[dq.input[1]].dims) == [] and onnx.numpy_helper.to_array(inits[dq.input[2]]) == 0
    iq = q.model.blocks[0].mlp.fc2.input_quant
    np.testing.assert_allclose(onnx.numpy_helper.to_array(inits[dq.input[1]]), iq.scale.item(), rtol=1e-7)
    with torch.no_grad():
        ref = q.model(x)
    assert torch.equal(run_ort(path, x).argmax(1), ref.argmax(1))


def test_channel_factors_divide_form(tmp_path):
    """``channel_factors="divide"``: Q and DQ per channel (the fake-quantized input as PyTorch
    computes it) and the dequantized weights divided by the factors."""
    x = images(32)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("outlier-aware", w_bits=8, a_bits=8))
    path = export_onnx(q, tmp_path / "vit.onnx", example=x[:1], channel_factors="divide")
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.name == "blocks.0.mlp.fc2.input_quant/DequantizeLinear")
    assert list(inits[dq.input[1]].dims) == [192] and list(inits[dq.input[2]].dims) == [192]
    assert "Div" in ops(path)
    with torch.no_grad():
        ref = q.model(x)
    assert torch.equal(run_ort(path, x).argmax(1), ref.argmax(1))
    with pytest.raises(ExportError):
        export_onnx(q, tmp_path / "n.onnx", example=x[:1], channel_factors="multiply")


def test_tiny_cnn_round_trip(tmp_path):
    """ResNet-18 (random weights and BatchNorms) at 32 px: the same top-1 as PyTorch."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    x = images(64)
    q = prepare_model(model, x[:16], QuantConfig(w_bits=8, a_bits=8))
    path = export_onnx(q, tmp_path / "cnn.onnx", example=x[:1])
    res = check_onnx(q, path, x[16:], batch_size=16)
    assert res["agreement"] == 100.0, res
    kinds = ops(path)
    assert kinds.count("QuantizeLinear") == len(act_quantizers(q))
    n_layers = sum(1 for m in q.model.modules() if type(m).__name__ in ("QConv2d", "QLinear"))
    assert kinds.count("DequantizeLinear") == len(act_quantizers(q)) + n_layers


FAMILIES = {  # id -> (builder, image size, adapter)
    "swin": (tiny_swin, 32, "swin"),
    "levit": (tiny_levit, 64, "levit"),
    "levit_conv": (lambda: tiny_levit(use_conv=True), 64, "levit"),
    "torchvision_vit": (tiny_torchvision_vit, 32, "torchvision_vit"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformer_family_round_trip(tmp_path, family):
    """timm Swin (shifted-window mask, patch merging), timm LeViT in linear and conv mode
    (folded BatchNorms, attention biases, distilled head) and torchvision's ViT (packed
    in_proj): the same top-1 as PyTorch and the same logits up to float32 reassociation
    (seed 0: no sample of any family has a rounding tie), every Linear/Conv's weights as
    integers and one Q/DQ pair per activation quantizer."""
    if family == "torchvision_vit":
        pytest.importorskip("torchvision")
    build, size, adapter = FAMILIES[family]
    x = images(40, size=size)
    q = prepare_model(build(), x[:16], QuantConfig(w_bits=8, a_bits=8))
    assert q.family == adapter
    path = export_onnx(q, tmp_path / f"{family}.onnx", example=x[:1])
    with torch.no_grad():
        ref = q.model(x[16:])
    row_diff = (run_ort(path, x[16:]) - ref).abs().amax(1)
    assert row_diff.median().item() < 1e-5 * ref.abs().max().item(), row_diff
    res = check_onnx(q, path, x[16:], batch_size=7, reference=ref)  # batches 7, 7, 7, 3: dynamic batch
    assert res["agreement"] == 100.0 and res["images"] == 24, res

    model = onnx.load(str(path))
    kinds = ops(path)
    assert kinds.count("QuantizeLinear") == len(act_quantizers(q))
    n_layers = sum(1 for m in q.model.modules() if type(m).__name__ in ("QConv2d", "QLinear"))
    assert kinds.count("DequantizeLinear") == len(act_quantizers(q)) + n_layers
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    n_int = sum(t.data_type == TP.UINT8 and t.name.endswith(".weight.quantized") for t in model.graph.initializer)
    assert n_int == n_layers


def test_efficientnet_same_padding_and_depthwise(tmp_path):
    """tf_efficientnet_lite0: "same"-padded stride-2 and depthwise convolutions. Its random
    logits are close together, so a rounding tie that float reassociation (onnxruntime's
    convolution order) tips the other way can change a top-1: most, not all, agree."""
    x = images(40)
    q = prepare_model(tiny_cnn(), x[:16], QuantConfig(w_bits=8, a_bits=8))
    path = export_onnx(q, tmp_path / "cnn.onnx", example=x[:1])
    res = check_onnx(q, path, x[16:])
    assert res["agreement"] >= 90.0 and res["mean_abs_diff"] < 0.05, res
    kinds = ops(path)
    assert kinds.count("QuantizeLinear") == len(act_quantizers(q)) and "Pad" in kinds
    n_conv = sum(1 for m in q.model.modules() if type(m).__name__ in ("QConv2d", "QConv2dSame"))
    assert kinds.count("DequantizeLinear") == len(act_quantizers(q)) + n_conv + 1  # + the classifier's weights


@pytest.mark.parametrize("form,consumers", [("weights", {"Sub"}), ("output", {"MatMul", "Conv", "Gemm"})])
def test_bias_correction_forms(tmp_path, form, consumers):
    """``weights``: (DQ(W) - mu_q) * r + mu, bit-identical weights; ``output``: DQ feeds the
    MatMul/Conv directly and the shift is a term on the output. Both agree with PyTorch."""
    x = images(40)
    q = prepare_model(tiny_vit(), x[:16], QuantConfig(w_bits=8, a_bits=8))
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1], bias_correction=form)
    graph = onnx.load(str(path)).graph
    weight_dq = [n.output[0] for n in graph.node if n.name.endswith(".weight/DequantizeLinear")]
    used_by = {n.op_type for n in graph.node for i in n.input if i in weight_dq}
    assert len(weight_dq) == 10 and used_by and used_by <= consumers
    assert ("ReduceSum" in ops(path)) == (form == "output")
    res = check_onnx(q, path, x[16:])
    assert res["agreement"] == 100.0 and res["mean_abs_diff"] < 1e-3, res
    with pytest.raises(ExportError):
        export_onnx(q, tmp_path / "n.onnx", example=x[:1], bias_correction="both")


def test_4bit_weights_make_a_smaller_file(tmp_path):
    x = images(16)
    sizes = {}
    for bits in (8, 4):
        q = prepare_model(tiny_vit(embed_dim=96), x, QuantConfig(w_bits=bits, a_bits=8))
        sizes[bits] = export_onnx(q, tmp_path / f"w{bits}.onnx", example=x[:1]).stat().st_size
    fp = tmp_path / "fp.onnx"
    from evolq.export import export_float_onnx

    export_float_onnx(tiny_vit(embed_dim=96), fp, example=x[:1])
    assert sizes[8] < 0.4 * fp.stat().st_size and sizes[4] < 0.7 * sizes[8]


def test_edge_bits_export_as_8bit_integers(tmp_path):
    """``edge_bits=8`` at W4A8: the patch embedding and the head are stored as uint8, every
    other layer as uint4, and onnxruntime agrees with PyTorch."""
    x = images(48)
    model = tiny_vit()
    torch.nn.init.normal_(model.head.weight, std=0.2)  # timm starts the head at zero
    q = prepare_model(model, x[:24], QuantConfig(w_bits=4, a_bits=8, edge_bits=8))
    path = export_onnx(q, tmp_path / "edge.onnx", example=x[:1])
    types = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer
             if t.name.endswith(".weight.quantized")}
    assert types.pop("patch_embed.proj.weight.quantized") == types.pop("head.weight.quantized") == TP.UINT8
    assert types and set(types.values()) == {TP.UINT4}
    assert check_onnx(q, path, x[24:], batch_size=8)["agreement"] == 100.0


def test_activation_bits_below_8_are_clipped(tmp_path):
    x = images(32)
    q = prepare_model(tiny_vit(), x[:16], QuantConfig(w_bits=6, a_bits=6))
    path = export_onnx(q, tmp_path / "a6.onnx", example=x[:1])
    assert ops(path).count("Clip") == len(act_quantizers(q))
    with torch.no_grad():
        ref = q.model(x[16:])
    assert torch.equal(run_ort(path, x[16:]).argmax(1), ref.argmax(1))


# --------------------------------------------------------------------------- bad input
def test_uncalibrated_model(tmp_path):
    q = wrap_model(tiny_vit(), QuantConfig())
    with pytest.raises(ExportError) as e:
        export_onnx(q, tmp_path / "m.onnx", example=images(1))
    assert "never calibrated" in one_line(e)
    assert no_files(tmp_path)


def test_log2_probabilities_are_refused_by_name(tmp_path):
    x = images(8)
    q = prepare_model(tiny_vit(), x, QuantConfig(attn_probs="log2"))
    with pytest.raises(ExportError) as e:
        export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    assert "blocks.0.attn.probs_quant" in one_line(e) and "log2" in str(e.value)
    assert no_files(tmp_path)


def test_a_quantizer_type_lowers_as_its_nearest_registered_class(tmp_path):
    """The ONNX lowerings are found by type: a quantizer class without its own lowering
    exports as its registered base class; registering one (what a new regime's module in
    evolq/export/onnx/ does) takes over for that class."""
    from evolq.export.onnx.exporter import ACTIVATIONS, lowers_activation
    from evolq.quant import UniformQuantizer

    class Derived(UniformQuantizer):
        pass

    x = images(24)
    q = prepare_model(tiny_vit(), x[:16], QuantConfig(w_bits=8, a_bits=8))
    name = "blocks.1.attn.v_quant"
    aq = q.model.get_submodule(name)
    assert type(aq) is UniformQuantizer
    aq.__class__ = Derived
    got = run_ort(export_onnx(q, tmp_path / "a.onnx", example=x[:1]), x[16:])
    with torch.no_grad():
        assert torch.equal(got.argmax(1), q.model(x[16:]).argmax(1))

    @lowers_activation(Derived)
    def refuse(quantizer, x_ndim, qname):
        raise ExportError(f"{qname}: no form of its own")

    try:
        with pytest.raises(ExportError) as e:
            export_onnx(q, tmp_path / "b.onnx", example=x[:1])
        assert one_line(e) == f"{name}: no form of its own"
    finally:
        ACTIVATIONS.pop(Derived)
    assert export_onnx(q, tmp_path / "b.onnx", example=x[:1]).is_file()


@pytest.mark.parametrize("opset,bits,needle", [(20, 4, "opset >= 21"), (12, 8, "13..21"), (22, 8, "13..21")])
def test_opset_too_low_for_the_bit_width(tmp_path, opset, bits, needle):
    x = images(8)
    q = prepare_model(tiny_vit(), x, QuantConfig(w_bits=bits))
    with pytest.raises(ExportError) as e:
        export_onnx(q, tmp_path / "m.onnx", opset=opset, example=x[:1])
    assert needle in one_line(e)
    assert no_files(tmp_path)
    if bits == 8 and opset == 12:  # 8 bits are fine from opset 13
        assert export_onnx(q, tmp_path / "m.onnx", opset=13, example=x[:1]).is_file()


def test_unwritable_path_and_interrupted_write(tmp_path):
    x = images(8)
    q = prepare_model(tiny_vit(), x, QuantConfig())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError) as e:
        export_onnx(q, tmp_path / "file" / "m.onnx", example=x[:1])
    assert "cannot write" in one_line(e)
    with pytest.raises(ExportError) as e:
        export_onnx(q, tmp_path, example=x[:1])  # a folder
    assert "folder" in one_line(e)

    def boom(tmp, final):
        raise OSError(28, "No space left on device")

    replace_hooks.append(boom)
    try:
        with pytest.raises(ExportError) as e:
            export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    finally:
        replace_hooks.remove(boom)
    assert "No space left" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no partial or temporary file


# --------------------------------------------------------------------------- command line
@pytest.fixture
def saved_run(tmp_path):
    """A saved tiny ViT (224 px input, 49 tokens) and a 6-image labels.csv folder."""
    from PIL import Image

    kw = dict(patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    model = tiny_vit(**kw, img_size=224)
    q = prepare_model(model, torch.randn(8, 3, 224, 224), QuantConfig(), arch="vit_tiny_patch16_224")
    save_quantized(q, tmp_path / "run" / "model", model_kwargs=dict(kw, img_size=224))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,label"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append(f"{i}.png,{i}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "run" / "model", data


def test_cli_export_check_json(saved_run, tmp_path, capsys):
    model_dir, data = saved_run
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(model_dir), "--out", str(out), "--check", "--json", "--data", str(data)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["agreement"] == 100.0 and res["images"] == 3  # odd labels: the evaluation split
    assert res["bytes"] == out.stat().st_size
    assert {"max_abs_diff", "top1_torch", "top1_runtime", "floor", "kl", "integer_kernels", "float_kernels"} <= set(res)


def test_cli_bad_input_exit_2(saved_run, tmp_path, capsys):
    model_dir, _ = saved_run
    empty = tmp_path / "empty"
    empty.mkdir()
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    cases = [
        [str(empty), "--out", str(out_dir / "a.onnx")],  # not a saved model
        [str(model_dir), "--out", str(out_dir / "b.onnx"), "--opset", "11"],
        [str(model_dir), "--out", str(tmp_path / "run" / "model" / "evolq.json" / "c.onnx")],  # parent is a file
        [str(model_dir), "--out", str(out_dir / "d.onnx"), "--weights", "w.safetensors"],  # --weights without --model
        [str(model_dir), "--out", str(out_dir / "e.onnx"), "--model", "resnet18"],  # another architecture
    ]
    for args in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("evolq: error: ") and err.count("\n") == 1, err
    assert no_files(out_dir)
