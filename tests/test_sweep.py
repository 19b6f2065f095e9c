"""Sweeps: lane i equals single run i, sharding over 4 devices, resume."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np

import qjax
import qjax.codes
import pytest

from qjax import data, models
from qjax.sweep import (Strategy, SweepSpec, choose_strategy, cpu_devices,
                        sweep, train)
from qjax.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
  return models.get("mlp", 10, features=(32,))


@pytest.mark.parametrize("method", ["sr", "bc"])
@pytest.mark.parametrize("strategy", [Strategy("scan", "vmap"),
                                      Strategy("loop", "map"),
                                      Strategy("loop", "loop")])
def test_lane_i_equals_single_run_i(method, strategy, small_digits):
  config = TrainConfig(method=method, batch_size=64, epochs=2)
  spec = SweepSpec(seeds=(0, 1), lrs=(0.01, 0.003))
  out = sweep(_model(), small_digits, config, spec, strategy=strategy,
              progress=False)
  i = 3
  cfg = out["configs"][i]
  single = train(_model(), small_digits, config, seed=cfg["seed"],
                 lr=cfg["lr"], strategy=strategy, progress=False)
  lane = jax.tree.map(lambda v: v[i], out["final_state"].params)
  alone = jax.tree.map(lambda v: v[0], single["final_state"].params)
  code_leaves = 0
  for a, b in zip(jax.tree.leaves(lane), jax.tree.leaves(alone)):
    if a.dtype == np.uint8:  # SR's stored codes: bit for bit
      code_leaves += 1
      assert np.array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert code_leaves == (2 if method == "sr" else 0)
  np.testing.assert_allclose(out["history"][-1]["test_error"][i],
                             single["history"][-1]["test_error"][0], atol=0.01)


def test_vmapped_lane_with_hash_bits_equals_its_single_run(small_digits):
  """SR with ``random_bits="hash"`` under the vmapped config axis (the
  accelerator strategy): lane i's codes are the single run's, bit for bit,
  and not the Threefry run's."""
  strategy = Strategy("scan", "vmap")
  config = TrainConfig(method="sr", batch_size=64, epochs=1,
                       random_bits="hash")
  spec = SweepSpec(seeds=(0, 1), lrs=(0.01,))
  out = sweep(_model(), small_digits, config, spec, strategy=strategy,
              progress=False)
  single = train(_model(), small_digits, config, seed=1, lr=0.01,
                 strategy=strategy, progress=False)
  threefry = train(_model(), small_digits, TrainConfig(
      method="sr", batch_size=64, epochs=1), seed=1, lr=0.01,
                   strategy=strategy, progress=False)
  kernel = lambda r, i: np.asarray(
      r["final_state"].params["Dense_0"]["kernel"].data[i])
  assert np.array_equal(kernel(out, 1), kernel(single, 0))
  assert not np.array_equal(kernel(single, 0), kernel(threefry, 0))


def test_repeated_runs_compile_nothing_new(small_digits):
  """A second single run (another seed, another lr) reuses every compiled
  program: before, each run re-jitted its shuffle and paid 0.5 s on MNIST."""
  config = TrainConfig(method="sr", batch_size=64, epochs=2)
  train(_model(), small_digits, config, seed=0, lr=0.01, progress=False)
  with jax.log_compiles(True):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
      train(_model(), small_digits, config, seed=1, lr=0.003, progress=False)
    finally:
      logger.removeHandler(handler)
  compiled = [r.getMessage() for r in records
              if "Compiling" in r.getMessage()]
  assert compiled == []


def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    small_digits, tmp_path):
  spec = SweepSpec(seeds=(0, 1), lrs=(0.01,))
  full = sweep(_model(), small_digits, TrainConfig(method="sr", batch_size=64,
                                                   epochs=3), spec,
               checkpoint_dir=str(tmp_path / "a"), progress=False)
  # "Interrupted" after epoch 2: run 2 epochs, then resume to 3.
  sweep(_model(), small_digits, TrainConfig(method="sr", batch_size=64,
                                            epochs=2), spec,
        checkpoint_dir=str(tmp_path / "b"), progress=False)
  resumed = sweep(_model(), small_digits, TrainConfig(
      method="sr", batch_size=64, epochs=3), spec,
                  checkpoint_dir=str(tmp_path / "b"), progress=False)
  for a, b in zip(jax.tree.leaves(full["final_state"]),
                  jax.tree.leaves(resumed["final_state"])):
    assert np.array_equal(a, b)
  assert full["history"] == [dict(r, seconds=f["seconds"]) for r, f in zip(
      resumed["history"], full["history"])]


def test_chunks_give_the_same_result_as_one_program(small_digits):
  config = TrainConfig(method="sr", batch_size=64, epochs=1)
  spec = SweepSpec(seeds=(0, 1, 2), lrs=(0.01,))
  one = sweep(_model(), small_digits, config, spec, progress=False,
              strategy=Strategy("loop", "map"))
  chunked = sweep(_model(), small_digits, config, spec, progress=False,
                  strategy=Strategy("loop", "map"), max_configs_per_chunk=2)
  for a, b in zip(jax.tree.leaves(one["final_state"].params),
                  jax.tree.leaves(chunked["final_state"].params)):
    assert np.array_equal(a, b)


_SHARDED = r"""
import functools, json
import jax, numpy as np
import qjax.codes, qjax.sweep
from qjax import data, models
from qjax.sweep import SweepSpec, Strategy, sweep
from qjax.train import TrainConfig
ds = data.load("digits")
ds = ds._replace(train_x=ds.train_x[:256], train_y=ds.train_y[:256])
# The 1-device reference runs its configs in chunks of 2, the lanes each of
# 4 devices gets, so both compile the same per-device program.
chunk = 2 if jax.device_count() == 1 else None
out = {"devices": jax.device_count()}
unpadded = qjax.sweep.config_sharding
for steps, configs, seeds, pad in [
    ("loop", "map", 6, False), ("scan", "vmap", 8, False),
    ("loop", "loop", 8, False), ("scan", "vmap", 1, False),
    ("loop", "loop", 5, True), ("scan", "vmap", 5, True)]:
  # pad=True is the accelerator policy: 5 configs padded to 8 on 4 devices.
  qjax.sweep.config_sharding = functools.partial(unpadded, pad=pad)
  run = sweep(models.get("mlp", 10, features=(16,)), ds,
              TrainConfig(method="sr", batch_size=64, epochs=1),
              SweepSpec(seeds=tuple(range(seeds)), lrs=(0.01,)),
              progress=False, strategy=Strategy(steps, configs),
              max_configs_per_chunk=chunk)
  out[f"{steps}/{configs}/{seeds}/{pad}"] = {
      "sharded": run["devices"],
      "kernel": np.asarray(qjax.codes.decode(
          run["final_state"].params["Dense_0"]["kernel"])).tolist(),
      "error": run["history"][-1]["test_error"]}
print(json.dumps(out))
"""


def _run_with_devices(n: int) -> dict:
  # Both runs compile without XLA's optimizations: the comparison needs the
  # same per-device program, not a fast one, and compiling is most of it.
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sweep_is_sharded_over_four_devices_with_the_same_results():
  """On 4 CPU devices: 6 configs use 3 devices, 8 use 4, a single run 1, and
  with padding (the accelerator policy) 5 configs use 4; for every config
  strategy the result equals the 1-device run of the same per-device
  program (chunks of 2 configs). Not the 1-device vmap over all 8: XLA:CPU's
  batched dot rounds differently for 8 lanes than for 2 (measured: one SR
  weight of 8192 flips), a float-rounding difference, not a sharding one."""
  four, one = _run_with_devices(4), _run_with_devices(1)
  assert four.pop("devices") == 4 and one.pop("devices") == 1
  expected = {"loop/map/6/False": 3, "scan/vmap/8/False": 4,
              "loop/loop/8/False": 4, "scan/vmap/1/False": 1,
              "loop/loop/5/True": 4, "scan/vmap/5/True": 4}
  assert set(four) == set(expected)
  for name, run in four.items():
    assert run["sharded"] == expected[name], name
    assert one[name]["sharded"] == 1
    assert np.array_equal(np.asarray(run["kernel"]),
                          np.asarray(one[name]["kernel"])), name
    assert run["error"] == one[name]["error"], name


_CPU_DEVICES = r"""
import sys
import jax
from qjax.sweep import cpu_devices
first = cpu_devices(3)
jax.numpy.zeros(1)  # backends are up: a later call changes nothing
print(first, cpu_devices(2), len(jax.devices()))
"""


@pytest.mark.parametrize("xla_flags, expected", [
    ("", "3 3 3"),
    ("--xla_force_host_platform_device_count=4", "4 4 4")])
def test_cpu_devices_splits_the_host_unless_the_user_chose(xla_flags,
                                                           expected):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, "-c", _CPU_DEVICES], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[-2] == expected
  with pytest.raises(ValueError, match="count must be an int >= 1"):
    cpu_devices(0)


_CPU_FLAGS = r"""
import glob, os, sys
import jax, jax.numpy as jnp
from qjax import results
from qjax.sweep import cpu_devices, cpu_flags
cpu_devices(1)
x = jnp.arange(4096, dtype=jnp.uint32)
mix = jax.jit(lambda x: (x * jnp.uint32(2654435761)) ^ (x >> 7))
mix(x).block_until_ready()
assert cpu_flags() == (), "after the first array nothing can change"
ir = "".join(open(f).read()
             for f in glob.glob(os.path.join(sys.argv[1], "*ir-with-opt.ll")))
print(results.environment()["xla_flags"])
print("<16 x i32>" in ir)
"""


def _avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


@pytest.mark.parametrize("user, width", [("", 512), (
    "--xla_cpu_prefer_vector_width=256", 256)])
def test_cpu_flags_reach_the_compiler_unless_the_user_chose(tmp_path, user,
                                                             width):
  # The experiment commands call cpu_devices; its XLA:CPU defaults must be
  # the ones XLA compiles with (512-bit vectors where the CPU has them),
  # and a width the user set must be the one used.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_dump_to={tmp_path} {user}".strip())
  proc = subprocess.run([sys.executable, "-c", _CPU_FLAGS, str(tmp_path)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flags, wide = proc.stdout.split("\n")[-3:-1]
  assert flags.split().count(f"--xla_cpu_prefer_vector_width={width}") == 1
  assert "vector_width" not in flags.replace(
      f"--xla_cpu_prefer_vector_width={width}", "")
  if _avx512():
    assert wide == str(width == 512)


def test_strategy_choice_and_bad_inputs(small_digits):
  # Measured fastest on XLA:CPU (benchmarks/sweep_throughput.py): configs
  # one after another, a scanned epoch for the MLP, looped steps for convnets.
  assert choose_strategy("mlp", "cpu") == Strategy("scan", "loop")
  assert choose_strategy("cnn", "cpu") == Strategy("loop", "loop")
  assert choose_strategy("mlp", "gpu") == Strategy("scan", "vmap")
  assert choose_strategy("cnn", "gpu") == Strategy("scan", "vmap")
  with pytest.raises(ValueError, match="steps must be"):
    Strategy("while", "vmap")
  with pytest.raises(ValueError, match="method must be one of"):
    TrainConfig(method="xnor")
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match="exceeds the 512 training examples"):
    sweep(_model(), small_digits, TrainConfig(batch_size=1024), SweepSpec(),
          progress=False)


def test_experiment_command_writes_results(tmp_path):
  from experiments import train as train_cli
  out = tmp_path / "run"
  code = train_cli.main(["--smoke", "--methods", "sr,bc", "--no-progress",
                         "--out", str(out)])
  assert code == 0
  payload = json.loads((out / "results.json").read_text())
  assert payload["environment"]["jax"] == jax.__version__
  assert [r["label"] for r in payload["runs"]] == ["SR-ADAM", "BC-ADAM"]
  for name in ("metrics.csv", "curves.png", "table.md"):
    assert (out / name).stat().st_size > 0


def test_grid_scale_is_a_sweep_axis_and_changes_the_grid(small_digits):
  config = TrainConfig(method="sr", batch_size=64, epochs=1)
  out = sweep(_model(), small_digits, config,
              SweepSpec(seeds=(0,), lrs=(0.01,), grid_scales=(1.0, 2.0)),
              progress=False)
  assert [c["grid_scale"] for c in out["configs"]] == [1.0, 2.0]
  codes = out["final_state"].params["Dense_0"]["kernel"]
  assert codes.data.dtype == np.uint8 and codes.data.shape == (2, 64 * 32 // 8)
  np.testing.assert_array_equal(np.asarray(codes.grid.scale), [1.0, 2.0])
  kernel = np.asarray(qjax.codes.decode(codes))
  h = np.float32(np.sqrt(1.5 / (64 + 32)))  # 2 h is exact in float32
  np.testing.assert_array_equal(np.unique(kernel[0]), [-h, h])
  np.testing.assert_array_equal(np.unique(kernel[1]), [-2 * h, 2 * h])


def _array_stream(ds):
  """A StreamingDataset over in-memory arrays, one numpy shuffle per epoch."""
  def train_batches(epoch, batch_size):
    order = np.random.default_rng(epoch).permutation(len(ds.train_y))
    for s in range(0, len(order) - batch_size + 1, batch_size):
      yield (ds.train_x[order[s:s + batch_size]],
             ds.train_y[order[s:s + batch_size]])

  def test_batches(batch_size):
    for s in range(0, len(ds.test_y), batch_size):
      yield ds.test_x[s:s + batch_size], ds.test_y[s:s + batch_size]
  return data.StreamingDataset(ds.name, ds.num_classes, len(ds.train_y),
                               train_batches, test_batches)


def test_streaming_dataset_trains_every_config_and_evaluates_all_examples():
  ds = data.load("digits")
  stream = _array_stream(ds)
  out = sweep(_model(), stream, TrainConfig(method="bc", batch_size=64,
                                            epochs=2),
              SweepSpec(seeds=(0, 1), lrs=(0.01,)), model_name="mlp",
              progress=False)
  assert out["train_config"]["steps_per_epoch"] == len(ds.train_y) // 64
  errors = out["history"][-1]["test_error"]
  assert len(errors) == 2 and max(errors) < 0.3
  # Evaluation covered the whole test set: error * n is an integer count.
  n = len(ds.test_y)
  assert all(abs(e * n - round(e * n)) < 1e-3 for e in errors)


def test_tfds_stream_feeds_a_sweep():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=96,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    stream = data.tfds_stream("mnist")
    assert stream.num_train == 96 and stream.num_classes == 10
    out = sweep(models.get("mlp", 10, features=(16,)), stream,
                TrainConfig(method="sr", batch_size=32, epochs=1),
                SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
  assert out["train_config"]["steps_per_epoch"] == 3
  assert 0.0 <= out["history"][0]["test_error"][0] <= 1.0
