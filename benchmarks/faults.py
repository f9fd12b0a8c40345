"""Fault injection, reported: runs the reliability cases of the test suite (bad input
at the API and the CLI, degenerate candidates, SIGKILL / Ctrl-C and resume,
determinism, save/load tampering, memory chunking and OOM) and writes one row per
case: section, case, outcome, seconds, and what the case recorded (the kill/resume
statistics). The cases live in ``tests/test_reliability.py`` and
``tests/test_bad_input.py`` only; this script is their reporter, not a second copy.

    python benchmarks/faults.py [--kills 12]

Writes benchmarks/results/faults.json. The cases use small random timm ViTs (2
blocks, 32x32 inputs): these figures are about mechanics, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
FILES = ("tests/test_reliability.py", "tests/test_bad_input.py")


def sections(path: Path) -> dict[str, str]:
    """test function -> the section it sits in (``# ==== name`` comments; else the file's)."""
    out, current = {}, path.stem.replace("test_", "")
    for line in path.read_text().splitlines():
        m = re.match(r"# =+ (.+)$", line)
        if m:
            current = m.group(1).strip()
        m = re.match(r"def (test_\w+)\(", line)
        if m:
            out[m.group(1)] = current
    return out


def main() -> int:
    from _common import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs in the kill/resume case (default 12)")
    ap.add_argument("--out", default="faults.json", help="file name in benchmarks/results/")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "EVOLQ_FAULT_KILLS": str(args.kills), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *FILES], cwd=ROOT, env=env, check=False)
        suite = ET.parse(xml).getroot()
    section = {k: v for f in FILES for k, v in sections(ROOT / f).items()}
    rows = []
    for tc in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (el.get("message") or "")[:200]
        name = tc.get("name")
        props = {p.get("name"): json.loads(p.get("value")) for p in tc.iter("property")}
        rows.append({"section": section.get(name.split("[")[0], "?"), "case": name,
                     "file": tc.get("classname", "").split(".")[-1], "outcome": outcome,
                     "seconds": round(float(tc.get("time", 0)), 2), **({"recorded": props} if props else {}),
                     **({"detail": detail} if outcome != "passed" else {})})
    n_pass = sum(r["outcome"] == "passed" for r in rows)
    print(f"\n{'section':<22} {'case':<64} outcome")
    for r in rows:
        print(f"{r['section'][:22]:<22} {r['case'][:64]:<64} {r['outcome']}")
    kr = next((r["recorded"] for r in rows if "recorded" in r and "kills" in r["recorded"]), None)
    print(f"\n{n_pass}/{len(rows)} cases passed in {time.perf_counter() - t0:.0f} s")
    if kr:
        print(f"kill/resume: {kr['kills']} SIGKILLs {kr['kills_by_kind']}, {kr['resumes']} resumes, "
              f"{kr['runs']} processes, stale temporary files found {kr['stale_tmp_files']}")
    import torch

    out = write_json(args.out, {"cases": rows, "passed": n_pass, "total": len(rows), "kill_resume": kr,
                                "kills_requested": args.kills, "seconds": round(time.perf_counter() - t0, 1),
                                "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                                "platform": platform.platform()}})
    print(f"wrote {out}")
    return 0 if n_pass == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
