"""The benchmark runner: ``python -m benchmarks SUITE [options]``.

A suite (one module in ``benchmarks/suites/``, found by the runner; see ``benchmarks/README.md``
for how to add one) is a ``Suite``: a ``run(run: Run)`` function plus what the runner and the
report need to know about it, stated as data: its own options, the common options it uses
with its defaults, its results files and the command that wrote each, its sections of
``docs/results.md``. The runner owns what every suite shares:

* argument parsing (``COMMON`` options: ``--model --calib --eval --dev --seeds --threads --device
  --max-batch``; ``--out``; ``--smoke`` for a tiny run that writes under ``/tmp``; ``--plan STEM``:
  every invocation that wrote a results file, as the suite lists them);
* the images: the bundled ImageNet sample decoded once per model, the calibration pool (even
  labels) and the evaluation split (odd labels) never mixed (``Run.data``, ``Run.pool``,
  ``Run.dev_split``; the hold-out through ``evolq.data.split_calibration``);
* seeds (``--seeds 0 1 2`` or ``0,1,2``), threads (``torch.set_num_threads``);
* the machine and its load (``cpu_info``: model, int8 flags, cores, 1-minute load) and the
  invocation's wall time, written into every results file as ``bench`` records;
* JSON writing: ``Run.save`` writes ``Run.doc`` atomically (``evolq.io.write_json``) after every
  finished piece, so a killed run keeps what it measured and resumable suites skip it next time.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOKE_DIR = Path("/tmp/evolq-bench-smoke")
SHORT = {"vit_tiny_patch16_224": "vit_tiny", "tf_efficientnet_lite0": "efficientnet_lite0"}

__all__ = ["Suite", "Run", "register", "suites", "parse", "main", "RESULTS", "ROOT", "short_name", "seed_list"]


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0"`` -> ``[0, 1, 2]`` (``--seeds`` takes either form, once or repeated)."""
    return [int(v) for v in text.split(",") if v]


def short_name(model: str) -> str:
    return SHORT.get(model, model)


COMMON = {  # name -> (flags, argparse keywords); a suite lists the ones it takes, with its defaults
    "model": (("--model",), {"help": "timm model name (weights from the assets folder)"}),
    "calib": (("--calib",), {"type": int, "help": "calibration images: the first N of the calibration pool "
                                                  "(even labels, 500 in all)"}),
    "eval": (("--eval",), {"type": int, "help": "evaluation images: the first N of the evaluation split (odd labels)"}),
    "dev": (("--dev",), {"type": int, "help": "dev images: the calibration-pool images after --calib (default: all)"}),
    "seeds": (("--seeds",), {"type": seed_list, "nargs": "+", "help": "seeds (space- or comma-separated)"}),
    "threads": (("--threads",), {"type": int, "help": "torch intra-op threads"}),
    "device": (("--device",), {"help": "cpu or cuda"}),
    "max_batch": (("--max-batch",), {"type": int, "help": "SearchConfig.max_batch (fitness chunk size)"}),
}


@dataclass
class Suite:
    """A benchmark suite, as data around its ``run`` function.

    Attributes:
        name: the command line name (``python -m benchmarks NAME``).
        what: what it measures, in a line (``--list``, the README's table).
        doc: what it measures and how (``--help``).
        run: ``run(run: Run) -> int | None`` (the exit status; None is 0).
        args: its own options, ``(flags, argparse keywords)`` pairs.
        common: the ``COMMON`` options it takes -> its default for each.
        out: the results file's default name, a format string over the parsed options
            (``short``: the model's short name).
        results: results file stem (or glob) -> the command that writes it (the README's table).
        stale: results files written by an earlier session's code and not re-run since (a tuple), or
            results file -> what about it is stale (a dict).
        smoke: option overrides of ``--smoke`` (tiny sizes).
        report: ``benchmarks.report.Section`` objects: its part of ``docs/results.md``.
        order: its sections' place in ``docs/results.md`` (ascending).
        resume: start from the results file already there (the suite skips what it holds).
    """
    name: str
    what: str
    doc: str
    run: Callable
    args: list = field(default_factory=list)
    common: dict = field(default_factory=dict)
    out: str = ""
    results: dict = field(default_factory=dict)
    stale: tuple = ()
    smoke: dict = field(default_factory=dict)
    report: list = field(default_factory=list)
    order: int = 100
    resume: bool = False


_SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def suites() -> dict[str, Suite]:
    """Every suite in ``benchmarks/suites/`` by name, in report order."""
    if not _SUITES:
        from . import suites as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return dict(sorted(_SUITES.items(), key=lambda kv: (kv[1].order, kv[0])))


def build_parser(suite: Suite) -> argparse.ArgumentParser:
    listed = "\n".join(f"  {stem}: " + " ; ".join(shlex.join(j) or "(defaults)" for j in jobs(suite, stem))
                        for stem in suite.results)
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {suite.name}", description=suite.doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"results files and the invocations that write them (--plan STEM runs "
                                       f"them all, each in a process of its own):\n{listed}" if listed else None)
    for name, default in suite.common.items():
        flags, kw = COMMON[name]
        p.add_argument(*flags, default=default, **kw)
    for flags, kw in suite.args:
        p.add_argument(*flags, **kw)
    p.add_argument("--out", default=None, help=f"results file: a name in benchmarks/results/ or a path (default "
                                               f"{suite.out or suite.name}.json)")
    p.add_argument("--smoke", action="store_true", help="a tiny run that proves the suite works; writes under "
                                                        f"{SMOKE_DIR} unless --out is a path")
    return p


def parse(argv: list[str]) -> tuple[Suite, argparse.Namespace]:
    """``[SUITE, options...]`` -> the suite and its options (seeds flattened, ``--smoke`` applied)."""
    if not argv or argv[0] not in suites():
        raise SystemExit(f"usage: python -m benchmarks SUITE [options]; suites: {', '.join(suites())}")
    suite = suites()[argv[0]]
    parser = build_parser(suite)
    args = parser.parse_args(argv[1:])
    if args.smoke:
        given = {a.dest for a in parser._actions if any(f in argv[1:] for f in a.option_strings)}
        for k, v in suite.smoke.items():
            if k not in given:
                setattr(args, k, v)
    if isinstance(getattr(args, "seeds", None), list):
        args.seeds = [s for part in args.seeds for s in (part if isinstance(part, list) else [part])]
    return suite, args


def results_path(suite: Suite, args) -> Path:
    name = args.out or (suite.out or suite.name).format(**vars(args), short=short_name(getattr(args, "model", "")))
    if "/" in name:
        return Path(name)
    name = name if name.endswith(".json") else f"{name}.json"
    return (SMOKE_DIR if args.smoke else RESULTS) / name


def cpu_info() -> dict:
    from evolq.export.bench import cpu_info as info

    return info()


@dataclass
class Data:
    """A model and its images: ``xc`` calibration pool (first ``calib``), ``xe``/``ye`` evaluation split."""
    base: object
    xc: object
    xe: object
    ye: object


class Run:
    """What a suite's ``run`` gets: ``args`` (its parsed options), ``doc`` (the results document,
    the file's content for a resumable suite), the images, and ``save``."""

    def __init__(self, suite: Suite, args, argv: list[str]):
        self.suite, self.args, self.path = suite, args, results_path(suite, args)
        self.doc = json.loads(self.path.read_text()) if suite.resume and self.path.exists() else {}
        self._images: dict = {}
        self._models: dict = {}
        self.t0 = time.perf_counter()
        self.record = {"suite": suite.name, "command": shlex.join(["python", "-m", "benchmarks", *argv]),
                       "cpu": cpu_info(), "python": platform.python_version(), "finished": False}

    # -- images -------------------------------------------------------------------------
    def model(self, name: str | None = None, weights=None):
        """The float model (weights from the assets folder, or ``weights``), loaded once per run."""
        from evolq.models import load_model

        name = name or self.args.model
        if name not in self._models:
            self._models[name] = load_model(name, weights=weights).eval()
        return self._models[name]

    def images(self, name: str | None, split: str, limit: int | None = None):
        """``(images, labels)`` of ``split`` ("calib": the calibration pool, even labels; "eval": the
        evaluation split, odd labels), the first ``limit``, decoded once per model and split."""
        from evolq.data import assets_dir, load_images
        from evolq.models import model_transform

        name = name or self.args.model
        key = (name, split, limit)
        if key not in self._images:
            self._images[key] = load_images(assets_dir() / "imagenet-sample", model_transform(self.model(name)), split,
                                            limit=limit)
        return self._images[key]

    def data(self, name: str | None = None, calib: int | None = None, n_eval: int | None = None) -> Data:
        """The model, the first ``calib`` calibration-pool images and the first ``n_eval`` evaluation
        images (defaults: ``--calib`` and ``--eval``)."""
        a = self.args
        xc, _ = self.images(name, "calib", calib if calib is not None else getattr(a, "calib", None))
        xe, ye = self.images(name, "eval", n_eval if n_eval is not None else getattr(a, "eval", None))
        return Data(self.model(name), xc, xe, ye)

    def dev_split(self, name: str | None, n: int):
        """The calibration pool split for decisions on calibration data only: the first ``n`` images
        calibrate, the rest (or the next ``--dev``) score, with their labels; the evaluation split is not read."""
        x, y = self.images(name, "calib")
        end = n + self.args.dev if getattr(self.args, "dev", None) else None
        return x[:n], x[n:end], y[n:end]

    # -- the record -----------------------------------------------------------------------
    def save(self, doc: dict | None = None) -> Path:
        """Write ``doc`` (default ``self.doc``) with this invocation's ``bench`` record (machine, load
        before and now, seconds so far) appended to the records of earlier invocations."""
        from evolq.io import write_json

        if doc is not None:
            self.doc = doc
        rec = {**self.record, "seconds": round(time.perf_counter() - self.t0, 1),
               "load_1m_now": cpu_info()["load_1m"]}
        old = [r for r in self.doc.get("bench", []) if r.get("command") != rec["command"] or r.get("finished")]
        self.doc["bench"] = old + [rec]
        return write_json(self.path, self.doc, indent=1)

    def finish(self) -> None:
        self.record["finished"] = True
        if self.doc:
            self.save()


def jobs(suite: Suite, stem: str) -> list[list[str]]:
    """The invocations that write results file ``stem`` (``Suite.results``), as argument lists."""
    if stem not in suite.results:
        raise SystemExit(f"{suite.name} lists no results file {stem!r}; it lists: {', '.join(suite.results)}")
    job = suite.results[stem]
    return [shlex.split(j) for j in (job if isinstance(job, list) else [job])]


def run_plan(suite: Suite, stem: str) -> int:
    """Every invocation that wrote ``stem``, each in a process of its own (a fresh interpreter: some
    tools cannot share one), stopping at the first that fails."""
    import subprocess

    for job in jobs(suite, stem):
        cmd = [sys.executable, "-m", "benchmarks", suite.name, *job]
        print("$", shlex.join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--list"], ["-l"], []):
        for name, s in suites().items():
            print(f"{name:18s} {s.what}")
        return 0
    if len(argv) == 3 and argv[1] == "--plan":
        return run_plan(parse(argv[:1])[0], argv[2])
    suite, args = parse(argv)
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(max(threads) if isinstance(threads, list) else threads)
    run = Run(suite, args, argv)
    code = suite.run(run) or 0
    if code == 0:
        run.finish()
        print(f"{suite.name}: {run.path} ({time.perf_counter() - run.t0:.0f} s)")
    return code
