"""The engine's guarantees: non-finite steps skipped and counted, a run that
keeps producing them stopped, epochs timed after their results exist, one
compilation of the epoch program on several devices, strict JSON."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
import pytest

from qjax import data, models, results
from qjax import train as train_lib
from qjax.sweep import SweepSpec, sweep
from qjax.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_digits():
  ds = data.load("digits")
  return ds._replace(train_x=ds.train_x[:256], train_y=ds.train_y[:256])


def _model():
  return models.get("mlp", 10, features=(16,))


def _state(method, optimizer, x):
  config = TrainConfig(method=method, optimizer=optimizer, batch_size=8)
  hp = {"lr": jnp.float32(0.01)}
  state = train_lib.init_state(_model(), config, jax.random.PRNGKey(0), x, hp)
  return config, hp, state


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_method_without_skip_nonfinite_is_guarded_by_the_step(bad,
                                                                small_digits):
  """The step's own check covers a hand-made Method whose tx does not skip
  (plain optax.adam): the poisoned step changes nothing, bit for bit."""
  import optax  # pylint: disable=import-outside-toplevel
  from qjax import methods as methods_lib  # pylint: disable=import-outside-toplevel
  x, y = small_digits.train_x[:8], small_digits.train_y[:8]
  tx = optax.adam(0.01)
  method = methods_lib.Method("plain-adam", methods_lib.identity_view, tx,
                              lambda p: p, "float")
  network = _model()
  params = network.init(jax.random.PRNGKey(0), x, train=False)
  config, hp, base = _state("fp", "adam", x)
  state = base.replace(params=params["params"],
                       opt_state=tx.init(params["params"]))
  step = jax.jit(lambda s, b: train_lib.step(network, method, s, b))
  poisoned = x.copy()
  poisoned[0, 0, 0, 0] = bad
  after, metrics = step(state, (poisoned, y))
  assert float(metrics["skipped"]) == 1.0 and int(after.skipped) == 1
  for name in ("params", "batch_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(after, name)),
                    jax.tree.leaves(getattr(state, name))):
      assert np.array_equal(a, b), name
  good, metrics = step(after, (x, y))
  assert float(metrics["skipped"]) == 0.0 and int(good.streak) == 0
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(good.params), jax.tree.leaves(after.params)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["fp", "bc", "sr", "r"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_step_is_skipped_by_every_method(method, optimizer, bad,
                                                     small_digits):
  """Before: a NaN gradient left NaN in SR, R and BC weights, off the grid,
  for ever."""
  x, y = small_digits.train_x[:8], small_digits.train_y[:8]
  config, hp, state = _state(method, optimizer, x)
  step = jax.jit(lambda s, b: train_lib.train_step(_model(), config, s, b,
                                                   hp))
  poisoned = x.copy()
  poisoned[0, 0, 0, 0] = bad
  after, metrics = step(state, (poisoned, y))
  assert float(metrics["skipped"]) == 1.0
  assert int(after.skipped) == 1 and int(after.streak) == 1
  assert int(after.first_skipped) == 0 and int(after.step) == 1
  # The method's skip_nonfinite counts the skip in its own state too; what
  # it wraps (Adam's moments, SR's key) stays as it was.
  assert int(after.opt_state.skipped) == 1
  assert int(after.opt_state.streak) == 1
  for name in ("params", "batch_stats", "opt_state.inner_state"):
    get = lambda s: (s.opt_state.inner_state if "." in name
                     else getattr(s, name))
    for a, b in zip(jax.tree.leaves(get(after)), jax.tree.leaves(get(state))):
      if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert np.array_equal(a, b), name  # bit for bit, NaN nowhere
  good, metrics = step(after, (x, y))  # then it trains normally
  assert float(metrics["skipped"]) == 0.0 and int(good.streak) == 0
  assert int(good.skipped) == 1
  leaves = jax.tree.leaves(good.params)
  assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
  assert any(not np.array_equal(a, b) for a, b in
             zip(leaves, jax.tree.leaves(state.params)))
  if method in ("sr", "r"):  # still 1-bit codes of exactly {-H, +H}
    flat = jax.tree_util.tree_flatten_with_path(
        good.params, is_leaf=qjax.codes.is_codes)[0]
    kernels = [w for path, w in flat if path[-1].key == "kernel"]
    assert kernels
    for w in kernels:
      assert isinstance(w, qjax.Codes)
      h = np.float32(np.sqrt(1.5 / sum(w.shape)))
      assert set(np.unique(np.asarray(qjax.codes.decode(w))).tolist()) <= {
          float(-h), float(h)}


def test_a_run_that_keeps_failing_stops_naming_the_step(small_digits):
  poisoned = small_digits._replace(
      train_x=np.full_like(small_digits.train_x, np.nan))
  config = TrainConfig(method="sr", batch_size=8, epochs=3,
                       max_nonfinite_streak=5)
  with pytest.raises(train_lib.NonFiniteError,
                     match=r"last 32 steps \(up to step 32, epoch 1; first "
                     r"skipped step 0\)"):
    sweep(_model(), poisoned, config, SweepSpec(seeds=(0,), lrs=(0.01,)),
          progress=False)


def test_skipped_steps_are_in_the_history(small_digits):
  x = small_digits.train_x.copy()
  x[:3] = np.nan  # 3 poisoned examples: at most 3 batches of 32 skipped
  config = TrainConfig(method="bc", batch_size=32, epochs=2)
  out = sweep(_model(), small_digits._replace(train_x=x), config,
              SweepSpec(seeds=(0, 1), lrs=(0.01,)), progress=False)
  skipped = [e["skipped_steps"] for e in out["history"]]
  assert all(1 <= s <= 6 for s in skipped[-1])  # cumulative, per config
  assert skipped[0][0] <= skipped[1][0]
  assert np.isfinite(out["history"][-1]["test_error"]).all()


def test_epoch_seconds_cover_the_compute(small_digits):
  """Before: timed before the epoch's results were ready (0.02 s epochs).

  The second epoch (compiled already) is compared with the same epoch
  program timed here after blocking on its result."""
  big = small_digits._replace(
      train_x=np.tile(small_digits.train_x, (8, 1, 1, 1)),
      train_y=np.tile(small_digits.train_y, 8))
  model = models.get("mlp", 10, features=(512, 512))
  config = TrainConfig(method="sr", batch_size=64, epochs=2)
  out = sweep(model, big, config, SweepSpec(seeds=(0, 1), lrs=(0.01,)),
              progress=False)
  recorded = out["history"][1]["seconds"]
  from qjax import sweep as sweep_lib
  programs = sweep_lib.programs(
      model, sweep_lib.dataclasses.replace(
          config, steps_per_epoch=big.train_x.shape[0] // 64),
      sweep_lib.choose_strategy("mlp"))
  states = jax.tree.map(jnp.asarray, out["final_state"])
  idx = jnp.zeros((2, big.train_x.shape[0] // 64, 64), jnp.int32)
  hps = {"lr": jnp.full((2,), 0.01, jnp.float32)}
  xs, ys = jnp.asarray(big.train_x), jnp.asarray(big.train_y)
  jax.block_until_ready(programs.run_epoch(states, xs, ys, idx, hps))
  t0 = time.perf_counter()
  jax.block_until_ready(programs.run_epoch(states, xs, ys, idx, hps))
  compute = time.perf_counter() - t0
  assert recorded >= 0.5 * compute, (recorded, compute)


@pytest.mark.parametrize("configs,expected", [("vmap", 1), ("loop", 2)])
def test_epoch_program_compiles_once_on_two_devices(configs, expected):
  """Before: on 2 CPU devices the vmapped epoch program compiled twice
  (replicated initial states, sharded ones after epoch 1). Over 3 epochs
  the vmapped program compiles once; the looped one (the CPU default) once
  per device, never again for a later epoch."""
  script = textwrap.dedent(f"""
      import jax
      jax.config.update("jax_num_cpu_devices", 2)
      from qjax import data, models, sweep as s
      from qjax.train import TrainConfig
      ds = data.load("digits")
      ds = ds._replace(train_x=ds.train_x[:256], train_y=ds.train_y[:256])
      model = models.get("mlp", 10, features=(16,))
      config = TrainConfig(method="sr", batch_size=32, epochs=3)
      strategy = s.Strategy("scan", {configs!r})
      out = s.sweep(model, ds, config, s.SweepSpec(seeds=(0, 1), lrs=(0.01,)),
                    model_name="mlp", progress=False, strategy=strategy)
      assert out["devices"] == 2, out["devices"]
      full = s.dataclasses.replace(config, steps_per_epoch=8)
      programs = s.programs(model, full, strategy)
      print("compiled", s.compiled_count(programs.epoch))
  """)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  assert out.stdout.split()[-2:] == ["compiled", str(expected)], out.stdout


def test_results_are_strict_json(tmp_path):
  path = tmp_path / "r.json"
  results.write_json(str(path), {"loss": [float("nan"), 1.0],
                                 "x": np.array([np.inf, 2.0])})
  def refuse(token):
    raise AssertionError(f"non-standard JSON token {token}")
  loaded = json.loads(path.read_text(), parse_constant=refuse)
  assert loaded == {"loss": [None, 1.0], "x": [None, 2.0]}
