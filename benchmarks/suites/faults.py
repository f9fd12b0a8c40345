"""Fault injection, reported: runs the reliability cases of the test suite (bad input at the API
and the CLI, degenerate candidates, SIGKILL / Ctrl-C and resume, determinism, save/load tampering,
memory chunking and OOM) and writes one row per case: section, case, outcome, seconds, and what the
case recorded (the kill/resume statistics). The cases live in ``tests/test_reliability.py`` and
``tests/test_bad_input.py`` only; this suite is their reporter, not a second copy. Small random
timm ViTs: these figures are about mechanics, not accuracy."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from ..common import timed_command
from ..runner import ROOT, Suite, register

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


def case(tc, section: dict) -> dict:
    outcome, detail = "passed", ""
    for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        el = tc.find(tag)
        if el is not None:
            outcome, detail = name, (el.get("message") or "")[:200]
    props = {p.get("name"): json.loads(p.get("value")) for p in tc.iter("property")}
    return {"section": section.get(tc.get("name").split("[")[0], "?"), "case": tc.get("name"),
            "file": tc.get("classname", "").split(".")[-1], "outcome": outcome,
            "seconds": round(float(tc.get("time", 0)), 2), **({"recorded": props} if props else {}),
            **({"detail": detail} if outcome != "passed" else {})}


def run(run):
    import torch

    a = run.args
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        files = [f for f in FILES if not a.only or a.only in f]
        r = timed_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                           *files, *(["-k", a.k] if a.k else [])], cwd=ROOT,
                          env={**os.environ, "EVOLQ_FAULT_KILLS": str(a.kills), "OMP_NUM_THREADS": "1"})
        print(r["proc"].stdout[-3000:])
        suite = ET.parse(xml).getroot()
    section = {k: v for f in FILES for k, v in sections(ROOT / f).items()}
    rows = [case(tc, section) for tc in suite.iter("testcase")]
    n_pass = sum(c["outcome"] == "passed" for c in rows)
    kr = next((c["recorded"] for c in rows if "recorded" in c and "kills" in c["recorded"]), None)
    print(f"{n_pass}/{len(rows)} cases passed; kill/resume: {kr}")
    run.save({"cases": rows, "passed": n_pass, "total": len(rows), "kill_resume": kr, "kills_requested": a.kills,
              "seconds": round(r["wall"], 1),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "platform": platform.platform()}})
    return 0 if n_pass == len(rows) else 1


register(Suite(
    name="faults", doc=__doc__, run=run, order=202,
    what="the reliability test cases, reported (bad input, degenerate candidates, SIGKILL/resume, tampering, "
         "OOM)",
    args=[(("--kills",), {"type": int, "default": 12, "help": "SIGKILLs in the kill/resume case"}),
          (("--only",), {"default": "", "help": "only the test files whose path contains this"}),
          (("-k",), {"default": "", "help": "pytest -k expression (a subset of the cases)"})],
    results={"faults": "--kills 12"}, smoke={"kills": 1, "only": "bad_input", "k": "config"}))
