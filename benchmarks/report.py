"""Results files -> Markdown, by schema: each suite states its part of ``docs/results.md`` as
``Section`` objects (which results files, then text, tables and figures in order), and a
``Table`` states its columns as data (``Col``: header, where the value is in a row, format).
``benchmarks/make_results.py`` renders every suite's sections in order; nothing here knows a
particular file.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .runner import RESULTS

__all__ = ["Col", "Table", "Pivot", "Section", "Image", "table", "load", "get", "render", "f2", "stats", "ms",
           "mean_sd", "provenance",
           "METRICS"]


def table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def load(stem: str, folder: Path = RESULTS):
    p = folder / f"{stem}.json"
    return json.loads(p.read_text()) if p.exists() else None


def get(obj, path: str | Callable | None):
    """``obj[a][b]...`` for ``path`` "a.b..." (None where a key is missing); a callable is called."""
    if callable(path):
        return path(obj)
    if path is None:
        return obj
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def f2(x) -> str:
    return f"{x:.2f}"


def stats(xs) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def ms(stat, digits=1) -> str:
    """``mean ± std`` of a ``{"mean", "std"}`` record."""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def mean_sd(xs, fmt="{:.1f}") -> str:
    """mean (and +- standard deviation where there are several values); None values left out."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    s = stats(xs)
    return fmt.format(s["mean"]) + (" +- " + fmt.format(s["std"]) if len(xs) > 1 else "")


@dataclass
class Col:
    """A column: ``head``, the value (a dotted path into the row, or a function of the row) and its
    format (a format string such as ``"{:.4f}"``, or a function of the value)."""
    head: str
    value: str | Callable | None = None
    fmt: str | Callable = "{}"

    def cell(self, row) -> str:
        v = get(row, self.value)
        return self.fmt(v) if callable(self.fmt) else self.fmt.format(v)


METRICS = [Col("top-1", "top1", f2), Col("agreement", "agreement", f2), Col("KL", "kl", "{:.4f}")]


@dataclass
class Table:
    """Rows (a dotted path into the document, or a function of it returning a list) in columns
    (``Col`` objects, or a function of the document returning them)."""
    cols: list | Callable
    rows: str | Callable = "runs"

    def render(self, doc) -> list[str]:
        rows = get(doc, self.rows) or []
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        cols = self.cols(doc) if callable(self.cols) else self.cols
        return [table([c.head for c in cols], [[c.cell(r) for c in cols] for r in rows])] if rows else []


@dataclass
class Pivot:
    """A cross table: one row per distinct value of the ``rows`` columns, one column per distinct
    ``col`` value (``col_head`` of it), the cell ``cell`` of the item at both (``missing`` if none).
    ``items``: a dotted path into the document or a function of it; rows in the order they first
    appear, or sorted (``order`` "asc" or "desc", numbers in labels compared as numbers)."""
    items: str | Callable
    rows: list
    col: str | Callable
    col_head: Callable
    cell: Callable
    missing: str = "-"
    order: str | None = None

    def render(self, doc) -> list[str]:
        items = get(doc, self.items) or []
        cols = sorted({get(i, self.col) for i in items})
        keys = list(dict.fromkeys(tuple(c.cell(i) for c in self.rows) for i in items))
        if self.order:
            keys.sort(key=lambda k: [_num(v) for v in k], reverse=self.order == "desc")
        body = []
        for k in keys:
            by = {get(i, self.col): i for i in items if tuple(c.cell(i) for c in self.rows) == k}
            body.append(list(k) + [self.cell(by[c]) if c in by else self.missing for c in cols])
        return [table([c.head for c in self.rows] + [self.col_head(c) for c in cols], body)] if items else []


def _num(v):
    """A sort key that orders numbers inside labels numerically ("W8A8" after "W4A8")."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(v))]


@dataclass
class Image:
    """A figure in ``benchmarks/results/``: ``![alt](../benchmarks/results/NAME)``; ``draw(doc, path)``,
    if given, draws it from the document first."""
    name: str
    alt: str
    draw: Callable | None = None

    def render(self, doc, folder: Path = RESULTS) -> list[str]:
        if self.draw is not None:
            self.draw(doc, folder / self.name)
        return [f"![{self.alt}](../benchmarks/results/{self.name})"]


@dataclass
class Section:
    """A part of ``docs/results.md``: ``blocks`` rendered in order for each results file matching
    ``files`` (stems, ``|``-separated, or a glob); with ``each=False`` once for all of them, the
    blocks then getting ``{stem: doc}``. A block is a format string over the document (``{file}``:
    the stem), a function of it returning a string, a list of lines or None (skipped), a ``Table``
    or an ``Image``; each is followed by a blank line. ``when``: render only if it holds."""
    files: str
    blocks: list = field(default_factory=list)
    each: bool = True
    when: Callable | None = None
    order: int | None = None  # its place in docs/results.md, if not its suite's
    reverse: bool = False  # a glob's files in descending name order

    def stems(self, folder: Path = RESULTS) -> list[str]:
        if any(c in self.files for c in "*?["):
            return [p.stem for p in sorted(folder.glob(f"{self.files}.json"), reverse=self.reverse)]
        return [s for s in self.files.split("|") if (folder / f"{s}.json").exists()]

    def render(self, folder: Path = RESULTS) -> list[str]:
        docs = {s: load(s, folder) for s in self.stems(folder)}
        if not docs:
            return []
        targets = [{**d, "file": s} for s, d in docs.items()] if self.each else [docs]
        lines = []
        for doc in targets:
            if self.when is None or self.when(doc):
                for i, block in enumerate(self.blocks):
                    lines += _block(block, doc, folder)
                    if i == 0:  # under the heading: where and over which seeds every figure below was measured
                        lines += [provenance(docs)] if not self.each else [provenance({doc["file"]: doc})]
                        lines += [""]
        return lines


def _collect(obj, cpus: dict, seeds: set) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "cpu" and isinstance(v, dict) and v.get("model"):
                cpus.setdefault(v["model"], set()).update(v.get("flags") or [])
            elif k == "cpu" and isinstance(v, str):
                cpus.setdefault(None, set())
            elif k == "seed" and isinstance(v, int):
                seeds.add(v)
            elif k == "seeds" and isinstance(v, list):
                seeds.update(x for x in v if isinstance(x, int))
            _collect(v, cpus, seeds)
    elif isinstance(obj, list):
        for v in obj:
            _collect(v, cpus, seeds)


def provenance(docs: dict) -> str:
    """One line per section: the CPU(s) and seeds its results files record (or that they record none),
    so that no figure stands without its machine and its spread."""
    parts = []
    for stem, doc in docs.items():
        cpus, seeds = {}, set()
        _collect(doc, cpus, seeds)
        named = [f"{m} ({', '.join(sorted(f)) or 'int8 flags not recorded'})" for m, f in cpus.items() if m]
        cpu = "; ".join(named) if named else ("CPU model not recorded (only the architecture, x86_64)"
                                                if None in cpus else "CPU not recorded (2-core machines of "
                                                "this project; which one is unknown)")
        if len(seeds) > 1:
            seed = f"seeds {', '.join(map(str, sorted(seeds)))} (the spread: the ± or per-seed figures below)"
        elif seeds:
            seed = f"one seed ({next(iter(seeds))}): no spread over seeds measured"
        else:
            seed = "no seed recorded: one run per figure (timings give their own spread over rounds)"
        parts.append(f"`{stem}.json`: {cpu}; {seed}")
    return "*Measured on* " + " · ".join(parts) + "."


def _block(block, doc, folder: Path) -> list[str]:
    if isinstance(block, Image):
        out = block.render(doc, folder)
    elif isinstance(block, (Table, Pivot)):
        out = block.render(doc)
    elif isinstance(block, str):
        out = [block.format_map(doc)]
    else:
        out = block(doc)
        out = [] if out is None else [out] if isinstance(out, str) else list(out)
    return out + [""] if out else []


def render(sections, folder: Path = RESULTS) -> list[str]:
    lines = []
    for s in sections:
        lines += s.render(folder)
    return lines
