"""bin/torch-plan, which bin/sync follows: the torch build for this kind of machine, and never a replacement
for a torch that is already there."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "bin/torch-plan"


def plan(venv: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PLAN), str(venv)], capture_output=True, text=True, env=os.environ | env, check=False, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("nvidia", "install torch==2.13.0"),  # the package index's Linux wheel is the CUDA build
        ("rocm", "install torch==2.13.0 --index-url https://download.pytorch.org/whl/rocm7.1"),
        ("none", "install-cpu torch==2.13.0"),
    ],
)
def test_a_venv_without_torch_gets_the_build_for_its_machine(tmp_path, kind, expected):
    assert plan(tmp_path / "no-venv", LLMCHAT_GPU=kind).stdout.strip() == expected


def test_the_versions_and_the_rocm_index_can_be_chosen(tmp_path):
    env = {"LLMCHAT_GPU": "rocm", "LLMCHAT_TORCH_SPEC": "torch==2.14.0", "LLMCHAT_ROCM_INDEX": "https://x/rocm9"}
    assert plan(tmp_path, **env).stdout.strip() == "install torch==2.14.0 --index-url https://x/rocm9"
    wrong = plan(tmp_path, LLMCHAT_GPU="intel")
    assert wrong.returncode == 2 and "nvidia, rocm or none" in wrong.stderr


def test_a_torch_that_imports_is_kept_whatever_the_machine(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin/python"
    python.write_text(f'#!/bin/sh\nexec "{ROOT / ".venv/bin/python"}" "$@"\n')  # the runtime venv's torch imports
    python.chmod(0o755)
    for kind in ("nvidia", "rocm", "none"):
        assert plan(venv, LLMCHAT_GPU=kind).stdout.strip() == "keep"


def test_a_torch_that_fails_to_import_is_reported_not_replaced(tmp_path):
    """A GPU build missing its driver libraries must not be overwritten by a CPU build."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin/python"
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"show torch"*) exit 0 ;;\n'
        '  *"import torch"*) echo "ImportError: libcudart.so.12: cannot open shared object file" >&2; exit 1 ;;\n'
        "esac\n"
        "exit 3\n"
    )
    python.chmod(0o755)
    result = plan(venv, LLMCHAT_GPU="none")
    assert result.stdout.strip() == "broken"
    assert "libcudart.so.12" in result.stderr
