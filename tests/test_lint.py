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


def test_ci_runs_the_readme_test_command():
  """The README's second command is the one .ci/run calls, verbatim."""
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2, commands
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [line.strip() for line in f if not line.startswith("#")]
  assert commands[1] in ci, (commands[1], ci)
  assert "pytest" in commands[1]
