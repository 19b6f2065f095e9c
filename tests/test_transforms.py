"""SR / R / BC update rules on codes and floats: exactness, statistics, jit.

Expected values are computed independently of qjax where it matters: half
gaps and neighbours from the value tables in float64 (exact for float32
values), means and variances against the stored points.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import qjax
from qjax import Grid
from qjax import codes as C
from qjax.grid import values

F32, BF16, F16 = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16),
                  np.dtype(np.float16))

# These toy trees name their leaves after the grids: round every float leaf
# (the rules' default mask is the kernels).
ALL = qjax.all_floats

GRIDS = {
    "binary": Grid.binary(0.0625),
    "kbit3": Grid.kbit(3, 0.7),
    "ternary": Grid.ternary(0.3),
    "far": Grid.uniform(0.1, lo=-2.9375, hi=3.0625),  # -2.9375 is a point
}


# One array size for most tests: eager dispatch compiles every primitive
# once per shape, so shared shapes keep the suite fast.
N = 48


def _grid_of(path, leaf):
  del leaf
  return GRIDS[path[0]]


def same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (a.dtype == b.dtype and a.shape == b.shape
          and a.tobytes() == b.tobytes())


def _tree_bits(tree):
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def _on_grid_params(key, dtype, n=N):
  """Codes on every grid of GRIDS (random points), and the same as floats."""
  keys = jax.random.split(key, len(GRIDS))
  codes = {name: C.pack(jax.random.randint(k, (n,), 0, g.levels), g, dtype)
           for k, (name, g) in zip(keys, sorted(GRIDS.items()))}
  return codes, C.decode_tree(codes)


def _rule(name, grid, key):
  if name == "sr":
    return qjax.stochastic_rounding(grid, key, ALL)
  return qjax.nearest_rounding(grid, ALL)


@functools.partial(jax.jit, static_argnames=("rule", "dtype", "steps"))
def _walk(rule, dtype, seed, scale, steps=16):
  """A random walk of float params and of codes from the same key."""
  key = jax.random.key(seed)
  codes, floats = _on_grid_params(jax.random.fold_in(key, 1), dtype)
  tx_f, tx_c = _rule(rule, _grid_of, key), _rule(rule, None, key)

  def step(carry, t):
    floats, codes, sf, sc = carry
    u = jax.tree.map(lambda p: (scale * jax.random.normal(
        jax.random.fold_in(key, t), p.shape)).astype(p.dtype), floats)
    d, sf = tx_f.update(u, sf, floats)
    floats = optax.apply_updates(floats, d)
    d, sc = tx_c.update(u, sc, codes)
    codes = optax.apply_updates(codes, d)
    return (floats, codes, sf, sc), (floats, C.decode_tree(codes))

  carry = (floats, codes, tx_f.init(floats), tx_c.init(floats))
  (_, codes, _, _), history = jax.lax.scan(step, carry, jnp.arange(steps))
  return codes, history


# Grids on which every float delta between two stored points is exact
# (q - p is a float), so that float parameters follow their codes exactly.
DYADIC = ("binary", "ternary")


@functools.lru_cache(maxsize=None)
def _walks(rule, dtype):
  seeds = jnp.arange(4)
  scales = jnp.float32([0.02, 0.1, 0.5, 3.0])
  out = jax.jit(jax.vmap(lambda s, a: _walk(rule, dtype, s, a)))(seeds,
                                                                 scales)
  return seeds, scales, out


@pytest.mark.parametrize("rule, dtype", [("sr", F32), ("r", BF16)],
                         ids=lambda x: getattr(x, "name", x))
def test_random_walks_of_codes_and_floats(rule, dtype):
  _, _, (codes, (floats, decoded)) = _walks(rule, dtype)
  moved = 0
  for name, grid in GRIDS.items():
    f, c = np.asarray(floats[name]), np.asarray(decoded[name])
    assert f.dtype == dtype and c.dtype == dtype
    table = values(grid, dtype).astype(np.float64)
    assert np.all(np.isin(c.astype(np.float64), table)), name
    assert codes[name].data.dtype == C.code_dtype(grid)
    moved += int(np.sum(c[:, 1:] != c[:, :-1]))
    if name in DYADIC:  # the float path is the codes' path, bit for bit
      assert same_bits(f, c), name
    else:  # float weights stay within a few ulps of the stored points
      f64 = f.astype(np.float64).ravel()
      i = np.clip(np.searchsorted(table, f64), 1, len(table) - 1)
      dist = np.minimum(np.abs(f64 - table[i]), np.abs(f64 - table[i - 1]))
      ulp = np.max(np.abs(table)) * (2.0**-22 if dtype == F32 else 2.0**-7)
      assert np.all(dist <= ulp), name
  assert moved > 500  # the walks do move


def test_vmap_lane_is_the_single_run_codes_bit_for_bit():
  seeds, scales, (lanes, _) = _walks("sr", F32)
  for i in (0, 3):
    single, _ = _walk("sr", F32, seeds[i], scales[i])
    for name in GRIDS:
      assert same_bits(lanes[name].data[i], single[name].data), name
  assert any(not same_bits(lanes[n].data[0], lanes[n].data[1])
             for n in GRIDS)


def _finite(dtype):
  with np.errstate(invalid="ignore"):
    allv = np.arange(2**16, dtype=np.uint16).view(dtype).astype(np.float64)
  return np.unique(allv[np.isfinite(allv)])


def _float_delta_exists(p, q, dtype):
  """Whether some float d of ``dtype`` has fl(p + d) == q, elementwise
  (brute force over the floats around q - p)."""
  p64, q64 = np.asarray(p).astype(np.float64), np.asarray(q).astype(
      np.float64)
  exact = q64 - p64  # exact for the values used here
  if dtype == F32:
    c = exact.astype(np.float32)
    cands, up, down = [c], c, c
    for _ in range(4):
      up = np.nextafter(up, np.float32(np.inf))
      down = np.nextafter(down, np.float32(-np.inf))
      cands += [up, down]
    cands = [x.astype(np.float64) for x in cands]
  else:
    table = _finite(dtype)
    i = np.searchsorted(table, exact)
    cands = [table[np.clip(i + j, 0, len(table) - 1)] for j in range(-4, 5)]
  found = np.zeros(p64.shape, bool)
  for d in cands:
    found |= (p64 + d).astype(dtype).astype(np.float64) == q64
  return found


def _check_float_path(p, q_codes, q_float, dtype):
  """Floats reach the codes' point exactly whenever a float delta can."""
  same = np.asarray(q_codes).astype(np.float64) == np.asarray(
      q_float).astype(np.float64)
  assert np.all(same | ~_float_delta_exists(p, q_codes, dtype))
  return same


@pytest.mark.parametrize("rule", ["sr", "r"])
def test_one_float_step_is_the_codes_step_whenever_a_float_delta_can_be(
    rule):
  """Float weights on the points move as their codes do, exactly whenever
  some float delta reaches the new point (apply_updates adds in float)."""
  codes, floats = _on_grid_params(jax.random.key(3), F32, n=4000)
  rng = np.random.default_rng(0)
  u = {n: jnp.asarray(rng.normal(size=4000) * float(GRIDS[n].step) *
                      rng.choice([0.1, 0.6, 3.0], 4000), jnp.float32)
       for n in GRIDS}
  new_c = C.decode_tree(_step(_rule(rule, None, 9), codes, u))
  new_f = _step(_rule(rule, _grid_of, 9), floats, u)
  for name in GRIDS:
    p, qc, qf = (np.asarray(t[name]) for t in (floats, new_c, new_f))
    assert np.mean(qc != p) > 0.2  # many weights moved
    same = _check_float_path(p, qc, qf, F32)
    if name in DYADIC:
      assert np.all(same), name


# ----------------------------------------------------------------------------
# Through optax chains, as a user writes them.
# ----------------------------------------------------------------------------


def _kernel_params(rng, grid, dtype=F32, shape=(37, 5)):
  w = jnp.asarray(rng.normal(size=shape) * float(grid.step), jnp.float32)
  codes = {"Dense_0": {"kernel": C.encode_nearest(w, grid, dtype),
                       "bias": jnp.zeros((shape[-1],), dtype)}}
  return codes, C.decode_tree(codes)


def _grads(rng, params, t):
  del t
  return jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), p.dtype), C.decode_tree(params))


@pytest.mark.parametrize("grid, rule", [
    (Grid.binary(0.18898223), "sr"), (Grid.uniform(0.0625, lo=-0.5, hi=0.5),
                                      "r")],
    ids=lambda x: x if isinstance(x, str) else repr(x))
def test_adam_chain_on_codes_equals_the_float_path(grid, rule, rng):
  codes, floats = _kernel_params(rng, grid)
  last = {"sr": lambda g: qjax.stochastic_rounding(g, key=0),
          "r": lambda g: qjax.nearest_rounding(g)}[rule]
  lr = 1e-2 if rule == "sr" else float(grid.step)  # R needs half a gap
  tx_c = optax.chain(optax.adam(lr), last(None))
  tx_f = optax.chain(optax.adam(lr), last(grid))
  sc, sf = tx_c.init(C.decode_tree(codes)), tx_f.init(floats)
  step_c = jax.jit(tx_c.update)
  step_f = jax.jit(tx_f.update)
  start = C.decode(codes["Dense_0"]["kernel"])
  for t in range(12):
    g = _grads(rng, codes, t)
    updates, sc = step_c(g, sc, codes)
    codes = optax.apply_updates(codes, updates)
    updates, sf = step_f(g, sf, floats)
    floats = optax.apply_updates(floats, updates)
    kernel = codes["Dense_0"]["kernel"]
    assert isinstance(kernel, C.Codes) and kernel.grid == grid
    assert same_bits(C.decode(kernel), floats["Dense_0"]["kernel"]), t
    assert same_bits(codes["Dense_0"]["bias"], floats["Dense_0"]["bias"])
  assert not same_bits(C.decode(kernel), start)  # it trained
  if C.packed(grid):  # still one bit per weight
    assert kernel.data.dtype == np.uint8 and kernel.data.shape == (24,)
    assert C.nbytes(kernel) == 24


def test_decoded_wraps_optimizers_that_read_the_params(rng):
  grid = Grid.uniform(0.25, lo=-0.5, hi=0.5)
  codes, floats = _kernel_params(rng, grid)
  tx_c = optax.chain(qjax.decoded(optax.adamw(0.05, 0.1)),
                     qjax.stochastic_rounding(None, key=3))
  tx_f = optax.chain(optax.adamw(0.05, 0.1),
                     qjax.stochastic_rounding(grid, key=3))
  sc, sf = tx_c.init(codes), tx_f.init(floats)  # decoded() decodes for init
  for t in range(5):
    g = _grads(rng, codes, t)
    u, sc = tx_c.update(g, sc, codes)
    codes = optax.apply_updates(codes, u)
    u, sf = tx_f.update(g, sf, floats)
    floats = optax.apply_updates(floats, u)
  assert _tree_bits(C.decode_tree(codes)) == _tree_bits(floats)
  # Without decoded(), adamw would read the codes' bytes as weights.
  with pytest.raises((TypeError, ValueError)):
    bad = optax.chain(optax.adamw(0.05, 0.1), qjax.nearest_rounding(None))
    bad.update(_grads(rng, codes, 0), bad.init(C.decode_tree(codes)), codes)


# ----------------------------------------------------------------------------
# Exact properties of single steps.
# ----------------------------------------------------------------------------


def _step(tx, params, u):
  d, _ = tx.update(u, tx.init(C.decode_tree(params)), params)
  return optax.apply_updates(params, d)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_a_zero_update_moves_nothing(dtype):
  codes, floats = _on_grid_params(jax.random.key(0), dtype)
  for name in ("binary", "kbit3"):  # fewer programs to compile
    codes.pop(name), floats.pop(name)
  floats["unbounded"] = jnp.asarray(np.arange(-24, 24) * 0.1, jnp.float32
                                    ).astype(dtype)
  floats["unbounded"] = qjax.round_nearest(floats["unbounded"],
                                           Grid.uniform(0.1))
  grids = dict(GRIDS, unbounded=Grid.uniform(0.1))
  grid_of = lambda path, leaf: grids[path[0]]
  for zero in (0.0, -0.0):
    for make in (lambda g: qjax.stochastic_rounding(g, 1, ALL),
                 lambda g: qjax.nearest_rounding(g, ALL)):
      u = jax.tree.map(lambda p: jnp.full(p.shape, zero, dtype), floats)
      assert _tree_bits(_step(make(grid_of), floats, u)) == _tree_bits(floats)
      u.pop("unbounded")
      new = _step(make(None), codes, u)
      assert _tree_bits(new) == _tree_bits(codes)


def _half_gap_updates(v):
  """Per code: the largest float32 below half the gap up / down, and the
  smallest float32 at or above it (the gaps exact in float64)."""
  v64 = v.astype(np.float64)
  half = np.diff(v64) / 2  # exact: float32 differences fit float64
  at = half.astype(np.float32)
  at = np.where(at.astype(np.float64) < half, np.nextafter(at, np.inf), at)
  below = np.nextafter(at, np.float32(0))
  assert np.all(below.astype(np.float64) < half)
  assert np.all(at.astype(np.float64) >= half)
  return below, at


R_GRIDS = [(Grid.uniform(0.1, lo=-2.9375, hi=3.0625), BF16),
           (Grid.uniform(0.1, lo=-2.9375, hi=3.0625), F32),
           (Grid.kbit(8, 1.0), BF16), (Grid.kbit(3, 0.7), F16),
           (Grid.uniform(0.1, lo=-327.7, hi=327.7), F32),  # far from 0
           (Grid.binary(0.18898223), F32)]


def test_r_moves_exactly_when_the_update_reaches_half_the_gap():
  """Every code of every grid, up and down: below half the gap R stays,
  at half the gap (rounded up to a float32) it moves one point."""
  codes, floats, u, want, tables = {}, {}, {}, {}, {}
  for i, (grid, dtype) in enumerate(R_GRIDS):
    v = np.asarray(values(grid, dtype)).astype(np.float32)
    below, at = _half_gap_updates(v)
    k = np.arange(grid.levels - 1)
    name = f"g{i}"
    codes[name] = C.pack(jnp.asarray(np.concatenate([k, k + 1] * 2)), grid,
                         dtype)
    floats[name] = C.decode(codes[name])
    u[name] = jnp.asarray(np.concatenate([below, -below, at, -at]))
    want[name] = np.concatenate([k, k + 1, k + 1, k])
    tables[name] = v
  grid_of = lambda path, leaf: R_GRIDS[int(path[0][1:])][0]
  new_c = jax.jit(lambda c, u: _step(qjax.nearest_rounding(None, ALL), c, u))(
      codes, u)
  new_f = jax.jit(lambda f, u: _step(qjax.nearest_rounding(grid_of, ALL), f,
                                     u))(floats, u)
  for name, (grid, dtype) in zip(codes, R_GRIDS):
    assert np.array_equal(np.asarray(C.unpack(new_c[name])), want[name]), (
        grid, dtype)
    # The same for float parameters on the points (where a delta can be).
    assert new_f[name].dtype == dtype
    _check_float_path(floats[name], tables[name][want[name]].astype(dtype),
                      new_f[name], dtype)
  # At the ends nothing moves outwards, however large the update.
  grid = R_GRIDS[0][0]
  ends = {"w": C.pack(jnp.array([0, grid.levels - 1]), grid, BF16)}
  out = _step(qjax.nearest_rounding(None, ALL), ends,
              {"w": jnp.array([-1e30, 1e30], jnp.float32)})
  assert C.unpack(out["w"]).tolist() == [0, grid.levels - 1]


def test_r_far_from_the_offset_in_bf16_is_the_issue_case():
  """bf16 -2.9375 + 0.0464 rounds (in bf16) to the exact midpoint -2.890625;
  the update is below half the gap (0.046875), so R must not move."""
  grid = Grid.uniform(0.1, lo=-2.9375, hi=3.0625)
  v = values(grid, BF16)
  assert float(v[0]) == -2.9375 and float(v[1]) == -2.84375
  w = jnp.full((N,), -2.9375, jnp.bfloat16)
  for u, want in [(0.0464, -2.9375), (-0.0464, -2.9375),
                  (0.046875, -2.84375), (0.05, -2.84375)]:
    upd = {"w": jnp.full((N,), u, jnp.bfloat16)}
    new = _step(qjax.nearest_rounding(grid, ALL), {"w": w}, upd)
    assert np.all(np.asarray(new["w"], np.float64) == want), u
    codes = {"w": C.encode_nearest(w, grid)}
    new = C.decode(_step(qjax.nearest_rounding(None, ALL), codes, upd)["w"])
    assert new.dtype == BF16 and np.all(np.asarray(new, np.float64) == want)


def test_r_stalls_when_updates_are_below_half_a_step_while_sr_moves(key):
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  params = {"w": C.encode_nearest(jnp.zeros((N,)), grid)}
  r_tx, sr_tx = qjax.nearest_rounding(None, ALL), qjax.stochastic_rounding(
      None, 1, ALL)
  r_step, sr_step = jax.jit(r_tx.update), jax.jit(sr_tx.update)
  r_p, sr_p = params, params
  r_state, sr_state = r_tx.init(None), sr_tx.init(None)
  for t in range(30):
    u = {"w": jnp.clip(jax.random.normal(jax.random.fold_in(key, t), (N,)),
                       -1, 1) * 0.049}  # every |u| < Δ/2
    d, r_state = r_step(u, r_state, r_p)
    r_p = optax.apply_updates(r_p, d)
    d, sr_state = sr_step(u, sr_state, sr_p)
    sr_p = optax.apply_updates(sr_p, d)
  assert same_bits(r_p["w"].data, params["w"].data)
  assert float(jnp.mean(C.decode(sr_p["w"]) != 0)) > 0.5


# ----------------------------------------------------------------------------
# SR statistics: unbiased with respect to the stored points.
# ----------------------------------------------------------------------------

N_DRAWS = 100_000

SR_CASES = [
    # grid, dtype, code k, update u (as a multiple of the gap up, or a float)
    (Grid.uniform(0.1, lo=-1.0, hi=1.0), F32, 13, 0.3),
    (Grid.uniform(0.1, lo=-1.0, hi=1.0), BF16, 13, -0.7),
    (Grid.kbit(3, 0.7), BF16, 2, 1.6),  # beyond the next point
    # Far below an ulp of the weight: 1000 + 2**-16 == 1000 in float32.
    (Grid.uniform(2.0**-10, lo=1000, hi=1001), F32, 0, ("abs", 2.0**-16)),
    (Grid.uniform(2.0**-10, lo=1000, hi=1001), F32, 5, ("abs", -2.0**-16)),
    # bf16: 1 + 2**-12 == 1 in bf16; the gap is 2**-6, p = 2**-6.
    (Grid.uniform(2.0**-6, lo=-2, hi=2), BF16, 192, ("abs", 2.0**-12)),
]


@pytest.mark.parametrize("case", SR_CASES, ids=lambda c: f"{c[0]!r}-"
                         f"{c[1].name}-{c[3]}")
def test_sr_step_is_unbiased_with_variance_gap2_p_1_minus_p(case):
  grid, dtype, k, u = case
  v = np.asarray(values(grid, dtype)).astype(np.float64)
  u = u[1] if isinstance(u, tuple) else u * (v[k + 1] - v[k])
  u32 = np.float32(u)
  target = v[k] + float(u32)  # exact, in float64
  i = np.searchsorted(v, target, side="right") - 1
  lo, hi = v[i], v[i + 1]
  p = (target - lo) / (hi - lo)
  codes = {"w": C.pack(jnp.full((N_DRAWS,), k), grid, dtype)}
  floats = C.decode_tree(codes)
  upd = {"w": jnp.full((N_DRAWS,), u32)}
  out_c = _step(qjax.stochastic_rounding(None, 7, ALL), codes, upd)
  out_f = _step(qjax.stochastic_rounding(grid, 7, ALL), floats, upd)
  d = np.asarray(C.decode(out_c["w"])).astype(np.float64)
  _check_float_path(floats["w"], C.decode(out_c["w"]), out_f["w"], dtype)
  assert set(np.unique(d)) <= {lo, hi}
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / N_DRAWS)
  assert abs(d.mean() - target) < 5 * sigma, (d.mean() - target) / sigma
  var_se = (hi - lo)**2 * (np.sqrt(p * (1 - p)) * abs(1 - 2 * p)
                           + 1 / np.sqrt(N_DRAWS)) / np.sqrt(N_DRAWS)
  assert abs(d.var() - (hi - lo)**2 * p * (1 - p)) < 5 * var_se
  if isinstance(case[3], tuple):  # the naive float path would never move
    naive = (v[k] + float(u32)) if dtype == F32 else None
    assert naive is None or np.float32(naive) == np.float32(v[k])
    assert 0 < np.mean(d != v[k]) < 0.05


def test_sr_same_key_same_bits_other_key_differs(rng):
  grid = Grid.kbit(4, 1.0)
  codes = {"w": C.encode_nearest(jnp.asarray(rng.uniform(-1, 1, N),
                                             jnp.float32), grid)}
  u = {"w": jnp.asarray(rng.normal(scale=0.1, size=N), jnp.float32)}
  outs = [_step(qjax.stochastic_rounding(None, key, ALL), codes, u)["w"].data
          for key in (5, jax.random.key(5), jax.random.PRNGKey(5), 6)]
  assert same_bits(outs[0], outs[1]) and same_bits(outs[0], outs[2])
  assert not same_bits(outs[0], outs[3])
  # The state's key advances: two steps differ, and replay is identical.
  tx = qjax.stochastic_rounding(None, 5, ALL)
  s0 = tx.init(None)
  d1, s1 = tx.update(u, s0, codes)
  d2, _ = tx.update(u, s1, codes)
  assert not same_bits(d1["w"].data, d2["w"].data)
  assert same_bits(tx.update(u, s0, codes)[0]["w"].data, d1["w"].data)


def test_sr_equals_q_s_of_params_plus_update_with_the_state_key(rng):
  """Off the grid, a float weight is rounded from w + u with the state key."""
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  p = jnp.asarray(rng.uniform(-1, 1, N), jnp.float32)  # not on the grid
  u = jnp.asarray(rng.normal(scale=0.07, size=N), jnp.float32)
  tx = qjax.stochastic_rounding(grid, jax.random.key(7), ALL)
  state = tx.init({"w": p})
  delta, new_state = tx.update({"w": u}, state, {"w": p})
  _, draw = jax.random.split(jax.random.key(7))
  expected = qjax.round_stochastic(jax.random.split(draw, 1)[0], p + u, grid)
  new = optax.apply_updates({"w": p}, delta)["w"]
  same = _check_float_path(p, expected, new, F32)
  assert np.mean(same) > 0.8
  assert not bool(jnp.all(jax.random.key_data(new_state.key)
                          == jax.random.key_data(state.key)))


def test_jit_equals_eager_on_codes_bit_for_bit(rng):
  """Updates given as arrays: the same codes eagerly and under jit, also on
  scaled grids (whose gaps XLA would otherwise fuse into FMAs)."""
  grid = Grid.kbit(4, 1.0)
  x = jnp.asarray(rng.uniform(-1, 1, 4 * N), jnp.float32)
  u = jnp.asarray(rng.normal(scale=0.2, size=4 * N), jnp.float32)

  def step(scale, x, u):
    g = grid.scaled(scale)
    params = {"w": C.encode_nearest(x * scale, g),
              "v": C.encode_nearest(x, grid)}
    out = []
    for rule in ("sr", "r"):
      tx = _rule(rule, None, 11)
      d, _ = tx.update({"w": u * scale, "v": u}, tx.init(None), params)
      out.append(optax.apply_updates(params, d))
    return out

  for s in (1.0, 0.37, 3.0):
    eager = step(jnp.float32(s), x, u)
    jitted = jax.jit(step)(jnp.float32(s), x, u)
    assert _tree_bits(eager) == _tree_bits(jitted)


def test_scaled_binary_codes_under_vmap_stay_at_plus_minus_s(rng):
  grid = Grid.binary(1.0)
  w = jnp.asarray(rng.normal(size=(64,)), jnp.float32)

  def run(s, key):
    codes = {"kernel": C.encode_nearest(w * s, grid.scaled(s))}
    tx = optax.chain(optax.sgd(0.5), qjax.stochastic_rounding(None, key))
    state = tx.init(C.decode_tree(codes))
    for t in range(3):
      g = {"kernel": jnp.sin(w + t)}
      d, state = tx.update(g, state, codes)
      codes = optax.apply_updates(codes, d)
    return codes, C.decode(codes["kernel"])

  scales = jnp.float32([0.1, 1.0, 4.0])
  keys = jax.random.split(jax.random.key(0), 3)
  codes, dec = jax.jit(jax.vmap(run))(scales, keys)
  assert same_bits(codes["kernel"].grid.scale, scales)  # kept exactly
  for i, s in enumerate(np.asarray(scales)):
    assert set(np.unique(np.asarray(dec[i]))) <= {-s, s}
    single, _ = jax.jit(run)(scales[i], keys[i])
    assert same_bits(single["kernel"].data, codes["kernel"].data[i])


# ----------------------------------------------------------------------------
# Unbounded grids, BC, masks, traces.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [Grid.uniform(0.125), Grid.uniform(0.1)],
                         ids=repr)
def test_unbounded_grid_walks_stay_on_or_next_to_the_grid(grid, key):
  """Float weights (the only storage of an unbounded grid): exactly on the
  points when the deltas are exact (a dyadic step), else within an ulp."""
  tx = qjax.stochastic_rounding(grid, 0, ALL)
  params = {"w": jnp.zeros((4 * N,))}
  state, update = tx.init(params), jax.jit(tx.update)
  for t in range(40):
    u = {"w": 0.3 * jax.random.normal(jax.random.fold_in(key, t), (4 * N,))}
    old = params["w"]
    d, state = update(u, state, params)
    params = optax.apply_updates(params, d)
    w = params["w"]
    on = qjax.contains(w, grid)
    if grid.step.denominator & (grid.step.denominator - 1) == 0:
      assert bool(jnp.all(on))
    else:
      near = qjax.round_nearest(w, grid)
      assert bool(jnp.all(jnp.abs(w - near) <= 2 * jnp.spacing(
          jnp.abs(near) + jnp.abs(old))))
  assert float(jnp.max(jnp.abs(params["w"]))) > 1.0  # it random-walked off 0


BC_GRIDS = ("far", "binary", "kbit3")


def _bc_walk(dtype, seed, scale, steps=25):
  key = jax.random.key(seed)
  tx = qjax.latent_clipping(_grid_of, ALL)
  params = {name: jnp.zeros((N,), dtype) for name in BC_GRIDS}

  def step(carry, t):
    params, state = carry
    u = {n: (scale * jax.random.normal(jax.random.fold_in(key, t),
                                       (N,))).astype(dtype) for n in params}
    u, state = tx.update(u, state, params)
    params = optax.apply_updates(params, u)
    return (params, state), params

  return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))[1]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_bc_latent_weights_stay_in_range(dtype):
  hist = jax.jit(jax.vmap(lambda s, a: _bc_walk(dtype, s, a)))(
      jnp.arange(3), jnp.float32([0.01, 0.5, 5.0]))
  for name in BC_GRIDS:
    v = values(GRIDS[name], dtype)
    lo, hi = float(v[0]), float(v[-1])
    h = np.asarray(hist[name]).astype(np.float64)
    assert np.all((h >= lo) & (h <= hi)), name
    assert np.any(h == hi) and np.any(h == lo)  # the clip is reached


def test_mask_leaves_unmasked_updates_untouched():
  grid = GRIDS["binary"]
  params = {"kernel": jnp.ones((N,)), "bias": jnp.zeros(3)}
  mask = {"kernel": True, "bias": False}
  u = {"kernel": jnp.full((N,), 0.01), "bias": jnp.full((3,), 0.123)}
  for tx in (qjax.stochastic_rounding(grid, 0, mask),
             qjax.nearest_rounding(grid, mask), qjax.latent_clipping(
                 grid, lambda path, leaf: path[-1] == "kernel")):
    d, _ = tx.update(u, tx.init(params), params)
    assert bool(jnp.all(d["bias"] == u["bias"]))


def test_codes_leaves_are_rounded_whatever_the_mask():
  grid = Grid.ternary(1.0)  # same table shape as GRIDS["ternary"]
  params = {"w": C.encode_nearest(jnp.zeros(N), grid), "b": jnp.zeros(3)}
  u = {"w": jnp.full((N,), 1.0), "b": jnp.full((3,), 0.25)}
  for tx in (qjax.nearest_rounding(None), qjax.stochastic_rounding(None, 0)):
    new = _step(tx, params, u)  # the default mask selects no "kernel"
    assert C.decode(new["w"]).tolist() == [1.0] * N
    assert new["b"].tolist() == [0.25] * 3


def test_scale_by_grid_divides_update_by_h():
  grid = Grid.binary(0.25)
  tx = qjax.latent_clipping(grid, ALL, scale_by_grid=True)
  p = {"w": jnp.zeros(3)}
  d, _ = tx.update({"w": jnp.array([0.01, -0.02, 1.0])}, tx.init(p), p)
  np.testing.assert_allclose(d["w"], [0.04, -0.08, 0.25], rtol=1e-6)


@pytest.mark.parametrize("rule", ["sr", "bc"])
def test_chain_jit_and_eager_agree_and_step_traces_once(rule, rng):
  chex.clear_trace_counter()
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  make = {"sr": lambda: qjax.stochastic_rounding(None, 3),
          "r": lambda: qjax.nearest_rounding(None),
          "bc": lambda: qjax.latent_clipping(grid)}[rule]
  tx = optax.chain(optax.adam(0.05), make())
  w = jnp.asarray(rng.uniform(-1, 1, N), jnp.float32)
  params = ({"kernel": qjax.round_nearest(w, grid)} if rule == "bc"
            else {"kernel": C.encode_nearest(w, grid)})

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  p_jit, s_jit = params, tx.init(C.decode_tree(params))
  p_eager, s_eager = params, tx.init(C.decode_tree(params))
  for t in range(3):
    g = {"kernel": jnp.asarray(rng.normal(size=N), jnp.float32)}
    p_jit, s_jit = step(p_jit, s_jit, g)
    u, s_eager = tx.update(g, s_eager, p_eager)
    p_eager = optax.apply_updates(p_eager, u)
  a = C.decode_tree(p_jit)["kernel"]
  b = C.decode_tree(p_eager)["kernel"]
  if rule == "bc":  # XLA may fuse Adam's arithmetic into FMAs under jit
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  else:
    assert same_bits(a, b)


def test_changing_learning_rate_by_inject_hyperparams_does_not_recompile():
  chex.clear_trace_counter()
  grid = Grid.uniform(0.1, lo=-1.0, hi=1.0)
  tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                   qjax.stochastic_rounding(None, 0))
  params = {"kernel": C.encode_nearest(jnp.zeros(N), grid)}
  state = tx.init(C.decode_tree(params))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    u, state = tx.update({"kernel": jnp.ones(N)}, state, params)
    return optax.apply_updates(params, u), state

  params, state = step(params, state)
  assert bool(jnp.any(C.decode(params["kernel"]) != 0))
  hyper = state[0].hyperparams
  state[0].hyperparams["learning_rate"] = jnp.zeros_like(
      hyper["learning_rate"])
  frozen, state = step(params, state)
  assert same_bits(frozen["kernel"].data, params["kernel"].data)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_errors_are_clear():
  grid = Grid.binary()
  with pytest.raises(ValueError, match="can update a state but not create"):
    qjax.stochastic_rounding(grid, None).init({"w": jnp.zeros(3)})
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
  with pytest.raises(ValueError, match="no grid was given"):
    tx = qjax.nearest_rounding(None, ALL)
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("rule", ["sr", "r"])
def test_a_wrong_update_of_a_codes_leaf_is_a_clear_error(rule):
  codes = {"kernel": C.encode_nearest(jnp.zeros((5, 7)), Grid.binary())}
  tx = _rule(rule, None, 0)
  name = "stochastic_rounding" if rule == "sr" else "nearest_rounding"
  match = (rf"{name}: the update of a quantized leaf must be a float array "
           r"of its decoded shape \(5, 7\); got .*shape \(7, 5\).*"
           r"decode_tree")
  with pytest.raises(ValueError, match=match):
    tx.update({"kernel": jnp.ones((7, 5))}, tx.init(None), codes)
  with pytest.raises(ValueError, match=rf"{name}: the update .*got a Codes"):
    tx.update(codes, tx.init(None), codes)
