"""The demo, measured: runs ``evolq demo`` (the README's first command, after install)
in a fresh process and records its wall time, the figures it printed and the machine's
load, so the time quoted in the README and the quickstart comes from this file.

    python benchmarks/demo.py [-- extra demo arguments]

Writes benchmarks/results/demo.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import write_json


def main():
    extra = sys.argv[1:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if {"-h", "--help"} & set(extra):  # the demo's own options
        return subprocess.run([sys.executable, "-m", "evolq", "demo", "--help"], check=False).returncode
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "evolq", "demo", "--out", tmp, *extra], capture_output=True,
                           text=True, check=False)
        wall = time.perf_counter() - t0
        print(p.stdout)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return p.returncode
        rep = json.loads((Path(tmp) / "report.json").read_text())
    out = {"command": "evolq demo " + " ".join(extra), "wall_seconds": wall, "search_seconds": rep["search_seconds"],
           "evaluations": rep["evaluations"], "fp32": rep["fp32"], "start": rep["start"], "final": rep["final"],
           "calib_images": rep["calib_images"], "eval_images": rep["eval_images"], "stdout": p.stdout,
           "load_before": load0, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
           "threads_env": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform()}
    print(f"wrote {write_json('demo.json', out)}: {wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
