"""Executes notebooks in place at a scale, keeping their outputs.

    python notebooks/execute.py --scale cpu notebooks/table1.ipynb ...

Each notebook runs top to bottom in a fresh ``python3`` kernel from the
repo root, with ``QJAX_SCALE`` set and ``QJAX_NOTEBOOK_OUT`` unset (the
notebook's default, ``results/notebooks/<name>/``). The executed notebook
is written back with its outputs and, in its metadata under ``qjax``, the
scale, the wall time in seconds, the date and the commit it ran at (with
``+dirty`` if tracked files other than the notebooks had changes). Progress bars are stored as a
terminal would show them at the end (carriage-return updates collapsed).
A cell that fails stops the notebook, which is then not written (exit 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commit() -> str:
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
  sha = git("rev-parse", "--short", "HEAD") or "unknown"
  # The notebooks themselves change as a batch executes: not counted.
  changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                ":(exclude)notebooks/*.ipynb")
  return sha + ("+dirty" if changed else "")


def _collapse(text: str) -> str:
  """Each line as a terminal shows it after its last carriage return."""
  return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def execute(path: pathlib.Path, scale: str, timeout_s: int) -> float:
  nb = nbformat.read(path, as_version=4)
  env = {**os.environ, "QJAX_SCALE": scale, "MPLBACKEND": "Agg"}
  env.pop("QJAX_NOTEBOOK_OUT", None)
  os.environ.update(env)
  os.environ.pop("QJAX_NOTEBOOK_OUT", None)
  commit = _commit()
  t0 = time.monotonic()
  NotebookClient(nb, kernel_name="python3", timeout=timeout_s,
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  seconds = time.monotonic() - t0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        out["text"] = _collapse(out["text"])
  nb.metadata["qjax"] = {
      "scale": scale, "wall_s": round(seconds, 1), "commit": commit,
      "date": datetime.date.today().isoformat()}
  nbformat.write(nb, path)
  return seconds


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
  p.add_argument("--timeout", type=int, default=3600,
                 help="seconds per cell (default 3600)")
  p.add_argument("notebooks", nargs="+", type=pathlib.Path)
  args = p.parse_args(argv)
  missing = [str(n) for n in args.notebooks if not n.is_file()]
  if missing:
    p.error(f"no such notebook: {', '.join(missing)}")
  for path in args.notebooks:
    print(f"{path}: executing at {args.scale} scale", flush=True)
    try:
      seconds = execute(path, args.scale, args.timeout)
    except CellExecutionError as e:
      print(re.sub(r"\x1b\[[0-9;]*m", "", str(e)), file=sys.stderr)
      print(f"{path}: FAILED, not written", file=sys.stderr)
      return 1
    print(f"{path}: done in {seconds:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
