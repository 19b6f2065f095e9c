"""Per-epoch checkpoints with orbax; a resumed sweep equals an uninterrupted one.

A checkpoint holds the stacked train states (params, optimizer state with SR's
key, batch-norm statistics, the run keys) and the metrics so far. Shuffles
and augmentation keys derive from ``fold_in(run_key, epoch)``, so training
resumed at epoch ``e`` draws exactly what it would have drawn.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta.json"


def _epoch_dirs(directory: str) -> list[tuple[int, str]]:
  if not os.path.isdir(directory):
    return []
  found = []
  for name in os.listdir(directory):
    if name.startswith("epoch_") and os.path.exists(
        os.path.join(directory, name, _META)):
      found.append((int(name.split("_")[1]), os.path.join(directory, name)))
  return sorted(found)


def save(directory: str, states, history: list, epoch: int,
         keep: int = 1) -> str:
  """Writes epoch ``epoch``'s checkpoint; older ones beyond ``keep`` go."""
  path = os.path.abspath(os.path.join(directory, f"epoch_{epoch:05d}"))
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(path):
    shutil.rmtree(path)
  host = jax.tree.map(np.asarray, states)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, _STATE), host)
  tmp = os.path.join(path, _META + ".tmp")
  with open(tmp, "w") as f:  # written last: its presence marks completeness
    json.dump({"epoch": epoch, "history": history}, f)
  os.replace(tmp, os.path.join(path, _META))
  for _, old in _epoch_dirs(directory)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return path


def restore(directory: str, like):
  """``(states, history, epoch)`` from the newest checkpoint, or None.

  Args:
    directory: where :func:`save` wrote.
    like: a state tree of the right structure (its values are ignored).
  """
  found = _epoch_dirs(directory)
  if not found:
    return None
  _, path = found[-1]
  with open(os.path.join(path, _META)) as f:
    meta = json.load(f)
  with ocp.PyTreeCheckpointer() as checkpointer:
    host = checkpointer.restore(os.path.join(path, _STATE))
  leaves = jax.tree.leaves(host)
  treedef = jax.tree.structure(like)
  if len(leaves) != treedef.num_leaves:
    raise ValueError(
        f"Checkpoint {path} holds {len(leaves)} arrays but the sweep's state "
        f"has {treedef.num_leaves}: it was written by a different model or "
        "method. Use another --out directory or delete the checkpoint.")
  states = jax.tree.unflatten(treedef, [
      np.asarray(v).astype(np.asarray(l).dtype) for v, l in zip(
          _ordered_leaves(host, like), jax.tree.leaves(like))])
  return jax.tree.map(jax.numpy.asarray, states), meta["history"], meta["epoch"]


def _ordered_leaves(host, like):
  """Leaves of the restored tree in ``like``'s flattening order."""
  try:
    return jax.tree.leaves(jax.tree.unflatten(
        jax.tree.structure(like), jax.tree.leaves(host)))
  except ValueError:  # pragma: no cover
    return jax.tree.leaves(host)
