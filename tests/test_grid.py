"""Grid constructors, bad input, and the exact-lattice property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import Grid


def _points(grid, dtype=jnp.float32):
  x = jnp.linspace(-5, 5, 20001, dtype=jnp.float32).astype(dtype)
  return np.unique(np.asarray(
      qjax.round_nearest(x, grid).astype(jnp.float32)))


@pytest.mark.parametrize("grid, expected", [
    (Grid.binary(0.5), [-0.5, 0.5]),
    (Grid.ternary(2.0), [-2.0, 0.0, 2.0]),
    (Grid.kbit(2, 1.0), [-1.0, -1 / 3, 1 / 3, 1.0]),
    (Grid.kbit(1, 3.0), [-3.0, 3.0]),
    (Grid.uniform(0.25, lo=-0.5, hi=0.75), [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75]),
])
def test_constructors_give_the_expected_points(grid, expected):
  np.testing.assert_allclose(_points(grid), expected, rtol=1e-6, atol=1e-7)
  assert grid.num_points() == len(expected)


def test_unbounded_grid_has_no_range():
  grid = Grid.uniform(0.1)
  assert not grid.bounded and grid.num_points() == float("inf")
  x = jnp.array([-123.44, 0.04, 7.06])
  # The unbounded lattice keeps 16 bits of the step (see lattice_resolution).
  np.testing.assert_allclose(qjax.round_nearest(x, grid), [-123.4, 0.0, 7.1],
                             rtol=1e-5)


@pytest.mark.parametrize("step", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_step_names_argument_and_value(step):
  with pytest.raises(ValueError, match=r"step.*> 0.*got step="):
    Grid.uniform(step)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan")])
def test_bad_scale(scale):
  for ctor in (Grid.binary, Grid.ternary):
    with pytest.raises(ValueError, match=r"scale.*got scale="):
      ctor(scale)


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, -2.0)])
def test_lo_not_below_hi(lo, hi):
  with pytest.raises(ValueError, match=r"lo < hi.*got lo="):
    Grid.uniform(0.5, lo=lo, hi=hi)


def test_bounds_must_come_together():
  with pytest.raises(ValueError, match="together"):
    Grid.uniform(0.5, lo=-1.0)


@pytest.mark.parametrize("bits", [0, -1, 1.5, True, "2"])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match=r"bits >= 1.*got bits="):
    Grid.kbit(bits)


def test_step_can_be_traced_under_vmap_and_jit():
  deltas = jnp.array([0.1, 0.2, 0.5])
  f = jax.jit(jax.vmap(lambda d: qjax.round_nearest(jnp.float32(0.33),
                                                     Grid.uniform(d))))
  np.testing.assert_allclose(f(deltas), [0.3, 0.4, 0.5], rtol=1e-5)
  g = jax.jit(jax.vmap(lambda s: qjax.round_nearest(jnp.float32(0.2),
                                                     Grid.binary(s))))
  np.testing.assert_allclose(g(jnp.array([1.0, 3.0])), [1.0, 3.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("grid", [Grid.uniform(0.1, lo=-2.9, hi=3.0),
                                  Grid.kbit(3, 0.0541), Grid.ternary(0.7)])
def test_differences_of_grid_points_are_exact(dtype, grid, rng):
  """p + (q - p) == q for every pair of points: the lattice guarantee."""
  pts = jnp.asarray(_points(grid, dtype), dtype)
  p, q = jnp.meshgrid(pts, pts)
  assert bool(jnp.all(p + (q - p) == q))
  assert bool(jnp.all(qjax.contains(pts, grid)))
