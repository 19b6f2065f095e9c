"""Loaders: read verified files from the cache into numpy arrays. Never
download."""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import numpy as np

from qjax.data import formats
from qjax.data import registry
from qjax.data.errors import DatasetCorruptError
from qjax.data.errors import DatasetNotFoundError
from qjax.data.errors import fetch_command

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Dataset(NamedTuple):
  """An in-memory classification dataset.

  Attributes:
    name: the dataset's name, e.g. 'mnist'.
    train_x: float32 [N, H, W, C] images in [0, 1].
    train_y: int32 [N] labels in [0, num_classes).
    test_x: float32 [M, H, W, C] images in [0, 1].
    test_y: int32 [M] labels.
    num_classes: number of classes.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int


def default_cache_dir() -> pathlib.Path:
  """Returns `$QJAX_DATA` if set, else `~/.cache/qjax/datasets`."""
  env = os.environ.get("QJAX_DATA")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "qjax" / "datasets"


def dataset_dir(name: str, cache_dir: str | os.PathLike | None) -> pathlib.Path:
  """Returns `<cache_dir>/<name>`, with the default cache when None."""
  root = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
  return root / name


def check_content(data: bytes, spec: registry.FileSpec, fmt: str) -> np.ndarray:
  """Checks a canonical file's bytes against its spec and parses them.

  Args:
    data: the file's canonical (decompressed) bytes.
    spec: the expected checksum and shape.
    fmt: 'idx' or 'cifar'.

  Returns:
    The parsed IDX array, or the CIFAR records as uint8 [N, record_bytes].

  Raises:
    ValueError: checksum, magic, or shape mismatch (message says which).
  """
  algorithm = "sha256" if spec.sha256 else "md5"
  expected = spec.sha256 or spec.md5
  if expected is None:
    raise ValueError(f"{spec.filename}: registry entry has no checksum")
  actual = formats.digest(data, algorithm)
  if actual != expected:
    raise ValueError(
        f"{algorithm} mismatch: expected {expected}, got {actual} "
        f"({len(data)} bytes)")
  if fmt == "idx":
    array = formats.parse_idx(data)
  else:
    array = formats.cifar_records(data, label_bytes=spec.shape[-1] - 3072)
  if array.shape != tuple(spec.shape):
    raise ValueError(f"shape mismatch: expected {tuple(spec.shape)}, "
                     f"got {array.shape}")
  return array


def read_verified(name: str, role: str,
                  cache_dir: str | os.PathLike | None) -> np.ndarray:
  """Reads one cached file of dataset `name` and checks it.

  Args:
    name: a key of `registry.DATASETS`.
    role: a key of that dataset's `files`.
    cache_dir: the cache root, or None for `default_cache_dir()`.

  Returns:
    See `check_content`.

  Raises:
    DatasetNotFoundError: the file is missing.
    DatasetCorruptError: the file fails its checksum or format check.
  """
  spec = registry.DATASETS[name]
  file_spec = spec.files[role]
  path = dataset_dir(name, cache_dir) / file_spec.filename
  command = fetch_command(name, cache_dir)
  if not path.is_file():
    raise DatasetNotFoundError(
        f"{name}: expected file {path} is missing. Loaders never download; "
        f"fetch it first with:\n  {command}")
  try:
    return check_content(path.read_bytes(), file_spec, spec.format)
  except ValueError as e:
    raise DatasetCorruptError(
        f"{name}: file {path} is corrupt: {e}. Replace it with a verified "
        f"copy with:\n  {command}") from e


def _images(pixels: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W] or [N, H, W, C] -> float32 NHWC in [0, 1]."""
  if pixels.ndim == 3:
    pixels = pixels[..., None]
  images = pixels.astype(np.float32)
  images /= np.float32(255)  # in place: no second full-size temporary
  return images


def _load_idx(name: str, cache_dir) -> Dataset:
  arrays = {role: read_verified(name, role, cache_dir)
            for role in ("train_x", "train_y", "test_x", "test_y")}
  return Dataset(name, _images(arrays["train_x"]),
                 arrays["train_y"].astype(np.int32), _images(arrays["test_x"]),
                 arrays["test_y"].astype(np.int32),
                 registry.DATASETS[name].num_classes)


def _load_cifar_split(name: str, split: str, cache_dir,
                      label_column: int) -> tuple[np.ndarray, np.ndarray]:
  roles = [r for r in registry.DATASETS[name].files if r.startswith(split)]
  images, labels = [], []
  for role in roles:
    records = read_verified(name, role, cache_dir)
    x, y = formats.split_cifar_records(records)
    images.append(x)
    labels.append(y[:, label_column])
  return (_images(np.concatenate(images)),
          np.concatenate(labels).astype(np.int32))


def _load_cifar(name: str, cache_dir, label_mode: str) -> Dataset:
  num_classes = registry.DATASETS[name].num_classes
  column = 0
  if name == "cifar100":
    column, num_classes = (0, 20) if label_mode == "coarse" else (1, 100)
  train = _load_cifar_split(name, "train", cache_dir, column)
  test = _load_cifar_split(name, "test", cache_dir, column)
  return Dataset(name, *train, *test, num_classes)


def load_digits(test_fraction: float = DIGITS_TEST_FRACTION,
                seed: int = DIGITS_SPLIT_SEED) -> Dataset:
  """scikit-learn's bundled 8x8 digits with a fixed, seeded split.

  Args:
    test_fraction: share of the 1797 images held out (rounded up).
    seed: seed of the numpy permutation that assigns images to splits.

  Returns:
    A Dataset of float32 [N, 8, 8, 1] images scaled by 1/16 into [0, 1];
    with the defaults, 1437 train and 360 test images.
  """
  try:
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load('digits') needs scikit-learn: "
        "pip install qjax[experiments]") from e
  bunch = sk_datasets.load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  num_test = int(np.ceil(test_fraction * len(labels)))
  train, test = order[:-num_test], order[-num_test:]
  return Dataset("digits", images[train], labels[train], images[test],
                 labels[test], 10)


def load(name: str, cache_dir: str | os.PathLike | None = None, *,
         label_mode: str = "fine") -> Dataset:
  """Loads a dataset from verified files in the cache.

  Loaders never download: fetch first with `python -m qjax.data fetch NAME`.
  Every file is checked (checksum, header, size) on each load.

  Args:
    name: 'mnist', 'fashion_mnist', 'digits', 'cifar10' or 'cifar100'.
    cache_dir: cache root; None means `default_cache_dir()`. Ignored for
      'digits', which ships with scikit-learn.
    label_mode: CIFAR-100 only: 'fine' (100 classes) or 'coarse' (20).

  Returns:
    A Dataset with float32 NHWC images in [0, 1] and int32 labels.

  Raises:
    ValueError: unknown name or label_mode.
    DatasetNotFoundError: a file is missing (message gives the fetch command).
    DatasetCorruptError: a file is corrupt (same).

  Example:
    >>> ds = load("mnist")  # after `python -m qjax.data fetch mnist`
    >>> ds.train_x.shape
    (60000, 28, 28, 1)
  """
  if name not in registry.KNOWN_NAMES:
    raise ValueError(
        f"unknown dataset {name!r}; known names: "
        f"{', '.join(registry.KNOWN_NAMES)}"
        ". For other datasets use load_tfds(name).")
  if label_mode not in ("fine", "coarse") or (
      label_mode == "coarse" and name != "cifar100"):
    raise ValueError(
        f"label_mode must be 'fine' (any dataset) or 'coarse' (cifar100 only); "
        f"got label_mode={label_mode!r} for {name!r}")
  if name == "digits":
    return load_digits()
  if registry.DATASETS[name].format == "idx":
    return _load_idx(name, cache_dir)
  return _load_cifar(name, cache_dir, label_mode)
