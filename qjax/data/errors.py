"""Errors raised when a dataset's files are missing or corrupt."""

from __future__ import annotations

import os


def fetch_command(name: str, cache_dir: str | os.PathLike | None = None) -> str:
  """Returns the shell command that fills the cache for dataset `name`.

  Args:
    name: a dataset name known to `qjax.data.load`.
    cache_dir: the cache directory, or None for the default one.

  Returns:
    e.g. ``python -m qjax.data fetch mnist --cache-dir /data``.
  """
  command = f"python -m qjax.data fetch {name}"
  if cache_dir is not None:
    command += f" --cache-dir {os.fspath(cache_dir)}"
  return command


class DatasetNotFoundError(FileNotFoundError):
  """A dataset file is not in the cache; the message says how to fetch it."""


class DatasetCorruptError(ValueError):
  """A dataset file fails its checksum or format check."""
