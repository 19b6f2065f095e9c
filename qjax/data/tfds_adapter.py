"""Adapter for tensorflow-datasets (optional extra `qjax[tfds]`).

Uses `tfds.data_source` (random access to ArrayRecord files), which needs
no TensorFlow. Datasets must be prepared in the ArrayRecord format, e.g.
`tfds.builder(name, file_format='array_record').download_and_prepare()`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from qjax.data.loaders import Dataset

Example = dict[str, Any]
Preprocess = Callable[[Example], tuple[np.ndarray, int]]


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "qjax.data's TFDS adapter needs tensorflow-datasets; install it with "
        "`pip install qjax[tfds]`") from e
  return tfds


def default_preprocess(example: Example) -> tuple[np.ndarray, int]:
  """`image` uint8 [H, W, C] -> float32 in [0, 1]; `label` as is."""
  image = np.asarray(example["image"])
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / np.float32(255)
  return image.astype(np.float32), example["label"]


def _stack(examples: Sequence[Example], preprocess: Preprocess):
  pairs = [preprocess(e) for e in examples]
  shapes = {p[0].shape for p in pairs}
  if len(shapes) > 1:
    raise ValueError(
        f"images of different shapes {sorted(shapes)[:3]} cannot be stacked; "
        f"pass preprocess= that resizes or crops to one shape")
  images = np.stack([p[0] for p in pairs])
  return images, np.asarray([p[1] for p in pairs], np.int32)


def _read_all(source, preprocess: Preprocess):
  return _stack([source[i] for i in range(len(source))], preprocess)


def load_tfds(name: str, data_dir: str | os.PathLike | None = None,
              split: tuple[str, str] = ("train", "test"), *,
              preprocess: Preprocess = default_preprocess) -> Dataset:
  """Loads a prepared TFDS image classification dataset into memory.

  For datasets that fit in memory; stream large ones with `tfds_batches`.

  Args:
    name: a TFDS name, e.g. 'cifar10' or 'svhn_cropped'.
    data_dir: TFDS data directory (None: TFDS's default).
    split: the (train, test) split names, e.g. ('train[:90%]', 'test').
    preprocess: maps an example dict to (image [H, W, C] float32, label).

  Returns:
    A Dataset; num_classes from the `label` feature.

  Raises:
    ImportError: tensorflow-datasets is not installed.
  """
  tfds = _tfds()
  train_split, test_split = split
  builder = tfds.builder(name, data_dir=data_dir)
  train = tfds.data_source(name, split=train_split, data_dir=data_dir)
  test = tfds.data_source(name, split=test_split, data_dir=data_dir)
  return Dataset(name, *_read_all(train, preprocess),
                 *_read_all(test, preprocess),
                 int(builder.info.features["label"].num_classes))


def tfds_batches(name: str, split: str, batch_size: int,
                 data_dir: str | os.PathLike | None = None, *,
                 seed: int | None = None, drop_remainder: bool = True,
                 preprocess: Preprocess = default_preprocess,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams one epoch of numpy batches from a prepared TFDS dataset.

  Reads only the examples of each batch, so it suits ImageNet-sized data.

  Args:
    name: a TFDS name, e.g. 'imagenet2012'.
    split: a split name, e.g. 'train'.
    batch_size: examples per batch.
    data_dir: TFDS data directory (None: TFDS's default).
    seed: if not None, shuffle the example order with this numpy seed.
    drop_remainder: drop the last partial batch.
    preprocess: maps an example dict to (image float32 [H, W, C], label);
      for ImageNet it must resize/crop to a common shape.

  Yields:
    (images float32 [B, H, W, C], labels int32 [B]).

  Raises:
    ImportError: tensorflow-datasets is not installed.
  """
  source = _tfds().data_source(name, split=split, data_dir=data_dir)
  order = np.arange(len(source))
  if seed is not None:
    order = np.random.default_rng(seed).permutation(order)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  for start in range(0, stop, batch_size):
    indices = [int(i) for i in order[start:start + batch_size]]
    yield _stack([source[i] for i in indices], preprocess)


class StreamingDataset(NamedTuple):
  """A dataset streamed epoch by epoch instead of held in memory (ImageNet).

  ``qjax.sweep.sweep`` accepts it wherever it accepts a :class:`Dataset`:
  every config of a chunk trains on the same stream (one shuffle per epoch,
  not one per seed), fed from the host batch by batch.

  Attributes:
    name: dataset name.
    num_classes: number of labels.
    num_train: training examples (sets ``steps_per_epoch``).
    train_batches: ``(epoch, batch_size) -> iterator of (x, y)`` numpy
      batches, shuffled per epoch, full batches only.
    test_batches: ``batch_size -> iterator of (x, y)`` covering the test set.
  """
  name: str
  num_classes: int
  num_train: int
  train_batches: Callable[[int, int], Iterator[tuple[np.ndarray, np.ndarray]]]
  test_batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


def tfds_stream(name: str, data_dir: str | os.PathLike | None = None,
                split: tuple[str, str] = ("train", "test"), *, seed: int = 0,
                preprocess: Preprocess = default_preprocess
                ) -> StreamingDataset:
  """A prepared TFDS dataset as a :class:`StreamingDataset` (e.g. ImageNet).

  Args:
    name: a TFDS name, e.g. 'imagenet2012'.
    data_dir: TFDS data directory (None: TFDS's default).
    split: the (train, test) split names, e.g. ('train', 'validation').
    seed: epoch ``e`` is shuffled with numpy seed ``seed + e``.
    preprocess: example dict -> (image float32 [H, W, C], label); for
      ImageNet it must resize/crop to one shape.
  """
  tfds = _tfds()
  train_split, test_split = split
  builder = tfds.builder(name, data_dir=data_dir)
  num_train = len(tfds.data_source(name, split=train_split, data_dir=data_dir))
  return StreamingDataset(
      name=name, num_classes=int(builder.info.features["label"].num_classes),
      num_train=num_train,
      train_batches=lambda epoch, batch_size: tfds_batches(
          name, train_split, batch_size, data_dir, seed=seed + epoch,
          preprocess=preprocess),
      test_batches=lambda batch_size: tfds_batches(
          name, test_split, batch_size, data_dir, drop_remainder=False,
          preprocess=preprocess))
