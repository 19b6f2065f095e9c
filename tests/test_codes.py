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

from qjax import codes as C

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
  v = C.values(C.uniform(0.1, lo=0, hi=1))
  assert v.dtype == F32 and v.shape == (11,)
  want = np.array([nearest(Fraction(k, 10), F32) for k in range(11)])
  assert np.array_equal(as64(v), want)
  # For these k the double k/10 rounds to the same float32.
  assert same_bits(v, np.float32([k / 10 for k in range(11)]))


def test_tenth_grid_bf16_hits_representable_points():
  v = C.values(C.uniform(0.1, lo=0, hi=1, dtype=jnp.bfloat16))
  assert v.dtype == BF16
  assert float(v[10]) == 1.0 and float(v[5]) == 0.5 and float(v[0]) == 0.0
  assert np.array_equal(as64(v), expected_table(0, Fraction(1, 10), 11, BF16))


def test_tenth_grid_wide_range_keeps_every_point():
  # The old lattice rounded 0.1 to 0 and 0.2, 0.3 to 0.25 here.
  g = C.uniform(0.1, lo=-3276.7, hi=3276.7)
  assert g.levels == 65535
  v = C.values(g)
  assert np.all(np.diff(as64(v)) > 0)
  k0 = 32767  # the point 0
  assert float(v[k0]) == 0.0
  for j in (1, 2, 3, 5, 10, -1, -3):
    assert float(v[k0 + j]) == nearest(Fraction(j, 10), F32)
  assert float(v[-1]) == nearest(Fraction(32767, 10), F32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("scale", [0.18898223, math.sqrt(1.5 / 107)])
def test_binary_grid_is_exactly_symmetric(scale, dtype):
  v = C.values(C.binary(scale, dtype=dtype))
  assert v.dtype == dtype
  assert float(v[0]) == -float(v[1])
  s = Fraction(repr(scale))
  assert float(v[1]) == nearest(s, dtype)


def test_binary_grid_keeps_the_float32_scale_asked_for():
  # Old behaviour: Grid.binary(0.18898223) stored +-0.18898225.
  v = C.values(C.binary(0.18898223))
  assert same_bits(v, np.float32([-0.18898223, 0.18898223]))


@pytest.mark.parametrize("bits, dtype, levels", [
    (4, BF16, 16), (8, F16, 256), (8, F32, 256), (8, BF16, 256),
    (2, BF16, 4), (1, BF16, 2), (12, F32, 4096), (16, F32, 65536)])
def test_kbit_has_exactly_two_to_the_bits_levels(bits, dtype, levels):
  g = C.kbit(bits, 1.0, dtype=dtype)
  v = as64(C.values(g))
  assert g.levels == levels and len(np.unique(v)) == levels
  assert v[0] == -1.0 and v[-1] == 1.0
  assert np.array_equal(v, -v[::-1])
  if levels <= 4096:
    want = expected_table(-1, Fraction(2, levels - 1), levels, dtype)
    assert np.array_equal(v, want)


def test_kbit2_bf16_ends_exactly_at_one():
  # Old behaviour: bf16 kbit(2, 1.0) ended at 0.96875.
  v = as64(C.values(C.kbit(2, 1.0, dtype=jnp.bfloat16)))
  assert v.tolist() == [-1.0, nearest(Fraction(-1, 3), BF16),
                        nearest(Fraction(1, 3), BF16), 1.0]


def test_kbit_beyond_what_bf16_can_hold_is_refused():
  # 1024 levels in [-1, 1]: spacing 2/1023 is below bf16's spacing near 1.
  with pytest.raises(ValueError, match=r"bfloat16 cannot represent the 1024"):
    C.kbit(10, 1.0, dtype=jnp.bfloat16)
  C.kbit(10, 1.0, dtype=jnp.float16)  # f16 can


def test_ternary_and_numpy_int_bits():
  assert as64(C.values(C.ternary(2.0))).tolist() == [-2.0, 0.0, 2.0]
  assert C.kbit(np.int64(3), 0.5) == C.kbit(3, 0.5)
  assert C.kbit(np.array(3), 0.5).levels == 8
  assert C.uniform(0.1, 0, 1) == C.CodeGrid(offset=0, step="1/10", levels=11)
  assert C.uniform(0.1, 0, 3 * 0.1).levels == 4  # float noise in hi
  assert hash(C.binary(0.5)) == hash(C.binary(0.5))



def test_exact_ties_round_to_even_in_the_table():
  # 1 + 2**-8 is half way between bf16's 1 and 1 + 2**-7: even is 1.0;
  # 1 + 3 * 2**-8 is half way between 1 + 2**-7 and 1 + 2**-6: even is
  # the latter. The same ties negated stay symmetric.
  for off, want in [("1.00390625", [1.0, 2.0]),
                    ("1.01171875", [1.015625, 2.015625])]:
    g = C.CodeGrid(off, 1, 2, dtype=jnp.bfloat16)
    assert as64(C.values(g)).tolist() == want
    assert want == expected_table(Fraction(off), 1, 2, BF16).tolist()
    neg = C.CodeGrid("-" + off, 1, 2, dtype=jnp.bfloat16)
    assert float(C.values(neg)[0]) == -want[0]


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
  if want is None:
    with pytest.raises(ValueError, match="largest finite value"):
      C.uniform(str(step), str(offset), str(hi), dtype=dtype)
    return
  if not np.all(np.diff(want) > 0):
    with pytest.raises(ValueError, match="cannot represent"):
      C.uniform(str(step), str(offset), str(hi), dtype=dtype)
    return
  g = C.uniform(str(step), str(offset), str(hi), dtype=dtype)
  assert g.levels == levels
  assert np.array_equal(as64(C.values(g)), want)
  # Float arguments mean their shortest decimal: the same grid.
  assert C.uniform(float(step), float(offset), float(hi), dtype=dtype) == g


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(bits=st.integers(1, 8), scale=_DEC,
                  dtype=st.sampled_from(DTYPES))
def test_kbit_tables_match_the_reference(bits, scale, dtype):
  levels = 2**bits
  want = expected_table(-scale, 2 * scale / (levels - 1), levels, dtype)
  if not np.all(np.diff(want) > 0) or scale > float(
      ml_dtypes.finfo(dtype).max):
    with pytest.raises(ValueError):
      C.kbit(bits, float(scale), dtype=dtype)
    return
  v = as64(C.values(C.kbit(bits, float(scale), dtype=dtype)))
  assert np.array_equal(v, want) and np.array_equal(v, -v[::-1])


# ----------------------------------------------------------------------------
# Encoding: nearest.
# ----------------------------------------------------------------------------

ROUND_TRIP_GRIDS = [
    C.binary(0.18898223), C.ternary(0.3), C.kbit(3, 1.0, dtype=jnp.bfloat16),
    C.uniform(0.1, -1, 1, dtype=jnp.float16), C.kbit(12, 0.7),
    C.uniform(0.25, lo=-0.5, hi=0.75)]


@pytest.mark.parametrize("grid", ROUND_TRIP_GRIDS, ids=repr)
def test_decode_encode_round_trip_is_bit_exact(grid):
  v = C.values(grid)
  c = C.encode_nearest(jnp.asarray(v), grid)
  assert same_bits(C.decode(c), v)
  assert np.array_equal(np.asarray(C.unpack(c)), np.arange(grid.levels))


def _brute_nearest(x32: np.ndarray, v: np.ndarray) -> np.ndarray:
  """argmin |x - v| over the table; ties to the upper code."""
  d = np.abs(x32.astype(np.float64)[:, None] - v.astype(np.float64)[None])
  return len(v) - 1 - np.argmin(d[:, ::-1], axis=1)


@pytest.mark.parametrize("grid", ROUND_TRIP_GRIDS, ids=repr)
def test_encode_nearest_is_the_nearest_table_value(grid, rng):
  v = np.asarray(C.values(grid)).astype(np.float32)
  span = float(v[-1] - v[0])
  x = rng.uniform(v[0] - 0.1 * span, v[-1] + 0.1 * span, 3000)
  mid = (v[:-1].astype(np.float64) + v[1:]) / 2  # exact ties, if float32
  x = np.concatenate([x, mid, v]).astype(np.float32)
  k = np.asarray(C.unpack(C.encode_nearest(jnp.asarray(x), grid)))
  assert np.array_equal(k, _brute_nearest(x, v))


def test_encode_nearest_ties_nan_inf_and_denormals():
  b = C.binary(1.0)
  x = jnp.array([0.0, -0.0, 1e-45, -1e-45, -1e-30, np.inf, -np.inf, np.nan],
                jnp.float32)
  assert C.unpack(C.encode_nearest(x, b)).tolist() == [1, 1, 1, 1, 0, 1, 0, 0]
  u = C.uniform(0.5, lo=-1, hi=1)
  x = jnp.array([0.25, -0.25, 0.75, -0.75, 0.2499999])
  assert as64(C.decode(C.encode_nearest(x, u))).tolist() == [
      0.5, 0.0, 1.0, -0.5, 0.0]
  # bf16 inputs are compared exactly (promoted to float32).
  g = C.kbit(2, 1.0, dtype=jnp.bfloat16)
  xb = jnp.asarray(C.values(g))
  assert same_bits(C.decode(C.encode_nearest(xb, g)), C.values(g))


# ----------------------------------------------------------------------------
# Packing and sizes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5), (64, 64), (), (0,)])
def test_binary_codes_pack_eight_per_byte(shape, rng):
  n = math.prod(shape)
  bits = rng.integers(0, 2, shape)
  c = C.pack(jnp.asarray(bits), C.binary(1.0))
  assert c.data.dtype == np.uint8 and c.data.shape == (-(-n // 8),)
  want = np.packbits(bits.astype(np.uint8).ravel(), bitorder="little")
  assert same_bits(c.data, want)
  assert np.array_equal(np.asarray(C.unpack(c)), bits)
  assert C.nbytes(c) == -(-n // 8)
  if n:
    assert C.bits_per_weight(c) == 8 * (-(-n // 8)) / n
  x = np.where(bits == 1, 1.0, -1.0).astype(np.float32)
  assert same_bits(C.decode(c), x)
  assert same_bits(C.encode_nearest(jnp.asarray(x), C.binary(1.0)).data,
                   want)


def test_sizes_per_storage_kind():
  x = jnp.zeros((64, 64))
  assert C.bits_per_weight(C.encode_nearest(x, C.binary(1.0))) == 1.0
  t = C.encode_nearest(x, C.ternary(1.0))
  assert t.data.dtype == np.uint8 and t.data.shape == (64, 64)
  assert C.nbytes(t) == 4096 and C.bits_per_weight(t) == 8.0
  w = C.encode_nearest(x, C.kbit(9, 1.0))
  assert w.data.dtype == np.uint16 and C.bits_per_weight(w) == 16.0
  assert C.kbit(8, 1.0).code_dtype == np.uint8


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


@pytest.mark.parametrize("grid", [
    C.binary(math.sqrt(1.5 / 107)), C.kbit(4, 1.0, dtype=jnp.bfloat16),
    C.uniform(0.1, -2, 2, dtype=jnp.float16), C.kbit(10, 0.3)], ids=repr)
def test_decode_same_bits_eager_jit_vmap(grid, rng):
  k = rng.integers(0, grid.levels, (4, 3, 11))
  lanes = [C.pack(jnp.asarray(k[i]), grid) for i in range(4)]
  eager = [np.asarray(C.decode(c)) for c in lanes]
  jitted = [np.asarray(jax.jit(C.decode)(c)) for c in lanes]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *lanes)
  vmapped = np.asarray(jax.vmap(C.decode)(stacked))
  batched = np.asarray(C.decode(stacked))  # batch axes kept outside vmap
  want = np.asarray(C.values(grid))[k]
  for i in range(4):
    assert same_bits(eager[i], want[i]) and same_bits(jitted[i], want[i])
  assert same_bits(vmapped, want) and same_bits(batched, want)
  # Encoding under vmap and jit gives the same codes as eagerly.
  x = jnp.asarray(want.astype(np.float32))
  enc = jax.jit(jax.vmap(lambda a: C.encode_nearest(a, grid)))(x)
  assert same_bits(enc.data, stacked.data)


def test_codes_is_a_pytree_with_one_leaf():
  c = C.encode_nearest(jnp.ones((3, 4)), C.ternary(1.0))
  leaves, treedef = jax.tree_util.tree_flatten(c)
  assert len(leaves) == 1 and leaves[0] is c.data
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.grid == c.grid and again.shape == (3, 4)
  assert jax.tree_util.tree_structure(
      C.encode_nearest(jnp.zeros((3, 4)), C.ternary(1.0))) == treedef
  assert jax.tree_util.tree_structure(
      C.encode_nearest(jnp.zeros((3, 4)), C.ternary(2.0))) != treedef
  out = jax.jit(lambda c: c)(c)
  assert isinstance(out, C.Codes) and same_bits(out.data, c.data)


# ----------------------------------------------------------------------------
# Encoding: stochastic rounding is unbiased with respect to the table.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [C.uniform(0.1, 0, 1),
                                  C.kbit(3, 1.0, dtype=jnp.bfloat16)],
                         ids=repr)
def test_encode_stochastic_is_unbiased(grid):
  n = 200_000
  v = as64(C.values(grid))
  lo, hi = v[3], v[4]
  fracs = [1e-3, 0.1, 0.25, 0.5, 0.9, 0.999]
  x = np.float32([lo + f * (hi - lo) for f in fracs])
  xs = jnp.asarray(np.repeat(x[:, None], n, axis=1))
  out = as64(C.decode(C.encode_stochastic(jax.random.key(7), xs, grid)))
  assert np.all((out == lo) | (out == hi))  # only the two neighbours
  p = (x.astype(np.float64) - lo) / (hi - lo)  # exact fraction of the input
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
  err = np.abs(out.mean(axis=1) - x.astype(np.float64))
  assert np.all(err < 5 * sigma), (err / sigma)


def test_encode_stochastic_draws_independently_per_element():
  # With p = 1/2, neighbours agree half the time (shared noise: always).
  n = 100_000
  out = np.asarray(C.unpack(C.encode_stochastic(
      3, jnp.full((n,), 0.05), C.uniform(0.1, 0, 1))))
  agree = np.mean(out[1:] == out[:-1])
  assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(n)


def test_encode_stochastic_fixes_points_and_clips(key):
  g = C.kbit(2, 1.0, dtype=jnp.bfloat16)
  v = jnp.asarray(C.values(g)).astype(jnp.float32)
  x = jnp.concatenate([jnp.tile(v, 1000), jnp.array([-5.0, 5.0, np.nan])])
  k = np.asarray(C.unpack(C.encode_stochastic(key, x, g)))
  assert np.array_equal(k[:-3], np.tile(np.arange(4), 1000))
  assert k[-3:].tolist() == [0, 3, 0]


def test_encode_stochastic_keys():
  g, x = C.ternary(1.0), jnp.linspace(-1, 1, 1001)
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


@pytest.mark.parametrize("grid", [C.binary(1.0), C.ternary(1.0),
                                  C.kbit(4, 1.0), C.kbit(9, 1.0)], ids=repr)
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
  g = C.binary(1.0)
  c = jax.vmap(lambda x: C.encode_nearest(x, g))(-jnp.ones((3, 10)))
  out = C.step_codes(c, jnp.array([[0], [1], [-1]]))
  assert np.array_equal(np.asarray(C.unpack(out)),
                        np.repeat([[0], [1], [0]], 10, axis=1))


# ----------------------------------------------------------------------------
# Bad input: one clear message naming what was given and what is allowed.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: C.CodeGrid(0, 1, 1), r"levels must be between 2 and 65536.*got "
     r"levels=1"),
    (lambda: C.CodeGrid(0, 1, 2**16 + 1), r"got levels=65537"),
    (lambda: C.CodeGrid(0, 1, 2.0), r"levels must be an integer"),
    (lambda: C.uniform(0.0, 0, 1), r"step must be > 0; got step=0.0"),
    (lambda: C.CodeGrid(0, -1, 3), r"step must be > 0; got step=-1"),
    (lambda: C.binary(float("nan")), r"finite real number.*scale=nan"),
    (lambda: C.ternary(float("inf")), r"finite real number.*scale=inf"),
    (lambda: C.binary(0.0), r"scale must be > 0; got scale=0.0"),
    (lambda: C.kbit(2.5, 1.0), r"bits must be an integer between 1 and 16.*"
     r"got bits=2.5"),
    (lambda: C.kbit(0), r"got bits=0"),
    (lambda: C.kbit(17), r"got bits=17"),
    (lambda: C.kbit(True), r"got bits=True"),
    (lambda: C.kbit(10, 1.0, dtype=jnp.bfloat16), r"cannot represent"),
    (lambda: C.binary(1.0, dtype=jnp.int8), r"dtype must be one of float32, "
     r"bfloat16, float16.*got dtype=.*int8"),
    (lambda: C.binary(1e5, dtype=jnp.float16), r"largest finite value"),
    (lambda: C.binary(1e39), r"largest finite value"),
    (lambda: C.uniform(0.1, 0, 0.95), r"whole number of steps.*9.5 steps"),
    (lambda: C.uniform(0.1, -1e6, 1e6), r"20000001 levels.*at most 65536"),
    (lambda: C.uniform(0.1, 1, 0), r"need lo < hi"),
    (lambda: C.uniform(0.1, None, None), r"bounded grid"),
    (lambda: C.uniform(1e-30, 0, 1e-29), r"step 1e-30 is below.*2\*\*-96"),
    (lambda: C.CodeGrid("1e-30", 1, 3), r"points or gaps below 2\*\*-96"),
    (lambda: C.binary("abc"), r"scale='abc'"),
])
def test_bad_grids_raise_clear_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_codes_raise_clear_errors():
  with pytest.raises(ValueError, match=r"lie in \[0, 2\]; got indices in "
                     r"\[0, 3\]"):
    C.pack(jnp.array([0, 3]), C.ternary(1.0))
  with pytest.raises(TypeError, match="integer code indices"):
    C.pack(jnp.array([0.0]), C.ternary(1.0))
  with pytest.raises(TypeError, match="integer code steps"):
    C.step_codes(C.pack(jnp.array([0]), C.ternary(1.0)), 0.5)
  with pytest.raises(ValueError, match="stored as uint8"):
    C.Codes(jnp.zeros(3, jnp.int32), C.ternary(1.0), (3,))
  with pytest.raises(ValueError, match="concrete scale"):
    jax.jit(lambda s: C.binary(s))(1.0)
  with pytest.raises(TypeError, match="expects a qjax.codes.CodeGrid"):
    C.encode_nearest(jnp.zeros(3), "binary")
