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
from ..runner import Suite, cpu_info, register

DEMO_KEYS = ("search_seconds", "evaluations", "fp32", "start", "final", "calib_images", "eval_images")


def run_demo(run):
    extra = shlex.split(run.args.demo_args)
    with tempfile.TemporaryDirectory() as tmp:
        r = timed_command([sys.executable, "-m", "evolq", "demo", "--out", tmp, *extra])
        print(r["proc"].stdout)
        if r["proc"].returncode:
            print(r["proc"].stderr[-2000:], file=sys.stderr)
            return r["proc"].returncode
        rep = json.loads((Path(tmp) / "report.json").read_text())
    run.save({"command": "evolq demo " + " ".join(extra), "wall_seconds": r["wall"], **{k: rep[k] for k in DEMO_KEYS},
              "stdout": r["proc"].stdout, "load_before": r["load_before"], "load_after": r["load_after"],
              "cpus": os.cpu_count(), "threads_env": os.environ.get("OMP_NUM_THREADS"),
              "platform": platform.platform()})


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
    name="demo", what="the demo (`evolq demo`) in a fresh process: wall time and figures",
    doc="The demo (`evolq demo`) in a fresh process: wall time, the figures it printed and the machine's load, so "
        "the time quoted in the README and the quickstart comes from this file.",
    run=run_demo, order=200, args=[(("--demo-args",), {"default": "", "help": "extra `evolq demo` arguments"})],
    results={"demo": ""}, smoke={"demo_args": "--passes 1 --cycles 1 --calib-size 16 --limit 8"}))
register(Suite(
    name="cli_eval",
    what="an `evolq eval --json` command run as a user would, its last line kept with the wall time, CPU and load",
    doc="An `evolq eval ... --json` command run as a user would: its last line kept with the wall time, the CPU and "
        "the load.",
    run=run_cli, order=201, out="cli_eval",
    args=[(("--command",), {"default": OFQ_EVAL, "help": "the evolq command (quoted, with --json)"})],
    results={"cli_eval_ofq_vit_tiny_w3a8": "--out cli_eval_ofq_vit_tiny_w3a8"},
    smoke={"command": "evolq eval --model vit_tiny_patch16_224 --calib-size 8 --limit 8 --json"}))
