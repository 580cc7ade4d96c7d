"""The packages import one way: ``still`` ← ``teacher_infer`` ← ``student_train`` ← ``tuning``,
``cluster`` on ``still`` alone, and the command line (``still_cli``) above them all.

Read from the source with :mod:`ast`, so an import inside a function counts as much as
one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the other packages of this project it may import
ALLOWED = {
    "still": set(),
    "teacher_infer": {"still"},
    "student_train": {"still", "teacher_infer"},
    "tuning": {"still", "teacher_infer", "student_train"},
    "cluster": {"still"},
    "still_cli": {"still", "teacher_infer", "student_train", "tuning", "cluster"},
}


def _imports(package: str) -> list[tuple[str, str, str]]:
    """(file, imported module, imported name) for every import of another of our packages."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name, "") for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found += [(path.name, node.module, alias.name) for alias in node.names]
    return [(file, module, name) for file, module, name in found
            if module.split(".")[0] in ALLOWED and module.split(".")[0] != package]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    wrong = [f"{file}: {module}" for file, module, _ in _imports(package)
             if module.split(".")[0] not in ALLOWED[package]]
    assert not wrong, f"{package} imports packages above it: {wrong}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_private_names_from_other_packages(package):
    private = [f"{file}: {module}.{name}" for file, module, name in _imports(package)
               if name.startswith("_") or any(part.startswith("_") for part in module.split("."))]
    assert not private, f"{package} imports another package's private names: {private}"
