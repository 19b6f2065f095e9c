"""Every notebook runs top to bottom at smoke scale and is stored without
outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, from the
repo root, with ``QJAX_SCALE=smoke`` and ``QJAX_NOTEBOOK_OUT`` a temporary
folder; the kernel inherits this process's environment.
"""

import os
import pathlib
import re
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
# Whole-notebook budget at smoke scale (kernel start and JAX compiles included).
NOTEBOOK_TIMEOUT_S = 300


def _check_kernel():
  try:
    KernelSpecManager().get_kernel_spec(KERNEL)
  except NoSuchKernel:
    pytest.fail(f"no Jupyter kernel named {KERNEL!r} (found "
                f"{sorted(KernelSpecManager().find_kernel_specs())}); install "
                "ipykernel (`pip install -e '.[test]'`) or register it with "
                "`python -m ipykernel install --user`.")


def test_notebooks_found():
  names = {p.stem for p in NOTEBOOKS}
  expected = {"table1", "sign_flips", "batch_size", "convex_floors",
              "markov_chain", "float_formats"}
  assert expected <= names, f"missing notebooks: {sorted(expected - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and
           (c.outputs or c.execution_count is not None)]
  assert not dirty, (
      f"{path.name}: code cells {dirty} carry outputs; strip them with "
      f"`jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)}` "
      "(nbconvert comes with `pip install -e '.[notebooks]'`).")


def test_readme_lists_every_notebook():
  readme = (ROOT / "notebooks" / "README.md").read_text()
  missing = [p.name for p in NOTEBOOKS if p.name not in readme]
  assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_scale(path, tmp_path, monkeypatch):
  _check_kernel()
  monkeypatch.setenv("QJAX_SCALE", "smoke")
  monkeypatch.setenv("QJAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
  client = NotebookClient(
      nb, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}},
      # nbclient's timeout is per cell: give each cell what is left.
      timeout_func=lambda _: max(1, int(deadline - time.monotonic())))
  # Fail outside the `except` so the cell's traceback is shown once.
  error = None
  try:
    client.execute()
  except CellExecutionError as e:
    # IPython colours its tracebacks; CI logs read better without the codes.
    error = (f"{path.name} failed at smoke scale:\n"
             + re.sub(r"\x1b\[[0-9;]*m", "", str(e)))
  except TimeoutError as e:
    error = f"{path.name} exceeded {NOTEBOOK_TIMEOUT_S} s at smoke scale: {e}"
  if error:
    pytest.fail(error, pytrace=False)
  assert list(tmp_path.glob("*.png")), f"{path.name} wrote no figure"
