"""Imports go downward only: the import-linter contract in pyproject.toml, checked on the tree
and shown to catch an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_imports_go_downward():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    for name in ("fedllm", "strategies"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    protocol = tmp_path / "fedllm" / "protocol.py"
    protocol.write_text(protocol.read_text() + "\nfrom strategies import rules  # noqa: an upward import\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "fedllm.protocol is not allowed to import strategies" in out.stdout


def test_no_module_over_400_lines_and_no_function_over_60():
    """The library stays readable: every file of fedllm/ and strategies/ under 400 lines, every
    function under 60, and the config's core (fedllm/config/__init__.py) under 350."""
    import ast

    long_files, long_functions = [], []
    for path in sorted([*(ROOT / "fedllm").rglob("*.py"), *(ROOT / "strategies").rglob("*.py")]):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(path.relative_to(ROOT).as_posix())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(ROOT).as_posix()}:{node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
    assert len((ROOT / "fedllm" / "config" / "__init__.py").read_text().splitlines()) < 350
