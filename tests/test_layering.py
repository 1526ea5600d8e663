"""The library imports no job: nothing under zarvan_dist/ imports data_prep or pretrain (the jobs import
the library, never the other way round), so an export's hf.py loads where only zarvan_dist is installed."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "zarvan_dist"
JOBS = {"data_prep", "pretrain"}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_no_job():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20
    offending = {f"{path.relative_to(LIBRARY.parent)}: {name}" for path in files for name in imported_modules(path)
                 if name.split(".")[0] in JOBS}
    assert offending == set()
