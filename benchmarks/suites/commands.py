"""Commands run as a user runs them, in a fresh process, their wall time and machine load kept with
what they printed, so a figure or a time quoted from a command has its JSON: ``demo`` (``evolq
demo``, the README's first command after install) and ``cli_eval`` (an ``evolq eval ... --json``
command, its last line kept)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from ..common import timed_command
from ..report import Col, Section, Table, f2
from ..runner import Suite, cpu_info, register

DEMO_KEYS = ("seconds", "steps", "settings", "rows", "allocation", "avg_bits", "budget", "allocation_evaluations",
             "allocation_full_evaluations", "allocation_generations", "allocation_choice", "ilp_allocation", "shipped",
             "commands")


def run_demo(run):
    extra = shlex.split(run.args.demo_args)
    with tempfile.TemporaryDirectory() as tmp:
        r = timed_command([sys.executable, "-m", "evolq", "demo", "--quiet", "--out", tmp, *extra])
        print(r["proc"].stdout)
        if r["proc"].returncode:
            print(r["proc"].stderr[-2000:], file=sys.stderr)
            return r["proc"].returncode
        rep = json.loads((Path(tmp) / "report.json").read_text())
    run.save({"command": shlex.join(["evolq", "demo", *extra]), "wall_seconds": round(r["wall"], 1),
              **{k: rep[k] for k in DEMO_KEYS if k in rep}, "stdout": r["proc"].stdout, "cpu": cpu_info(),
              "load_before": r["load_before"], "load_after": r["load_after"], "cpus": os.cpu_count(),
              "threads_env": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform()})


def _choice_text(d):
    """Which allocation the demo's calibration hold-out chose: the searcher's point or the ILP's."""
    c = d["allocation_choice"]
    kl = ", ".join(f"{'ILP (sensitivity + ILP at the budget)' if k == 'ilp' else k} {v:.4f}"
                   for k, v in c["holdout_kl"].items() if v is not None)
    won = "the ILP" if c["winner"] == "ilp" else c["winner"]
    return (f"The bits-per-layer row is chosen on the calibration hold-out ({c['holdout_images']} images, never the "
            f"evaluation split): KL {kl}; {won} won, and the row is its allocation.")


def demo_rows(d):
    return [{**r, "file": d["file"]} for r in d["rows"]]


def run_cli(run):
    cmd = shlex.split(run.args.command)
    if not cmd or "--json" not in cmd:
        raise SystemExit("--command: an evolq command with --json")
    exe = Path(sys.executable).parent / cmd[0]
    r = timed_command([str(exe) if exe.exists() else cmd[0], *cmd[1:]])
    lines = r["proc"].stdout.strip().splitlines()
    if r["proc"].returncode or not lines:
        sys.stderr.write(r["proc"].stderr[-4000:])
        return r["proc"].returncode or 1
    run.save({"command": shlex.join(cmd), "exit": 0, "wall_seconds": round(r["wall"], 1), "cpu": cpu_info(),
              "load_1m_before": round(r["load_before"][0], 2), "load_1m_after": round(r["load_after"][0], 2),
              "output": json.loads(lines[-1])})
    print(json.dumps(run.doc["output"].get("quantized", {})))


OFQ_EVAL = ("evolq eval --model vit_tiny_patch16_224 --w-bits 3 --a-bits 8 --preset outlier-aware --edge-bits 8 "
            "--start ofq --json")
register(Suite(
    name="demo", what="the demo (`evolq demo`, `make demo`) in a fresh process: wall time, its table, the machine",
    doc="The demo (`evolq demo`) in a fresh process, as `make demo` runs it: wall time, the table it printed (FP32, "
        "uniform W3A8, the same packed size with bits allocated per layer, the W8A8 deploy model, the shipped pt2 "
        "file's size and speedup), the CPU and the machine's load, so the time and figures quoted in the README and "
        "the quickstart come from this file. Time it alone on the machine (a shared CPU slows it).",
    run=run_demo, order=200, args=[(("--demo-args",), {"default": "", "help": "extra `evolq demo` arguments"})],
    results={"demo": ""},
    smoke={"demo_args": "--calib-size 24 --limit 16 --evaluations 60 --fitness-images 8 --no-export"},
    report=[Section("demo", [
        "## The demo (`evolq demo`, `benchmarks/suites/commands.py`)",
        lambda d: f"`{d['command']}` in a fresh process: {d['wall_seconds']:.0f} s wall on {d['cpu']['model']} "
                  f"({d['cpus']} cores, 1-minute load {d['load_before'][0]:.1f} before, {d['load_after'][0]:.1f} "
                  f"after), {d['settings']['calib_images']} calibration and {d['settings']['eval_images']} evaluation "
                  f"images; allocation menu {d['settings']['menu']}, searcher {d['settings']['searcher']}, "
                  f"{d['allocation_evaluations']:.0f} evaluations on {d['settings']['fitness_images']} images "
                  f"(`demo.json`).",
        lambda d: None if not d.get("allocation_choice") else _choice_text(d),
        Table([Col("model", "model"), Col("top-1", "top1", f2), Col("top-5", "top5", f2),
               Col("agreement", "agreement", f2), Col("KL", "kl", "{:.4f}"), Col("weights MB", "weights_mb", f2)],
              demo_rows),
        lambda d: None if not d.get("shipped") else
        f"Shipped: `{d['shipped']['file']}`, {d['shipped']['mb']:.1f} MB, {d['shipped']['speedup']:.2f}x its own "
        f"FP32 compile in {d['shipped']['runtime']} (batch {d['shipped']['batch']}, {d['shipped']['threads']} "
        f"threads, median of {d['shipped']['pairs']} alternating pairs: {d['shipped']['fp32_ms']:.0f} ms -> "
        f"{d['shipped']['int8_ms']:.0f} ms)."])]))
register(Suite(
    name="cli_eval",
    what="an `evolq eval --json` command run as a user would, its last line kept with the wall time, CPU and load",
    doc="An `evolq eval ... --json` command run as a user would: its last line kept with the wall time, the CPU and "
        "the load.",
    run=run_cli, order=201, out="cli_eval",
    args=[(("--command",), {"default": OFQ_EVAL, "help": "the evolq command (quoted, with --json)"})],
    results={"cli_eval_ofq_vit_tiny_w3a8": "--out cli_eval_ofq_vit_tiny_w3a8"},
    smoke={"command": "evolq eval --model vit_tiny_patch16_224 --calib-size 8 --limit 8 --json"}))
