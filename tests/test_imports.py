"""Imports run one way: config <- model <- {evaluation, inference, surgery} <- train <- cli; data depends on
config only; nothing imports the CLI. A new import against that direction fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loopformer"

# What each part of the package may import (besides itself and the standard library).
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "data": {"config", "errors"},
    "model": {"config", "errors"},
    "parallel": {"config", "errors"},
    "flops": {"config", "errors"},
    "evaluation": {"config", "model", "errors"},
    "inference": {"config", "model", "errors"},
    "surgery": {"config", "model", "errors"},
    "train": {"config", "data", "model", "evaluation", "inference", "surgery", "parallel", "flops", "errors"},
    "cli": {"config", "data", "model", "evaluation", "inference", "surgery", "train", "parallel", "flops", "errors"},
    "__main__": {"cli"},
    "__init__": set(),
}


def part_of(module: str) -> str:
    """``loopformer.model.circuit`` -> ``model``; ``loopformer.flops`` -> ``flops``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """Every ``loopformer.*`` module a file imports, at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("loopformer")}
        elif isinstance(node, ast.ImportFrom) and node.module == "loopformer":  # from loopformer import parallel
            out |= {f"loopformer.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loopformer."):
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
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{path.relative_to(PACKAGE.parent)} ({here}) imports {target} ({there})")
    return bad


def test_every_part_is_listed():
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing the trainer is reported."""
    fake = tmp_path / "loopformer"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("from loopformer.train.trainer import train\n")
    (fake / "config.py").write_text("import loopformer.cli\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert violations() == ["loopformer/config.py (config) imports loopformer.cli (cli)",
                            "loopformer/model/bad.py (model) imports loopformer.train.trainer (train)"]
