"""Invariants every registered update rule satisfies (tests/rules_table.py).

Parametrized over ``rules_table.RULES`` (one row per method registered in
:mod:`qjax.methods`) and both base optimizers: stored grid weights are grid
points after every step, runs are deterministic, ``jit`` equals eager,
``vmap`` lanes equal single runs, a non-finite gradient skips the step,
the rule learns a quadratic towards a grid target (R: stalls below half the
gap, moves above it), and what a method says it stores is what it stores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import rules_table as rt

STEPS = 30
BINARY_HALF = np.array([-0.5, 0.5], np.float32)  # Grid.binary(0.5), by hand
LARGE = 10  # a learning-rate scale whose steps overshoot the grid's range

RULES = pytest.mark.parametrize("rule", rt.RULES, ids=rt.NAMES)
OPTIMIZERS = pytest.mark.parametrize("optimizer", rt.OPTIMIZERS)


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def flat(tree):
  """``[(names, leaf)]`` with :class:`qjax.Codes` kept as leaves."""
  pairs = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=qjax.codes.is_codes)[0]
  return [(qjax.quantizers.path_names(p), leaf) for p, leaf in pairs]


def masked(rule, tree):
  """``{names: quantized?}`` for the rule's mask on ``tree``'s floats."""
  mask = qjax.resolve_mask(rule.mask, qjax.codes.decode_tree(tree))
  return {names: bool(m) for names, m in flat(mask)}


def raw(tree):
  """Every leaf as ``(dtype, shape, bytes)``; keys by their data."""
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    out.append((a.dtype.str, a.shape, a.tobytes()))
  return out


def assert_same_bits(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(raw(a), raw(b))):
    assert x == y, f"{what}: leaf {i} ({x[0]}{list(x[1])}) differs"


def points(rule):
  """The stored float32 points of the rule's grid (qjax.grid.values)."""
  assert isinstance(rule.grid, qjax.Grid), "per-layer grids: extend points()"
  return np.asarray(qjax.grid.values(rule.grid, np.float32))


def on_grid(x, rule):
  """Exact membership in the rule's grid points, bit for bit (float32)."""
  x = np.asarray(x)
  return x.dtype == np.float32 and bool(np.isin(x, points(rule)).all())


def trajectory(rule, optimizer, steps, key, lr):
  """``steps`` training steps from :func:`rt.init_params`.

  Returns ``(stored0, stored, opt_state, ys)``: the projected initial
  params, the final stored params and optimizer state, and after each step
  the decoded stored params, the training view the next step differentiates
  at (with its key) and the evaluation view (no key).
  """
  method_key, run_key = jax.random.split(key)
  method = rule.make(optimizer, key=method_key, lr=lr)
  stored0, opt0 = rt.init(method, rt.init_params())

  def body(carry, i):
    stored, opt = carry
    k = rt.view_key(run_key, i)
    stored, opt = rt.step(method, stored, opt, k)
    w = qjax.codes.decode_tree(stored)
    return (stored, opt), (w, method.view(w, rt.view_key(run_key, i + 1)),
                           method.view(w))

  (stored, opt), ys = jax.lax.scan(body, (stored0, opt0), jnp.arange(steps))
  return stored0, stored, opt, ys


@functools.lru_cache(maxsize=None)
def compiled(name, optimizer, steps):
  """The jitted :func:`trajectory` of ``name``, arguments ``(key, lr)``."""
  return jax.jit(functools.partial(trajectory, rt.BY_NAME[name], optimizer,
                                   steps))


@functools.lru_cache(maxsize=None)
def default_run(name, optimizer, lr_scale=1):
  """The run the per-step tests read: key 0, the table's lr times a scale."""
  lr = rt.BY_NAME[name].lr[optimizer] * lr_scale
  return jax.device_get(compiled(name, optimizer, STEPS)(jax.random.key(0),
                                                         jnp.float32(lr)))


# ----------------------------------------------------------------------------
# The table itself.
# ----------------------------------------------------------------------------


def test_table_has_one_row_per_registered_method():
  assert rt.NAMES == qjax.methods.names()
  assert {"fp", "bc", "sbc", "sr", "r", "bop"} <= set(rt.NAMES)
  assert set(rt.OVERRIDES) <= set(rt.NAMES), "OVERRIDES for unknown methods"
  np.testing.assert_array_equal(qjax.grid.values(rt.GRID), BINARY_HALF)


# ----------------------------------------------------------------------------
# 1. Stored quantized leaves are grid points after every step.
# ----------------------------------------------------------------------------


@RULES
@OPTIMIZERS
@pytest.mark.parametrize("lr_scale", [1, LARGE])
def test_quantized_leaves_stay_on_the_grid_every_step(rule, optimizer,
                                                      lr_scale):
  """At the table's lr and at a lr large enough to push latents outside."""
  stored0, stored, _, (decoded, train_view, eval_view) = default_run(
      rule.name, optimizer, lr_scale)
  quantized = masked(rule, stored0)
  lo, hi = points(rule)[0], points(rule)[-1]
  for tree in (stored0, stored):
    for names, leaf in flat(tree):
      if quantized[names] and rule.storage == "codes":
        assert qjax.codes.is_codes(leaf), (names, leaf)
        assert leaf.grid == rt.GRID and leaf.dtype == np.float32, leaf
      else:
        assert not qjax.codes.is_codes(leaf), (names, leaf)
        assert np.asarray(leaf).dtype == np.float32, names
  decoded0 = qjax.codes.decode_tree(stored0)
  views = {n: v for n, v in flat(rule.make(optimizer).view(decoded0))}
  for names, w0 in flat(decoded0):
    w = dict(flat(decoded))[names]           # (STEPS, *shape)
    tv = dict(flat(train_view))[names]
    ev = dict(flat(eval_view))[names]
    assert w.shape == (STEPS,) + w0.shape
    assert np.isfinite(w).all(), names
    if not quantized[names] or rule.storage == "float":
      # The view passes float leaves through, bit for bit.
      np.testing.assert_array_equal(ev, w, err_msg=str(names))
      np.testing.assert_array_equal(tv, w, err_msg=str(names))
      continue
    if rule.storage == "codes":
      assert on_grid(w0, rule), names
      for i in range(STEPS):
        assert on_grid(w[i], rule), (names, f"step {i + 1}", np.unique(w[i]))
    else:  # float latents in [lo, hi], the views on the grid
      assert rule.storage == "latent", rule
      assert ((w0 >= lo) & (w0 <= hi)).all(), names
      assert on_grid(views[names], rule), names
      for i in range(STEPS):
        assert ((w[i] >= lo) & (w[i] <= hi)).all(), (names, i + 1)
      if lr_scale == LARGE:  # the clip was exercised
        assert ((w == lo) | (w == hi)).any(), names
    for i in range(STEPS):
      assert on_grid(ev[i], rule), (names, f"eval view, step {i + 1}")
      assert on_grid(tv[i], rule), (names, f"train view, step {i + 1}")


# ----------------------------------------------------------------------------
# 2. Determinism.
# ----------------------------------------------------------------------------


@RULES
@OPTIMIZERS
def test_same_key_same_inputs_give_the_same_bits(rule, optimizer):
  _, stored, opt, _ = default_run(rule.name, optimizer)
  # A separately built method in a separately traced and compiled program.
  fresh = jax.jit(functools.partial(trajectory, rule, optimizer, STEPS))
  _, stored2, opt2, _ = jax.device_get(
      fresh(jax.random.key(0), jnp.float32(rule.lr[optimizer])))
  assert_same_bits(stored, stored2, f"{rule.name}-{optimizer} stored params")
  assert_same_bits(opt, opt2, f"{rule.name}-{optimizer} optimizer state")


# ----------------------------------------------------------------------------
# 3. jit == eager.
# ----------------------------------------------------------------------------


@RULES
@OPTIMIZERS
def test_jit_equals_eager_bit_for_bit(rule, optimizer):
  """Eager steps against the jitted run's first steps (:func:`default_run`).

  Grid codes (and the views of latent methods) must match bit for bit:
  every rounding decision is a comparison with precomputed thresholds.
  Float leaves (FP's weights, biases, BC's latents) are plain optax
  arithmetic, which XLA contracts into fused multiply-adds under jit but
  not eagerly (qjax.grid's docstring), so they agree to a few ulps only.
  """
  _, _, _, (decoded, _, eval_view) = default_run(rule.name, optimizer)
  # trajectory(), eagerly: the same keys, the same (array) learning rate.
  method_key, run_key = jax.random.split(jax.random.key(0))
  method = rule.make(optimizer, key=method_key,
                     lr=jnp.float32(rule.lr[optimizer]))
  stored, opt = rt.init(method, rt.init_params())
  quantized = masked(rule, stored)
  for i in range(3):
    stored, opt = rt.step(method, stored, opt, rt.view_key(run_key, i))
    where = f"{rule.name}-{optimizer} step {i + 1}"
    jitted = jax.tree.map(lambda v, i=i: v[i], (decoded, eval_view))
    pairs = zip(flat(qjax.codes.decode_tree(stored)), flat(jitted[0]),
                flat(rt.eval_view(method, stored)), flat(jitted[1]))
    for (names, a), (_, b), (_, va), (_, vb) in pairs:
      a = np.asarray(a)
      if quantized[names] and rule.storage != "float":
        # Codes decode by a table gather: equal values are equal codes.
        if rule.storage == "codes":
          assert_same_bits(a, b, f"{where} {names}")
        assert_same_bits(np.asarray(va), vb, f"{where} {names} (view)")
      if not (quantized[names] and rule.storage == "codes"):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{where} {names}")


# ----------------------------------------------------------------------------
# 4. vmap lanes equal single runs.
# ----------------------------------------------------------------------------


@RULES
def test_vmap_lanes_equal_single_runs(rule, optimizer="adam"):
  """3 lanes (keys and learning rates) against 3 single runs.

  Adam only: the base optimizer is the same optax code for every rule, and
  each vmapped program is a compile (the slowest part of this file).
  """
  keys = jax.random.split(jax.random.key(5), 3)
  lrs = jnp.asarray([0.5, 1.0, 2.0], jnp.float32) * rule.lr[optimizer]
  lanes = jax.jit(jax.vmap(functools.partial(
      trajectory, rule, optimizer, STEPS)))(keys, lrs)
  _, lane_stored, lane_opt, _ = jax.device_get(lanes)
  single = compiled(rule.name, optimizer, STEPS)
  for i in range(3):
    _, stored, opt, _ = jax.device_get(single(keys[i], lrs[i]))
    quantized = masked(rule, stored)
    lane = jax.tree.map(lambda v, i=i: v[i], lane_stored)
    lane_view = rule.make(optimizer).view(qjax.codes.decode_tree(lane))
    view = rule.make(optimizer).view(qjax.codes.decode_tree(stored))
    for (names, a), (_, b), (_, va), (_, vb) in zip(
        flat(lane), flat(stored), flat(lane_view), flat(view)):
      where = f"{rule.name}-{optimizer} lane {i} {names}"
      if qjax.codes.is_codes(b):
        assert_same_bits(a.data, b.data, where)
      else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                   err_msg=where)
      if quantized[names] and rule.storage != "float":
        assert_same_bits(va, vb, where + " (view)")
    lane_opt_i = jax.tree.map(lambda v, i=i: v[i], lane_opt)
    for a, b in zip(jax.tree.leaves(lane_opt_i), jax.tree.leaves(opt)):
      if jnp.issubdtype(jnp.result_type(b), jnp.inexact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      else:
        assert_same_bits(a, b, f"{rule.name} lane {i} optimizer state")


# ----------------------------------------------------------------------------
# 5. A non-finite gradient skips the step.
# ----------------------------------------------------------------------------


@RULES
@OPTIMIZERS
@pytest.mark.parametrize("leaf", ["kernel", "bias"])
def test_nonfinite_gradient_skips_the_step(rule, optimizer, leaf):
  """Eagerly, from the state after :func:`default_run`'s steps."""
  _, stored, opt, _ = default_run(rule.name, optimizer)
  stored, opt = jax.device_put((stored, opt))
  method = rule.make(optimizer, key=None)  # the key is in the state
  assert isinstance(opt, qjax.SkipNonFiniteState), type(opt)
  grads = rt.grads_at(method, stored, jax.random.key(13))
  bad = dict(grads, dense=dict(grads["dense"]))
  bad["dense"][leaf] = bad["dense"][leaf].at[(0,) * bad["dense"][
      leaf].ndim].set(jnp.nan)
  new_stored, new_opt = rt.apply(method, stored, opt, bad)
  what = f"{rule.name}-{optimizer}, NaN in dense/{leaf}"
  assert_same_bits(jax.device_get(new_stored), jax.device_get(stored),
                   what + ": params")
  assert_same_bits(jax.device_get(new_opt.inner_state),
                   jax.device_get(opt.inner_state), what + ": opt state")
  assert int(new_opt.skipped) == int(opt.skipped) + 1
  assert int(new_opt.streak) == int(opt.streak) + 1
  # The next finite step trains again and resets the streak.
  after, after_opt = rt.apply(method, new_stored, new_opt, grads)
  assert int(after_opt.skipped) == int(opt.skipped) + 1
  assert int(after_opt.streak) == 0


# ----------------------------------------------------------------------------
# 6. Learning (R: stalls below half the gap, moves above it).
# ----------------------------------------------------------------------------


LEARNING = [r for r in rt.RULES if r.learns]


@pytest.mark.parametrize("rule", LEARNING, ids=[r.name for r in LEARNING])
@OPTIMIZERS
def test_the_loss_goes_down(rule, optimizer):
  stored0, stored, _, _ = default_run(rule.name, optimizer)
  method = rule.make(optimizer)
  before = rt.eval_view(method, stored0)
  after = rt.eval_view(method, stored)
  assert float(rt.loss(after)) < float(rt.loss(before)), rule.name
  # The quantized leaves themselves learn, not only the float biases.
  assert float(rt.kernel_loss(after)) < float(rt.kernel_loss(before))


def _kernel_codes(stored):
  return [leaf.data for names, leaf in flat(stored)
          if names[-1] == "kernel"]


STALLING = [r for r in rt.RULES if r.stalls]


@pytest.mark.parametrize("rule", STALLING, ids=[r.name for r in STALLING])
@OPTIMIZERS
def test_stalls_below_half_the_gap_and_moves_above(rule, optimizer):
  """R (Li et al. 2017, Sec. 3) stalls at a small lr and moves at a large."""
  assert rule.storage == "codes", rule
  method = rule.make(optimizer)
  stored0, _ = rt.init(method, rt.init_params())
  # The loss is separable, so a kernel's gradient stays what it is at the
  # start while the kernel does not move: Adam's step is then lr itself,
  # SGD's lr |g|.
  g = [np.abs(np.asarray(v)) for names, v in
       flat(rt.grads_at(method, stored0, None)) if names[-1] == "kernel"]
  half_gap = float(np.diff(points(rule)).min()) / 2
  g_max = max(float(v.max()) for v in g)
  g_min = min(float(v[v > 0].min()) for v in g)
  if optimizer == "adam":
    small, large = 0.8 * half_gap, 1.2 * half_gap
  else:
    small, large = 0.8 * half_gap / g_max, 1.2 * half_gap / g_min
  run = compiled(rule.name, optimizer, STEPS)
  _, stalled, _, (decoded, _, _) = jax.device_get(
      run(jax.random.key(0), jnp.float32(small)))
  assert_same_bits(_kernel_codes(stalled), _kernel_codes(stored0),
                   f"{rule.name}-{optimizer} at lr {small:.3g}: kernels moved")
  for names, w in flat(decoded):
    if names[-1] == "kernel":
      w0 = dict(flat(qjax.codes.decode_tree(stored0)))[names]
      assert (w == w0[None]).all(), names  # at every step
  _, moved, _, _ = jax.device_get(run(jax.random.key(0), jnp.float32(large)))
  changed = [np.any(a != b) for a, b in zip(_kernel_codes(moved),
                                            _kernel_codes(stored0))]
  assert all(changed), f"{rule.name}-{optimizer} at lr {large:.3g}: no move"
  assert float(rt.kernel_loss(qjax.codes.decode_tree(moved))) < float(
      rt.kernel_loss(qjax.codes.decode_tree(stored0)))


# ----------------------------------------------------------------------------
# 7. What a method says it stores and evaluates.
# ----------------------------------------------------------------------------


EXPECTED_EVAL_MODE = {"codes": "stored grid weights",
                      "latent": "deterministic-quantized latent",
                      "float": "float"}


@RULES
def test_eval_mode_and_storage_match_the_spec(rule):
  spec = rule.spec
  assert rule.storage in rt.STORAGE_KINDS, (
      f"{rule.name}: Spec.stores={spec.stores!r} is not a known storage "
      "kind; set 'storage' in rules_table.OVERRIDES.")
  assert spec.eval_mode in rt.EVAL_MODES, spec.eval_mode
  assert spec.eval_mode == EXPECTED_EVAL_MODE[rule.storage], rule.name
  assert spec.quantized == (rule.storage != "float"), rule.name
  params = rt.init_params()
  quantized = masked(rule, params)
  for optimizer in rt.OPTIMIZERS:
    method = rule.make(optimizer)
    assert method.eval_mode == spec.eval_mode, (method.eval_mode, spec)
    assert method.name == f"{rule.name}-{optimizer}", method.name
    stored = method.project(params)
    for (names, p), (_, s) in zip(flat(params), flat(stored)):
      if not quantized[names] or rule.storage == "float":
        assert_same_bits(s, p, f"{rule.name} {names} (float leaf)")
      elif rule.storage == "codes":
        assert qjax.codes.is_codes(s), (names, s)
        v = points(rule)  # the nearest point, ties upwards
        k = np.searchsorted((v[1:] + v[:-1]) / 2, np.asarray(p), "right")
        np.testing.assert_array_equal(qjax.codes.decode(s), v[k])
      else:
        np.testing.assert_array_equal(s, np.clip(p, points(rule)[0],
                                                 points(rule)[-1]))
    if rule.storage == "float":
      assert_same_bits(method.view(stored), stored, "fp view")
