"""The speed work's layout changes keep the values: qjax.ops and Points."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import grid as grid_lib
from qjax import ops
from qjax.grid import Grid


def _loss(dot_general):
  def loss(x, w):
    y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1]))
  return loss


@pytest.mark.parametrize("shape", [(128, 784, 512), (3, 5, 2), (1, 7, 1)])
def test_dot_general_matches_lax_value_and_grads(shape):
  b, k, n = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
  want = jax.jit(jax.value_and_grad(_loss(jax.lax.dot_general), (0, 1)))
  got = jax.jit(jax.value_and_grad(_loss(ops.dot_general), (0, 1)))
  (v0, (dx0, dw0)), (v1, (dx1, dw1)) = want(x, w), got(x, w)
  assert v1 == v0  # the forward product is the same dot
  # The independent reference: float64 numpy of the chain rule.
  # The output gradient from the float32 forward, the products in float64.
  y = np.asarray(x @ w, np.float64)
  gy = (1 - np.tanh(y) ** 2) * np.arange(n)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  for got_, lax_, ref in ((dw1, dw0, x64.T @ gy), (dx1, dx0, gy @ w64.T)):
    tol = 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(got_, ref, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(got_, lax_, rtol=1e-4, atol=tol)


def test_dot_general_under_vmap_and_leading_axes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, 6, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  grad = lambda dg: jax.jit(jax.vmap(jax.grad(_loss(dg), (0, 1))))
  for a, b in zip(jax.tree.leaves(grad(ops.dot_general)(x, w)),
                  jax.tree.leaves(grad(jax.lax.dot_general)(x, w))):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dot_general_passes_other_products_through():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched product
  np.testing.assert_array_equal(ops.dot_general(a, b, dims),
                                jax.lax.dot_general(a, b, dims))


def test_dense_layer_same_parameters_and_outputs():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.float32)
  plain, fast = nn.Dense(4), nn.Dense(4, dot_general=ops.dot_general)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(fast.init(jax.random.key(0), x)) == \
      jax.tree.structure(variables)
  np.testing.assert_array_equal(fast.apply(variables, x),
                                plain.apply(variables, x))


@pytest.mark.parametrize("grid", [
    Grid.binary(0.3), Grid.ternary(0.7), Grid.kbit(3, 0.1), Grid.kbit(4),
    Grid.uniform(0.25, -1.0, 0.75)], ids=repr)
def test_points_small_grid_lookups_equal_gathers(grid):
  """Select chains (small grids) give exactly the table entries and the
  brackets a gather and a linear scan give, out-of-range codes included."""
  points = grid_lib.Points(grid, jnp.float32)
  levels = grid.levels
  k = jnp.arange(-2, levels + 2, dtype=jnp.int32)
  np.testing.assert_array_equal(
      points.value(k), jnp.take(points.v, k, mode="clip"))
  values = np.asarray(points.v, np.float32)
  lo, hi = values[0], values[-1]
  xs = np.concatenate([
      values, np.nextafter(values, np.float32(np.inf)),
      np.nextafter(values, np.float32(-np.inf)),
      np.random.default_rng(4).uniform(lo - 1, hi + 1, 200),
      [np.nan, np.inf, -np.inf]]).astype(np.float32)
  # XLA:CPU treats float32 subnormal inputs as zero (DAZ), so the neighbours
  # of 0 (+-1e-45) compare as 0 there, in either implementation.
  xs = xs[~((xs != 0) & (np.abs(xs) < np.finfo(np.float32).tiny))]
  got = np.asarray(jax.jit(points.bracket)(jnp.asarray(xs)))
  inner = values[1:-1]
  want = np.array([0 if np.isnan(x) else int(np.sum(x >= inner))
                   for x in xs])
  np.testing.assert_array_equal(got, want)
