"""Per-epoch checkpoints with orbax: a resumed sweep equals an unbroken one.

A checkpoint holds the stacked train states (params, optimizer state with SR's
key, batch-norm statistics, the run keys) and the metrics so far. Shuffles
and augmentation keys derive from ``fold_in(run_key, epoch)``, so training
resumed at epoch ``e`` draws exactly what it would have drawn.

Layout: one ``ocp.CheckpointManager`` directory per run, one step per epoch
(``<dir>/<epoch>/``), the last ``max_to_keep`` kept, each step written to a
temporary directory and renamed when complete (a process killed mid-save
leaves the previous step intact; the half-written one is ignored and cleaned
up). A step has two items:

* ``state``: the train state as the nested dict of
  ``flax.serialization.to_state_dict``, so orbax shows paths such as
  ``params/Dense_0/kernel``;
* ``meta``: JSON with the epoch, the metrics history, the run's
  *fingerprint* (everything that determines the run, given by the caller)
  and a sha256 *checksum* of the state.

Once orbax has finalized a step, ``qjax_files.json`` beside its items records
the sha256 of every file of the ``state`` item. A restore checks those first,
so that a corrupt file is refused before tensorstore reads it (a failing
orbax read leaves reads pending that later complain on stderr about a closed
event loop); a step without that file (a kill between the two writes) is
verified by the state checksum alone.

Results you can trust: a directory whose checkpoints carry another run's
fingerprint is refused (:class:`FingerprintMismatchError`) unless
``fresh=True`` discards them; a restore recomputes the checksum and falls
back to the previous checkpoint when the newest is corrupt or unreadable
(saying so on stderr), and raises :class:`CorruptCheckpointError` when none
verifies. :func:`lock_directory` keeps two processes out of one output
directory; :func:`check_writable` fails early on a directory that cannot be
written.

Non-finite floats of the history are stored as ``None`` (JSON has no NaN)
and come back as ``None``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

_STATE = "state"
_META = "meta"
_FILES = "qjax_files.json"  # sha256 of each file of the state item
_LOCK_FILE = ".qjax.lock"
_FORMAT = 2  # meta["format"]; the epoch_NNNNN layout before it was 1
_MAX_LISTED = 5
_HOW_TO_PROCEED = ("use another --out, or pass --fresh to discard these "
                   "checkpoints and start over")


class CheckpointError(Exception):
  """A checkpoint directory that cannot be used as it is."""


class FingerprintMismatchError(CheckpointError):
  """The directory holds checkpoints of another run."""


class CorruptCheckpointError(CheckpointError):
  """No checkpoint of the directory could be read and verified."""


class StateMismatchError(CheckpointError):
  """The checkpoints hold a state of another structure than this run's."""


class OutputLockedError(CheckpointError):
  """Another process holds the output directory's lock."""


class OutputNotWritableError(CheckpointError):
  """The output directory cannot be created or written."""


class _Unusable(Exception):
  """One checkpoint failed to read or verify; ``reason`` says why."""

  def __init__(self, reason: str, mismatch: bool = False):
    super().__init__(reason)
    self.reason = reason
    self.mismatch = mismatch


# ----------------------------------------------------------------------------
# JSON and fingerprints.
# ----------------------------------------------------------------------------


def _json_safe(value: Any, where: str = "value") -> Any:
  """``value`` with tuples as lists, numpy scalars as Python, NaN/inf None."""
  if isinstance(value, dict):
    return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  raise TypeError(
      f"{where} is a {type(value).__name__} ({value!r:.60}); checkpoint "
      "metadata allows only dicts, lists, str, int, float, bool and None. "
      "Convert it (e.g. dataclasses.asdict, str(...)) before passing it.")


def _normalized_fingerprint(fingerprint: dict) -> dict:
  if not isinstance(fingerprint, dict):
    raise TypeError(f"fingerprint must be a dict; got "
                    f"{type(fingerprint).__name__}.")
  return _json_safe(fingerprint, "fingerprint")


def _short(value: Any, limit: int = 40) -> str:
  text = "<missing>" if value is _MISSING else json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


_MISSING = object()


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b), key=str):
      sub = f"{path}.{k}" if path else str(k)
      _diff(a.get(k, _MISSING), b.get(k, _MISSING), sub, out)
  elif isinstance(a, list) and isinstance(b, list):
    for i in range(max(len(a), len(b))):
      _diff(a[i] if i < len(a) else _MISSING,
            b[i] if i < len(b) else _MISSING, f"{path}[{i}]", out)
  elif a != b or isinstance(a, bool) != isinstance(b, bool):
    out.append(f"{path}: {_short(a)} (checkpoint) vs {_short(b)} (this run)")


def fingerprint_diff(a: dict, b: dict) -> list[str]:
  """The differences of fingerprint ``a`` (checkpoint) and ``b`` (this run).

  Returns:
    One ``"dotted.path[i]: A (checkpoint) vs B (this run)"`` per differing
    leaf, sorted by path; ``<missing>`` where one side lacks the key.
  """
  out: list[str] = []
  _diff(_json_safe(a), _json_safe(b), "", out)
  return out


def _listed(items: list[str], sep: str = "; ",
            limit: int = _MAX_LISTED) -> str:
  shown = sep.join(items[:limit])
  more = len(items) - limit
  return shown + (f"{sep}and {more} more" if more > 0 else "")


def _mismatch_error(directory: str, step: int,
                    diffs: list[str]) -> FingerprintMismatchError:
  return FingerprintMismatchError(
      f"{directory} holds checkpoints of another run (epoch {step} differs: "
      f"{_listed(diffs)}). To proceed, {_HOW_TO_PROCEED}.")


# ----------------------------------------------------------------------------
# The directory: steps, legacy checkpoints, fresh starts.
# ----------------------------------------------------------------------------


def _steps(directory: str) -> list[int]:
  """The finalized steps of ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def check_epochs(directory: str, epochs: int) -> None:
  """Refuses checkpoints beyond ``epochs``: resuming would not shorten a run.

  A run may be extended (a 2-epoch checkpoint resumed with 3 epochs trains
  the third one, exactly as an uninterrupted 3-epoch run would: shuffles
  and keys derive from the epoch), never cut short.

  Raises:
    FingerprintMismatchError: ``directory`` holds a checkpoint of a later
      epoch than ``epochs``.
  """
  steps = _steps(os.path.abspath(directory)) if directory else []
  if steps and steps[-1] > epochs:
    raise FingerprintMismatchError(
        f"{os.path.abspath(directory)} holds checkpoints of another run "
        f"(train_config.epochs differs: it has trained {steps[-1]} epochs, "
        f"this run asks for {epochs}). To proceed, {_HOW_TO_PROCEED}.")


def _legacy_dirs(directory: str) -> list[str]:
  """``epoch_NNNNN`` checkpoints of qjax's first checkpoint format."""
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory)
                if re.fullmatch(r"epoch_\d+", n)
                and os.path.isdir(os.path.join(directory, n)))


def _checkpoint_entries(directory: str) -> list[str]:
  """Every entry of ``directory`` that a checkpoint wrote (steps, tmp)."""
  if not os.path.isdir(directory):
    return []
  return [n for n in os.listdir(directory)
          if re.fullmatch(r"\d+", n) or ocp.step.TMP_DIR_SUFFIX in n
          or re.fullmatch(r"epoch_\d+", n)]


def _discard(directory: str) -> None:
  """Deletes the checkpoints of ``directory``; other files stay."""
  for name in _checkpoint_entries(directory):
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def _read_meta(directory: str, step: int) -> dict:
  """The ``meta`` item of ``step``; raises :class:`_Unusable`."""
  path = os.path.join(directory, str(step), _META)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      meta = checkpointer.restore(path)
  except Exception as e:  # orbax, tensorstore, json, OS: all mean unreadable
    raise _Unusable(f"its metadata is unreadable ({_reason(e)})") from None
  keys = ("format", "epoch", "history", "fingerprint", "checksum",
          "meta_checksum")
  if not isinstance(meta, dict) or any(k not in meta for k in keys):
    raise _Unusable("its metadata is incomplete")
  if meta["meta_checksum"] != _meta_checksum(meta):
    raise _Unusable("its metadata fails its checksum")
  if meta["epoch"] != step:
    raise _Unusable(f"its metadata says epoch {meta['epoch']!r}")
  return meta


def check_fingerprint(directory: str, fingerprint: dict) -> None:
  """Refuses a directory that holds checkpoints of another run.

  Every readable checkpoint of ``directory`` must carry ``fingerprint``
  (unreadable ones are left to :meth:`RunCheckpoints.restore`). Nothing
  happens when the directory holds no checkpoints or does not exist.

  Raises:
    FingerprintMismatchError: naming the keys that differ and how to proceed.
  """
  directory = os.path.abspath(directory)
  fingerprint = _normalized_fingerprint(fingerprint)
  legacy = _legacy_dirs(directory)
  if legacy:
    raise FingerprintMismatchError(
        f"{directory} holds checkpoints of an older qjax ({legacy[-1]}/ and "
        f"{len(legacy) - 1} more) that record no fingerprint, so they cannot "
        f"be matched to this run. To proceed, {_HOW_TO_PROCEED}.")
  for step in reversed(_steps(directory)):
    try:
      meta = _read_meta(directory, step)
    except _Unusable:
      continue
    diffs = fingerprint_diff(meta["fingerprint"], fingerprint)
    if diffs:
      raise _mismatch_error(directory, step, diffs)


# ----------------------------------------------------------------------------
# State dicts and checksums.
# ----------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"params/Dense_0/kernel": leaf}`` of a nested dict; empties vanish."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {} if tree is None else {prefix: tree}


def _fill(skeleton: Any, flat: dict[str, Any], prefix: str = "") -> Any:
  """``skeleton`` (a nested dict) with its leaves taken from ``flat``."""
  if isinstance(skeleton, dict):
    return {k: _fill(v, flat, f"{prefix}/{k}" if prefix else str(k))
            for k, v in skeleton.items()}
  return None if skeleton is None else flat[prefix]


def _host(leaf: Any, path: str) -> np.ndarray:
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    raise TypeError(
        f"State leaf {path} is a typed PRNG key array ({dtype}); checkpoints "
        "store raw keys. Keep jax.random.key_data(key) in the state instead.")
  return np.asarray(leaf)


def _dtype(leaf: Any) -> np.dtype:
  """``leaf``'s dtype, without copying a device array to the host."""
  return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(
      leaf).dtype


def _checksum(flat: dict[str, np.ndarray]) -> str:
  """sha256 over path, dtype, shape and bytes of every leaf, sorted by path."""
  digest = hashlib.sha256()
  for path in sorted(flat):
    value = np.ascontiguousarray(flat[path])
    header = f"{path}\0{value.dtype.str}\0{value.shape}\0"
    digest.update(header.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _meta_checksum(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "meta_checksum"}
  text = json.dumps(body, sort_keys=True, allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def _file_hashes(root: str) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``root``."""
  hashes = {}
  for parent, _, names in os.walk(root):
    for name in names:
      path = os.path.join(parent, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      hashes[os.path.relpath(path, root)] = digest.hexdigest()
  return dict(sorted(hashes.items()))


def _write_file_hashes(step_dir: str) -> None:
  """Records the hashes of ``step_dir``'s state files, atomically."""
  hashes = _file_hashes(os.path.join(step_dir, _STATE))
  tmp = os.path.join(step_dir, _FILES + ".tmp")
  with open(tmp, "w") as f:
    json.dump(hashes, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, _FILES))


def _verify_file_hashes(step_dir: str) -> None:
  """Raises :class:`_Unusable` when a recorded state file changed."""
  path = os.path.join(step_dir, _FILES)
  if not os.path.exists(path):
    return  # killed before it was written: the state checksum decides
  try:
    with open(path) as f:
      recorded = json.load(f)
    if not isinstance(recorded, dict):
      raise ValueError(f"a {type(recorded).__name__}, not a dict")
    actual = _file_hashes(os.path.join(step_dir, _STATE))
  except (OSError, ValueError) as e:
    raise _Unusable(f"its file hashes are unreadable ({_reason(e)})"
                    ) from None
  changed = sorted(name for name, digest in recorded.items()
                   if actual.get(name) != digest)
  if changed:
    listed = _listed([f"{_STATE}/{name}" for name in changed], ", ", limit=2)
    raise _Unusable(f"its files changed after they were written ({listed})")


def _reason(e: BaseException) -> str:
  """A one-line, short account of ``e``."""
  text = " ".join(str(e).split())
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _structure_problems(stored: dict[str, Any],
                        like: dict[str, Any]) -> list[str]:
  """How the stored leaves (path -> metadata) differ from ``like``'s."""
  problems = [f"missing {p}" for p in sorted(set(like) - set(stored))]
  problems += [f"unexpected {p}" for p in sorted(set(stored) - set(like))]
  for p in sorted(set(like) & set(stored)):
    have = tuple(getattr(stored[p], "shape", ()) or ())
    want = tuple(np.shape(like[p]))
    if have != want:
      problems.append(f"{p} has shape {have}, this run's {want}")
  return problems


# ----------------------------------------------------------------------------
# Checkpoints of one run.
# ----------------------------------------------------------------------------


class RunCheckpoints:
  """The per-epoch checkpoints of one run in ``directory``.

  Args:
    directory: created if needed; one run's checkpoints (and nothing of
      another run's).
    fingerprint: a JSON-able dict of everything that determines the run
      (configs, dataset, model, qjax version, ...); stored in every
      checkpoint and compared when the directory is opened.
    fresh: discard the directory's checkpoints and start over.
    max_to_keep: how many of the newest checkpoints to keep (>= 1; 2 lets a
      corrupt newest fall back to the one before).

  Raises:
    FingerprintMismatchError: the directory holds another run's checkpoints.
    OutputNotWritableError: the directory cannot be created or written.

  Use as a context manager, or call :meth:`close`.
  """

  def __init__(self, directory: str, fingerprint: dict, *,
               fresh: bool = False, max_to_keep: int = 2):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be an int >= 1; got "
                       f"{max_to_keep!r}.")
    self.directory = os.path.abspath(directory)
    self.fingerprint = _normalized_fingerprint(fingerprint)
    check_writable(self.directory)
    if fresh:
      _discard(self.directory)
    else:
      check_fingerprint(self.directory, self.fingerprint)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  def __enter__(self) -> "RunCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending writes and releases orbax's resources."""
    self._manager.close()

  def steps(self) -> list[int]:
    """The epochs that have a checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, states, history: list, epoch: int) -> None:
    """Writes epoch ``epoch``'s checkpoint and waits until it is on disk.

    Checkpoints of epochs ``>= epoch`` (left by a run that fell back to an
    older one) are replaced; beyond ``max_to_keep`` the oldest go.
    """
    if not isinstance(epoch, (int, np.integer)) or epoch < 0:
      raise ValueError(f"epoch must be an int >= 0; got {epoch!r}.")
    epoch = int(epoch)
    state_dict = serialization.to_state_dict(states)
    flat = {p: _host(v, p) for p, v in _flatten(state_dict).items()}
    meta = {"format": _FORMAT, "epoch": epoch,
            "history": _json_safe(history, "history"),
            "fingerprint": self.fingerprint, "checksum": _checksum(flat)}
    meta["meta_checksum"] = _meta_checksum(meta)
    for step in self.steps():
      if step >= epoch:
        self._manager.delete(step)
    saved = self._manager.save(epoch, force=True, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeSave(_fill(state_dict, flat)),
        _META: ocp.args.JsonSave(meta)}))
    self._manager.wait_until_finished()
    if not saved:
      raise CheckpointError(f"orbax declined to save epoch {epoch} in "
                            f"{self.directory}.")
    _write_file_hashes(os.path.join(self.directory, str(epoch)))

  def restore(self, like):
    """``(states, history, epoch)`` of the newest verified checkpoint.

    Args:
      like: a state of this run's structure (its values are ignored); the
        restored leaves take its dtypes and come back as host numpy arrays.

    Returns:
      The restored triple, or None when the directory has no checkpoint.

    Raises:
      CorruptCheckpointError: no checkpoint reads and verifies.
      StateMismatchError: the checkpoints hold another structure of state.
      FingerprintMismatchError: they belong to another run.
    """
    like_dict = serialization.to_state_dict(like)
    like_flat = _flatten(like_dict)
    failed: list[tuple[int, _Unusable]] = []
    for step in reversed(self.steps()):
      try:
        flat, meta = self._restore_step(step, like_dict, like_flat)
      except _Unusable as e:
        failed.append((step, e))
        continue
      for bad, e in failed:
        print(f"qjax: checkpoint of epoch {bad} in {self.directory} is "
              f"unusable: {e.reason}; resumed from epoch {step} instead.",
              file=sys.stderr)
      flat = {p: np.asarray(v).astype(_dtype(like_flat[p]), copy=False)
              for p, v in flat.items()}
      states = serialization.from_state_dict(like, _fill(like_dict, flat))
      return states, meta["history"], meta["epoch"]
    if failed:
      raise self._none_usable(failed)
    return None

  def _none_usable(self, failed) -> CheckpointError:
    listed = "; ".join(f"epoch {s}: {e.reason}" for s, e in failed)
    if all(e.mismatch for _, e in failed):
      return StateMismatchError(
          f"The checkpoints in {self.directory} hold a state of another "
          f"structure than this run's ({listed}). To proceed, "
          f"{_HOW_TO_PROCEED}.")
    return CorruptCheckpointError(
        f"No checkpoint in {self.directory} could be read and verified "
        f"({listed}). Pass --fresh to discard them and start over, or use "
        "another --out.")

  def _restore_step(self, step: int, like_dict: dict, like_flat: dict):
    """The verified leaves and meta of ``step``; raises :class:`_Unusable`."""
    meta = _read_meta(self.directory, step)
    _verify_file_hashes(os.path.join(self.directory, str(step)))
    diffs = fingerprint_diff(meta["fingerprint"], self.fingerprint)
    if diffs:
      raise _mismatch_error(self.directory, step, diffs)
    try:
      stored = self._manager.item_metadata(step)[_STATE]
      stored = _flatten(dict(getattr(stored, "tree", stored)))
    except Exception as e:  # orbax, tensorstore, json, OS
      raise _Unusable(f"its state metadata is unreadable ({_reason(e)})"
                      ) from None
    problems = _structure_problems(stored, like_flat)
    if problems:
      raise _Unusable("its state does not match this run's: "
                      + _listed(problems, ", ", limit=3), mismatch=True)
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    restore_args = _fill(like_dict, {p: as_numpy for p in like_flat})
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(restore_args=restore_args)}))
      flat = _flatten(dict(restored[_STATE]))
    except Exception as e:  # orbax, tensorstore, OS
      raise _Unusable(f"its state is unreadable ({_reason(e)})") from None
    if set(flat) != set(like_flat):
      raise _Unusable("its state does not hold the leaves its metadata lists")
    if _checksum(flat) != meta["checksum"]:
      raise _Unusable("its state fails its checksum (the files changed "
                      "after they were written)")
    return flat, meta


# ----------------------------------------------------------------------------
# The output directory: one process at a time, writable.
# ----------------------------------------------------------------------------


def _holder(fd: int) -> str:
  """Who holds the lock, as its lock file tells."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 65536).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not isinstance(info, dict):
    info = {}
  return (f"pid {info.get('pid', 'unknown')}, started "
          f"{info.get('started', 'at an unknown time')}, command: "
          f"{info.get('what') or 'unknown'}")


@contextlib.contextmanager
def lock_directory(path: str, what: str = "") -> Iterator[str]:
  """Holds an exclusive advisory lock on ``path`` (created if needed).

  The lock is ``fcntl.flock`` on ``path/.qjax.lock``, which records this
  process's pid, start time and ``what`` (e.g. the command line). It is
  released on exit, or by the OS when the process dies. A second lock of
  the same directory fails, from another process or from this one.

  Yields:
    The absolute ``path``.

  Raises:
    OutputLockedError: another holder; its pid, start and command are named.
    OutputNotWritableError: the lock file cannot be created.
  """
  path = os.path.abspath(path)
  check_writable(path)
  lock_path = os.path.join(path, _LOCK_FILE)
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise OutputNotWritableError(
        f"Cannot create the lock file {lock_path} ({_reason(e)}); choose a "
        "writable --out.") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise OutputLockedError(
        f"{path} is in use by another qjax process ({holder}); wait for it "
        "to finish, or use another --out.") from None
  except OSError as e:
    os.close(fd)
    raise OutputNotWritableError(
        f"Cannot lock {lock_path} ({_reason(e)}); choose an --out on a "
        "local file system.") from None
  try:
    info = {"pid": os.getpid(), "what": what,
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    yield path
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def check_writable(path: str) -> None:
  """Creates ``path`` if needed and writes and removes a probe file there.

  Raises:
    OutputNotWritableError: naming the path and the OS error.
  """
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".qjax-write-probe-", dir=path)
    try:
      os.write(fd, b"probe")
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise OutputNotWritableError(
        f"Cannot write to {path} ({_reason(e)}); choose a writable --out."
    ) from None
