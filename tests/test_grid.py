"""Grid: exactly the points asked for, scaled (traced) grids, bad input.

Expected values come from the independent reference of ``test_codes``
(nearest storage-dtype value of an exact Fraction, found by comparing exact
distances to neighbouring floats), from numpy float32 arithmetic, or from
brute force over a grid's table; never from qjax's own rounding.
"""

import copy
import math
import pickle
from fractions import Fraction

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import Grid
from qjax import codes as C
from qjax.grid import values
from test_codes import BF16, DTYPES, F16, F32, as64, nearest, same_bits

# ----------------------------------------------------------------------------
# Exactly the grid asked for.
# ----------------------------------------------------------------------------

EXACT = [
    (Grid.binary(0.5), [Fraction(-1, 2), Fraction(1, 2)]),
    (Grid.ternary(2.0), [-2, 0, 2]),
    (Grid.kbit(2, 1.0), [-1, Fraction(-1, 3), Fraction(1, 3), 1]),
    (Grid.kbit(1, 3.0), [-3, 3]),
    (Grid.uniform(0.25, lo=-0.5, hi=0.75),
     [Fraction(k, 4) for k in range(-2, 4)]),
    (Grid.uniform(0.1, lo=0, hi=1), [Fraction(k, 10) for k in range(11)]),
    (Grid.binary(0.18898223), [-Fraction("0.18898223"),
                               Fraction("0.18898223")]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("grid, exact", EXACT, ids=lambda g: repr(g)[:40])
def test_constructors_store_the_nearest_values_of_the_exact_points(
    grid, exact, dtype):
  exact = [Fraction(q) for q in exact]
  assert grid.levels == grid.num_points() == len(exact)
  assert [grid.point(k) for k in range(grid.levels)] == exact
  assert grid.offset == exact[0] and grid.step == exact[1] - exact[0]
  v = values(grid, dtype)
  assert v.dtype == dtype and not v.flags.writeable
  assert as64(v).tolist() == [nearest(q, dtype) for q in exact]
  # Rounding a sweep of inputs only ever gives these values, and all of them.
  x = jnp.linspace(-5, 5, 4001, dtype=jnp.float32).astype(dtype)
  got = np.unique(as64(qjax.round_nearest(x, grid)))
  assert np.array_equal(got, as64(v))


def test_issue_regressions():
  # round_nearest(0.3, Grid.uniform(0.1)) is float32(0.3), not 0.25 or so.
  for x in (0.1, 0.2, 0.3):
    q = qjax.round_nearest(jnp.float32(x), Grid.uniform(0.1))
    assert same_bits(q, np.float32(x))
  q = qjax.round_nearest(jnp.float32([0.1, 0.2, 0.3]), Grid.uniform(0.1))
  assert same_bits(q, np.float32([0.1, 0.2, 0.3]))
  # In bf16, 1.0 is a point of Grid.uniform(0.1): it stays 1.0.
  one = jnp.ones((), jnp.bfloat16)
  assert same_bits(qjax.round_nearest(one, Grid.uniform(0.1)), one)
  assert float(qjax.round_nearest(jnp.float32(1.0), Grid.uniform(0.1),
                                  jnp.bfloat16)) == 1.0
  # Binary scales are stored as asked (old: +-0.18898225).
  assert same_bits(values(Grid.binary(0.18898223)),
                   np.float32([-0.18898223, 0.18898223]))
  v = values(Grid.binary(math.sqrt(1.5 / 107)))
  assert float(v[0]) == -float(v[1]) == -float(np.float32(math.sqrt(1.5 /
                                                                    107)))
  # k-bit level counts in half precision.
  assert len(np.unique(as64(values(Grid.kbit(4, 1.0), BF16)))) == 16
  assert len(np.unique(as64(values(Grid.kbit(8, 1.0), BF16)))) == 256
  assert len(np.unique(as64(values(Grid.kbit(8), F16)))) == 256
  assert float(values(Grid.kbit(2, 1.0), BF16)[-1]) == 1.0
  # Too many levels is an error, not a silently coarser grid.
  with pytest.raises(ValueError, match="at most 65536"):
    Grid.uniform(0.1, lo=-1e6, hi=1e6)


def test_exact_fields_of_float_arguments():
  assert Grid.uniform(0.1).step == Fraction(1, 10)
  assert Grid.uniform(np.float32(0.1)).step == Fraction(1, 10)
  assert Grid.uniform("1/3", lo=0, hi=1).levels == 4
  assert Grid.kbit(3, 0.7).step == Fraction(7, 5) / 7
  assert Grid.uniform(0.1, lo=-0.3, hi=0.3).offset == Fraction(-3, 10)
  assert Grid.uniform(0.5, offset=0.25).offset == Fraction(1, 4)
  g = Grid.uniform(0.1, lo=-1, hi=1)
  assert g.lo == -1.0 and g.hi == 1.0 and g.bounded
  assert Grid.uniform(0.1).lo is None and Grid.uniform(0.1).hi is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_representable_points_are_exact_in_every_dtype(dtype):
  for g in (Grid.uniform(0.1, lo=-1, hi=1), Grid.kbit(2), Grid.kbit(8),
            Grid.ternary(0.5), Grid.uniform(0.125, lo=-2, hi=2)):
    v = as64(values(g, dtype))
    for point in (-1.0, -0.5, 0.0, 0.5, 1.0):
      k = (Fraction(point) - g.offset) / g.step
      if k.denominator == 1 and 0 <= k < g.levels:
        assert v[int(k)] == point


# ----------------------------------------------------------------------------
# Unbounded grids: the points offset + k * step, every integer k.
# ----------------------------------------------------------------------------


def _times(k, d):
  """k * d in numpy float32 from four exact partial products (documented)."""
  kh = np.trunc(k / np.float32(4096)) * np.float32(4096)
  kl = k - kh
  dh = (np.asarray(d, np.float32).view(np.uint32) & np.uint32(
      0xFFFFF000)).view(np.float32)
  dl = d - dh
  for a, b in [(kh, dh), (kh, dl), (kl, dh), (kl, dl)]:  # exact products
    assert np.array_equal(as64(a) * as64(b), as64(a * b))
  return kh * dh + ((kh * dl + kl * dh) + kl * dl)


def _unbounded_points(grid, ks, dtype=F32, scale=None):
  """The documented points of an unbounded grid, with numpy float32."""
  o = np.float32(nearest(grid.offset, F32))
  d = np.float32(nearest(grid.step, F32))
  if scale is not None:
    o, d = o * np.float32(scale), d * np.float32(scale)
  ks = np.asarray(ks, np.float32)
  return (o + _times(ks, d)).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_unbounded_grid_rounds_to_the_nearest_of_its_points(dtype, rng):
  for grid in (Grid.uniform(0.1), Grid.uniform(0.5, offset=0.25),
               Grid.uniform(3.0, offset=-1)):
    assert not grid.bounded and grid.num_points() == math.inf
    d = float(grid.step)
    x = np.concatenate([rng.uniform(-300 * d, 300 * d, 3000),
                        [0.0, d, -d, 0.5 * d]]).astype(np.float32)
    x = x.astype(dtype)
    q = np.asarray(qjax.round_nearest(jnp.asarray(x), grid))
    assert q.dtype == dtype
    # Brute force over the documented points around each x.
    k0 = np.floor((x.astype(np.float64) - float(grid.offset)) / d)
    ks = k0[:, None] + np.arange(-3, 4)[None]
    pts = as64(_unbounded_points(grid, ks, dtype))
    dist = np.abs(pts - x.astype(np.float64)[:, None])
    best = pts[np.arange(len(x)), 6 - np.argmin(dist[:, ::-1], axis=1)]
    assert np.array_equal(as64(q), best)
    # Within a few float32 roundings of the exact points offset + k step.
    exact = (np.float64(float(grid.offset))
             + np.round((as64(q) - float(grid.offset)) / d) * d)
    mag = np.maximum(np.abs(exact), np.abs(as64(q)))
    tol = 3 * 2.0**-24 * np.maximum(mag, d) + (
        0 if dtype == F32 else 2.0**-8 * mag)  # half a bf16 ulp
    assert np.all(np.abs(as64(q) - exact) <= tol)


def test_unbounded_scaled_grid_follows_the_documented_formula(rng):
  x = jnp.asarray(rng.uniform(-5, 5, 512), jnp.float32)
  grid = Grid.uniform(0.1, offset=0.05)
  f = jax.jit(jax.vmap(lambda s: qjax.round_nearest(x, grid.scaled(s))))
  scales = np.float32([0.5, 1.0, 3.0])
  out = np.asarray(f(jnp.asarray(scales)))
  for s, q in zip(scales, out):
    d = float(np.float32(0.1) * s)
    k0 = np.floor((np.asarray(x, np.float64) - 0.05 * s) / d)
    ks = k0[:, None] + np.arange(-3, 4)[None]
    pts = as64(_unbounded_points(grid, ks, F32, s))
    dist = np.abs(pts - np.asarray(x, np.float64)[:, None])
    best = pts[np.arange(len(x)), 6 - np.argmin(dist[:, ::-1], axis=1)]
    assert np.array_equal(as64(q), best)


@pytest.mark.parametrize("grid", [Grid.uniform(0.3, offset=0.7)], ids=repr)
def test_decisions_are_the_same_bits_eager_jit_and_vmap(grid, rng):
  """Unbounded grids (scaled too), where XLA would fuse an FMA (bounded
  scaled grids: test_scaled_rounding_is_the_same_bits_eager_jit_and_vmap)."""
  span = 3.0 if grid.bounded else 100.0
  x = jnp.asarray(rng.uniform(-span, span, (2, 5000)), jnp.float32)
  scales = jnp.float32([1.0, 0.7])
  keys = jax.random.split(jax.random.key(2), 2)

  def decide(key, x, s):
    g = grid.scaled(s)
    return (qjax.round_nearest(x, grid), qjax.round_stochastic(key, x, grid),
            qjax.round_nearest(x, g),
            qjax.round_stochastic(key, x, g, jnp.bfloat16))

  lanes = jax.jit(jax.vmap(decide))(keys, x, scales)
  for i in range(2):
    eager = decide(keys[i], x[i], scales[i])
    jitted = jax.jit(decide)(keys[i], x[i], scales[i])
    for a, b, c in zip(eager, jitted, lanes):
      assert same_bits(a, b) and same_bits(a, c[i])


# ----------------------------------------------------------------------------
# Decisions against the stored points: brute force over the table.
# ----------------------------------------------------------------------------


def _brute_nearest_values(x: np.ndarray, v: np.ndarray) -> np.ndarray:
  """The table value nearest to each x (exact in float64); ties upwards."""
  x64 = x.astype(np.float64)
  i = np.searchsorted(v, x64)
  lo, hi = np.clip(i - 1, 0, len(v) - 1), np.clip(i, 0, len(v) - 1)
  up = (v[hi] - x64) <= (x64 - v[lo])
  return np.where(up, v[hi], v[lo])


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    step=st.integers(1, 10**5).map(lambda n: Fraction(n, 10**4)),
    lo_steps=st.integers(-3000, 3000), levels=st.sampled_from(
        [2, 3, 4, 7, 8, 9, 16, 61, 256, 1001, 4096]),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_round_nearest_is_the_nearest_stored_point(step, lo_steps, levels,
                                                   dtype, seed):
  lo = lo_steps * step
  hi = lo + (levels - 1) * step
  try:
    grid = Grid.uniform(str(step), str(lo), str(hi))
    v = as64(values(grid, dtype))
  except ValueError:
    hypothesis.assume(False)  # not representable: tested in test_codes
  rng = np.random.default_rng(seed)
  span = v[-1] - v[0]
  mids = (v[:-1] + v[1:]) / 2
  n = 10240 - 2 * len(v) + 1  # one shape for every example
  x = rng.uniform(v[0] - 0.05 * span, v[-1] + 0.05 * span, n)
  top = float(ml_dtypes.finfo(dtype).max)
  x = np.clip(np.concatenate([x, v, mids]), -top, top).astype(np.float32)
  q = qjax.round_nearest(jnp.asarray(x), grid, dtype)
  assert q.dtype == dtype
  assert np.array_equal(as64(q), _brute_nearest_values(x, v))
  # The bf16/f16 input path: promoted exactly, same decision.
  xd = x.astype(dtype)
  qd = qjax.round_nearest(jnp.asarray(xd), grid)
  assert np.array_equal(as64(qd), _brute_nearest_values(
      xd.astype(np.float32), v))


def test_contains_is_membership_in_the_stored_table():
  g = Grid.uniform(0.1, lo=-1, hi=1)
  for dtype in (F32, BF16):
    v = jnp.asarray(values(g, dtype))
    assert bool(jnp.all(qjax.contains(v, g)))
    off = jnp.asarray(np.nextafter(np.asarray(v, np.float32)[1:-1],
                                   np.float32(np.inf))).astype(dtype)
    off = off[off != v[1:-1]]
    assert not bool(jnp.any(qjax.contains(off, g)))
  # 0.3 exactly (the float32 nearest of 3/10) is a point; 0.3 + ulp is not.
  assert bool(qjax.contains(jnp.float32(0.3), g))
  assert not bool(qjax.contains(jnp.nextafter(jnp.float32(0.3), 1.0), g))


# ----------------------------------------------------------------------------
# Scaled grids: a static grid times a traced scale.
# ----------------------------------------------------------------------------

SCALES = np.float32([1e-3, 0.0625, 0.1, 0.18898223, 1.0, 1 / 3, 2.5, 7.0,
                     1234.5])


def _points_of(grid, dtype):
  """The decoded points of every code of ``grid`` (scale may be traced)."""
  return C.decode(C.pack(jnp.arange(grid.levels), grid, dtype))


def test_binary_scaled_under_jit_and_vmap_is_exactly_plus_minus_s():
  g = Grid.binary(1.0)
  f = jax.jit(jax.vmap(lambda s: _points_of(g.scaled(s), F32)))
  out = np.asarray(f(jnp.asarray(SCALES)))
  assert same_bits(out[:, 1], SCALES) and same_bits(out[:, 0], -SCALES)
  for s, pts in zip(SCALES, out):  # within 2**-23 of the exact s * (+-1)
    assert abs(Fraction(float(pts[1])) - Fraction(float(s))) <= Fraction(
        float(s)) * Fraction(1, 2**23)
  # Rounding on the scaled grid picks between exactly these points.
  x = jnp.array([-3.0, -1e-3, 0.0, 1e-3, 3.0], jnp.float32)
  r = jax.jit(jax.vmap(lambda s: qjax.round_nearest(x, g.scaled(s))))(
      jnp.asarray(SCALES))
  want = np.where(np.asarray(x) >= 0, 1, -1)[None] * SCALES[:, None]
  assert same_bits(r, want.astype(np.float32))
  # A concrete scale gives the same bits as a traced one.
  assert same_bits(_points_of(g.scaled(SCALES[3]), F32), out[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("grid", [Grid.kbit(2), Grid.kbit(4), Grid.kbit(8),
                                  Grid.ternary(0.7),
                                  Grid.uniform(0.1, lo=-1, hi=1)], ids=repr)
def test_scaled_points_follow_the_documented_precision(grid, dtype):
  """fl_dtype(fl32(values32[k] * s)): within 2**-23 of s * point (float32)."""
  f = jax.jit(jax.vmap(lambda s: _points_of(grid.scaled(s), dtype)))
  scales = SCALES[SCALES < 60] if dtype == F16 else SCALES
  out = np.asarray(f(jnp.asarray(scales)))
  assert out.dtype == dtype
  v32 = values(grid, F32)
  for s, pts in zip(scales, out):
    want = (v32 * np.float32(s)).astype(np.float32).astype(dtype)
    assert same_bits(pts, want)
    assert np.array_equal(as64(pts), -as64(pts)[::-1])  # symmetric
    # Precision with respect to the exact s * (offset + k * step).
    info = ml_dtypes.finfo(dtype)
    storage = 0 if dtype == F32 else Fraction(1, 2**(info.nmant + 1))
    bound = Fraction(1, 2**23) * (1 + storage) + storage
    # Below the smallest normal number, half the subnormal spacing.
    sub = 0 if dtype == F32 else Fraction(float(info.smallest_subnormal)) / 2
    for k in range(grid.levels):
      exact = Fraction(float(s)) * grid.point(k)
      err = abs(Fraction(float(pts[k])) - exact)
      assert err <= max(bound * abs(exact), sub + Fraction(1, 2**23) * abs(
          exact))


def test_scaled_grids_compose_and_compare():
  g = Grid.kbit(3, 0.5)
  s = g.scaled(2.0).scaled(jnp.float32(1.5))
  assert float(s.scale) == 3.0 and s.unscaled() == g
  assert g.scaled(2.0) == g.scaled(np.float32(2.0)) != g.scaled(3.0)
  assert g.scaled(2.0) != g and hash(g.scaled(2.0)) == hash(g)
  assert g.scaled(2.0).levels == 8 and g.scaled(2.0).bounded
  assert "scale=2.0" in repr(g.scaled(2.0))


def test_scaled_rounding_is_the_same_bits_eager_jit_and_vmap(rng):
  g = Grid.kbit(4, 1.0)
  x = jnp.asarray(rng.normal(size=257), jnp.float32)
  keys = jax.random.split(jax.random.key(4), 3)
  scales = jnp.float32([0.3, 1.0, 2.0])

  def both(key, s):
    return (qjax.round_nearest(x, g.scaled(s)),
            qjax.round_stochastic(key, x, g.scaled(s), jnp.bfloat16))

  lanes = jax.jit(jax.vmap(both))(keys, scales)
  for i in range(3):
    eager = both(keys[i], scales[i])
    jitted = jax.jit(both)(keys[i], scales[i])
    for a, b, c in zip(eager, jitted, lanes):
      assert same_bits(a, b) and same_bits(a, c[i])
    v = (values(g) * np.float32(scales[i])).astype(np.float32)
    assert np.all(np.isin(np.asarray(eager[0]), v))
    assert np.all(np.isin(as64(eager[1]), as64(v.astype(BF16))))


# ----------------------------------------------------------------------------
# Pytree behaviour.
# ----------------------------------------------------------------------------


def test_grid_is_a_pytree_whose_only_leaf_is_the_scale():
  g = Grid.binary(0.5)
  assert jax.tree.leaves(g) == []
  scaled = g.scaled(2.0)
  assert [qjax.quantizers.path_names(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(scaled)[0]] == [("scale",)]
  assert jax.tree.structure(g) != jax.tree.structure(scaled)
  assert jax.tree.structure(Grid.uniform(0.1)) != jax.tree.structure(g)
  assert jax.tree.structure(Grid.binary(0.5)) == jax.tree.structure(g)
  # An in_axes spec built with a tree utility; a batch of scaled grids.
  axes = jax.tree.map(lambda _: 0, scaled)
  assert axes.scale == 0 and axes.bounded
  grids = jax.vmap(lambda s: g.scaled(s))(jnp.float32([1.0, 2.0]))
  out = jax.vmap(qjax.round_nearest, in_axes=(None, axes))(jnp.float32(0.3),
                                                           grids)
  assert same_bits(out, np.float32([0.5, 1.0]))
  doubled = jax.jit(lambda g: jax.tree.map(lambda v: 2 * v, g))(scaled)
  assert float(doubled.scale) == 4.0 and doubled.unscaled() == g
  # Unscaled grids pass through jit as static data.
  out = jax.jit(lambda g, x: qjax.round_nearest(x, g))(g, jnp.float32(-2.0))
  assert float(out) == -0.5


def test_grid_is_immutable_and_pickles():
  g = Grid.uniform(0.1, lo=-1, hi=1)
  with pytest.raises(AttributeError, match="immutable"):
    g.step = Fraction(1, 5)
  assert pickle.loads(pickle.dumps(g)) == g
  assert copy.deepcopy(g) is g and copy.copy(g) is g
  s = pickle.loads(pickle.dumps(g.scaled(2.0)))
  assert s == g.scaled(2.0) and float(s.scale) == 2.0
  assert {Grid.binary(1.0), Grid.binary(1.0), Grid.binary(2.0)} == {
      Grid.binary(1.0), Grid.binary(2.0)}


# ----------------------------------------------------------------------------
# Bad input: clear errors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0.0, -1.0, float("nan"), float("inf"),
                                  "abc"])
def test_bad_step_names_argument_and_value(step):
  with pytest.raises(ValueError, match=r"step must be .*got step="):
    Grid.uniform(step)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf"),
                                   True])
@pytest.mark.parametrize("ctor", [Grid.binary, Grid.ternary,
                                  lambda s: Grid.kbit(3, s)])
def test_bad_scale(scale, ctor):
  with pytest.raises(ValueError, match=r"scale.*got scale="):
    ctor(scale)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"),
                                   1e39, np.float32(-0.5)])
def test_bad_concrete_scale_of_a_scaled_grid(scale):
  with pytest.raises(ValueError, match=r"Grid\.scaled: the scale must be a "
                     r"finite number > 0.*got scale="):
    Grid.binary(1.0).scaled(scale)
  with pytest.raises(ValueError, match=r"one number \(a scalar\).*vmap"):
    Grid.binary(1.0).scaled(jnp.ones(3))


@pytest.mark.parametrize("ctor", [
    Grid.binary, Grid.ternary, lambda s: Grid.kbit(2, s), Grid.uniform,
    lambda s: Grid.uniform(0.1, lo=-s, hi=s)])
def test_traced_grid_sizes_are_refused_with_a_pointer_to_scaled(ctor):
  with pytest.raises(ValueError, match=r"needs a concrete .*traced value.*"
                     r"grid\.scaled\(s\)"):
    jax.jit(lambda s: qjax.round_nearest(jnp.zeros(3), ctor(s)))(1.0)
  with pytest.raises(ValueError, match=r"concrete"):
    jax.vmap(ctor)(jnp.float32([1.0, 2.0]))
  # The supported way: a traced scale of a static grid.
  out = jax.jit(lambda s: qjax.round_nearest(jnp.full(3, 0.4), Grid.binary(
      1.0).scaled(s)))(2.0)
  assert same_bits(out, np.float32([2.0] * 3))


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, -2.0)])
def test_lo_not_below_hi(lo, hi):
  with pytest.raises(ValueError, match=r"lo < hi.*got lo="):
    Grid.uniform(0.5, lo=lo, hi=hi)


def test_bounds_and_steps():
  with pytest.raises(ValueError, match="pass both lo and hi"):
    Grid.uniform(0.5, lo=-1.0)
  with pytest.raises(ValueError, match="pass both lo and hi"):
    Grid.uniform(0.5, hi=1.0)
  with pytest.raises(ValueError, match="without offset"):
    Grid.uniform(0.5, lo=-1.0, hi=1.0, offset=0.0)
  with pytest.raises(ValueError, match=r"whole number of steps.*hi=0\.9 or "
                     r"hi=1"):
    Grid.uniform(0.1, lo=0, hi=0.95)
  with pytest.raises(ValueError, match=r"lo must be a finite"):
    Grid.uniform(1.0, lo=-np.inf, hi=1.0)
  assert Grid.uniform(1, 0, 65535).levels == 65536
  with pytest.raises(ValueError, match=r"65537 levels.*at most 65536"):
    Grid.uniform(1, 0, 65536)
  with pytest.raises(ValueError, match=r"levels must be between 2 and 65536"):
    Grid(0, 1, 65537)
  with pytest.raises(ValueError, match=r"must fit float32"):
    Grid.binary(3.5e38)
  with pytest.raises(ValueError, match=r"must fit float32"):
    Grid(0, 1e39)


@pytest.mark.parametrize("bits", [0, 17, -1, 1.5, 2.5, True, "2",
                                  np.bool_(True), jnp.float32(2.0),
                                  jnp.array(True)])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match=r"bits must be an integer between 1 "
                     r"and 16.*got bits="):
    Grid.kbit(bits)


def test_traced_bits_are_a_clear_error():
  with pytest.raises(ValueError, match=r"static Python int.*traced"):
    jax.jit(lambda b: Grid.kbit(b).levels)(2)
  with pytest.raises(ValueError, match=r"static Python int.*traced"):
    jax.vmap(lambda b: Grid.kbit(b).levels)(jnp.array([2, 3]))


@pytest.mark.parametrize("dtype", [np.float64, "float64", jnp.int8,
                                   "float8_e4m3fn", None])
def test_storage_dtype_must_be_float32_bfloat16_or_float16(dtype):
  match = r"storage dtype must be one of float32, bfloat16, float16; got"
  g = Grid.ternary(1.0)
  with pytest.raises(ValueError, match=match):
    values(g, dtype)
  if dtype is not None:
    with pytest.raises(ValueError, match=match):
      qjax.round_nearest(jnp.zeros(3), g, dtype)
    with pytest.raises(ValueError, match=match):
      qjax.round_stochastic(0, jnp.zeros(3), g, dtype)
    with pytest.raises(ValueError, match=match):
      C.encode_nearest(jnp.zeros(3), g, dtype)


def test_non_grids_are_refused():
  with pytest.raises(TypeError, match=r"expected a qjax\.Grid"):
    qjax.round_nearest(jnp.zeros(3), 0.5)
  with pytest.raises(TypeError, match=r"Expected a qjax\.Grid"):
    values("binary")
