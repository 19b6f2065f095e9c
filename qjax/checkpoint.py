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
  # Saved as numbered leaves: orbax would store a dataclass as a dict with
  # sorted keys, losing the field order that unflattening needs.
  host = {f"leaf_{i:06d}": np.asarray(v)
          for i, v in enumerate(jax.tree.leaves(states))}
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
  leaves = [host[k] for k in sorted(host)]
  like_leaves, treedef = jax.tree.flatten(like)
  shapes_match = len(leaves) == len(like_leaves) and all(
      np.shape(v) == np.shape(l) for v, l in zip(leaves, like_leaves))
  if not shapes_match:
    raise ValueError(
        f"Checkpoint {path} does not match this sweep's state (different "
        "model, method or number of configs). Use another --out directory or "
        "delete the checkpoint.")
  states = jax.tree.unflatten(treedef, [
      jax.numpy.asarray(np.asarray(v).astype(np.asarray(l).dtype))
      for v, l in zip(leaves, like_leaves)])
  return states, meta["history"], meta["epoch"]
