"""Readers for the on-disk formats: IDX (MNIST family) and CIFAR binary.

Both readers take bytes and return uint8 numpy arrays; they check the header
and the size against what the bytes claim, so a truncated file is an error,
never a silently shorter dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CIFAR_IMAGE_BYTES = 32 * 32 * 3


def maybe_gunzip(data: bytes) -> bytes:
  """Returns `data` decompressed if it starts with the gzip magic, else as
  is."""
  return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data


def digest(data: bytes, algorithm: str) -> str:
  """Returns the hex digest of `data` ('md5' or 'sha256')."""
  return hashlib.new(algorithm, data).hexdigest()


def parse_idx(data: bytes) -> np.ndarray:
  """Parses the bytes of one (decompressed) IDX file.

  The format is two zero bytes, a type code, the number of dimensions `d`,
  `d` big-endian uint32 sizes, then the values in C order.

  Args:
    data: the file's bytes.

  Returns:
    An array of the file's shape, in native byte order.

  Raises:
    ValueError: bad magic, unknown type code, or a size that does not match
      the header.
  """
  if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
    raise ValueError(
        f"not an IDX file: expected magic 00 00 <type in "
        f"{sorted(_IDX_DTYPES)}> <ndim>, got {data[:4].hex(' ')!r}")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(
        f"IDX size mismatch: header says shape {shape} ({expected} bytes), "
        f"file has {len(data)} bytes (truncated or padded)")
  values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
  return values.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file, gzipped or raw, with no checksum check.

  This is the low-level reader for files of any size (tests, custom data).
  `qjax.data.load` reads through the checksum registry instead.

  Args:
    path: an IDX file, optionally gzip-compressed (detected by its magic).

  Returns:
    The array stored in the file.
  """
  with open(path, "rb") as f:
    return parse_idx(maybe_gunzip(f.read()))


def cifar_records(data: bytes, label_bytes: int) -> np.ndarray:
  """Views CIFAR binary-version bytes as records.

  Each record is `label_bytes` label bytes (CIFAR-10: the label; CIFAR-100:
  coarse then fine) and 3072 pixel bytes: the red, green, then blue 32x32
  planes, each in row-major order.

  Args:
    data: the concatenated records of one file.
    label_bytes: 1 for CIFAR-10, 2 for CIFAR-100.

  Returns:
    uint8 [N, label_bytes + 3072].

  Raises:
    ValueError: the size is not a whole number of records.
  """
  record = label_bytes + CIFAR_IMAGE_BYTES
  if len(data) % record:
    raise ValueError(
        f"CIFAR binary size {len(data)} is not a multiple of the record "
        f"size {record} ({label_bytes} label bytes + {CIFAR_IMAGE_BYTES})")
  return np.frombuffer(data, np.uint8).reshape(-1, record)


def split_cifar_records(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Splits records [N, L + 3072] into images [N, 32, 32, 3] and labels [N, L].

  The file stores each image channel-major (CHW); this returns HWC.
  """
  label_bytes = records.shape[1] - CIFAR_IMAGE_BYTES
  images = records[:, label_bytes:].reshape(-1, 3, 32, 32)
  return images.transpose(0, 2, 3, 1), records[:, :label_bytes]


def parse_cifar(data: bytes, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Parses one CIFAR binary-version file, with no checksum check.

  Args:
    data: the file's bytes.
    label_bytes: 1 for CIFAR-10, 2 for CIFAR-100 (coarse, fine).

  Returns:
    (images uint8 [N, 32, 32, 3], labels uint8 [N, label_bytes]).
  """
  return split_cifar_records(cifar_records(data, label_bytes))
