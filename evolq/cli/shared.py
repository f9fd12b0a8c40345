"""What more than one verb does with its parsed arguments: the ``QuantConfig`` the model arguments
describe (``quant_config``), the model and images they name (``load_inputs``), the one-line
check of positive counts, the metrics table, and Ray started or joined once (``ray_connected``)."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from ..config import QuantConfig
from ..demo import short_metrics, width_counts
from ..errors import EvolQError

__all__ = ["quant_config", "load_inputs", "check_positive", "short_metrics", "width_counts", "table",
           "ray_connected"]


def _read_layer_bits(path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as e:
        raise EvolQError(f"--layer-bits: cannot read {str(path)!r} ({e.strerror or e})") from None
    except ValueError as e:
        raise EvolQError(f"--layer-bits: {str(path)!r} is not JSON ({str(e).splitlines()[0][:80]})") from None
    if isinstance(spec, dict) and isinstance(spec.get("allocation"), dict):  # an evolq allocate report.json
        spec = spec["allocation"]
    if not isinstance(spec, dict):
        raise EvolQError(f"--layer-bits: {str(path)!r} must hold a JSON object of layer names to bits")
    return spec


def quant_config(args) -> QuantConfig:
    """The ``QuantConfig`` that parsed ``eval`` / ``quantize`` arguments describe."""
    extra = {} if args.linear_input_strength is None else {"linear_input_strength": args.linear_input_strength}
    if args.smooth_strength is not None:
        extra["smooth_strength"] = args.smooth_strength
    if args.deploy_weights is not None:
        extra["deploy_weights"] = args.deploy_weights
    if getattr(args, "layer_bits", None):
        extra["layer_bits"] = _read_layer_bits(args.layer_bits)
    if getattr(args, "w_group", None) is not None:
        extra["w_group"] = args.w_group
    for name in ("rotation", "rotation_seed", "rotation_mlp"):
        if getattr(args, name, None) is not None:
            extra[name] = getattr(args, name)
    return QuantConfig.preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, act_observer=args.act_observer,
                              attn_probs=args.attn_probs, ptf=not args.no_ptf,
                              bias_correction=not args.no_bias_correction and args.preset != "deploy", start=args.start,
                              start_options=dict(args.start_arg), edge_bits=args.edge_bits or None, **extra)


def check_positive(args, names):
    """One line (``--NAME must be positive``) for the first of ``names`` set below 1; unset (None) passes."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvolQError(f"--{name.replace('_', '-')} must be positive, got {v}")


def load_inputs(args, quiet=False):
    """The model, the ``QuantConfig``, the calibration images and the evaluation images and labels
    that the model arguments name: ``(model, quant, xc, xe, ye)``."""
    from ..data import assets_dir, load_images
    from ..models import load_model, model_transform

    quant = quant_config(args)
    check_positive(args, ("calib_size", "limit"))
    model = load_model(args.model, args.weights)
    tf = model_transform(model)
    data = Path(args.data) if args.data else assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=args.calib_size, progress=not quiet)
    xe, ye = load_images(data, tf, "eval", limit=args.limit, progress=not quiet)
    return model, quant, xc, xe, ye


def table(rows) -> str:
    """top-1, top-5, agreement and KL of ``(name, metrics)`` rows."""
    lines = [f"{'model':<12}{'top1':>8}{'top5':>8}{'agree':>8}{'KL':>9}"]
    for name, m in rows:
        lines.append(f"{name:<12}{m['top1']:8.2f}{m['top5']:8.2f}{m['agreement']:8.2f}{m['kl']:9.4f}")
    return "\n".join(lines)


@contextmanager
def ray_connected(*configs):
    """Start or join Ray for each config's ``actors`` on entering (``evolq.api.connect_ray``), so
    an unusable cluster fails before anything is loaded or written; its warning is printed once,
    as one line."""
    import warnings

    from ..api import connect_ray
    from ..scaleout import ScaleOutWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ScaleOutWarning)
        for config in configs:
            connect_ray(config)
    for w in seen:
        if issubclass(w.category, ScaleOutWarning):
            print(f"evolq: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ScaleOutWarning)  # quantize_model's connect_ray finds Ray up
        yield
