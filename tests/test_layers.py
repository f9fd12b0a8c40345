"""The floor plan of ``evolq/``: every import of an evolq module (function-level ones included)
points down the layers or stays on its own layer, and no module reaches itself again through its
imports. The layer order is written once, here:

    base -> quant -> qnn -> adapters -> problems/search -> config/start -> engine/allocation -> api
    -> export -> cli

the order of the developers' guide (quant -> qnn -> adapters -> problems/search -> engine ->
api -> export -> cli) with the modules it does not name placed explicitly: ``base`` holds what
every layer may use (errors, registries, files, hooks, data helpers), ``config/start`` the typed
configs, the start point (``evolq.start.prepare_model``) and saving/loading, which both the
engines and the allocation build on. Imports of other packages (torch, evotorch, ray, onnx) are
not evolq's and are not checked. Parsed with ``ast``; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "evolq"

# layer name -> evolq modules and packages on it (a package covers its submodules)
LAYERS = [
    ("base", ["errors", "registry", "fsio", "_evotorch", "hooks", "data", "start_options", "checkpoint", "losses"]),
    ("quant", ["quant"]),
    ("qnn", ["qnn", "evaluate"]),
    ("adapters", ["adapters", "models"]),
    ("problems/search", ["problems", "search", "scaleout", "fitness", "holdout", "landscape"]),
    ("config/start", ["config", "start", "io"]),
    ("engine/allocation", ["engine", "allocation"]),
    ("api", ["api"]),
    ("export", ["export"]),
    ("cli", ["cli", "demo", "__main__", ""]),  # "": the top package, evolq/__init__.py
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{"evolq.x.y": path}`` of every module under ``root``; a package is named by its ``__init__.py``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = ("evolq",) + p.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the longest entry that names ``module`` or a package above it."""
    rel = module[len("evolq."):] if module != "evolq" else ""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (rel == n or (n and rel.startswith(n + "."))) and len(n) > depth:
                best, depth = i, len(n)
    assert best is not None, f"{module} is on no layer: add it to LAYERS in {Path(__file__).name}"
    return best


def imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported evolq module: line}}``: ``from X import name`` counts as an import of
    the submodule ``X.name`` where that is a module, else of ``X`` itself."""
    out = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target != "evolq" and not target.startswith("evolq."):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                if len(subs) < len(node.names):  # some names are attributes of the module itself
                    subs.append(target)
                for s in subs:
                    if s != mod:
                        found.setdefault(s, node.lineno)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.name == "evolq" or a.name.startswith("evolq.")) and a.name != mod:
                        found.setdefault(a.name, node.lineno)
        unknown = [m for m in found if m not in mods]
        assert not unknown, f"{mod} imports {unknown}, which are not evolq modules"
        out[mod] = found
    return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_is_on_a_layer_and_imports_only_down_or_level():
    mods = modules()
    graph = imports(mods)
    up = []
    for mod, found in graph.items():
        lm = layer_of(mod)
        for dep, line in found.items():
            ld = layer_of(dep)
            if ld > lm:
                up.append(f"{mods[mod].relative_to(ROOT.parent)}:{line} ({LAYERS[lm][0]}) imports {dep} "
                          f"({LAYERS[ld][0]})")
    assert not up, "imports up the layers:\n" + "\n".join(up)


def test_no_import_circles():
    found = cycles(imports(modules()))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_upward_imports_and_circles(tmp_path):
    """The two checks above fail where they should: a made-up package with a circle and a climb."""
    pkg = tmp_path / "evolq"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from .api import g  # a climb, function-level\n")
    (pkg / "api.py").write_text("from .errors import f\n")
    (pkg / "quant" / "__init__.py").write_text("from .a import x\n")
    (pkg / "quant" / "a.py").write_text("from . import y\nx = 1\n")  # y is not a submodule: the package
    graph = imports(modules(pkg))
    assert graph["evolq.errors"] == {"evolq.api": 2}
    assert sorted(map(tuple, cycles(graph))) == [("evolq.api", "evolq.errors"), ("evolq.quant", "evolq.quant.a")]
    assert layer_of("evolq.errors") < layer_of("evolq.api")
