"""The demo (``evolq demo``, ``evolq.demo.run``): ViT-Tiny on the bundled assets in under 5
minutes on 2 cores. Its rows: FP32, uniform W3A8, the same packed size with bits allocated per
layer (EvoPress's evolution, ``evopress``, against the sensitivity + ILP answer it starts from: the
calibration hold-out chooses between them, ``allocation_verdict``), the W8A8 deploy model; that
model exported as pt2 and timed against its FP32; the table, and the ``evolq`` commands behind
each row, at the demo's sizes and at full size.

The demo's settings (``DEMO``, ``DemoSettings``), its commands (``demo_commands``) and the
configs its rows are built from (``uniform_config``, ``deploy_config``, ``allocation_config``)
are this module's; tests/test_demo.py checks that the printed commands parse to these very configs.
It sits above api and export and below the command line, which only parses ``evolq demo``'s
arguments into a ``DemoSettings`` and calls ``run``.
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import AllocationConfig, QuantConfig, field_default
from .errors import ConfigError

__all__ = ["DEMO", "DemoSettings", "run", "demo_commands", "uniform_config", "deploy_config", "allocation_config",
           "allocation_verdict", "verdict_line", "demo_table", "quiet_third_party", "short_metrics", "width_counts"]

ARCH = "vit_tiny_patch16_224"

# the uniform row's regime is the lowest calibration-pool KL at W3A8
# (`python -m benchmarks start_choices`, benchmarks/suites/start_choices.py); the sizes keep the demo under
# 5 minutes on 2 cores (`python -m benchmarks demo`, benchmarks/results/demo.json); the allocation: evopress
# (its default stages, 1, 4 and 32 of the 32 fitness images) for 150 full-fitness equivalents by images seen, the
# sensitivity pass (about 100) included, with the ILP point competing on the hold-out (compare_additive)
DEMO = {"preset": "outlier-aware", "start": "gptq", "edge_bits": 8, "w_bits": 3, "calib_size": 96, "limit": 250,
        "menu": "3,4,8", "searcher": "evopress", "evaluations": 150, "fitness_images": 32, "tables": "rtn"}


@dataclass(frozen=True)
class DemoSettings:
    """What ``evolq demo``'s flags set: the sizes of the rows (``calib_size`` calibration images,
    ``limit`` evaluation images), the allocation's ``menu``, ``searcher``, ``evaluations``,
    ``fitness_images`` and ``tables``, the timed ``pairs`` of the speed measurement, ``export``
    (False: no pt2 export nor timing), ``out`` (a folder for report.json and the models) and
    ``progress`` (progress bars)."""

    calib_size: int = DEMO["calib_size"]
    limit: int = DEMO["limit"]
    menu: str = DEMO["menu"]
    searcher: str = DEMO["searcher"]
    evaluations: int = DEMO["evaluations"]
    fitness_images: int = DEMO["fitness_images"]
    tables: str = DEMO["tables"]
    pairs: int = 3
    export: bool = True
    out: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("calib_size", "limit", "evaluations", "fitness_images", "pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DemoSettings.{name} must be a positive integer, got {v!r}")


def short_metrics(m) -> dict:
    """top1, top5, agreement and KL of one ``evaluate_qmodel`` entry (what reports keep)."""
    return {k: m[k] for k in ("top1", "top5", "agreement", "kl") if k in m}


def width_counts(allocation) -> list:
    """``[(width, layers)]`` of an allocation (layer -> width), the widths in text order."""
    counts = {}
    for o in allocation.values():
        counts[o] = counts.get(o, 0) + 1
    return sorted(counts.items(), key=lambda kv: str(kv[0]))


def uniform_config() -> QuantConfig:
    """The uniform row's regime (the allocated row starts from it too): ``evolq eval`` with
    ``demo_commands()["uniform"]``'s flags."""
    return QuantConfig.preset(DEMO["preset"], w_bits=DEMO["w_bits"], a_bits=8, start=DEMO["start"],
                              edge_bits=DEMO["edge_bits"])


def deploy_config() -> QuantConfig:
    """The W8A8 deploy row's regime: ``demo_commands()["deploy"]``'s."""
    return QuantConfig.preset("deploy", w_bits=8, a_bits=8, bias_correction=False)


def allocation_config(settings: DemoSettings, budget: str) -> AllocationConfig:
    """The allocated row's search: ``demo_commands(settings, budget)["allocated"]``'s. The additive
    answer (sensitivity + ILP at the budget) competes on the hold-out (``compare_additive``), so the
    row is whichever of the searcher's point and the ILP's the calibration hold-out rates better."""
    return AllocationConfig(menu=settings.menu, budget=budget, searcher=settings.searcher,
                            evaluations=settings.evaluations, fitness_images=settings.fitness_images,
                            tables=settings.tables, compare_additive=True, progress=settings.progress)


def allocation_verdict(report: dict, searcher: str) -> dict:
    """Which allocation the calibration hold-out chose, from an ``allocate_bits`` report made with
    ``compare_additive``: the searcher's best point (the lowest hold-out KL among its front points
    other than the ILP's) against the additive answer (``report["search"]["additive"]``, the ILP
    point at the budget), each ranked by (hold-out KL, fitness KL) as the engine ranks them.

    Returns ``{"searcher", "holdout_kl": {searcher: KL or None, "ilp": KL or None}, "winner"
    (searcher or "ilp"), "holdout_images"}``; the searcher's KL is None where it ended on the ILP
    point, the ILP's where there is no additive answer (a searcher without sensitivities). With
    searcher ``"ilp"`` the winner is the ILP's chosen point. Raises ``RuntimeError`` where the model
    built (``report["chosen"]``) is not the winner's (the engine and this choice disagree)."""
    chosen = report["chosen"]
    add = report["search"].get("additive") or {}
    hold = add.get("holdout_loss")
    out = {"searcher": searcher, "holdout_images": report.get("calibration", {}).get("holdout_images")}
    if searcher == "ilp":  # the ILP searcher's own choice among its points
        return {**out, "winner": "ilp", "holdout_kl": {"ilp": chosen.get("holdout_loss")}}
    if hold is None:  # no additive answer (a searcher without sensitivities)
        return {**out, "winner": searcher, "holdout_kl": {searcher: chosen.get("holdout_loss"), "ilp": None}}
    others = [p for p in report["front"] if p.get("holdout_loss") is not None and p["genes"] != add["genes"]]
    best = min(others, key=lambda p: (p["holdout_loss"], p["loss"]), default=None)
    if best is None or (hold, add["loss"]) <= (best["holdout_loss"], best["loss"]):
        winner, genes = "ilp", add["genes"]
    else:
        winner, genes = searcher, best["genes"]
    if genes != chosen["genes"]:
        raise RuntimeError(f"the allocation built is not the hold-out's choice ({winner}): the engine's choice and "
                           f"the demo's disagree")
    return {**out, "winner": winner, "holdout_kl": {searcher: None if best is None else best["holdout_loss"],
                                                     "ilp": hold}}


def verdict_line(verdict: dict) -> str:
    """The demo's line on which allocation the hold-out chose (``allocation_verdict``)."""
    s, kl, n = verdict["searcher"], verdict["holdout_kl"], verdict["holdout_images"]
    where = f"on the calibration hold-out ({n} images; never the evaluation split)" if n else "on the hold-out"
    ilp = "n/a" if kl["ilp"] is None else f"{kl['ilp']:.4f}"
    if s == "ilp":
        return f"bits per layer, KL {where}: the ILP (sensitivity + ILP) alone, {ilp}; the row is its allocation."
    if kl["ilp"] is None:
        return (f"bits per layer, KL {where}: {s} {kl[s]:.4f}, no ILP answer to compare ({s} measures no "
                f"sensitivities); the row is the {s} allocation.")
    if kl[s] is None:
        return (f"bits per layer, KL {where}: {s} found no point but the ILP's (KL {ilp}): the ILP won; the row is "
                f"the ILP allocation.")
    start = {"evopress": ", evopress's warm start", "nsga2": ", among nsga2's seeds"}.get(s, "")
    head = f"bits per layer, KL {where}: {s} {kl[s]:.4f}, ILP (sensitivity + ILP{start}) {ilp}"
    if verdict["winner"] == s:
        gain = f" ({100 * (1 - kl[s] / kl['ilp']):.0f}% lower)" if kl["ilp"] else ""
        return f"{head}: {s} won{gain}; the row is the {s} allocation."
    return (f"{head}: the ILP won: {s} found nothing the hold-out rates better at the demo's size and time; the row "
            f"is the ILP allocation.")


def demo_commands(settings, budget: str = "size-mb=S") -> dict:
    """The ``evolq`` commands behind the demo's rows (at the demo's sizes), at full size, and the
    ones that ship the models; ``settings``: a ``DemoSettings`` (or parsed ``evolq demo`` arguments)."""
    common = (f"--model {ARCH} --preset {DEMO['preset']} --edge-bits {DEMO['edge_bits']} --start {DEMO['start']} "
              f"--w-bits {DEMO['w_bits']} --a-bits 8")
    size = f"--calib-size {settings.calib_size} --limit {settings.limit}"
    kind, _, value = budget.partition("=")
    full_budget = f"{kind}={math.floor(float(value) * 1000) / 1000:.3f}" if value[:1].isdigit() else budget
    return {
        "uniform": f"evolq eval {common} {size}",
        "allocated": f"evolq allocate {common} --menu {settings.menu} --budget {budget} --searcher {settings.searcher} "
                     f"--evaluations {settings.evaluations} --fitness-images {settings.fitness_images} "
                     f"--tables {settings.tables} --compare-additive {size} --out runs/alloc",
        "deploy": f"evolq eval --model {ARCH} --preset deploy --w-bits 8 --a-bits 8 {size}",
        "allocated_full": f"evolq allocate {common} --menu 2,3,4,8 --budget {full_budget} --out runs/alloc_full",
        "ship": f"evolq quantize --model {ARCH} --preset deploy --w-bits 8 --a-bits 8 --passes 0 --out runs/w8",
        "ship_export": "evolq export runs/w8/model --format pt2 --out vit_w8.pt2 --check --bench",
        "ship_allocated": "evolq export runs/alloc/model --format onnx --out vit_mixed.onnx --check",
    }


def demo_table(rows) -> str:
    """The demo's table: ``(name, metrics, weights MB)`` rows."""
    lines = [f"{'model':<36}{'top1':>7}{'top5':>7}{'agree':>7}{'KL':>8}{'weights MB':>12}"]
    for name, m, mb in rows:
        lines.append(f"{name:<36}{m['top1']:7.2f}{m['top5']:7.2f}{m['agreement']:7.2f}{m['kl']:8.4f}{mb:12.2f}")
    return "\n".join(lines)


def _additive_allocation(report) -> dict | None:
    """The additive answer's allocation (layer -> width) from an ``allocate_bits`` report, or None."""
    add = report["search"].get("additive")
    pt = next((p for p in report["front"] if add and p["genes"] == add["genes"]), None)
    return None if pt is None else pt.get("allocation")


def _packed_bytes(qmodel, quant) -> float:
    """The packed size of ``qmodel`` at its layers' widths and groups (``evolq.problems.menu.model_bytes``)."""
    from .problems.menu import model_bytes

    return model_bytes(qmodel.model, quant)


# the export step's known harmless third-party notes (the only ones a fresh demo printed, torch 2.14, torchao 0.18):
# (logger, message start) of those logged, and (message start, category, module) of those warned
_KNOWN_LOGS = (
    # importing torchao registers its KernelPreference enum as a pytree constant, which torch now calls needless
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported"),
    # inductor's first C++ compile finds a CUDA toolkit on a machine without a GPU
    ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME="),
)
_KNOWN_WARNINGS = (
    # inductor's int8 lowering copies its zero-point tensor with torch.tensor(tensor)
    ("To copy construct from a tensor, it is recommended to use sourceTensor.detach().clone()", UserWarning,
     r"torch\._inductor\.mkldnn_lowerings"),
)


class _DropMessages(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.start)


@contextmanager
def quiet_third_party():
    """Silence exactly the export step's known harmless third-party notes (``_KNOWN_LOGS``, logged
    through torch's loggers; ``_KNOWN_WARNINGS``, Python warnings) while the block runs; every
    other warning and log line passes."""
    dropped = [(logging.getLogger(name), _DropMessages(start)) for name, start in _KNOWN_LOGS]
    for logger, f in dropped:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for message, category, module in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=module)
            yield
    finally:
        for logger, f in dropped:
            logger.removeFilter(f)


def _echo(text: str = "", *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _ship(dep, folder: Path, xe, pairs: int, echo) -> dict | None:
    """The deploy model exported as pt2 and timed against its FP32 in inductor; None (and one line
    on stderr) where the export extras are missing or the runtime fails."""
    try:
        with quiet_third_party():
            from .export import export_pt2
            from .export.check import bench_export

            path = export_pt2(dep, folder / "vit_tiny_w8a8.pt2")
            b = bench_export(dep, path, "pt2", "inductor", xe[0], batches=(32,), threads=(2,), pairs=pairs)
        r = b["runs"][0]
        return {"file": path.name, "mb": path.stat().st_size / 1e6, "speedup": r["speedup"]["median"],
                "fp32_ms": r["fp32_ms"], "int8_ms": r["int8_ms"], "cpu": b["cpu"]["model"],
                "cpu_flags": b["cpu"]["flags"], "runtime": "inductor", "batch": 32, "threads": 2, "pairs": pairs}
    except Exception as e:  # the export extras missing, or a runtime failure: the table still stands
        echo(f"evolq demo: the pt2 export or its timing failed ({type(e).__name__}: {str(e)[:200]}); "
             f"pip install -e '.[deploy]'", err=True)
        return None


def run(settings: DemoSettings | None = None, *, echo=None) -> dict:
    """Build the demo's rows, ship the W8A8 model (unless ``settings.export`` is False), print the
    table and the commands through ``echo(text, err=False)`` (default: stdout, stderr for ``err``),
    write report.json and the models to ``settings.out`` if set, and return the report."""
    import copy
    import tempfile

    from .api import allocate_bits, prepare_model
    from .data import assets_dir, load_images
    from .evaluate import evaluate_qmodel
    from .io import save_quantized, write_json
    from .models import load_model, model_transform

    settings = DemoSettings() if settings is None else settings
    echo = _echo if echo is None else echo
    t0, steps, progress = time.perf_counter(), {}, settings.progress
    n_steps = 5 if settings.export else 4
    quant, dquant = uniform_config(), deploy_config()
    hold = field_default(AllocationConfig, "holdout")
    echo(f"evolq demo: {ARCH} (real ImageNet weights), {settings.calib_size} calibration images of the bundled "
         f"sample (even labels; the allocation holds {hold:.0%} of them out), {settings.limit} evaluation images "
         f"(odd labels). Small settings, to end in minutes on 2 cores; the commands at the end reproduce each row, "
         f"and at full size.")

    def step(k, text):
        steps[k] = round(time.perf_counter() - t0, 1)
        echo(f"[{len(steps)}/{n_steps} {time.perf_counter() - t0:4.0f} s] {text}")

    step("load", "loading the model and the images")
    model = load_model(ARCH)
    tf = model_transform(model)
    data = assets_dir() / "imagenet-sample"
    xc, _ = load_images(data, tf, "calib", limit=settings.calib_size, progress=progress)
    xe, ye = load_images(data, tf, "eval", limit=settings.limit, progress=progress)
    fp32_mb = 4.0 * sum(p.numel() for p in model.parameters()) / 1e6

    step("uniform", f"uniform W{quant.w_bits}A8: {DEMO['preset']} regime, {quant.start} start, first layer and "
                    f"classifier at {DEMO['edge_bits']} bits")
    uni = prepare_model(copy.deepcopy(model), xc, quant, arch=ARCH, progress=progress)
    res_u, fp_logits = evaluate_qmodel(uni, xe, ye, progress=progress)
    uni_bytes = _packed_bytes(uni, quant)
    del uni
    budget = f"size-mb={uni_bytes / 1e6:.6f}"
    commands = demo_commands(settings, budget)
    alloc = allocation_config(settings, budget)

    step("allocate", f"bits per layer at the uniform model's packed size: allocate_bits (menu {alloc.menu}, "
                     f"{budget}, searcher {alloc.searcher}, <= {alloc.evaluations} evaluations on "
                     f"{alloc.fitness_images} images, tables {alloc.table_method(quant.start)}; the ILP point "
                     f"competes on the calibration hold-out), then the winner built and evaluated")
    aq, arep = allocate_bits(copy.deepcopy(model), xc, quant, alloc, arch=ARCH)
    verdict = allocation_verdict(arep, alloc.searcher if isinstance(alloc.searcher, str) else "search")
    res_a, _ = evaluate_qmodel(aq, xe, ye, fp_logits=fp_logits, progress=progress)
    mix = ", ".join(f"{n} at {o} bits" for o, n in width_counts(arep["allocation"]))
    spent = arep["search"]["spent"]

    step("deploy", "W8A8 deploy model (what CPU int8 kernels run: u8 inputs, s8 weights, SmoothQuant folded)")
    dep = prepare_model(copy.deepcopy(model), xc, dquant, arch=ARCH, progress=progress)
    res_d, _ = evaluate_qmodel(dep, xe, ye, fp_logits=fp_logits, progress=progress)
    dep_bytes = _packed_bytes(dep, dquant)

    out = Path(settings.out) if settings.out else None
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = out if out is not None else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    ship = None
    if settings.export:
        step("export", f"the W8A8 model as a pt2 program, timed against its FP32 in inductor (batch 32, 2 threads, "
                       f"{settings.pairs} alternating pairs; compiling both takes most of this step)")
        ship = _ship(dep, folder, xe, settings.pairs, echo)
    seconds = time.perf_counter() - t0

    rows = [("fp32", res_u["fp32"], fp32_mb),
            (f"W3A8 uniform ({quant.start}, edge 8)", res_u["quantized"], uni_bytes / 1e6),
            (f"same size, bits per layer ({'ILP' if verdict['winner'] == 'ilp' else verdict['winner']})",
             res_a["quantized"], arep["size_bytes"] / 1e6),
            ("W8A8 deploy (ships as int8)", res_d["quantized"], dep_bytes / 1e6)]
    echo()
    echo(demo_table(rows))
    echo(verdict_line(verdict))
    echo(f"bits per layer (menu {alloc.menu}): {mix}; {arep['avg_bits']:.2f} mean weight bits; {spent:.0f} fitness "
         f"evaluations (full-fitness equivalents by images seen, the sensitivities included; "
         f"{arep['search']['generations']} generations)")
    if ship is not None:
        echo(f"shipped: {ship['file']}, {ship['mb']:.1f} MB, {ship['speedup']:.2f}x faster than FP32 in inductor "
             f"(batch 32, 2 threads: {ship['fp32_ms']:.0f} -> {ship['int8_ms']:.0f} ms) on {ship['cpu']} "
             f"({', '.join(ship['cpu_flags'])})")
    echo("Evol-Q's block-scale search is not run: from the gptq and ofq starts it adds about 0 top-1 "
         "(benchmarks/results/start_points_vit_tiny_w3a8.json).")
    echo(f"top-1 on {xe.shape[0]} evaluation images; weights MB: the packed size (weights at their bits, scales, "
         f"float tensors), FP32 4 bytes per parameter; {seconds:.0f} s in all.")
    echo("\nEach row (fp32 and uniform from the first command):")
    for k in ("uniform", "allocated", "deploy"):
        echo(f"  {commands[k]}")
    echo("Full size (500 calibration images, every evaluation image; NSGA-II, 500 evaluations):")
    echo(f"  {commands['allocated_full']}")
    echo("Ship the int8 model (pt2 for torch.compile; --format onnx for onnxruntime), then the allocated one:")
    for k in ("ship", "ship_export", "ship_allocated"):
        echo(f"  {commands[k]}")
    report = {"model": ARCH, "seconds": seconds, "steps": steps,
              "settings": {"calib_images": int(xc.shape[0]), "eval_images": int(xe.shape[0]), "menu": alloc.menu,
                           "searcher": alloc.searcher, "compare_additive": alloc.compare_additive,
                           "evaluations": alloc.evaluations,
                           "fitness_images": alloc.fitness_images, "tables": alloc.table_method(quant.start),
                           "preset": DEMO["preset"], "start": quant.start, "edge_bits": DEMO["edge_bits"],
                           "w_bits": quant.w_bits},
              "rows": [{"model": n, **short_metrics(m), "weights_mb": round(mb, 4)} for n, m, mb in rows],
              "allocation": arep["allocation"], "avg_bits": arep["avg_bits"], "budget": budget,
              "allocation_choice": verdict, "ilp_allocation": _additive_allocation(arep),
              "allocation_evaluations": round(float(spent), 1),
              "allocation_full_evaluations": arep["search"]["evaluations"],
              "allocation_generations": arep["search"]["generations"], "shipped": ship, "commands": commands}
    if out is not None:
        write_json(out / "report.json", report)
        save_quantized(aq, out / "alloc_model")
        save_quantized(dep, out / "w8_model")
    if tmp is not None:
        tmp.cleanup()
    return report
