"""Clear errors for bad input, no false rejections, NaN/inf steps skipped."""

from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import Grid
from qjax import codes as C


def _linen(kernel=0.3, bias=0.1):
  """A Linen-style tree: a dense kernel (on no grid yet) and a bias."""
  return {"params": {"Dense_0": {
      "kernel": jnp.full((4, 3), kernel, jnp.float32),
      "bias": jnp.full((3,), bias, jnp.float32)}}}


def _key_data(tree):
  """``tree`` with typed keys as their raw ``uint32`` data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, tree)


def _bits(tree):
  return [np.asarray(leaf).tobytes()
          for leaf in jax.tree.leaves(tree)]


def _update(tx, params, grads=None):
  """One update; gradients and optimizer state live on the decoded view."""
  floats = C.decode_tree(params)
  grads = jax.tree.map(jnp.ones_like, floats) if grads is None else grads
  return tx.update(grads, tx.init(floats), params)


# 1. Integer leaves selected by a mask.


def test_int_leaf_selected_by_a_mask_names_its_path_and_dtype():
  params = {"kernel": jnp.zeros((2, 2)), "step": jnp.zeros((), jnp.int32)}
  mask = {"kernel": True, "step": True}
  grid = Grid.binary()
  for tx in (qjax.stochastic_rounding(grid, 0, mask),
             qjax.nearest_rounding(grid, mask)):
    with pytest.raises(TypeError, match=r"floating point.*step.*int32"):
      _update(tx, params)
  with pytest.raises(TypeError, match=r"floating point.*step.*int32"):
    qjax.quantize(params, qjax.round_nearest, mask, grid=grid)


def test_int_kernel_selected_by_the_default_mask_is_a_clear_error():
  params = {"Dense_0": {"kernel": jnp.zeros((2, 2), jnp.int32)}}
  with pytest.raises(TypeError, match=r"floating point.*Dense_0/kernel"):
    qjax.quantize(params, qjax.round_nearest, grid=Grid.binary())


# 2. Boolean array masks.


def test_concrete_jnp_bool_mask_works_under_jit():
  params = {"kernel": jnp.full((2, 2), 0.3), "bias": jnp.full((2,), 0.3)}
  mask = jax.tree.map(lambda _: jnp.array(True), params)
  mask["bias"] = np.bool_(False)
  resolved = qjax.resolve_mask(mask, params)
  assert resolved == {"kernel": True, "bias": False}
  assert all(type(m) is bool for m in jax.tree.leaves(resolved))
  tx = qjax.nearest_rounding(Grid.binary(), mask)
  d, _ = jax.jit(lambda p: _update(tx, p))(params)
  assert bool(jnp.all(d["bias"] == 1.0))
  assert bool(jnp.all(params["kernel"] + d["kernel"] == 1.0))


def test_traced_mask_is_a_clear_error():
  params = {"kernel": jnp.zeros((2, 2))}
  mask = {"kernel": jnp.array(True)}
  grid = Grid.binary()

  def step(p, m):
    return _update(qjax.nearest_rounding(grid, m), p)

  with pytest.raises(ValueError, match="static Python bools or predicates"):
    jax.jit(step)(params, mask)
  with pytest.raises(ValueError, match="static Python bools or predicates"):
    jax.jit(lambda p: qjax.quantize(p, qjax.sign, lambda path, leaf: jnp.all(
        leaf > 0)))(params)


def test_mask_of_non_bools_is_a_clear_error():
  params = {"kernel": jnp.zeros((2, 2))}
  with pytest.raises(TypeError, match=r"one Python bool per leaf.*kernel"):
    qjax.resolve_mask({"kernel": jnp.array([True, False])}, params)


# 3.-5. Keys, seeds and integer arguments.


@pytest.mark.parametrize("seed", [0, np.int64(0), np.uint32(0),
                                  jnp.int32(0)])
def test_round_stochastic_takes_int_seeds(seed):
  x, grid = jnp.linspace(-1, 1, 64), Grid.uniform(0.25, lo=-1.0, hi=1.0)
  expected = qjax.round_stochastic(jax.random.key(0), x, grid)
  assert bool(jnp.all(qjax.round_stochastic(seed, x, grid) == expected))


def test_round_stochastic_takes_typed_and_raw_keys():
  x, grid = jnp.linspace(-1, 1, 64), Grid.uniform(0.25, lo=-1.0, hi=1.0)
  typed = qjax.round_stochastic(jax.random.key(3), x, grid)
  raw = qjax.round_stochastic(jax.random.PRNGKey(3), x, grid)
  numpy_raw = qjax.round_stochastic(np.asarray(jax.random.PRNGKey(3)), x,
                                    grid)
  assert bool(jnp.all(typed == raw)) and bool(jnp.all(raw == numpy_raw))


@pytest.mark.parametrize("keys", [
    jax.random.split(jax.random.key(0), 2),
    jax.random.split(jax.random.PRNGKey(0), 2),
])
def test_batched_key_is_a_clear_error(keys):
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match=r"expects one key.*shape.*vmap"):
    qjax.round_stochastic(keys, x, Grid.binary())
  # The factory checks the key, before the first update.
  with pytest.raises(ValueError, match=r"expects one key.*shape.*vmap"):
    qjax.stochastic_rounding(Grid.binary(), keys)
  out = jax.vmap(lambda k: qjax.round_stochastic(k, x, Grid.binary()))(keys)
  assert out.shape == (2, 3)


def test_quantize_takes_an_int_seed():
  params = _linen()
  grid = qjax.glorot_binary_grid
  by_seed = qjax.quantize(params, qjax.round_stochastic, grid=grid, key=5)
  by_key = qjax.quantize(params, qjax.round_stochastic, grid=grid,
                         key=jax.random.key(5))
  assert _bits(by_seed) == _bits(by_key)


def test_numpy_and_jax_integers_are_accepted():
  for bits in (np.int64(2), jnp.int32(2), np.int8(2)):
    grid = Grid.kbit(bits, 0.5)
    assert grid.num_points() == 4
    assert grid == Grid.kbit(2, 0.5) and grid.step == Fraction(1, 3)
  grid = Grid.binary()
  params = {"kernel": jnp.zeros((8,))}
  d_np, _ = _update(qjax.stochastic_rounding(grid, key=np.int64(3)), params)
  d_int, _ = _update(qjax.stochastic_rounding(grid, key=3), params)
  assert _bits(d_np) == _bits(d_int)


# (bad and traced kbit bits: tests/test_grid.py)


# 6. Masks that select nothing; NNX paths.


@pytest.mark.parametrize("params", [
    {"params": {"Dense_0": {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}}},
    {"linear": {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}},   # Haiku
    {"layers": [{"weight": jnp.zeros((2, 2))}]},               # Equinox
])
def test_a_mask_that_selects_nothing_is_an_error_everywhere(params):
  grid = Grid.binary()
  calls = [
      lambda: _update(qjax.stochastic_rounding(grid, 0), params),
      lambda: _update(qjax.nearest_rounding(grid), params),
      lambda: _update(qjax.latent_clipping(grid), params),
      lambda: qjax.quantize(params, qjax.sign),
      lambda: qjax.resolve_mask(qjax.conv_kernels, params),
  ] + [lambda m=m: qjax.methods.make(m, key=0, grid=grid).project(params)
       for m in ("bc", "sr", "r")]
  for call in calls:
    with pytest.raises(ValueError, match=r"selects no parameter.*leaves are "
                       r"'.*(w|weight)'.*Pass a mask"):
      call()


def test_empty_selection_lists_at_most_ten_paths():
  params = {f"layer_{i:02d}": {"w": jnp.zeros(2)} for i in range(15)}
  with pytest.raises(ValueError, match=r"'layer_09/w', \.\.\. and 5 more"):
    qjax.resolve_mask(None, params)
  assert not any(jax.tree.leaves(
      qjax.resolve_mask(None, params, allow_empty=True)))


def test_fp_ignores_the_mask():
  params = {"linear": {"w": jnp.zeros((2, 2))}}
  method = qjax.methods.make("fp", mask=qjax.conv_kernels)
  assert method.project(params) is params
  _update(method.tx, params)


def test_kernel_predicates_recognise_nnx_paths():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.Conv(4, 2, (3, 3), rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  mask = qjax.resolve_mask(qjax.all_kernels, state)
  names = {"/".join(qjax.quantizers.path_names(p)): m for p, m in
           jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert names == {"layers/0/kernel/value": True, "layers/0/bias/value": False,
                   "layers/1/kernel/value": True, "layers/1/bias/value": False}
  conv = qjax.resolve_mask(qjax.conv_kernels, state)
  assert sum(jax.tree.leaves(conv)) == 1
  method = qjax.methods.make("sr", key=0)
  projected = method.project(state)
  flat = jax.tree_util.tree_flatten_with_path(projected, is_leaf=C.is_codes)
  kernels = 0
  for path, leaf in flat[0]:
    names = qjax.quantizers.path_names(path)
    if names[-2] == "kernel":  # stored as codes on the Glorot binary grid
      assert isinstance(leaf, C.Codes) and C.bits_per_weight(leaf) <= 8
      assert leaf.grid == qjax.glorot_binary_grid(names, leaf)
      assert bool(jnp.all(qjax.contains(C.decode(leaf), leaf.grid))), names
      kernels += 1
    else:
      assert not isinstance(leaf, C.Codes)
  assert kernels == 2


# 7. The default mask is the kernels.


@pytest.mark.parametrize("name", ["bc", "sr", "r"])
def test_default_mask_of_every_method_is_the_kernels(name):
  params = _linen()
  method = qjax.methods.make(name, 0.01, key=0)
  projected = method.project(params)
  assert _bits(projected["params"]["Dense_0"]["bias"]) == _bits(
      params["params"]["Dense_0"]["bias"])
  h = qjax.glorot_scale((4, 3))
  floats = C.decode_tree(projected)
  view = method.view(floats)["params"]["Dense_0"]["kernel"]
  assert bool(jnp.all(jnp.abs(view) <= jnp.float32(h)))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), floats)
  d, _ = method.tx.update(grads, method.tx.init(floats), projected)
  new = optax.apply_updates(projected, d)
  assert bool(jnp.all(new["params"]["Dense_0"]["bias"] < 0.1))
  if name != "bc":
    kernel = new["params"]["Dense_0"]["kernel"]
    assert isinstance(kernel, C.Codes) and kernel.grid == Grid.binary(h)
    assert bool(jnp.all(jnp.abs(C.decode(kernel)) == jnp.float32(h)))


def test_default_mask_of_quantize_is_the_kernels_or_a_bare_array():
  view = qjax.quantize(_linen(kernel=0.3, bias=0.1), qjax.sign)
  assert bool(jnp.all(view["params"]["Dense_0"]["kernel"] == 1.0))
  assert bool(jnp.all(view["params"]["Dense_0"]["bias"] == 0.1))
  assert bool(jnp.all(qjax.quantize(jnp.full(3, -0.2), qjax.sign) == -1.0))


# 8. Raw Grid fields.


@pytest.mark.parametrize("make, match", [
    (lambda: Grid(0, 0.0), r"Grid: step must be > 0; got step=0.0"),
    (lambda: Grid(0, jnp.float32(-1.0)), r"step must be > 0"),
    (lambda: Grid(0, float("inf")), r"step must be a finite real number"),
    (lambda: Grid(float("nan"), 1.0), r"offset must be a finite real"),
    (lambda: Grid(0, 1e39), r"must fit float32"),
    (lambda: Grid(0, 1.0, 1), r"levels must be between 2 and 65536"),
    (lambda: Grid(0, 1.0, 3.0), r"levels must be an integer"),
    (lambda: Grid(-1.0, 1.0, 70000), r"got levels=70000"),
    (lambda: Grid.uniform(1.0, lo=-1.0), r"pass both lo and hi"),
    (lambda: Grid.uniform(1.0, lo=1.0, hi=-1.0), r"lo < hi.*got lo="),
    (lambda: Grid.uniform(1.0, lo=-np.inf, hi=1.0), r"lo must be a finite"),
    (lambda: Grid.binary(3.5e38), r"must fit float32"),
    (lambda: Grid.ternary(3.5e38), r"must fit float32"),
    (lambda: Grid.kbit(2, 3.5e38), r"must fit float32"),
    (lambda: Grid.binary(float("inf")), r"scale must be a finite real"),
    (lambda: Grid.uniform(1.0, lo=-3e38, hi=3e38), r"at most 65536"),
    (lambda: Grid.binary(1.0).scaled(0.0), r"scale must be a finite number "
     r"> 0"),
])
def test_raw_grid_fields_are_validated(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_grids_still_rebuild_under_tree_utilities_jit_and_vmap():
  grid = Grid.binary(0.5).scaled(1.0)
  axes = jax.tree.map(lambda _: 0, grid)  # scale=0 as an in_axes spec
  assert axes.scale == 0 and axes.bounded and axes.unscaled() == Grid.binary(
      0.5)
  scales = jnp.array([1.0, 2.0])
  grids = jax.vmap(Grid.binary(0.5).scaled)(scales)
  out = jax.vmap(qjax.round_nearest, in_axes=(None, axes))(jnp.float32(0.3),
                                                           grids)
  np.testing.assert_array_equal(out, [0.5, 1.0])
  doubled = jax.jit(lambda g: jax.tree.map(lambda v: 2 * v, g))(grid)
  assert float(doubled.scale) == 2.0 and doubled.hi == 0.5  # hi: unscaled
  assert jax.tree.structure(Grid.uniform(0.1)) != jax.tree.structure(grid)
  assert [qjax.quantizers.path_names(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(grid)[0]] == [("scale",)]
  assert jax.tree.leaves(Grid.binary(0.5)) == []
  # Codes on a scaled grid: the data and the scale are the leaves.
  c = C.encode_nearest(jnp.zeros(3), grid)
  assert [qjax.quantizers.path_names(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(c)[0]] == [
              ("data",), ("grid", "scale")]


# 9. Non-finite steps are skipped.


def _bad(params, value):
  """Gradients with one non-finite entry in the first kernel."""
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3),
                       C.decode_tree(params))
  k = grads["params"]["Dense_0"]["kernel"]
  grads["params"]["Dense_0"]["kernel"] = k.at[0, 0].set(value)
  return grads


def _good(params, t):
  return jax.tree.map(lambda x: jnp.full_like(x, 0.2 * (-1) ** t),
                      C.decode_tree(params))


def _init(method, params):
  return method.tx.init(C.decode_tree(params))


@pytest.mark.parametrize("optimizer, value", [("sgd", jnp.nan),
                                              ("adam", jnp.inf)])
@pytest.mark.parametrize("name", ["fp", "bc", "sr", "r"])
def test_a_non_finite_gradient_is_skipped_bit_for_bit(name, optimizer, value):
  method = qjax.methods.make(name, 0.5, optimizer=optimizer, key=1)
  params = method.project(_linen(kernel=0.3, bias=-0.0))
  state = _init(method, params)
  step = jax.jit(lambda p, s, g: method.tx.update(g, s, p))
  d, state = step(params, state, _good(params, 0))
  params = optax.apply_updates(params, d)

  d, bad_state = step(params, state, _bad(params, value))
  after = optax.apply_updates(params, d)
  assert _bits(after) == _bits(params)
  assert int(bad_state.skipped) == 1 and int(bad_state.streak) == 1
  d, bad_state = step(params, bad_state, _bad(params, value))
  assert int(bad_state.skipped) == 2 and int(bad_state.streak) == 2
  if name in ("sr", "r"):
    kernel = after["params"]["Dense_0"]["kernel"]
    assert isinstance(kernel, C.Codes)
    assert kernel.grid == Grid.binary(qjax.glorot_scale((4, 3)))

  # The next finite step trains as if the bad steps had never happened.
  d, good_state = step(params, bad_state, _good(params, 1))
  d_ref, ref_state = step(params, state, _good(params, 1))
  assert _bits(d) == _bits(d_ref)
  assert int(good_state.skipped) == 2 and int(good_state.streak) == 0
  for leaf in jax.tree.leaves(good_state.inner_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf)))
  assert jax.tree.structure(good_state) == jax.tree.structure(ref_state)


@pytest.mark.parametrize("name", ["fp", "bc", "sr", "r"])
def test_skipped_steps_keep_the_inner_state_bit_for_bit(name):
  method = qjax.methods.make(name, 0.1, optimizer="adam", key=2)
  params = method.project(_linen())
  state = _init(method, params)
  d, state = method.tx.update(_good(params, 0), state, params)
  params = optax.apply_updates(params, d)
  _, skipped = method.tx.update(_bad(params, jnp.nan), state, params)
  assert _bits(_key_data(skipped.inner_state)) == _bits(
      _key_data(state.inner_state))


def test_nan_in_an_unquantized_leaf_or_in_the_updates_is_skipped():
  method = qjax.methods.make("sr", 0.1, optimizer="sgd", key=0)
  params = method.project(_linen())
  grads = _good(params, 0)
  grads["params"]["Dense_0"]["bias"] = grads["params"]["Dense_0"][
      "bias"].at[1].set(jnp.nan)
  d, state = method.tx.update(grads, _init(method, params), params)
  assert _bits(optax.apply_updates(params, d)) == _bits(params)
  assert int(state.skipped) == 1
  # Finite gradients whose update overflows: skipped too.
  tx = qjax.skip_nonfinite(optax.sgd(3e38))
  p = {"w": jnp.full(2, 3e38)}
  d, state = tx.update({"w": jnp.full(2, -2.0)}, tx.init(p), p)
  assert bool(jnp.all(d["w"] == 0)) and int(state.skipped) == 1


def test_skip_nonfinite_keeps_adam_moments_finite_after_overflow():
  tx = qjax.skip_nonfinite(optax.adam(0.1))
  p = {"w": jnp.ones(2)}
  state = tx.init(p)
  _, state = tx.update({"w": jnp.full(2, 1e30)}, state, p)  # g**2 = inf
  assert int(state.skipped) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
      state.inner_state) if jnp.issubdtype(x.dtype, jnp.floating))


def test_skip_nonfinite_vmaps_lane_by_lane_and_traces_once():
  chex.clear_trace_counter()
  method = qjax.methods.make("sr", 0.1, optimizer="adam", key=0)
  params = method.project(_linen())
  lanes = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  grads = jax.tree.map(lambda a, b: jnp.stack([a, b]), _good(params, 0),
                       _bad(params, jnp.nan))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, g):
    d, s = method.tx.update(g, _init(method, p), p)
    return optax.apply_updates(p, d), s

  new, state = jax.vmap(step)(lanes, grads)
  np.testing.assert_array_equal(state.skipped, [0, 1])
  np.testing.assert_array_equal(state.streak, [0, 1])
  one, _ = step(params, _good(params, 0))
  assert _bits(jax.tree.map(lambda x: x[0], new)) == _bits(one)
  assert _bits(jax.tree.map(lambda x: x[1], new)) == _bits(params)
  assert _bits(one) != _bits(params)
  new, state = jax.vmap(step)(lanes, jax.tree.map(jnp.zeros_like, grads))
  np.testing.assert_array_equal(state.skipped, [0, 0])


def test_adding_the_zero_update_keeps_every_float_bit_for_bit():
  # (Not subnormals: XLA's arithmetic flushes them to zero in any step.)
  x = jnp.array([-0.0, 0.0, 2e-38, -3.5, 0.1, jnp.finfo(jnp.float32).max])
  zero = qjax.transforms._no_update(x)
  assert bool(jnp.all(zero == 0))
  assert _bits(optax.apply_updates({"w": x}, {"w": zero})) == _bits({"w": x})


def test_every_method_is_wrapped():
  for name in qjax.methods.names():
    method = qjax.methods.make(name, key=0)
    params = method.project(_linen())
    assert isinstance(_init(method, params), qjax.SkipNonFiniteState)


# -- the built-in methods' precheck (qjax.transforms.bounded_step) ----------

_G, _MU, _P, _LR = 2.0**50, 2.0**60, 2.0**120, 2.0**20


def _signs(x):
  """+1, -1, +1, ... in the shape of ``x`` (both signs at every bound)."""
  return jnp.where(jnp.arange(x.size).reshape(x.shape) % 2 == 0, 1.0, -1.0)


def _at_bounds(method, params, g=_G, p=_P, mu=_MU):
  """Gradients, parameters and an Adam state (nu = 0, the worst case for
  the step's size) with every entry at the given magnitudes."""
  floats = C.decode_tree(params)
  grads = jax.tree.map(lambda x: g * _signs(x), floats)
  big = jax.tree.map(
      lambda x: x if C.is_codes(x) else (p * _signs(x)).astype(x.dtype),
      params, is_leaf=C.is_codes)
  state = _init(method, params)

  def extreme(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(mu=jax.tree.map(lambda x: mu * _signs(x), s.mu),
                        nu=jax.tree.map(jnp.zeros_like, s.nu))
    return s
  state = jax.tree.map(extreme, state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState))
  return grads, big, state


def _floats_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
      C.decode_tree(tree)) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("name", ["fp", "bc", "sr", "r"])
def test_bounded_step_takes_steps_at_its_bounds_and_stores_finite_values(
    name, optimizer):
  # The proof in bounded_step's docstring, checked at its edges: every
  # input at its bound (both signs, Adam's nu at 0) gives finite
  # parameters and state, and the step is taken; just beyond any one bound
  # the step is skipped and nothing changes.
  method = qjax.methods.make(name, _LR, optimizer=optimizer, key=0)
  params = method.project(_linen())
  grads, big, state = _at_bounds(method, params)
  step = jax.jit(method.tx.update)
  for g in (grads, jax.tree.map(jnp.zeros_like, grads)):
    # With g = 0 and nu = 0, Adam's step is its largest: lr mu_hat / eps.
    d, new = step(g, state, big)
    assert int(new.skipped) == 0
    assert _floats_finite(qjax.apply_updates(big, d)) and _floats_finite(
        new.inner_state)
  if optimizer == "adam":
    assert _bits(qjax.apply_updates(big, d)) != _bits(big)
  beyond = 1 + 2.0**-20
  cases = [_at_bounds(method, params, g=_G * beyond),
           _at_bounds(method, params, p=_P * beyond)]
  if optimizer == "adam":
    cases.append(_at_bounds(method, params, mu=_MU * beyond))
  for g, p, s in cases:
    d, new = step(g, s, p)
    assert int(new.skipped) == 1
    assert _bits(qjax.apply_updates(p, d)) == _bits(p)
  fast = qjax.methods.make(name, _LR * beyond, optimizer=optimizer, key=0)
  d, new = jax.jit(fast.tx.update)(grads, state, big)
  assert int(new.skipped) == 1


@pytest.mark.parametrize("name", ["fp", "bc", "sr", "r"])
def test_bounded_step_trains_bit_for_bit_as_the_output_checks(name,
                                                              monkeypatch):
  # Inside the bounds the precheck only changes which checks run: the same
  # steps, skips included, give the same bits as the output-checking policy.
  method = qjax.methods.make(name, 0.1, optimizer="adam", key=3)
  monkeypatch.setattr(qjax.methods.Setup, "precheck", lambda self: None)
  checked = qjax.methods.make(name, 0.1, optimizer="adam", key=3)
  params = method.project(_linen())
  runs = []
  for m in (method, checked):
    p, s, out = params, _init(m, params), []
    for t in range(6):
      g = _bad(p, jnp.nan) if t == 2 else _good(p, t)
      d, s = jax.jit(m.tx.update)(g, s, p)
      p = qjax.apply_updates(p, d)
      out.append(_bits(p) + _bits(_key_data(s)))
    runs.append(out)
  assert runs[0] == runs[1]
  assert len({tuple(b) for b in runs[0]}) > 3  # it trained


def test_bounded_step_leaves_float16_parameters_to_the_output_checks():
  # float16 overflows below the proof's 2**121: an update that would store
  # inf must still be skipped (bounded_step declines, skip_nonfinite checks
  # the outputs).
  method = qjax.methods.make("fp", 100.0, optimizer="sgd")
  p = {"w": jnp.full((2,), 65504.0, jnp.float16)}
  d, s = method.tx.update({"w": jnp.full((2,), -1.0, jnp.float16)},
                          method.tx.init(p), p)
  assert int(s.skipped) == 1
  assert _bits(qjax.apply_updates(p, d)) == _bits(p)
  with pytest.raises(ValueError, match="optax.adam and optax.sgd"):
    qjax.transforms.bounded_step("lion", 0.1)
  with pytest.raises(TypeError, match="precheck must be None or a function"):
    qjax.skip_nonfinite(optax.adam(0.1), precheck=True)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bounded_step_reads_a_schedule_at_the_steps_own_count(optimizer):
  # The engine passes a schedule: the bound applies to the rate each step
  # uses, so a step whose scheduled rate passes 2**20 is skipped.
  schedule = optax.piecewise_constant_schedule(0.1, {2: 2.0**30})
  method = qjax.methods.make("fp", schedule, optimizer=optimizer)
  p = {"w": jnp.ones((3,))}
  s = method.tx.init(p)
  skipped = []
  for _ in range(4):
    d, s = method.tx.update({"w": jnp.full((3,), 0.5)}, s, p)
    p = qjax.apply_updates(p, d)
    skipped.append(int(s.skipped))
  assert skipped == [0, 0, 1, 2]  # the count stays at 2 while skipped
