"""``evolq export``: a saved quantized model as an ONNX QDQ file or a pt2 program; ``--check``
runs it in its runtime against the PyTorch model, ``--bench`` times it against its FP32."""
from __future__ import annotations

import json
from pathlib import Path

from .shared import check_positive


def add_parser(sub):
    px = sub.add_parser("export", help="a saved quantized model (RUN_DIR/model) as an ONNX QDQ file or a torch.export "
                                       "program (pt2); --check runs it in its runtime against the PyTorch model, "
                                       "--bench times it against the same model's FP32")
    px.add_argument("model_dir", help="folder written by evolq quantize (RUN_DIR/model) or save_quantized")
    px.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    px.add_argument("--format", default="onnx", choices=("onnx", "pt2"),
                    help="onnx (QDQ graph for onnxruntime / OpenVINO; default) or pt2 (torch.export program in PT2E "
                         "form for PyTorch's x86 int8 path; deploy regime only)")
    px.add_argument("--runtime", default=None, choices=("onnxruntime", "openvino", "inductor"),
                    help="runtime of --check/--bench (default: onnxruntime for onnx, inductor for pt2)")
    px.add_argument("--model", default=None, help="build the float model from this name (timm name or "
                                                  "torchvision:NAME) instead of the saved architecture")
    px.add_argument("--weights", default=None, help="with --model: local weights file of the float model")
    px.add_argument("--opset", type=int, default=21, help="ONNX opset (13-21; 4-bit weights need 21; default 21)")
    px.add_argument("--check", action="store_true", help="run the file in its runtime (CPU) on the evaluation images: "
                                                         "top-1 of both, agreement, float floor, kernels executed")
    px.add_argument("--bench", action="store_true", help="time the file against the same model's FP32 in the same "
                                                         "runtime: batch 32 and 1, 2 and 1 threads, alternating pairs")
    px.add_argument("--pairs", type=int, default=5, help="with --bench: timed pairs per setting (default 5)")
    px.add_argument("--threads", type=int, default=2, help="with --check: runtime threads (default 2)")
    px.add_argument("--data", help="with --check: image folder (default: the bundled ImageNet sample, odd labels)")
    px.add_argument("--limit", type=int, default=None, help="with --check: evaluation images (default: all)")
    px.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")


def _print_summary(out, path, args, runtime):
    print(f"wrote {path} ({out['bytes'] / 1e6:.2f} MB, {args.format})")
    if args.check:
        print(f"{runtime} vs PyTorch on {out['images']} images: top-1 PyTorch {out['top1_torch']:.2f}%, {runtime} "
              f"{out['top1_runtime']:.2f}%; agreement {out['agreement']:.2f}% (float floor {out['floor']:.2f}%), "
              f"KL {out['kl']:.4f}")
        print(f"integer kernels: {out['integer_kernels'] or 'none'}; float kernels: {out['float_kernels'] or 'none'}")
        if out.get("matmulnbits"):
            print(f"MatMulNBits {out['matmulnbits']} of {out['quantized_layers']} quantized layers; float matmuls "
                  f"{out['float_matmuls']} (attention products and float layers)")
        if out.get("memory"):
            m = out["memory"]
            print(f"resident memory: {m['after_mb']:.0f} MB after creating the session ({m['session_mb']:+.0f} MB)")
    if args.bench:
        print(f"{out['cpu']} ({', '.join(out['cpu_flags'])})")
        for r in out["bench"]:
            s = r["speedup"]
            vs = r.get("vs_int8_qdq")
            extra = (f"; int8 QDQ export {r['int8_qdq_ms']:.1f} ms, this file {vs['median']:.2f}x its time"
                     if vs else "")
            print(f"batch {r['batch']:>3}, {r['threads']} threads: FP32 {r['fp32_ms']:.1f} ms, "
                  f"int8 {r['int8_ms']:.1f} ms, speedup {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}){extra}")


def run(args) -> int:
    from ..errors import ExportError
    from ..export import FORMATS
    from ..export.runtimes import FORMAT_RUNTIMES, get_runtime
    from ..io import load_quantized

    if args.weights and not args.model:
        raise ExportError("--weights needs --model (the float architecture the weights belong to)")
    check_positive(args, ("limit", "pairs", "threads"))
    runtime = args.runtime or FORMAT_RUNTIMES[args.format][0]
    if args.check or args.bench:
        get_runtime(runtime, args.format)  # a missing runtime or a wrong pairing fails before any work
    model = None
    if args.model:
        from ..models import create_model, load_model

        model = load_model(args.model, args.weights, hub=False) if args.weights else create_model(args.model)
    qmodel = load_quantized(args.model_dir, model=model)
    opts = {"opset": args.opset} if args.format == "onnx" else {}
    path = FORMATS[args.format](qmodel, args.out, **opts)
    out = {"model": qmodel.arch, "out": str(path), "format": args.format, "bytes": path.stat().st_size,
           "regime": getattr(qmodel.config, "regime", "fq-vit")}
    if args.format == "onnx":
        out["opset"] = args.opset
    if args.check or args.bench:
        from ..data import assets_dir, load_images
        from ..models import model_transform

        data = Path(args.data) if args.data else assets_dir() / "imagenet-sample"
        limit = args.limit if args.check else 1
        xe, ye = load_images(data, model_transform(qmodel.model), "eval", limit=limit, progress=not args.json)
        if args.check:
            from ..export.check import check_export

            out.update(check_export(qmodel, path, args.format, runtime, xe, ye, threads=args.threads))
        if args.check:
            from ..export.check import session_memory

            out["memory"] = session_memory(path, args.format, runtime, args.threads)
        if args.bench:
            from ..export.check import bench_export

            compare = {}
            if getattr(qmodel.config, "weight_only", False) and args.format == "onnx":  # vs today's int8 QDQ export
                import tempfile

                from ..export.check import int8_twin

                xc, _ = load_images(data, model_transform(qmodel.model), "calib", limit=32, progress=not args.json)
                twin_dir = tempfile.mkdtemp(prefix="evolq-int8-")
                compare["int8_qdq"] = int8_twin(qmodel, xc, Path(twin_dir) / "int8_qdq.onnx")
            b = bench_export(qmodel, path, args.format, runtime, xe[0], pairs=args.pairs, compare=compare)
            out.update({"speedup": b["speedup"], "cpu_flags": b["cpu"]["flags"], "cpu": b["cpu"]["model"],
                        "bench": b["runs"]})
    if args.json:
        print(json.dumps(out))
        return 0
    _print_summary(out, path, args, runtime)
    return 0
