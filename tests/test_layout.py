"""The layout's rules, checked on the source: imports point one way, each heavy stack stays in
its room, modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ragtrain"
LIBRARY = ("data", "retrieval", "generation", "evaluation", "tracking", "report")
MAX_LINES = 450


def _imports(path: Path) -> set[str]:
    """Every module name a file imports (top level and inside functions)."""
    out: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return out


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_import_rules(path: Path) -> None:
    rel = path.relative_to(SRC)
    names = _imports(path)
    roots = {n.split(".")[0] for n in names}
    assert "prefect" not in roots, f"{rel}: nothing under src/ imports prefect"
    if rel.parts[0] != "tracking":
        assert "mlflow" not in roots, f"{rel}: mlflow is imported only under tracking/"
    if rel.parts[0] in LIBRARY:
        bad = sorted(n for n in names if n.startswith(("ragtrain.pipeline", "ragtrain.cli")))
        assert not bad, f"{rel}: the library never imports the pipeline or the CLI ({bad})"
    if rel.parts[0] != "tracking" and rel.parts[0] != "pipeline" and rel.name != "cli.py":
        bad = sorted(n for n in names if n.startswith("ragtrain.tracking"))
        assert not bad, f"{rel}: only pipeline/ and the CLI reach tracking/ ({bad})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_readable(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)}: {n} lines; split it along its seams"


def test_rules_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    import prefect\n    from ragtrain.pipeline import stages\n")
    assert {"prefect", "ragtrain.pipeline", "ragtrain.pipeline.stages"} <= _imports(bad)
