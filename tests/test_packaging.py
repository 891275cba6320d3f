"""The wheel holds every module and the compiled contracts (a user who installs fedllm from a
wheel, not a checkout, can run the ledger), and the public surface imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_module_and_the_contract_artifacts(tmp_path):
    src = tmp_path / "src"
    for name in ("fedllm", "strategies", "contracts/artifacts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fedllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("fedllm", "strategies") for p in (ROOT / pkg).rglob("*.py")}
    assert modules - names == set()  # a package missing from pyproject's list would be left out
    artifacts = {f"fedllm/contracts/{p.name}" for p in (ROOT / "contracts" / "artifacts").glob("*.json")}
    assert artifacts and artifacts <= names


def test_public_surface_imports():
    import fedllm
    import strategies
    from fedllm import methods

    assert all(hasattr(fedllm, n) for n in fedllm.__all__ if n not in ("MODEL_CACHE", "load_base_model"))
    assert all(hasattr(strategies, n) for n in strategies.__all__)
    assert all(hasattr(methods, n) for n in methods.__all__)
    assert {"lora", "exact-lora", "zo"} <= set(methods.METHODS)
