"""qjax.codes: exact value tables, encode/decode, packing, integer updates.

Expected values are computed here independently of the module: the nearest
storage-dtype value of an exact Fraction is found by comparing exact
distances to neighbouring floats (float32: numpy's nextafter; bf16/f16: an
enumeration of all 65536 bit patterns), never by the module's integer
rounding.
"""

import bisect
import math
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

F32, BF16, F16 = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16),
                  np.dtype(np.float16))
DTYPES = (F32, BF16, F16)
_UINT = {2: np.uint16, 4: np.uint32}


# ----------------------------------------------------------------------------
# Independent reference: nearest float of an exact rational, ties to even.
# ----------------------------------------------------------------------------


def _bits(value, dtype) -> int:
  return int(np.asarray(value, dtype).view(_UINT[dtype.itemsize]))


def _pick(q: Fraction, candidates, dtype) -> float:
  """The candidate nearest to ``q``; a tie goes to the even bit pattern."""
  best = min(abs(Fraction(float(c)) - q) for c in candidates)
  near = [c for c in candidates if abs(Fraction(float(c)) - q) == best]
  near = sorted(set(float(c) for c in near))
  if len(near) == 2:
    near = [c for c in near if _bits(c, dtype) % 2 == 0]
  assert len(near) == 1
  return near[0]


_FINITE = {}


def _finite_values(dtype) -> list:
  if dtype not in _FINITE:
    with np.errstate(invalid="ignore"):  # NaN patterns
      allv = np.arange(2**16, dtype=np.uint16).view(dtype).astype(np.float64)
    _FINITE[dtype] = sorted(set(allv[np.isfinite(allv)].tolist()))
  return _FINITE[dtype]


def nearest(q: Fraction, dtype) -> float:
  """The ``dtype`` value nearest to the exact rational ``q`` (ties even)."""
  dtype = np.dtype(dtype)
  if dtype == F32:
    c = np.float32(float(q))
    cands = [np.nextafter(c, np.float32(-np.inf)), c,
             np.nextafter(c, np.float32(np.inf))]
    return _pick(q, [x for x in cands if np.isfinite(x)], dtype)
  table = _finite_values(dtype)
  i = bisect.bisect_left(table, float(q))
  cands = table[max(i - 2, 0):i + 2]
  return _pick(q, cands, dtype)


def expected_table(offset, step, levels, dtype) -> np.ndarray:
  return np.array([nearest(Fraction(offset) + k * Fraction(step), dtype)
                   for k in range(levels)], np.float64)


def as64(v) -> np.ndarray:
  return np.asarray(v).astype(np.float64)


def same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (a.dtype == b.dtype and a.shape == b.shape
          and a.tobytes() == b.tobytes())


# ----------------------------------------------------------------------------
# The reference itself (so that a wrong reference cannot hide a wrong table).
# ----------------------------------------------------------------------------


def test_reference_on_known_values():
  assert nearest(Fraction(1, 10), F32) == float(np.float32(0.1))
  assert nearest(Fraction(1, 10), BF16) == 0.10009765625
  assert nearest(Fraction(1, 3), F16) == float(np.float16(1 / 3))
  # A tie in bf16 (8 significant bits): 1 + 2**-8 is half way between
  # 1 and 1 + 2**-7; the even pattern is 1.0.
  assert nearest(1 + Fraction(1, 256), BF16) == 1.0
  assert nearest(1 + Fraction(3, 256), BF16) == 1 + 2**-6


# ----------------------------------------------------------------------------
# Value tables: the points asked for.
# ----------------------------------------------------------------------------


def test_tenth_grid_float32_is_k_over_ten():
  v = values(Grid.uniform(0.1, lo=0, hi=1))
  assert v.dtype == F32 and v.shape == (11,)
  want = np.array([nearest(Fraction(k, 10), F32) for k in range(11)])
  assert np.array_equal(as64(v), want)
  # For these k the double k/10 rounds to the same float32.
  assert same_bits(v, np.float32([k / 10 for k in range(11)]))
  assert same_bits(values(Grid.uniform(0.1, lo=0, hi=1), "float32"), v)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=lambda d: d.name)
def test_tenth_grid_in_half_precision_hits_representable_points(dtype):
  v = values(Grid.uniform(0.1, lo=0, hi=1), dtype)
  assert v.dtype == dtype
  assert float(v[10]) == 1.0 and float(v[5]) == 0.5 and float(v[0]) == 0.0
  assert np.array_equal(as64(v), expected_table(0, Fraction(1, 10), 11, dtype))


def test_tenth_grid_wide_range_keeps_every_point():
  # The old lattice rounded 0.1 to 0 and 0.2, 0.3 to 0.25 here.
  g = Grid.uniform(0.1, lo=-3276.7, hi=3276.7)
  assert g.levels == 65535
  v = values(g)
  assert np.all(np.diff(as64(v)) > 0)
  k0 = 32767  # the point 0
  assert float(v[k0]) == 0.0
  for j in (1, 2, 3, 5, 10, -1, -3, 1234, -32767):
    assert float(v[k0 + j]) == nearest(Fraction(j, 10), F32)
  assert np.array_equal(as64(v), -as64(v)[::-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("scale", [0.18898223, math.sqrt(1.5 / 107)])
def test_binary_grid_is_exactly_symmetric(scale, dtype):
  v = values(Grid.binary(scale), dtype)
  assert v.dtype == dtype
  assert float(v[0]) == -float(v[1])
  s = Fraction(repr(scale))
  assert float(v[1]) == nearest(s, dtype)


def test_binary_grid_keeps_the_float32_scale_asked_for():
  # Old behaviour: Grid.binary(0.18898223) stored +-0.18898225.
  g = Grid.binary(0.18898223)
  assert g.offset == -Fraction("0.18898223") and g.levels == 2
  assert same_bits(values(g), np.float32([-0.18898223, 0.18898223]))
  c = C.encode_nearest(jnp.array([-5.0, -0.0, 0.1, 7.0]), g)
  assert same_bits(C.decode(c), np.float32([-0.18898223, 0.18898223,
                                            0.18898223, 0.18898223]))


@pytest.mark.parametrize("bits, dtype, levels", [
    (4, BF16, 16), (8, F16, 256), (8, F32, 256), (8, BF16, 256),
    (2, BF16, 4), (1, BF16, 2), (12, F32, 4096), (16, F32, 65536)])
def test_kbit_has_exactly_two_to_the_bits_levels(bits, dtype, levels):
  g = Grid.kbit(bits, 1.0)
  v = as64(values(g, dtype))
  assert g.levels == levels and len(np.unique(v)) == levels
  assert v[0] == -1.0 and v[-1] == 1.0
  assert np.array_equal(v, -v[::-1])
  if levels <= 4096:
    want = expected_table(-1, Fraction(2, levels - 1), levels, dtype)
    assert np.array_equal(v, want)
  else:
    ks = np.random.default_rng(bits).integers(0, levels, 64)
    assert all(v[k] == nearest(g.point(int(k)), dtype) for k in ks)


def test_kbit2_bf16_ends_exactly_at_one():
  # Old behaviour: bf16 kbit(2, 1.0) ended at 0.96875.
  v = as64(values(Grid.kbit(2, 1.0), BF16))
  assert v.tolist() == [-1.0, nearest(Fraction(-1, 3), BF16),
                        nearest(Fraction(1, 3), BF16), 1.0]


def _distinct_in(points, dtype) -> bool:
  """Whether the reference rounds ``points`` (increasing) to distinct values."""
  rounded = [nearest(q, dtype) for q in points]
  return all(a < b for a, b in zip(rounded, rounded[1:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_kbit_levels_in_every_dtype_or_a_clear_error(dtype):
  """kbit(b): 2**b distinct values whenever the dtype can hold them."""
  for bits in range(1, 17):
    g = Grid.kbit(bits, 1.0)
    levels = 2**bits
    if levels <= 2048:  # the whole reference table
      can = _distinct_in([g.point(k) for k in range(levels)], dtype)
    else:  # the top 1100 points (just below 1) decide for half precision
      top = [g.point(k) for k in range(levels - 1100, levels)]
      can = _distinct_in(top, dtype)
      if dtype == F32:  # float32 holds every kbit grid
        assert can
    if can:
      v = as64(values(g, dtype))
      assert len(np.unique(v)) == levels and v[0] == -1 and v[-1] == 1
    else:
      with pytest.raises(ValueError, match=rf"{dtype.name} cannot represent "
                         rf"the {levels} distinct points"):
        values(g, dtype)
  # Where the reference says the limits are.
  values(Grid.kbit(9, 1.0), BF16)
  with pytest.raises(ValueError, match="bfloat16 cannot represent"):
    values(Grid.kbit(10, 1.0), BF16)
  values(Grid.kbit(12, 1.0), F16)
  with pytest.raises(ValueError, match=r"bfloat16 cannot represent the 4096"):
    values(Grid.kbit(12, 1.0), BF16)
  with pytest.raises(ValueError, match="float16 cannot represent"):
    values(Grid.kbit(13, 1.0), F16)


def test_ternary_and_numpy_int_bits():
  assert as64(values(Grid.ternary(2.0))).tolist() == [-2.0, 0.0, 2.0]
  assert Grid.kbit(np.int64(3), 0.5) == Grid.kbit(3, 0.5)
  assert Grid.kbit(np.array(3), 0.5).levels == 8
  assert Grid.uniform(0.1, 0, 1) == Grid(offset=0, step="1/10", levels=11)
  assert Grid.uniform(0.1, 0, 3 * 0.1).levels == 4  # float noise in hi
  assert hash(Grid.binary(0.5)) == hash(Grid.binary(0.5))


def test_exact_ties_round_to_even_in_the_table():
  # 1 + 2**-8 is half way between bf16's 1 and 1 + 2**-7: even is 1.0;
  # 1 + 3 * 2**-8 is half way between 1 + 2**-7 and 1 + 2**-6: even is
  # the latter. The same ties negated stay symmetric.
  for off, want in [("1.00390625", [1.0, 2.0]),
                    ("1.01171875", [1.015625, 2.015625])]:
    g = Grid(off, 1, 2)
    assert as64(values(g, BF16)).tolist() == want
    assert want == expected_table(Fraction(off), 1, 2, BF16).tolist()
    neg = Grid("-" + off, 1, 2)
    assert float(values(neg, BF16)[0]) == -want[0]


_DEC = st.integers(1, 10**6).map(lambda n: Fraction(n, 10**4))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    step=_DEC, offset=st.integers(-10**8, 10**8).map(lambda n: Fraction(
        n, 10**4)), levels=st.integers(2, 24),
    dtype=st.sampled_from(DTYPES))
def test_uniform_tables_match_the_reference(step, offset, levels, dtype):
  hi = offset + (levels - 1) * step
  want = expected_table(offset, step, levels, dtype) if max(
      abs(offset), abs(hi)) <= float(ml_dtypes.finfo(dtype).max) else None
  if not np.all(np.diff(expected_table(offset, step, levels, F32)) > 0):
    # A grid is validated in float32 when it is built.
    with pytest.raises(ValueError, match="float32 cannot represent"):
      Grid.uniform(str(step), str(offset), str(hi))
    return
  g = Grid.uniform(str(step), str(offset), str(hi))
  assert g.levels == levels and g.offset == offset and g.step == step
  if want is None:
    with pytest.raises(ValueError, match="largest finite value"):
      values(g, dtype)
    return
  if not np.all(np.diff(want) > 0):
    with pytest.raises(ValueError, match="cannot represent"):
      values(g, dtype)
    return
  assert np.array_equal(as64(values(g, dtype)), want)
  # Float arguments mean their shortest decimal: the same grid.
  assert Grid.uniform(float(step), float(offset), float(hi)) == g


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    step=st.sampled_from([Fraction(1, 10), Fraction(1, 100), Fraction(3, 7),
                          Fraction(1, 1000), Fraction(5, 4)]),
    lo_steps=st.integers(-10**6, 10**6), n=st.integers(1, 6000),
    dtype=st.sampled_from(DTYPES), data=st.data())
def test_wide_uniform_tables_match_the_reference(step, lo_steps, n, dtype,
                                                 data):
  """Thousands of levels far from zero (Δ = 0.1 among them): sampled points
  are exact (65535 levels: test_tenth_grid_wide_range_keeps_every_point)."""
  lo, hi = lo_steps * step, (lo_steps + n) * step
  ks = sorted({0, n, *data.draw(st.lists(st.integers(0, n), max_size=12))})
  try:
    g = Grid.uniform(str(step), str(lo), str(hi))
    assert g.levels == n + 1
    if max(abs(lo), abs(hi)) > float(ml_dtypes.finfo(dtype).max):
      with pytest.raises(ValueError, match="largest finite value"):
        values(g, dtype)
      return
    v = values(g, dtype)
  except ValueError as e:  # only when two points round together
    assert "cannot represent" in str(e)
    dt = F32 if str(e).startswith("float32") else dtype
    k = int(str(e).split(": points ")[1].split(" and")[0])
    assert nearest(lo + k * step, dt) == nearest(lo + (k + 1) * step, dt)
    return
  assert np.all(np.diff(as64(v)) > 0) and len(v) == n + 1
  for k in ks:
    assert float(v[k]) == nearest(lo + k * step, dtype), k


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(bits=st.integers(1, 8), scale=_DEC,
                  dtype=st.sampled_from(DTYPES))
def test_kbit_tables_match_the_reference(bits, scale, dtype):
  levels = 2**bits
  want = expected_table(-scale, 2 * scale / (levels - 1), levels, dtype)
  if not np.all(np.diff(want) > 0) or scale > float(
      ml_dtypes.finfo(dtype).max):
    with pytest.raises(ValueError):
      values(Grid.kbit(bits, float(scale)), dtype)
    return
  v = as64(values(Grid.kbit(bits, float(scale)), dtype))
  assert np.array_equal(v, want) and np.array_equal(v, -v[::-1])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(scale=st.floats(1e-6, 1e4), dtype=st.sampled_from(DTYPES),
                  kind=st.sampled_from(["binary", "ternary", "kbit3"]))
def test_symmetric_grids_are_exactly_symmetric(scale, dtype, kind):
  g = {"binary": Grid.binary, "ternary": Grid.ternary,
       "kbit3": lambda s: Grid.kbit(3, s)}[kind](scale)
  v = as64(values(g, dtype))
  assert np.array_equal(v, -v[::-1])
  s = Fraction(np.format_float_positional(scale, unique=True))
  assert v[-1] == nearest(s, dtype) and v[0] == -nearest(s, dtype)


# ----------------------------------------------------------------------------
# Encoding: nearest.
# ----------------------------------------------------------------------------

ROUND_TRIP_GRIDS = [
    (Grid.binary(0.18898223), F32), (Grid.kbit(3, 1.0), BF16),
    (Grid.uniform(0.1, -1, 1), F16), (Grid.kbit(12, 0.7), F32),
    (Grid.uniform(0.1, lo=-2.9375, hi=3.0625), BF16)]
_ID = lambda gd: f"{gd[0]!r}-{gd[1].name}"


@pytest.mark.parametrize("grid_dtype", ROUND_TRIP_GRIDS, ids=_ID)
def test_decode_encode_round_trip_is_bit_exact(grid_dtype):
  grid, dtype = grid_dtype
  v = values(grid, dtype)
  c = C.encode_nearest(jnp.asarray(v), grid)  # dtype from the input
  assert c.dtype == dtype
  assert same_bits(C.decode(c), v)
  assert np.array_equal(np.asarray(C.unpack(c)), np.arange(grid.levels))
  c32 = C.encode_nearest(jnp.asarray(v.astype(np.float32)), grid, dtype)
  assert same_bits(c32.data, c.data) and c32.dtype == dtype


def _brute_nearest(x32: np.ndarray, v: np.ndarray) -> np.ndarray:
  """argmin |x - v| over the table (exact in float64); ties to the upper."""
  x64, v64 = x32.astype(np.float64), v.astype(np.float64)
  if len(v) > 64:  # the nearest is one of the two around x
    i = np.searchsorted(v64, x64)
    lo, hi = np.clip(i - 1, 0, len(v) - 1), np.clip(i, 0, len(v) - 1)
    return np.where(v64[hi] - x64 <= x64 - v64[lo], hi, lo)
  d = np.abs(x64[:, None] - v64[None])
  return len(v) - 1 - np.argmin(d[:, ::-1], axis=1)


@pytest.mark.parametrize("grid_dtype", ROUND_TRIP_GRIDS, ids=_ID)
def test_encode_nearest_is_the_nearest_table_value(grid_dtype, rng):
  grid, dtype = grid_dtype
  v = np.asarray(values(grid, dtype)).astype(np.float32)
  span = float(v[-1] - v[0])
  mid = (v[:-1].astype(np.float64) + v[1:]) / 2  # exact ties, if float32
  special = [mid, np.nextafter(mid.astype(np.float32), -np.inf), v]
  n = 16384 - sum(len(a) for a in special)  # one shape for every grid
  x = rng.uniform(v[0] - 0.1 * span, v[-1] + 0.1 * span, n)
  x = np.concatenate([x] + special).astype(np.float32)
  c = C.encode_nearest(jnp.asarray(x), grid, dtype)
  k = np.asarray(C.unpack(c))
  assert np.array_equal(k, _brute_nearest(x, v))
  if dtype == BF16:  # bf16/f16 inputs are promoted exactly
    xd = x.astype(dtype)
    kd = np.asarray(C.unpack(C.encode_nearest(jnp.asarray(xd), grid)))
    assert np.array_equal(kd, _brute_nearest(xd.astype(np.float32), v))


def test_encode_nearest_ties_nan_inf_and_denormals():
  b = Grid.binary(1.0)
  x = jnp.array([0.0, -0.0, 1e-45, -1e-45, -1e-30, np.inf, -np.inf, np.nan],
                jnp.float32)
  assert C.unpack(C.encode_nearest(x, b)).tolist() == [1, 1, 1, 1, 0, 1, 0, 0]
  u = Grid.uniform(0.5, lo=-1, hi=1)
  x = jnp.array([0.25, -0.25, 0.75, -0.75, 0.2499999])
  assert as64(C.decode(C.encode_nearest(x, u))).tolist() == [
      0.5, 0.0, 1.0, -0.5, 0.0]
  # bf16 inputs are compared exactly (promoted to float32).
  g = Grid.kbit(2, 1.0)
  xb = jnp.asarray(values(g, BF16))
  assert same_bits(C.decode(C.encode_nearest(xb, g)), values(g, BF16))


def test_storage_dtype_defaults_and_integer_inputs():
  g = Grid.ternary(1.0)
  assert C.encode_nearest(jnp.zeros(3), g).dtype == F32
  assert C.encode_nearest(jnp.zeros(3, jnp.bfloat16), g).dtype == BF16
  assert C.encode_nearest(jnp.zeros(3, jnp.float16), g).dtype == F16
  assert C.encode_nearest(jnp.zeros(3), g, "bfloat16").dtype == BF16
  assert C.decode(C.encode_nearest(jnp.zeros(3), g, BF16)).dtype == BF16
  k = C.encode_nearest(jnp.array([-3, 0, 1, 2]), g)  # integer input
  assert C.unpack(k).tolist() == [0, 1, 2, 2]
  assert C.encode_nearest(np.float64([0.4, 0.6]), g).dtype == F32


# ----------------------------------------------------------------------------
# Packing and sizes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (0,)])
def test_binary_codes_pack_eight_per_byte(shape, rng):
  n = math.prod(shape)
  bits = rng.integers(0, 2, shape)
  c = C.pack(jnp.asarray(bits), Grid.binary(1.0))
  assert c.data.dtype == np.uint8 and c.data.shape == (-(-n // 8),)
  want = np.packbits(bits.astype(np.uint8).ravel(), bitorder="little")
  assert same_bits(c.data, want)
  assert np.array_equal(np.asarray(C.unpack(c)), bits)
  assert C.nbytes(c) == -(-n // 8)
  if n:
    assert C.bits_per_weight(c) == 8 * (-(-n // 8)) / n
  x = np.where(bits == 1, 1.0, -1.0).astype(np.float32)
  assert same_bits(C.decode(c), x)
  assert same_bits(C.encode_nearest(jnp.asarray(x), Grid.binary(1.0)).data,
                   want)


def test_sizes_per_storage_kind():
  x = jnp.zeros((64, 64))
  assert C.bits_per_weight(C.encode_nearest(x, Grid.binary(1.0))) == 1.0
  assert C.bits_per_weight(C.encode_nearest(x, Grid.binary(1.0), BF16)) == 1.0
  t = C.encode_nearest(x, Grid.ternary(1.0))
  assert t.data.dtype == np.uint8 and t.data.shape == (64, 64)
  assert C.nbytes(t) == 4096 and C.bits_per_weight(t) == 8.0
  w = C.encode_nearest(x, Grid.kbit(9, 1.0))
  assert w.data.dtype == np.uint16 and C.bits_per_weight(w) == 16.0
  assert C.code_dtype(Grid.kbit(8, 1.0)) == np.uint8
  assert C.code_dtype(Grid.uniform(1, 0, 255)) == np.uint8
  assert C.code_dtype(Grid.uniform(1, 0, 256)) == np.uint16
  assert C.packed(Grid.binary()) and not C.packed(Grid.ternary())


def test_pack_bits_matches_numpy_with_batch_axes(rng):
  bits = rng.integers(0, 2, (3, 2, 5))
  packed = C.pack_bits(jnp.asarray(bits), batch_ndim=1)
  assert packed.shape == (3, 2)
  for i in range(3):
    assert same_bits(packed[i], np.packbits(bits[i].ravel().astype(np.uint8),
                                            bitorder="little"))
  assert np.array_equal(np.asarray(C.unpack_bits(packed, (2, 5))), bits)


# ----------------------------------------------------------------------------
# Decoding: one function, the same bits everywhere; pytree behaviour.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid_dtype", [
    (Grid.binary(math.sqrt(1.5 / 107)), F32), (Grid.kbit(10, 0.3), F16)],
    ids=_ID)
def test_decode_same_bits_eager_jit_vmap(grid_dtype, rng):
  grid, dtype = grid_dtype
  k = rng.integers(0, grid.levels, (4, 3, 11))
  lanes = [C.pack(jnp.asarray(k[i]), grid, dtype) for i in range(4)]
  eager = [np.asarray(C.decode(c)) for c in lanes]
  jitted = [np.asarray(jax.jit(C.decode)(c)) for c in lanes]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *lanes)
  vmapped = np.asarray(jax.vmap(C.decode)(stacked))
  batched = np.asarray(C.decode(stacked))  # batch axes kept outside vmap
  want = np.asarray(values(grid, dtype))[k]
  for i in range(4):
    assert same_bits(eager[i], want[i]) and same_bits(jitted[i], want[i])
  assert same_bits(vmapped, want) and same_bits(batched, want)
  # Encoding under vmap and jit gives the same codes as eagerly.
  x = jnp.asarray(want.astype(np.float32))
  enc = jax.jit(jax.vmap(lambda a: C.encode_nearest(a, grid, dtype)))(x)
  assert same_bits(enc.data, stacked.data)
  assert np.array_equal(np.asarray(C.unpack(C.encode_nearest(x, grid,
                                                            dtype))), k)


def test_codes_is_a_pytree_with_one_leaf():
  c = C.encode_nearest(jnp.ones((3, 4)), Grid.ternary(1.0))
  leaves, treedef = jax.tree_util.tree_flatten(c)
  assert len(leaves) == 1 and leaves[0] is c.data
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.grid == c.grid and again.shape == (3, 4)
  assert again.dtype == F32
  assert jax.tree_util.tree_structure(
      C.encode_nearest(jnp.zeros((3, 4)), Grid.ternary(1.0))) == treedef
  assert jax.tree_util.tree_structure(
      C.encode_nearest(jnp.zeros((3, 4)), Grid.ternary(2.0))) != treedef
  assert jax.tree_util.tree_structure(C.encode_nearest(
      jnp.zeros((3, 4)), Grid.ternary(1.0), BF16)) != treedef
  out = jax.jit(lambda c: c)(c)
  assert isinstance(out, C.Codes) and same_bits(out.data, c.data)


def test_codes_on_a_scaled_grid_carry_the_scale_as_a_leaf():
  g = Grid.kbit(2, 1.0)
  x = jnp.array([0.3, -1.0, 2.0, 0.7])

  def encode_decode(s):
    c = C.encode_nearest(x * s, g.scaled(s))
    return c, C.decode(c)

  scales = jnp.array([0.5, 1.0, 3.0], jnp.float32)
  c, dec = jax.jit(jax.vmap(encode_decode))(scales)
  assert c.batch_shape == (3,) and c.grid.scale.shape == (3,)
  assert len(jax.tree.leaves(c)) == 2
  assert np.array_equal(np.asarray(C.unpack(c)), np.tile([2, 0, 3, 3], (3, 1)))
  v32 = np.asarray(values(g))
  for i, s in enumerate(np.asarray(scales)):
    want = (v32 * np.float32(s)).astype(np.float32)[[2, 0, 3, 3]]
    assert same_bits(dec[i], want)
    single, d = encode_decode(jnp.float32(s))
    assert same_bits(single.data, c.data[i]) and same_bits(d, dec[i])
  assert same_bits(C.decode(c), dec)  # batched scales outside vmap


# ----------------------------------------------------------------------------
# Encoding: stochastic rounding is unbiased with respect to the table.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid_dtype", [(Grid.uniform(0.1, 0, 1), F32),
                                        (Grid.kbit(3, 1.0), BF16),
                                        (Grid.uniform(0.1, 0, 1), BF16)],
                         ids=_ID)
def test_encode_stochastic_is_unbiased(grid_dtype):
  grid, dtype = grid_dtype
  n = 100_000
  v = as64(values(grid, dtype))
  lo, hi = v[3], v[4]
  fracs = [1e-3, 0.1, 0.25, 0.5, 0.9, 0.999]
  x = np.float32([lo + f * (hi - lo) for f in fracs])
  xs = jnp.asarray(np.repeat(x[:, None], n, axis=1))
  c = C.encode_stochastic(jax.random.key(7), xs, grid, dtype)
  out = as64(C.decode(c))
  assert np.all((out == lo) | (out == hi))  # only the two neighbours
  p = (x.astype(np.float64) - lo) / (hi - lo)  # exact fraction of the input
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
  err = np.abs(out.mean(axis=1) - x.astype(np.float64))
  assert np.all(err < 5 * sigma), (err / sigma)


def test_encode_stochastic_draws_independently_per_element():
  # With p = 1/2, neighbours agree half the time (shared noise: always).
  n = 100_000
  out = np.asarray(C.unpack(C.encode_stochastic(
      3, jnp.full((n,), 0.05), Grid.uniform(0.1, 0, 1))))
  agree = np.mean(out[1:] == out[:-1])
  assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(n)


def test_encode_stochastic_fixes_points_and_clips(key):
  g = Grid.kbit(2, 1.0)
  v = jnp.asarray(values(g, BF16)).astype(jnp.float32)
  x = jnp.concatenate([jnp.tile(v, 1000), jnp.array([-5.0, 5.0, np.nan])])
  k = np.asarray(C.unpack(C.encode_stochastic(key, x, g, BF16)))
  assert np.array_equal(k[:-3], np.tile(np.arange(4), 1000))
  assert k[-3:].tolist() == [0, 3, 0]


def test_encode_stochastic_keys():
  g, x = Grid.ternary(1.0), jnp.linspace(-1, 1, 1001)
  a = C.encode_stochastic(jax.random.key(1), x, g).data
  assert same_bits(a, C.encode_stochastic(jax.random.key(1), x, g).data)
  assert same_bits(a, C.encode_stochastic(1, x, g).data)
  assert same_bits(a, C.encode_stochastic(jax.random.PRNGKey(1), x, g).data)
  assert not same_bits(a, C.encode_stochastic(2, x, g).data)
  assert same_bits(
      a, jax.jit(C.encode_stochastic, static_argnums=2)(1, x, g).data)
  with pytest.raises(ValueError, match="one int seed or one jax.random key"):
    C.encode_stochastic(jax.random.split(jax.random.key(0), 2), x, g)
  with pytest.raises(ValueError, match="needs a key"):
    C.encode_stochastic(None, x, g)


# ----------------------------------------------------------------------------
# Integer updates.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [Grid.binary(1.0), Grid.ternary(1.0),
                                  Grid.kbit(4, 1.0), Grid.kbit(9, 1.0)],
                         ids=repr)
def test_step_codes_is_exact_and_clips(grid, rng):
  k = rng.integers(0, grid.levels, (5, 7))
  d = rng.integers(-3, 4, (5, 7))
  d[0, :3] = [2**31 - 1, -2**31, grid.levels]
  c = C.pack(jnp.asarray(k), grid)
  out = C.step_codes(c, jnp.asarray(d, jnp.int32))
  want = np.clip(k.astype(np.int64) + d, 0, grid.levels - 1)
  assert np.array_equal(np.asarray(C.unpack(out)), want)
  assert out.grid == grid and out.shape == (5, 7)
  assert same_bits(C.step_codes(c, 0).data, c.data)
  assert same_bits(jax.jit(C.step_codes)(c, jnp.asarray(d, jnp.int32)).data,
                   out.data)
  assert np.array_equal(np.asarray(C.unpack(C.step_codes(c, np.uint8(1)))),
                        np.minimum(k + 1, grid.levels - 1))


def test_step_codes_keeps_batch_axes():
  g = Grid.binary(1.0)
  c = jax.vmap(lambda x: C.encode_nearest(x, g))(-jnp.ones((3, 10)))
  out = C.step_codes(c, jnp.array([[0], [1], [-1]]))
  assert np.array_equal(np.asarray(C.unpack(out)),
                        np.repeat([[0], [1], [0]], 10, axis=1))


@pytest.mark.parametrize("grid", [Grid.binary(0.3), Grid.kbit(3, 1.0),
                                  Grid.kbit(10, 1.0)], ids=repr)
def test_update_is_added_back_exactly_by_apply_updates(grid, rng):
  """old.data + update(old, new).data wraps around to new.data, every byte."""
  import optax
  shape = (9, 13)
  for dtype in (F32, BF16):
    old = C.pack(jnp.asarray(rng.integers(0, grid.levels, shape)), grid, dtype)
    new = C.pack(jnp.asarray(rng.integers(0, grid.levels, shape)), grid, dtype)
    u = C.update(old, new)
    assert u.data.dtype == old.data.dtype
    out = optax.apply_updates({"w": old}, {"w": u})["w"]
    assert isinstance(out, C.Codes) and out.dtype == dtype
    assert same_bits(out.data, new.data)
    assert same_bits(optax.apply_updates(old, C.update(old, old)).data,
                     old.data)
  s = grid.scaled(jnp.float32(2.5))
  old = C.pack(jnp.asarray(rng.integers(0, grid.levels, shape)), s)
  new = C.pack(jnp.asarray(rng.integers(0, grid.levels, shape)), s)
  out = optax.apply_updates(old, C.update(old, new))
  assert same_bits(out.data, new.data) and float(out.grid.scale) == 2.5
  with pytest.raises(ValueError, match="differ in grid, shape or dtype"):
    C.update(old, C.pack(jnp.zeros(shape, jnp.int32), grid, BF16))


def test_trees_encode_decode_and_serialize(rng):
  from flax import serialization
  params = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "half": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
            "bias": jnp.zeros(3)}
  grids = {"kernel": Grid.binary(0.5), "half": Grid.kbit(2, 1.0),
           "bias": None}
  tree = C.encode_tree(params, grids)
  assert isinstance(tree["kernel"], C.Codes) and tree["bias"] is params["bias"]
  assert tree["half"].dtype == BF16
  dec = C.decode_tree(tree)
  want = np.where(np.asarray(params["kernel"]) >= 0, 0.5, -0.5)
  assert same_bits(dec["kernel"], want.astype(np.float32))
  assert dec["half"].dtype == BF16
  assert same_bits(dec["half"], np.asarray(qjax.round_nearest(
      params["half"], grids["half"])))
  state = serialization.to_state_dict(tree)
  assert same_bits(state["kernel"]["data"], tree["kernel"].data)
  back = serialization.from_state_dict(tree, state)
  assert same_bits(back["half"].data, tree["half"].data)
  assert back["half"].grid == tree["half"].grid
  assert C.tree_nbytes(tree) == 2 + 5 + 3 * 4  # codes as stored


# ----------------------------------------------------------------------------
# Bad input: one clear message naming what was given and what is allowed.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: Grid(0, 1, 1), r"levels must be between 2 and 65536.*got "
     r"levels=1"),
    (lambda: Grid(0, 1, 2**16 + 1), r"got levels=65537"),
    (lambda: Grid(0, 1, 2.0), r"levels must be an integer"),
    (lambda: Grid.uniform(0.0, 0, 1), r"step must be > 0; got step=0.0"),
    (lambda: Grid(0, -1, 3), r"step must be > 0; got step=-1"),
    (lambda: Grid.binary(float("nan")), r"finite real number.*scale=nan"),
    (lambda: Grid.ternary(float("inf")), r"finite real number.*scale=inf"),
    (lambda: Grid.binary(0.0), r"scale must be > 0; got scale=0.0"),
    (lambda: Grid.kbit(2.5, 1.0), r"bits must be an integer between 1 and "
     r"16.*got bits=2.5"),
    (lambda: Grid.kbit(0), r"got bits=0"),
    (lambda: Grid.kbit(17), r"got bits=17"),
    (lambda: Grid.kbit(True), r"got bits=True"),
    (lambda: values(Grid.kbit(10, 1.0), BF16), r"cannot represent"),
    (lambda: values(Grid.kbit(12, 1.0), BF16), r"bfloat16 cannot represent "
     r"the 4096 distinct points.*wider dtype"),
    (lambda: values(Grid.binary(1.0), jnp.int8), r"dtype must be one of "
     r"float32, bfloat16, float16.*got dtype=.*int8"),
    (lambda: values(Grid.binary(1.0), np.float64), r"dtype must be one of "
     r"float32, bfloat16, float16.*got dtype=.*float64"),
    (lambda: C.encode_nearest(jnp.zeros(3), Grid.binary(), np.float64),
     r"dtype must be one of float32, bfloat16, float16"),
    (lambda: C.pack(jnp.zeros(3, jnp.int32), Grid.binary(), "float64"),
     r"dtype must be one of float32, bfloat16, float16"),
    (lambda: values(Grid.binary(1e5), jnp.float16), r"largest finite value"),
    (lambda: Grid.binary(1e39), r"must fit float32"),
    (lambda: Grid.uniform(0.1, 0, 0.95), r"whole number of steps.*9.5 steps"),
    (lambda: Grid.uniform(0.1, -1e6, 1e6), r"20000001 levels.*at most 65536"),
    (lambda: Grid.uniform(0.1, 1, 0), r"need lo < hi"),
    (lambda: Grid.uniform(0.1, 1, 1), r"need lo < hi"),
    (lambda: Grid.uniform(1e-30, 0, 1e-29), r"step 1e-30 is below.*2\*\*-96"),
    (lambda: Grid("1e-30", 1, 3), r"points or gaps below 2\*\*-96"),
    (lambda: Grid.binary("abc"), r"scale='abc'"),
    (lambda: C.encode_nearest(jnp.zeros(3), Grid.uniform(0.1)),
     r"encode_nearest: codes need a bounded grid"),
    (lambda: C.encode_stochastic(0, jnp.zeros(3), Grid.uniform(0.1)),
     r"encode_stochastic: codes need a bounded grid"),
    (lambda: C.pack(jnp.zeros(3, jnp.int32), Grid.uniform(0.1)),
     r"bounded grid"),
    (lambda: values(Grid.uniform(0.1)), r"unbounded and has no value table"),
])
def test_bad_grids_raise_clear_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_codes_raise_clear_errors():
  with pytest.raises(ValueError, match=r"lie in \[0, 2\]; got indices in "
                     r"\[0, 3\]"):
    C.pack(jnp.array([0, 3]), Grid.ternary(1.0))
  with pytest.raises(TypeError, match="integer code indices"):
    C.pack(jnp.array([0.0]), Grid.ternary(1.0))
  with pytest.raises(TypeError, match="integer code steps"):
    C.step_codes(C.pack(jnp.array([0]), Grid.ternary(1.0)), 0.5)
  with pytest.raises(ValueError, match="stored as uint8"):
    C.Codes(jnp.zeros(3, jnp.int32), Grid.ternary(1.0), (3,))
  with pytest.raises(ValueError, match=r"store data of shape \(\.\.\., 1\)"):
    C.Codes(jnp.zeros(3, jnp.uint8), Grid.binary(1.0), (3,))
  with pytest.raises(ValueError, match="bfloat16 cannot represent"):
    C.Codes(jnp.zeros(3, jnp.uint16), Grid.kbit(12), (3,), BF16)
  with pytest.raises(ValueError, match=r"concrete scale.*grid\.scaled"):
    jax.jit(lambda s: Grid.binary(s))(1.0)
  with pytest.raises(TypeError, match=r"expects a qjax\.Grid"):
    C.encode_nearest(jnp.zeros(3), "binary")
  with pytest.raises(TypeError, match="expects Codes"):
    C.decode(jnp.zeros(3))
