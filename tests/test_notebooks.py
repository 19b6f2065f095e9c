"""Every notebook is stored executed at cpu scale and runs top to bottom at
smoke scale.

The stored notebooks carry the outputs of a whole run at ``cpu`` scale
(``python notebooks/execute.py --scale cpu notebooks/<name>.ipynb``), so
their tables and figures read without running anything.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, from the
repo root, with ``QJAX_SCALE=smoke`` and ``QJAX_NOTEBOOK_OUT`` a temporary
folder; the kernel inherits this process's environment.
"""

import importlib.util
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
  expected = {"table1", "sign_flips", "batch_size", "bit_width",
              "convex_floors", "markov_chain", "float_formats"}
  assert expected <= names, f"missing notebooks: {sorted(expected - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_executed_at_cpu_scale(path):
  nb = nbformat.read(path, as_version=4)
  how = ("run `python notebooks/execute.py --scale cpu "
         f"{path.relative_to(ROOT)}`")
  meta = nb.metadata.get("qjax", {})
  assert meta.get("scale") == "cpu", (
      f"{path.name} is not stored executed at cpu scale (metadata "
      f"{meta or 'missing'}); {how}")
  code = [c for c in nb.cells if c.cell_type == "code"]
  counts = [c.execution_count for c in code]
  assert counts == list(range(1, len(code) + 1)), (
      f"{path.name}: execution counts {counts} are not one run top to "
      f"bottom; {how}")
  errors = [i for i, c in enumerate(code)
            if any(o.output_type == "error" for o in c.outputs)]
  assert not errors, f"{path.name}: code cells {errors} stored an error"
  images = [o for c in code for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, f"{path.name}: no figure stored"
  assert meta.get("wall_s", 0) > 0 and meta.get("commit"), meta


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
  # Smoke runs are compile-bound: skip XLA's optimizations (as the in-process
  # smoke tests do, the fast_compile fixture) and compile each program once,
  # on one CPU device, not once per core (multi-device runs are tested in
  # tests/test_sweep.py). bit_width's notebook took 234 s of the 300 s
  # budget without these, with the suite on two workers.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
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


def _executor():
  spec = importlib.util.spec_from_file_location(
      "notebook_execute", ROOT / "notebooks" / "execute.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_executor_stores_progress_bars_as_shown():
  collapse = _executor()._collapse
  assert collapse("10%|#  \r50%|##### \r100%|##########\nnext\n") == (
      "100%|##########\nnext\n")
  assert collapse("no bars\n") == "no bars\n"


def test_executor_refuses_missing_notebook(capsys):
  with pytest.raises(SystemExit) as e:
    _executor().main(["--scale", "cpu", "notebooks/no_such.ipynb"])
  assert e.value.code == 2
  assert "no such notebook: notebooks/no_such.ipynb" in capsys.readouterr().err
