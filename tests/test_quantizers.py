"""Q_d and Q_s: statistical unbiasedness, grid membership, STE, masks."""

import jax
import jax.extend.random  # threefry2x32_p, the reference for ours
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import Grid
from qjax.grid import values

BF16 = np.dtype(ml_dtypes.bfloat16)


def _five_sigma_mean(delta, p, n):
  return 5.0 * delta * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("grid, k", [
    (Grid.uniform(0.25, lo=-2.0, hi=2.0), 10),
    # Stored points that are not the exact ones: bf16 0.10009765625, ...
    (Grid.uniform(0.1, lo=-1.0, hi=1.0), 12),
    (Grid.kbit(3, 0.7), 5)], ids=repr)
def test_stochastic_rounding_is_unbiased_with_right_variance(dtype, grid, k,
                                                             key):
  """E[Q_s(x)] = x and Var = Δ² p (1 - p) w.r.t. the stored points, 5 sigma."""
  n = 100_000
  v = np.asarray(values(grid, dtype)).astype(np.float64)
  lo, hi = v[k], v[k + 1]
  delta = hi - lo
  for frac in (0.05, 0.37, 0.5, 0.95):
    x32 = np.float32(lo + frac * delta)  # any float32 input
    p = (float(x32) - lo) / delta  # exact, in float64
    draws = qjax.round_stochastic(jax.random.fold_in(key, int(frac * 100)),
                                  jnp.full((n,), x32), grid, dtype)
    assert draws.dtype == dtype
    d = np.asarray(draws.astype(jnp.float32), np.float64)
    assert set(np.unique(d)) <= {lo, hi}
    assert abs(d.mean() - float(x32)) < _five_sigma_mean(delta, p, n)
    var_se = delta**2 * (np.sqrt(p * (1 - p)) * abs(1 - 2 * p)
                         + 1 / np.sqrt(n))
    assert abs(d.var() - delta**2 * p * (1 - p)) < 5 * var_se / np.sqrt(n)


def test_fine_fractions_are_not_truncated(key):
  """A library drawing only 8 random bits cannot round up w.p. 1e-3 right."""
  n, delta, p = 100_000, 1.0, 1e-3
  x = jnp.full((n,), p, jnp.float32)
  d = np.asarray(qjax.round_stochastic(key, x, Grid.uniform(delta)))
  assert abs(d.mean() - p) < _five_sigma_mean(delta, p, n)


def test_noise_is_independent_per_element(key):
  """Neighbouring elements of one array round independently (no shared axis)."""
  n = 20_000
  x = jnp.full((n, 2, 3), 0.5, jnp.float32)
  d = np.asarray(qjax.round_stochastic(key, x, Grid.binary(1.0))).reshape(n, 6)
  corr = np.corrcoef(d, rowvar=False)[np.triu_indices(6, 1)]
  assert np.max(np.abs(corr)) < 5 / np.sqrt(n)


@pytest.mark.parametrize("grid", [Grid.binary(0.3), Grid.kbit(3, 2.0),
                                  Grid.uniform(0.1)], ids=repr)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_outputs_are_grid_points_and_rounding_is_idempotent(grid, dtype, key,
                                                          rng):
  x = jnp.asarray(rng.normal(scale=2.0, size=4096), dtype)
  for q in (qjax.round_nearest(x, grid), qjax.round_stochastic(key, x, grid)):
    assert q.dtype == dtype and q.shape == x.shape
    assert bool(jnp.all(qjax.contains(q, grid)))
    assert bool(jnp.all(qjax.round_nearest(q, grid) == q))
    assert bool(jnp.all(qjax.round_stochastic(key, q, grid) == q))


def test_nearest_rounding_rounds_to_nearest_and_clips():
  grid = Grid.uniform(0.5, lo=-1.0, hi=1.0)
  x = jnp.array([-7.0, -1.2, -0.74, -0.26, 0.0, 0.24, 0.25, 0.76, 9.0])
  np.testing.assert_array_equal(
      qjax.round_nearest(x, grid),
      [-1.0, -1.0, -0.5, -0.5, 0.0, 0.0, 0.5, 1.0, 1.0])


def test_stochastic_rounding_clips_outside_range(key):
  grid = Grid.ternary(1.0)
  q = qjax.round_stochastic(key, jnp.array([-5.0, 5.0] * 100), grid)
  np.testing.assert_array_equal(q, jnp.array([-1.0, 1.0] * 100))


def _same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and (
      a.tobytes() == b.tobytes())


@pytest.mark.parametrize("grid", [Grid.kbit(3, 0.7),
                                  Grid.uniform(0.1, offset=0.05)], ids=repr)
def test_same_key_same_bits_eager_jit_and_vmap(grid, rng):
  x = jnp.asarray(rng.normal(size=4096), jnp.float32)
  a = qjax.round_stochastic(jax.random.key(3), x, grid)
  b = jax.jit(qjax.round_stochastic, static_argnums=2)(jax.random.key(3), x,
                                                       grid)
  c = qjax.round_stochastic(jax.random.key(4), x, grid)
  assert _same_bits(a, b) and not _same_bits(a, c)
  assert _same_bits(a, qjax.round_stochastic(3, x, grid))
  assert _same_bits(a, qjax.round_stochastic(jax.random.PRNGKey(3), x, grid))
  keys = jax.random.split(jax.random.key(5), 3)
  xs = jnp.stack([x, -x, 2 * x])
  lanes = jax.jit(jax.vmap(lambda k, v: qjax.round_stochastic(k, v, grid)))(
      keys, xs)
  for i in range(3):
    assert _same_bits(lanes[i], qjax.round_stochastic(keys[i], xs[i], grid))
  near = jax.jit(jax.vmap(lambda v: qjax.round_nearest(v, grid)))(xs)
  for i in range(3):
    assert _same_bits(near[i], qjax.round_nearest(xs[i], grid))


def test_sign_maps_zero_to_plus_scale():
  np.testing.assert_array_equal(qjax.sign(jnp.array([-0.1, 0.0, 2.0]), 0.5),
                                [-0.5, 0.5, 0.5])
  np.testing.assert_array_equal(
      qjax.round_nearest(jnp.array([-0.1, 0.0, 2.0]), Grid.binary(0.5)),
      [-0.5, 0.5, 0.5])


def test_stochastic_binarize_follows_hard_sigmoid(key):
  n, scale = 20_000, 2.0
  w = jnp.array([-3.0, -1.0, 0.0, 0.5, 1.5, 4.0])
  draws = qjax.stochastic_binarize(key, jnp.tile(w, (n, 1)), scale)
  assert set(np.unique(np.asarray(draws)).tolist()) <= {-scale, scale}
  p_plus = np.asarray((draws > 0).mean(0))
  expected = np.clip((np.asarray(w) / scale + 1) / 2, 0, 1)
  tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12
  assert np.all(np.abs(p_plus - expected) <= tol)


def test_scales():
  assert qjax.glorot_scale((100, 50)) == pytest.approx(np.sqrt(1.5 / 150))
  assert qjax.glorot_scale((3, 3, 16, 32)) == pytest.approx(
      np.sqrt(1.5 / (9 * 16 + 9 * 32)))
  w = jnp.arange(24.0).reshape(2, 3, 4) - 12
  s = qjax.mean_abs_scale(w)
  assert s.shape == (1, 1, 4)
  np.testing.assert_allclose(s[0, 0], np.abs(np.asarray(w)).mean((0, 1)))
  with pytest.raises(ValueError, match="rank >= 2"):
    qjax.glorot_scale((5,))


def test_straight_through_value_is_exact_and_gradient_identity(rng):
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  x = jnp.asarray(rng.uniform(-2, 2, 512), jnp.float32)
  ste = qjax.straight_through(qjax.round_nearest)
  assert bool(jnp.all(ste(x, grid) == qjax.round_nearest(x, grid)))
  g = jax.grad(lambda v: jnp.sum(ste(v, grid) * 3.0))(x)
  np.testing.assert_array_equal(g, jnp.full_like(x, 3.0))
  clipped = qjax.straight_through(qjax.round_nearest, clip=1.0)
  g = jax.grad(lambda v: jnp.sum(clipped(v, grid)))(x)
  np.testing.assert_array_equal(g, (jnp.abs(x) <= 1.0).astype(jnp.float32))


def test_straight_through_stochastic_takes_key(key):
  ste = qjax.straight_through(qjax.round_stochastic)
  x = jnp.linspace(-1, 1, 64)
  q = ste(x, Grid.binary(1.0), key=key)
  assert bool(jnp.all(q == qjax.round_stochastic(key, x, Grid.binary(1.0))))


def _params():
  return {"params": {
      "Conv_0": {"kernel": jnp.full((3, 3, 1, 4), 0.3), "bias": jnp.zeros(4)},
      "Dense_0": {"kernel": jnp.full((8, 2), -0.2), "bias": jnp.ones(2)},
  }}


def test_quantize_respects_mask_and_passes_gradients():
  params = _params()
  view = qjax.quantize(params, qjax.round_nearest, qjax.conv_kernels,
                       grid=Grid.binary(1.0))
  assert bool(jnp.all(view["params"]["Conv_0"]["kernel"] == 1.0))
  assert bool(jnp.all(view["params"]["Dense_0"]["kernel"] == -0.2))
  view = qjax.quantize(params, qjax.sign, qjax.all_kernels)
  assert bool(jnp.all(view["params"]["Dense_0"]["kernel"] == -1.0))
  assert bool(jnp.all(view["params"]["Dense_0"]["bias"] == 1.0))
  grads = jax.grad(lambda p: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(
      qjax.quantize(p, qjax.sign, qjax.all_kernels))))(params)
  assert all(bool(jnp.all(g == 1.0)) for g in jax.tree.leaves(grads))


def test_quantize_stochastic_with_per_leaf_keys(key):
  params = _params()
  view = qjax.quantize(params, qjax.round_stochastic, qjax.all_kernels,
                       grid=qjax.glorot_binary_grid, key=key)
  k = view["params"]["Dense_0"]["kernel"]
  h = qjax.glorot_scale((8, 2))
  assert bool(jnp.all(jnp.abs(k) == jnp.float32(h)))


def test_mask_with_wrong_structure_is_a_clear_error():
  params = _params()
  bad = {"params": {"Conv_0": {"kernel": True}}}
  with pytest.raises(ValueError, match="same structure as the parameters"):
    qjax.quantize(params, qjax.sign, bad)


@pytest.mark.parametrize("fn", [
    lambda: qjax.round_stochastic(None, jnp.ones(3), Grid.binary()),
    lambda: qjax.round_nearest(jnp.ones(3, jnp.int32), Grid.binary()),
    lambda: qjax.round_nearest(jnp.ones(3), 0.5),
])
def test_bad_quantizer_inputs(fn):
  with pytest.raises((ValueError, TypeError), match="got"):
    fn()


def test_per_channel_mean_abs_scale(rng):
  """XNOR/BWN-style binarization: sign(w) * mean|w| per output channel."""
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
  view = qjax.quantize({"kernel": w}, lambda x: qjax.sign(
      x, qjax.mean_abs_scale(x)), qjax.all_kernels)["kernel"]
  scale = np.abs(np.asarray(w)).mean((0, 1, 2)).astype(np.float32)
  expected = np.where(np.asarray(w) >= 0, 1.0, -1.0) * scale
  np.testing.assert_allclose(view, expected, rtol=1e-6)
  # A grid has one scale (a scalar, possibly traced), not one per channel.
  with pytest.raises(ValueError, match="one number"):
    Grid.binary(1.0).scaled(qjax.mean_abs_scale(w))


def test_uniform_is_uniform_and_independent(key):
  """The SR noise: chi-square over 64 bins, moments, lag-1 correlation."""
  n = 1 << 18
  u = np.asarray(qjax.quantizers.uniform(key, (n,)), np.float64)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
  counts = np.bincount((u * 64).astype(int), minlength=64)
  chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
  assert chi2 < 63 + 6 * np.sqrt(2 * 63)  # 63 dof, 6 sigma
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(n)


def test_threefry_is_jaxs_bit_for_bit(rng):
  k0, k1 = (jnp.uint32(v) for v in rng.integers(0, 2**32, 2))
  x0, x1 = (jnp.asarray(rng.integers(0, 2**32, 4097), jnp.uint32)
            for _ in range(2))
  ours = qjax.quantizers._threefry2x32(k0, k1, x0, x1)
  jaxs = jax.extend.random.threefry2x32_p.bind(k0, k1, x0, x1)
  for a, b in zip(ours, jaxs):
    assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(784, 256)])
def test_random_bits_equal_jax_random_bits(shape, key):
  expected = jax.random.bits(key, shape, jnp.uint32)
  assert _same_bits(qjax.quantizers.random_bits(key, shape), expected)
  raw = jax.random.key_data(key)  # a raw uint32[2] key draws the same
  assert _same_bits(jax.jit(qjax.quantizers.random_bits, static_argnums=1)(
      raw, shape), expected)
  keys = jax.random.split(key, 3)
  lanes = jax.vmap(lambda k: qjax.quantizers.random_bits(k, shape))(keys)
  for k, lane in zip(keys, lanes):
    assert _same_bits(lane, jax.random.bits(k, shape, jnp.uint32))
  with jax.threefry_partitionable(False):
    assert _same_bits(qjax.quantizers.random_bits(key, shape),
                      jax.random.bits(key, shape, jnp.uint32))
  rbg = jax.random.key(0, impl="rbg")
  assert _same_bits(qjax.quantizers.random_bits(rbg, shape),
                    jax.random.bits(rbg, shape, jnp.uint32))


def test_round_stochastic_draws_its_bits_from_the_key(key):
  """Q_s compares p with random_bits(key, shape):
  P(up) = ceil(p 2**32)/2**32."""
  grid = Grid.uniform(0.25, lo=-1.0, hi=1.0)
  x = jnp.full((4096,), 0.0625, jnp.float32)  # p = 1/4 exactly
  up = np.asarray(qjax.round_stochastic(key, x, grid)) == 0.25
  bits = np.asarray(jax.random.bits(key, x.shape, jnp.uint32))
  assert np.array_equal(up, bits < 2**30)


@pytest.mark.parametrize("shape", [(), (3, 5), (784, 256)])
def test_uniform_equals_jax_random_uniform(shape, key):
  expected = jax.random.uniform(key, shape)
  assert np.array_equal(qjax.quantizers.uniform(key, shape), expected)
  raw = jax.random.key_data(key)  # a raw uint32[2] key draws the same
  assert np.array_equal(jax.jit(qjax.quantizers.uniform, static_argnums=1)(
      raw, shape), expected)


def test_uniform_follows_jax_in_the_non_partitionable_mode(key):
  with jax.threefry_partitionable(False):
    expected = jax.random.uniform(key, (5, 7))
    assert np.array_equal(qjax.quantizers.uniform(key, (5, 7)), expected)
  assert not np.array_equal(expected, jax.random.uniform(key, (5, 7)))


def test_uniform_vmaps_lane_by_lane(key):
  keys = jax.random.split(key, 4)
  batched = jax.vmap(lambda k: qjax.quantizers.uniform(k, (3, 5)))(keys)
  for k, lane in zip(keys, batched):
    assert np.array_equal(lane, qjax.quantizers.uniform(k, (3, 5)))
  assert not np.array_equal(batched[0], batched[1])


@pytest.mark.parametrize("shape", [(0,), (2, 3, 5)])
def test_uniform_shapes_and_other_prngs(shape, key):
  assert qjax.quantizers.uniform(key, shape).shape == shape
  rbg = qjax.quantizers.uniform(jax.random.key(0, impl="rbg"), shape)
  assert rbg.shape == shape and rbg.dtype == jnp.float32
  assert bool(jnp.all((rbg >= 0) & (rbg < 1)))
