"""Checkpoints you can trust: layout, fingerprints, checksums, locks."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qjax import checkpoint as ckpt
from qjax.checkpoint import (CheckpointError, CorruptCheckpointError,
                             FingerprintMismatchError, OutputLockedError,
                             RunCheckpoints, StateMismatchError,
                             check_fingerprint, check_writable,
                             fingerprint_diff, lock_directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = {"train_config": {"method": "sr", "epochs": 3},
               "configs": [{"seed": 0, "lr": 0.01}, {"seed": 1, "lr": 0.01}],
               "dataset": {"name": "digits", "num_train": 512}}


class State(flax.struct.PyTreeNode):
  """A TrainState-like pytree: int32, uint32 and float32 leaves."""
  step: jax.Array
  params: dict
  opt_state: tuple
  key: jax.Array


def _state(seed: int, width: int = 32) -> State:
  rng = np.random.default_rng(seed)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(
      size=(2, 64, width)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(2, width)),
                                            jnp.float32)}}
  opt_state = optax.adam(1e-3).init(params)  # with an EmptyState inside
  opt_state = jax.tree.map(lambda v: v + seed, opt_state)
  return State(step=jnp.asarray([seed, seed], jnp.int32), params=params,
               opt_state=opt_state,
               key=jnp.asarray(rng.integers(0, 2**32, size=(2, 2)),
                               jnp.uint32))


def _like() -> State:
  return jax.tree.map(jnp.zeros_like, _state(0))


def _history(epochs: int) -> list:
  return [{"epoch": e, "test_error": [0.5 / e, float("nan")],
           "sign_flips": {"Dense_0": [e, None]}}
          for e in range(1, epochs + 1)]


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _save_epochs(directory, epochs=(1, 2), fingerprint=FINGERPRINT):
  with RunCheckpoints(directory, fingerprint) as run:
    for e in epochs:
      run.save(_state(e), _history(e), e)


def _restore(directory, fingerprint=FINGERPRINT, like=None):
  with RunCheckpoints(directory, fingerprint) as run:
    return run.restore(_like() if like is None else like)


def _data_files(directory, step):
  """The orbax array data files of ``step``'s state (ocdbt ``d/`` files)."""
  root = os.path.join(directory, str(step), "state")
  found = [os.path.join(d, n) for d, _, names in os.walk(root)
           for n in names if os.path.basename(d) == "d"]
  assert found, f"no data files under {root}"
  return sorted(found)


def _flip(path, position=None):
  with open(path, "r+b") as f:
    size = f.seek(0, os.SEEK_END)
    position = size // 2 if position is None else position % size
    f.seek(position)
    byte = f.read(1)
    f.seek(position)
    f.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------------------
# Round trip and layout.
# ---------------------------------------------------------------------------


def test_round_trip_is_bit_for_bit_with_dtypes(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory, epochs=(1,))
  states, history, epoch = _restore(directory)
  _assert_same(states, _state(1))
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(states))
  assert epoch == 1
  # NaN is stored as None (JSON has no NaN) and comes back as stored.
  assert history == [{"epoch": 1, "test_error": [0.5, None],
                      "sign_flips": {"Dense_0": [1, None]}}]


def test_an_empty_directory_restores_nothing(tmp_path):
  assert _restore(str(tmp_path / "run")) is None


def test_orbax_shows_the_state_by_name(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory, epochs=(1,))
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(directory, "1", "state"))
  assert set(tree) == {"step", "params", "opt_state", "key"}
  np.testing.assert_array_equal(tree["params"]["Dense_0"]["kernel"],
                                _state(1).params["Dense_0"]["kernel"])
  assert tree["key"].dtype == np.uint32
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(directory, "1", "meta"))
  assert meta["epoch"] == 1 and meta["fingerprint"] == FINGERPRINT
  assert len(meta["checksum"]) == 64


def test_keeps_the_last_two_checkpoints(tmp_path):
  directory = str(tmp_path / "run")
  with RunCheckpoints(directory, FINGERPRINT) as run:
    for e in (1, 2, 3, 4):
      run.save(_state(e), _history(e), e)
    assert run.steps() == [3, 4]
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["3", "4"]
  states, _, epoch = _restore(directory)
  assert epoch == 4
  _assert_same(states, _state(4))


def test_a_half_written_step_is_ignored_and_cleaned_up(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory, epochs=(1,))
  partial = os.path.join(directory, "2.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(directory, "1"), partial)
  states, _, epoch = _restore(directory)
  assert epoch == 1
  _assert_same(states, _state(1))
  assert not os.path.exists(partial)


def test_a_state_of_another_structure_is_refused(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory, epochs=(1,))
  other = jax.tree.map(jnp.zeros_like, _state(0, width=16))
  with pytest.raises(StateMismatchError, match=r"Dense_0/bias has shape "
                     r"\(2, 32\), this run's \(2, 16\).*--fresh"):
    _restore(directory, like=other)


# ---------------------------------------------------------------------------
# Fingerprints.
# ---------------------------------------------------------------------------


def _other_fingerprint(lr=0.5):
  configs = [dict(FINGERPRINT["configs"][0], lr=lr), FINGERPRINT["configs"][1]]
  return dict(FINGERPRINT, configs=configs)


def test_another_runs_checkpoints_are_refused(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  with pytest.raises(FingerprintMismatchError) as info:
    RunCheckpoints(directory, _other_fingerprint())
  message = str(info.value)
  assert "configs[0].lr: 0.01 (checkpoint) vs 0.5 (this run)" in message
  assert directory in message and "--fresh" in message and "--out" in message
  with pytest.raises(FingerprintMismatchError, match=r"configs\[0\]\.lr"):
    check_fingerprint(directory, _other_fingerprint())
  check_fingerprint(directory, FINGERPRINT)  # the same run: no error
  check_fingerprint(str(tmp_path / "nothing"), FINGERPRINT)
  assert _restore(directory)[2] == 2  # nothing was touched


def test_fingerprint_diff_names_dotted_paths_and_caps_the_message(tmp_path):
  a = {"x": {"y": 1, "z": [1, 2]}, "gone": "a"}
  b = {"x": {"y": 2, "z": [1]}, "new": (3,)}
  assert fingerprint_diff(a, b) == [
      'gone: "a" (checkpoint) vs <missing> (this run)',
      "new: <missing> (checkpoint) vs [3] (this run)",
      "x.y: 1 (checkpoint) vs 2 (this run)",
      "x.z[1]: 2 (checkpoint) vs <missing> (this run)"]
  assert fingerprint_diff(a, a) == []
  assert fingerprint_diff({"lr": 1}, {"lr": 1.0}) == []
  assert fingerprint_diff({"x": True}, {"x": 1}) == [
      "x: true (checkpoint) vs 1 (this run)"]
  directory = str(tmp_path / "run")
  _save_epochs(directory, epochs=(1,), fingerprint={f"k{i}": i
                                                     for i in range(8)})
  with pytest.raises(FingerprintMismatchError, match="and 3 more"):
    check_fingerprint(directory, {f"k{i}": -i - 1 for i in range(8)})


def test_fresh_discards_the_checkpoints_and_starts_over(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  (tmp_path / "run" / "results.json").write_text("{}")
  with RunCheckpoints(directory, _other_fingerprint(), fresh=True) as run:
    assert run.steps() == []
    assert run.restore(_like()) is None
    run.save(_state(7), _history(1), 1)
  assert (tmp_path / "run" / "results.json").exists()
  assert _restore(directory, _other_fingerprint())[2] == 1


def test_checkpoints_of_the_old_format_are_refused(tmp_path):
  old = tmp_path / "run" / "epoch_00002"
  old.mkdir(parents=True)
  (old / "meta.json").write_text('{"epoch": 2, "history": []}')
  with pytest.raises(FingerprintMismatchError, match="older qjax"):
    RunCheckpoints(str(tmp_path / "run"), FINGERPRINT)
  with RunCheckpoints(str(tmp_path / "run"), FINGERPRINT, fresh=True):
    assert not old.exists()


# ---------------------------------------------------------------------------
# Corruption: checksums, fallback to the previous checkpoint.
# ---------------------------------------------------------------------------


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, capsys):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  for path in _data_files(directory, 2):
    _flip(path)
  with RunCheckpoints(directory, FINGERPRINT) as run:
    states, history, epoch = run.restore(_like())
    assert epoch == 1 and len(history) == 1
    _assert_same(states, _state(1))
    err = capsys.readouterr().err
    assert "epoch 2" in err and "resumed from epoch 1" in err
    assert len(err.strip().splitlines()) == 1
    run.save(_state(2), _history(2), 2)  # replaces the corrupt one
  states, _, epoch = _restore(directory)
  assert epoch == 2 and capsys.readouterr().err == ""
  _assert_same(states, _state(2))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, capsys):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  biggest = max(_data_files(directory, 2), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  states, _, epoch = _restore(directory)
  assert epoch == 1
  _assert_same(states, _state(1))
  assert "resumed from epoch 1" in capsys.readouterr().err


def test_an_unreadable_meta_falls_back_to_the_previous(tmp_path, capsys):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  meta_dir = os.path.join(directory, "2", "meta")
  for name in os.listdir(meta_dir):
    if not name.startswith("commit"):
      with open(os.path.join(meta_dir, name), "r+b") as f:
        f.truncate(10)
  assert _restore(directory)[2] == 1
  assert "epoch 2" in capsys.readouterr().err


def test_the_state_checksum_catches_changed_weights(tmp_path, capsys):
  """Valid orbax files with other values (here epoch 1's state under epoch
  2, without the file hashes that would catch it first) are refused."""
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  os.remove(os.path.join(directory, "2", ckpt._FILES))
  shutil.rmtree(os.path.join(directory, "2", "state"))
  shutil.copytree(os.path.join(directory, "1", "state"),
                  os.path.join(directory, "2", "state"))
  states, _, epoch = _restore(directory)
  assert epoch == 1
  _assert_same(states, _state(1))
  err = capsys.readouterr().err
  assert "epoch 2" in err and "checksum" in err


def test_a_step_without_file_hashes_is_verified_by_its_checksum(tmp_path):
  """A kill between orbax's finalize and the file hashes loses nothing."""
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  os.remove(os.path.join(directory, "2", ckpt._FILES))
  states, _, epoch = _restore(directory)
  assert epoch == 2
  _assert_same(states, _state(2))


def test_no_verified_checkpoint_raises_a_clear_error(tmp_path):
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  for path in _data_files(directory, 1):
    _flip(path)
  biggest = max(_data_files(directory, 2), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(7)
  with pytest.raises(CorruptCheckpointError) as info:
    _restore(directory)
  message = str(info.value)
  assert "epoch 2:" in message and "epoch 1:" in message
  assert "--fresh" in message and directory in message
  assert info.value.__cause__ is None and info.value.__context__ is None
  assert type(info.value) is CorruptCheckpointError


def test_flipped_bytes_are_detected_or_harmless(tmp_path):
  """Wherever a byte flips in a step's files, restore either notices
  (falls back, or raises a CheckpointError) or restores the saved bits."""
  directory = str(tmp_path / "run")
  _save_epochs(directory)
  step_dir = os.path.join(directory, "2")
  pristine = str(tmp_path / "pristine")
  shutil.copytree(step_dir, pristine)
  files = sorted(os.path.join(d, n) for d, _, names in os.walk(pristine)
                 for n in names)
  rng = np.random.default_rng(0)
  outcomes = set()
  for i in range(24):
    shutil.rmtree(step_dir)
    shutil.copytree(pristine, step_dir)
    target = files[i % len(files)].replace(pristine, step_dir)
    _flip(target, int(rng.integers(0, 1 << 30)))
    try:
      states, _, epoch = _restore(directory)
    except CheckpointError:
      outcomes.add("error")
      continue
    _assert_same(states, _state(epoch))
    outcomes.add("fallback" if epoch == 1 else "same")
  assert "fallback" in outcomes or "error" in outcomes


def test_a_killed_save_leaves_a_readable_checkpoint(tmp_path):
  """kill -9 during a save: the next run resumes from a verified epoch."""
  directory = str(tmp_path / "run")
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from qjax.checkpoint import RunCheckpoints
      def state(e):
        return {{"params": {{"w": np.full((512, 512), e, np.float32)}},
                 "step": np.int32(e)}}
      with RunCheckpoints({directory!r}, {{"run": 1}}) as run:
        for e in range(1, 1000):
          print(e, flush=True)
          run.save(state(e), [], e)
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  try:
    while int(proc.stdout.readline() or 0) < 3:
      assert proc.poll() is None, "the saving process died"
    time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  like = {"params": {"w": np.zeros((512, 512), np.float32)},
          "step": np.int32(0)}
  states, _, epoch = _restore(directory, {"run": 1}, like)
  assert epoch >= 2
  assert np.all(states["params"]["w"] == epoch) and states["step"] == epoch


# ---------------------------------------------------------------------------
# The output directory: locks and write probes.
# ---------------------------------------------------------------------------


def test_a_directory_locked_by_another_process_is_refused(tmp_path):
  directory = str(tmp_path / "out")
  script = textwrap.dedent(f"""
      import sys
      from qjax.checkpoint import lock_directory
      with lock_directory({directory!r}, "python -m experiments.table1"):
        print("locked", flush=True)
        sys.stdin.read()
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(OutputLockedError) as info:
      with lock_directory(directory, "mine"):
        pass
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert "python -m experiments.table1" in message
    assert "wait for it to finish, or use another --out" in message
  finally:
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()
  with lock_directory(directory, "mine"):  # free once the holder is gone
    pass


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  directory = str(tmp_path / "out")
  with lock_directory(directory, "first"):
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
      with lock_directory(directory, "second"):
        pass
  with lock_directory(directory, "again"):
    pass


def test_an_unwritable_output_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  path = str(blocker / "sub")
  with pytest.raises(ckpt.OutputNotWritableError,
                     match="choose a writable --out") as info:
    check_writable(path)
  assert path in str(info.value)
  assert isinstance(info.value, CheckpointError)
  with pytest.raises(CheckpointError, match="choose a writable --out"):
    RunCheckpoints(path, FINGERPRINT)
  check_writable(str(tmp_path / "fine" / "deeper"))
  assert os.listdir(tmp_path / "fine" / "deeper") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only dirs")
def test_a_read_only_directory_is_refused(tmp_path):
  read_only = tmp_path / "ro"
  read_only.mkdir()
  read_only.chmod(0o500)
  try:
    with pytest.raises(CheckpointError, match="Permission"):
      check_writable(str(read_only))
  finally:
    read_only.chmod(0o700)
