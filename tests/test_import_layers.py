"""Imports flow one way: data -> models / losses -> train / metrics / efficiency / tuning -> papers -> notebooks.

Read from the source with ``ast`` (every import statement, also those inside functions), so a lazy import against
the grain is caught as well as a top-level one.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mdbench

PACKAGE = Path(mdbench.__file__).resolve().parent
ABOVE_MODELS = ("mdbench.train", "mdbench.metrics", "mdbench.efficiency", "mdbench.tuning", "mdbench.results",
                "mdbench.runner", "mdbench.cli", "mdbench.doctor", "mdbench.papers")
FORBIDDEN = {  # layer -> modules it may not import (everything above it)
    "data": ("mdbench.models", "mdbench.losses", *ABOVE_MODELS),
    "models": ABOVE_MODELS,
    "losses": ("mdbench.models", *ABOVE_MODELS),
}


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module the file ``path`` of the package ``root`` imports, as absolute dotted names (``from mdbench
    import efficiency`` gives ``mdbench.efficiency`` too; relative imports are resolved against the file's package)."""
    package = ".".join(path.parent.relative_to(root.parent).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(layer: str, root: Path = PACKAGE) -> list[str]:
    """``"<file> imports <module>"`` for every import of a module above ``layer`` in the package at ``root``."""
    above = FORBIDDEN[layer]
    return [f"{path.relative_to(root.parent)} imports {name}"
            for path in sorted((root / layer).rglob("*.py")) for name in sorted(imported_modules(path, root))
            if any(name == module or name.startswith(module + ".") for module in above)]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(layer):
    assert violations(layer) == []


def test_the_atomic_write_helper_sits_below_every_layer():
    assert not [name for name in imported_modules(PACKAGE / "io.py", PACKAGE) if name.startswith("mdbench")]


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    root = tmp_path / "mdbench"
    (root / "models").mkdir(parents=True)
    (root / "models" / "bad.py").write_text("from ..papers.daft import routing\n"
                                            "def f():\n    from mdbench import tuning\n")
    assert violations("models", root) == ["mdbench/models/bad.py imports mdbench.papers.daft",
                                          "mdbench/models/bad.py imports mdbench.papers.daft.routing",
                                          "mdbench/models/bad.py imports mdbench.tuning"]


def test_box_prompt_convention_imports_without_torch():
    # DAFT's deployed path reads cases and preprocesses images through it in a fresh process per case
    code = "import sys, mdbench.data.boxprompt; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
