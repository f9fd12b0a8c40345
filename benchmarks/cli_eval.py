"""Run an ``evolq eval ... --json`` command as a user would and keep what it printed.

The command runs in a subprocess (the installed ``evolq`` entry point); its last stdout line
(one JSON object) is stored with the command, the wall time, the CPU (``cpu_info``) and the
1-minute load average before and after, so a figure quoted from a CLI run has its JSON.

    python benchmarks/cli_eval.py --out cli_eval_ofq_vit_tiny_w3a8.json -- \\
        evolq eval --model vit_tiny_patch16_224 --w-bits 3 --a-bits 8 --preset outlier-aware \\
        --edge-bits 8 --start ofq --json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runs as a script
    sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS  # noqa: E402
from evolq.export.bench import cpu_info  # noqa: E402
from evolq.io import write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="file name under benchmarks/results/")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the evolq command (after --)")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd or "--json" not in cmd:
        ap.error("give an evolq command with --json after --")
    exe = Path(sys.executable).parent / cmd[0]
    run = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(run, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the command failed (exit {proc.returncode})")
    res = {"command": shlex.join(cmd), "exit": proc.returncode, "wall_seconds": round(wall, 1), "cpu": cpu_info(),
           "load_1m_before": round(load0, 2), "load_1m_after": round(os.getloadavg()[0], 2),
           "output": json.loads(lines[-1])}
    write_json(RESULTS / args.out, res)
    print(json.dumps(res["output"].get("quantized", {})))
    print(f"wrote {RESULTS / args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
