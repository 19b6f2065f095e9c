"""The repository passes ``ruff check`` (configured in pyproject.toml)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
  pytest.importorskip("ruff")  # in the test extras, so CI always runs this
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", ROOT],
                        cwd=ROOT, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    pytest.fail(f"ruff check failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}", pytrace=False)
