"""Imports run one way: variants <- config <- {data, model} <- runs <- {evaluation, inference, surgery} <- train
<- cli (errors, jsontext, metrics, parallel and flops sit low, beside config); nothing imports the CLI. A new import
against that direction fails here, and so does a circle of module-level imports between modules (one
package's modules importing each other at import time). Opening and restoring a run is `runs`: the
analysis commands never import the trainer."""

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loopformer"

# What each part of the package may import (besides itself and the standard library).
ALLOWED = {
    "errors": set(),
    "jsontext": set(),  # JSON text read with one error for every malformation (standard library only)
    "variants": {"errors", "jsontext"},
    "config": {"variants", "errors", "jsontext"},
    "data": {"config", "errors", "jsontext"},
    "model": {"config", "variants", "errors", "jsontext"},
    "parallel": {"config", "errors", "jsontext"},
    "flops": {"config", "errors", "jsontext"},
    "metrics": set(),
    "runs": {"config", "data", "model", "variants", "errors", "jsontext"},
    "evaluation": {"config", "model", "metrics", "runs", "variants", "errors", "jsontext"},
    "inference": {"config", "model", "runs", "variants", "errors", "jsontext"},
    "surgery": {"config", "model", "runs", "variants", "errors", "jsontext"},
    "train": {"config", "data", "model", "evaluation", "inference", "surgery", "parallel", "flops", "metrics",
              "runs", "variants", "errors", "jsontext"},
    "cli": {"config", "data", "model", "evaluation", "inference", "surgery", "train", "parallel", "flops",
            "metrics", "runs", "variants", "errors", "jsontext"},
    "__main__": {"cli"},
    "__init__": set(),
}

# Modules every part may import: they import nothing of loopformer but each other and errors (checked
# below), nor does their package's __init__. The run directory's file names, the one log function and
# the file lock live in `runs`, their home, while the data layer below it names the run's tokenizer
# file, logs, and locks `prepare`'s output.
SHARED = {"loopformer.runs.layout", "loopformer.runs.log", "loopformer.runs.lock"}

# The analysis commands: they open and restore runs through `runs` and never import the trainer (convert
# and import write a new run, whose checkpoint holds optimizer state: they import it inside the command).
ANALYSIS = ("eval", "sweep", "ablate", "activity", "generate", "inspect", "rys")


def part_of(module: str) -> str:
    """``loopformer.model.circuit`` -> ``model``; ``loopformer.flops`` -> ``flops``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _import_nodes(path: Path, module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a file: all of them, or (``module_level``) those that run when the
    module is imported: not inside a function or class, nor under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))
        return

    def walk(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    yield from walk(block)
            elif isinstance(node, ast.With):
                yield from walk(node.body)

    yield from walk(tree.body)


def imports(path: Path, module_level: bool = False, modules: set[str] | None = None) -> set[str]:
    """Every ``loopformer.*`` module a file imports, at any depth (function-level imports count too), or
    only at ``module_level``. With ``modules`` (the package's), ``from P import M`` of a submodule M
    names P.M, the module it loads (and P when it also takes names defined in P)."""
    out = set()
    for node in _import_nodes(path, module_level):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("loopformer")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loopformer":
            if modules is None:  # from loopformer import parallel: the part is loopformer.parallel
                out |= {f"loopformer.{a.name}" for a in node.names} if node.module == "loopformer" else {node.module}
            else:
                names = {f"{node.module}.{a.name}" for a in node.names}
                out |= names & modules
                if not names <= modules:
                    out.add(node.module)
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(module_name(path))
        for target in sorted(imports(path)):
            there = part_of(target)
            if there != here and there not in ALLOWED[here] and target not in SHARED:
                bad.append(f"{path.relative_to(PACKAGE.parent)} ({here}) imports {target} ({there})")
    return bad


def import_graph(module_level: bool) -> dict[str, set[str]]:
    """module -> the package's modules it imports (every import, or only those run at import time)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {m: {t for t in imports(p, module_level, modules) if t in modules and t != m} for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One circle per strongly connected group of modules, as ``a -> b -> a`` (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in sorted(groups):  # the shortest way around, from the group's first module back to it
        start, members = group[0], set(group)
        paths, queue = {start: [start]}, [start]
        for v in queue:  # breadth first (the queue grows while it is read)
            if start in graph[v]:
                out.append(" -> ".join([*paths[v], start]))
                break
            for w in sorted(graph[v] & members - paths.keys()):
                paths[w] = [*paths[v], w]
                queue.append(w)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules importing ``start`` loads: what it imports, transitively, and the packages holding them."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        todo += [t for t in [*graph.get(m, ()), *parents] if t in graph]
    return seen


def test_every_part_is_listed():
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_imports_run_one_way():
    assert violations() == []


def test_shared_modules_import_nothing_of_loopformer():
    """... but one another, `loopformer.errors` and `loopformer.jsontext` (which import nothing)."""
    for module in SHARED:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        package = path.parent / "__init__.py"
        assert imports(path) <= SHARED | {"loopformer.errors", "loopformer.jsontext"} and imports(package) == set(), module
    assert imports(PACKAGE / "errors.py") == set() and imports(PACKAGE / "jsontext.py") == set()


def test_no_module_level_import_cycles():
    assert cycles(import_graph(module_level=True)) == []


def test_the_analysis_commands_do_not_import_the_trainer():
    """Issue #23: every command opened and restored runs through loopformer.train (the optimizer, the
    train step) just to read weights. Now registering the commands (what any ``loopformer`` call
    imports) loads nothing of the trainer, and the analysis commands never import it."""
    at_import = import_graph(module_level=True)
    from loopformer.cli import MODULES

    for name in MODULES:
        loaded = reachable(at_import, f"loopformer.cli.{name}")
        assert not {m for m in loaded if part_of(m) == "train"}, name
    every = import_graph(module_level=False)
    for name in ANALYSIS:
        loaded = reachable(every, f"loopformer.cli.{name}")
        assert not {m for m in loaded if part_of(m) == "train"}, name


def test_the_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing the trainer is reported."""
    fake = tmp_path / "loopformer"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("from loopformer.train.trainer import train\n")
    (fake / "config.py").write_text("import loopformer.cli\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert violations() == ["loopformer/config.py (config) imports loopformer.cli (cli)",
                            "loopformer/model/bad.py (model) imports loopformer.train.trainer (train)"]


def test_the_check_catches_a_circle_inside_a_package(tmp_path, monkeypatch):
    """The checker itself: model/a.py and model/b.py importing each other at module level (a, b, c in a
    longer circle too) are reported; an import inside a function, or under TYPE_CHECKING, is no circle."""
    fake = tmp_path / "loopformer"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "a.py").write_text("from loopformer.model.b import f\n")
    (fake / "model" / "b.py").write_text("import loopformer.model.a\n")
    (fake / "model" / "c.py").write_text("from loopformer.model import d\n")
    (fake / "model" / "d.py").write_text("from loopformer.model.e import g\n")
    (fake / "model" / "e.py").write_text("try:\n    from loopformer.model.c import h\nexcept ImportError:\n    pass\n")
    (fake / "model" / "lazy.py").write_text("def f():\n    from loopformer.model.quiet import x\n")
    (fake / "model" / "quiet.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loopformer.model.lazy import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert cycles(import_graph(module_level=True)) == [
        "loopformer.model.a -> loopformer.model.b -> loopformer.model.a",
        "loopformer.model.c -> loopformer.model.d -> loopformer.model.e -> loopformer.model.c"]
    assert cycles(import_graph(module_level=False)) == [
        "loopformer.model.a -> loopformer.model.b -> loopformer.model.a",
        "loopformer.model.c -> loopformer.model.d -> loopformer.model.e -> loopformer.model.c",
        "loopformer.model.lazy -> loopformer.model.quiet -> loopformer.model.lazy"]
