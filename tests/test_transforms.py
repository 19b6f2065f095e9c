"""SR / R / BC update rules: exactness, invariants over many steps, jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import qjax
from qjax import Grid

# These toy trees name their leaves "w"/"b": round every float leaf (the
# rules' default mask is the kernels).
ALL = qjax.all_floats

GRIDS = {
    "delta0.1": Grid.uniform(0.1, lo=-1.0, hi=1.0),
    "binary": Grid.binary(0.0625),
    "kbit3": Grid.kbit(3, 0.7),
    "ternary": Grid.ternary(0.3),
}


def _as_arrays(grid):
  """Same grid with float32 array fields, so all grids share one trace."""
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), grid)


def _params(dtype=jnp.float32):
  return {"w": jnp.zeros((64,), dtype), "b": jnp.zeros((3,), dtype)}


def _random_updates(key, params, scale):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, l.shape)).astype(l.dtype)
      for k, l in zip(keys, leaves)])


def _run(tx, params, key, steps, scale):
  """Eager-loop reference runner: the history of params over ``steps``."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for t in range(steps):
    u = _random_updates(jax.random.fold_in(key, t), params, scale)
    u, state = update(u, state, params)
    params = optax.apply_updates(params, u)
    history.append(params)
  return history


_RULES = {
    "sr": lambda grid, seed: qjax.stochastic_rounding(grid, seed, ALL),
    "r": lambda grid, seed: qjax.nearest_rounding(grid, ALL),
    "bc": lambda grid, seed: qjax.latent_clipping(grid, ALL),
}


@functools.partial(jax.jit, static_argnames=("rule", "steps"))
def _scan_run(rule, grid, params, seed, scale, steps=40):
  """All ``steps`` params of a random walk, compiled once per rule/dtype."""
  key = jax.random.key(seed)
  tx = _RULES[rule](grid, key)

  def step(carry, t):
    params, state = carry
    u = _random_updates(jax.random.fold_in(key, t), params, scale)
    u, state = tx.update(u, state, params)
    params = optax.apply_updates(params, u)
    return (params, state), params

  _, history = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
  return history


@settings(max_examples=30, deadline=None)
@given(grid_name=st.sampled_from(sorted(GRIDS)),
       rule=st.sampled_from(["sr", "r"]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       scale=st.floats(0.01, 3.0), seed=st.integers(0, 2**16))
def test_rounded_params_stay_on_grid_bit_for_bit(grid_name, rule, dtype,
                                                 scale, seed):
  grid = _as_arrays(GRIDS[grid_name])
  history = _scan_run(rule, grid, _params(dtype), seed, scale)
  for leaf in jax.tree.leaves(history):
    assert leaf.dtype == dtype
    assert bool(jnp.all(qjax.contains(leaf, grid))), leaf


def test_unbounded_grid_stays_on_grid_for_steps_of_a_few_delta(key):
  grid = Grid.uniform(0.1)
  tx = qjax.stochastic_rounding(grid, 0, ALL)
  params = {"w": jnp.zeros((512,))}
  for params in _run(tx, params, key, 200, 0.3):
    assert bool(jnp.all(qjax.contains(params["w"], grid)))
  assert float(jnp.max(jnp.abs(params["w"]))) > 1.0  # it random-walked off 0


@settings(max_examples=20, deadline=None)
@given(grid_name=st.sampled_from(["delta0.1", "binary", "kbit3"]),
       scale=st.floats(0.01, 5.0), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_bc_latent_weights_stay_in_range(grid_name, scale, seed, dtype):
  grid = _as_arrays(GRIDS[grid_name])
  lo, hi = jnp.asarray(grid.lo, dtype), jnp.asarray(grid.hi, dtype)
  history = _scan_run("bc", grid, _params(dtype), seed, scale)
  for leaf in jax.tree.leaves(history):
    assert bool(jnp.all((leaf >= lo) & (leaf <= hi)))


def test_sr_equals_q_s_of_params_plus_update_with_the_state_key(rng):
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  p = qjax.round_nearest(jnp.asarray(rng.uniform(-1, 1, 256), jnp.float32),
                         grid)
  u = jnp.asarray(rng.normal(scale=0.07, size=256), jnp.float32)
  tx = qjax.stochastic_rounding(grid, jax.random.key(7), ALL)
  state = tx.init({"w": p})
  delta, new_state = tx.update({"w": u}, state, {"w": p})
  _, draw = jax.random.split(jax.random.key(7))
  expected = qjax.round_stochastic(jax.random.split(draw, 1)[0], p + u, grid)
  assert bool(jnp.all(optax.apply_updates({"w": p}, delta)["w"] == expected))
  assert not bool(jnp.all(jax.random.key_data(new_state.key)
                          == jax.random.key_data(state.key)))


def test_r_stalls_when_updates_are_below_half_a_step_while_sr_moves(key):
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  params = {"w": jnp.zeros((256,)), "b": jnp.zeros((3,))}
  small = 0.049  # every |u| < Δ/2
  r_state, r_tx = None, qjax.nearest_rounding(grid, ALL)
  sr_tx = qjax.stochastic_rounding(grid, 1, ALL)
  r_p, sr_p = params, params
  r_state, sr_state = r_tx.init(params), sr_tx.init(params)
  for t in range(100):
    u = jax.tree.map(lambda x: jnp.clip(jax.random.normal(
        jax.random.fold_in(key, t), x.shape), -1, 1) * small, params)
    d, r_state = r_tx.update(u, r_state, r_p)
    r_p = optax.apply_updates(r_p, d)
    d, sr_state = sr_tx.update(u, sr_state, sr_p)
    sr_p = optax.apply_updates(sr_p, d)
  assert all(bool(jnp.all(l == 0)) for l in jax.tree.leaves(r_p))
  assert float(jnp.mean(sr_p["w"] != 0)) > 0.5


def test_mask_leaves_unmasked_updates_untouched(rng):
  grid = Grid.binary(1.0)
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}
  mask = {"kernel": True, "bias": False}
  u = {"kernel": jnp.full((4, 4), 0.01), "bias": jnp.full((4,), 0.123)}
  for tx in (qjax.stochastic_rounding(grid, 0, mask),
             qjax.nearest_rounding(grid, mask), qjax.latent_clipping(
                 grid, lambda path, leaf: path[-1] == "kernel")):
    d, _ = tx.update(u, tx.init(params), params)
    assert bool(jnp.all(d["bias"] == u["bias"]))


def test_scale_by_grid_divides_update_by_h():
  grid = Grid.binary(0.25)
  tx = qjax.latent_clipping(grid, ALL, scale_by_grid=True)
  p = {"w": jnp.zeros(3)}
  d, _ = tx.update({"w": jnp.array([0.01, -0.02, 1.0])}, tx.init(p), p)
  np.testing.assert_allclose(d["w"], [0.04, -0.08, 0.25], rtol=1e-6)


@pytest.mark.parametrize("rule", ["sr", "r", "bc"])
def test_jit_and_no_jit_agree_and_step_traces_once(rule, rng):
  chex.clear_trace_counter()
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  make = {"sr": lambda: qjax.stochastic_rounding(grid, 3, ALL),
          "r": lambda: qjax.nearest_rounding(grid, ALL),
          "bc": lambda: qjax.latent_clipping(grid, ALL)}[rule]
  tx = optax.chain(optax.adam(0.05), make())
  params = {"w": jnp.asarray(rng.uniform(-1, 1, 32), jnp.float32)}
  params = {"w": qjax.round_nearest(params["w"], grid)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  p_jit, s_jit = params, tx.init(params)
  p_eager, s_eager = params, tx.init(params)
  for t in range(5):
    g = {"w": jnp.asarray(rng.normal(size=32), jnp.float32)}
    p_jit, s_jit = step(p_jit, s_jit, g)
    u, s_eager = tx.update(g, s_eager, p_eager)
    p_eager = optax.apply_updates(p_eager, u)
  if rule == "bc":
    np.testing.assert_allclose(p_jit["w"], p_eager["w"], rtol=1e-6, atol=1e-7)
  else:
    assert bool(jnp.all(p_jit["w"] == p_eager["w"]))


def test_changing_learning_rate_by_inject_hyperparams_does_not_recompile(rng):
  chex.clear_trace_counter()
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                   qjax.stochastic_rounding(grid, 0, ALL))
  params = {"w": jnp.zeros(16)}
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    u, state = tx.update({"w": jnp.ones(16)}, state, params)
    return optax.apply_updates(params, u), state

  params, state = step(params, state)
  hyper = state[0].hyperparams
  state[0].hyperparams["learning_rate"] = jnp.zeros_like(
      hyper["learning_rate"])
  frozen, state = step(params, state)
  assert bool(jnp.all(frozen["w"] == params["w"]))


def test_same_key_same_result_different_key_differs():
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  params = {"w": jnp.zeros(128)}
  runs = [_run(qjax.stochastic_rounding(grid, s, ALL), params,
               jax.random.key(0), 10, 0.2)[-1]["w"] for s in (5, 5, 6)]
  assert bool(jnp.all(runs[0] == runs[1]))
  assert not bool(jnp.all(runs[0] == runs[2]))


def test_errors_are_clear():
  grid = Grid.binary()
  with pytest.raises(ValueError, match="needs a key; got key=None"):
    qjax.stochastic_rounding(grid, None)
  with pytest.raises(TypeError, match="key must be"):
    qjax.stochastic_rounding(grid, jnp.ones(3))
  with pytest.raises(TypeError, match="grid must be"):
    qjax.nearest_rounding(0.5)
  with pytest.raises(ValueError, match="bounded grid"):
    qjax.latent_clipping(Grid.uniform(0.1))
  params = {"w": jnp.zeros(3)}
  for tx in (qjax.stochastic_rounding(grid, 0), qjax.nearest_rounding(grid),
             qjax.latent_clipping(grid)):
    with pytest.raises(ValueError, match="needs the current parameters"):
      tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="same structure"):
    tx = qjax.nearest_rounding(grid, {"v": True})
    tx.update(params, tx.init(params), params)
