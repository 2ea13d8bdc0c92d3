"""The tree passes ruff (which also forbids print), keeps its layers (import-linter's contracts in
pyproject.toml) and the engine type-checks (mypy, [tool.mypy] there), so style drift, a layer crossed and a
type error fail CI like any other defect."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is installed by the test extra"
    return path


def test_ruff_clean():
    result = subprocess.run([_tool("ruff"), "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_kept():
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_engine_type_checks():
    # The files and settings are [tool.mypy]'s; the cache (.mypy_cache) makes reruns take seconds.
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
