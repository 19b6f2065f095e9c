"""What identifies a run: its fingerprint, for checkpoints and results.

A checkpoint records :func:`fingerprint`; resuming with another one is
refused (:class:`qjax.checkpoint.FingerprintMismatchError`), so a changed
flag, seed, dataset, model, task or validation split never continues another
run's training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np

from qjax import network as network_lib
from qjax import train as train_lib


def is_streaming(dataset) -> bool:
  """A :class:`qjax.data.StreamingDataset` rather than in-memory arrays."""
  return hasattr(dataset, "train_batches")


def fingerprint(model, dataset, config: train_lib.TrainConfig,
                configs: list[dict], strategy,
                task: train_lib.Task = train_lib.CLASSIFICATION,
                validation: tuple | None = None) -> dict:
  """Everything that determines a chunk's run, as JSON-able values.

  A checkpoint records it; resuming with another fingerprint is refused
  (:class:`qjax.checkpoint.FingerprintMismatchError`), so a changed flag, seed,
  dataset or model never continues another run's training.
  """
  import jax as _jax
  import jaxlib
  import qjax
  train_config = dataclasses.asdict(config)
  # Not the epoch count: a run may be extended (checkpoint.check_epochs).
  del train_config["epochs"]
  # The default source leaves the fingerprint as it was before the option
  # existed, so earlier runs' checkpoints still resume.
  if train_config.get("random_bits") == "threefry":
    del train_config["random_bits"]
  return {
      "train_config": train_config,
      "configs": [dict(c) for c in configs],
      "strategy": dataclasses.asdict(strategy),
      "dataset": describe_dataset(dataset),
      "model": model_definition(model),
      "task": task.name,
      "validation": (None if validation is None else
                     _hash_arrays(tuple(_Hashable(a) for a in validation))),
      "versions": {"qjax": qjax.__version__, "jax": _jax.__version__,
                   "jaxlib": jaxlib.__version__},
  }


def model_definition(model) -> str:
  """The model's definition without memory addresses (stable across
  processes): ``repr`` of a Linen module, the graph of an NNX model."""
  if isinstance(model, str):
    return re.sub(r" at 0x[0-9a-fA-F]+", "", model)
  return network_lib.as_network(model).definition


class _Hashable:
  """An array keyed by identity, so its content hash is computed once."""

  def __init__(self, array):
    self.array = array

  def __hash__(self):
    return id(self.array)

  def __eq__(self, other):
    return self.array is other.array


def describe_dataset(dataset) -> dict:
  """Name, sizes and (in memory) a content hash of ``dataset``."""
  if is_streaming(dataset):
    return {"name": dataset.name, "train": int(dataset.num_train),
            "streamed": True}
  arrays = (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y)
  content = _hash_arrays(tuple(_Hashable(a) for a in arrays))
  return {"name": dataset.name, "train": int(dataset.train_x.shape[0]),
          "test": int(dataset.test_x.shape[0]),
          "input_shape": list(dataset.train_x.shape[1:]),
          "num_classes": int(dataset.num_classes), "content": content}


@functools.lru_cache(maxsize=8)
def _hash_arrays(arrays: tuple) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for wrapped in arrays:
    a = np.ascontiguousarray(np.asarray(wrapped.array))
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(memoryview(a).cast("B"))
  return digest.hexdigest()
