"""SR's random bits from the cheap keyed hash (``random_bits="hash"``).

The hash is checked against an independent numpy implementation of its
documented formula, then statistically (bit balance, byte histograms,
serial and cross-key correlation, one draw's bits all distinct), then
through what it is for: stochastic rounding stays unbiased at 5 sigma on
integer grids and floating-point formats, vmap lane i is run i, and the
option reaches the engine and the command line (recorded, fingerprinted,
a bad value refused).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import qjax
from qjax import quantizers
from qjax import train as train_lib

from experiments import train as train_cli

N = 1 << 20


def _numpy_hash(k0: int, k1: int, n: int) -> np.ndarray:
  """The documented formula in numpy uint32 arithmetic (wrapping)."""
  def mix(x):
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))
  with np.errstate(over="ignore"):
    i = np.arange(n, dtype=np.uint32)
    return mix(mix(i * np.uint32(0x9E3779B9) + np.uint32(k0))
               ^ np.uint32(k1))


def _uniform(bits) -> np.ndarray:
  return (np.asarray(bits, np.float64) + 0.5) / 2.0**32


def test_hash_bits_match_an_independent_numpy_implementation():
  key = jax.random.PRNGKey(1234)
  k0, k1 = (int(w) for w in np.asarray(key))
  got = np.asarray(quantizers.hash_bits(key, (64, 100)))
  np.testing.assert_array_equal(got.ravel(), _numpy_hash(k0, k1, 6400))
  # A typed Threefry key uses the same two words.
  typed = jax.random.wrap_key_data(key)
  np.testing.assert_array_equal(
      np.asarray(quantizers.random_bits(typed, (64, 100), "hash")), got)


def test_hash_bits_are_balanced_and_uniform(key):
  bits = np.asarray(quantizers.hash_bits(key, (N,)))
  # Every bit position is one with probability 1/2 (5 sigma).
  ones = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(0)
  assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(N)), ones
  # The top and bottom bytes are uniform over 256 values.
  for byte in (bits >> 24, bits & 0xFF):
    counts = np.bincount(byte.astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
  # One draw is a bijection of the element index: no repeated word.
  assert np.unique(bits).size == N


def test_hash_bits_are_uncorrelated_across_elements_and_keys(key):
  u = _uniform(quantizers.hash_bits(key, (N,)))
  bound = 5 / np.sqrt(N)
  for lag in (1, 2, 512, 784):  # neighbours, and a kernel row apart
    assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < bound, lag
  # The keys SR uses: successive splits of the state's key, the same
  # element index in successive steps.
  state, draws = key, []
  for _ in range(4):
    state, draw = jax.random.split(state)
    draws.append(_uniform(quantizers.hash_bits(draw, (N,))))
  for a in range(4):
    for b in range(a + 1, 4):
      assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < bound
  # Keys that differ in one word or one bit still give unrelated draws.
  k = np.asarray(jax.random.key_data(key))
  for other in (k ^ np.array([1, 0], np.uint32),
                k ^ np.array([0, 1], np.uint32),
                k + np.array([1, 0], np.uint32)):
    v = _uniform(quantizers.hash_bits(jnp.asarray(other), (N,)))
    assert abs(np.corrcoef(u, v)[0, 1]) < bound


def test_hash_bits_same_key_same_bits_other_key_other_bits():
  a = quantizers.hash_bits(jax.random.PRNGKey(0), (1000,))
  b = jax.jit(lambda k: quantizers.hash_bits(k, (1000,)))(
      jax.random.PRNGKey(0))
  c = quantizers.hash_bits(jax.random.PRNGKey(1), (1000,))
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) == np.asarray(c)) < 0.01


def test_hash_bits_vmap_lane_is_the_single_run():
  keys = jax.random.split(jax.random.PRNGKey(7), 5)
  lanes = jax.vmap(lambda k: quantizers.hash_bits(k, (33, 17)))(keys)
  for i in range(5):
    np.testing.assert_array_equal(lanes[i],
                                  quantizers.hash_bits(keys[i], (33, 17)))


def test_hash_bits_take_a_seed_and_refuse_a_batch_of_keys():
  np.testing.assert_array_equal(
      quantizers.hash_bits(5, (8,)),
      quantizers.hash_bits(jax.random.key(5), (8,)))
  with pytest.raises(ValueError, match="expects one key"):
    quantizers.hash_bits(jax.random.split(jax.random.key(0), 3), (8,))


def test_hash_bits_other_prngs_draw_their_two_words():
  key = jax.random.key(3, impl="rbg")
  a = quantizers.hash_bits(key, (4096,))
  np.testing.assert_array_equal(a, quantizers.hash_bits(key, (4096,)))
  assert np.unique(np.asarray(a)).size == 4096


@pytest.mark.parametrize("grid,x", [
    (qjax.Grid.binary(), 0.3),
    (qjax.Grid.uniform(0.25, lo=-1.0, hi=1.0), -0.61),
    (qjax.FloatGrid(jnp.bfloat16), 1.0 + 2.0**-9),  # inside a binade
    (qjax.FloatGrid(jnp.bfloat16), 2.0 - 2.0**-10),  # at a binade boundary
    (qjax.FloatGrid(jnp.float16), 3e-6),  # a float16 subnormal
    (qjax.FloatGrid(jnp.float8_e4m3fn), 0.3),
    (qjax.FloatGrid(jnp.float8_e5m2), -0.0007),
], ids=["binary", "uniform", "bf16", "bf16-boundary", "f16-subnormal",
        "e4m3", "e5m2"])
def test_sr_with_hash_bits_is_unbiased(grid, x, key):
  """E[Q_s(x)] = x at 5 sigma over 10^5 draws, sigma from the bracket."""
  n = 100_000
  xs = jnp.full((n,), x, jnp.float32)
  q = np.asarray(qjax.round_stochastic(key, xs, grid, random_bits="hash"),
                 np.float64)
  lo, hi = np.min(q), np.max(q)
  assert lo < hi, "both neighbours must occur"
  assert set(np.unique(q)) == {lo, hi}
  p = (x - lo) / (hi - lo)
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
  assert abs(q.mean() - x) < 5 * sigma
  # and not the Threefry draw itself
  other = np.asarray(qjax.round_stochastic(key, xs, grid), np.float64)
  assert np.any(other != q)


def test_stochastic_rounding_transform_with_hash_bits_trains_and_differs():
  grid = qjax.Grid.uniform(0.125, lo=-1.0, hi=1.0)
  params = {"w": jnp.zeros((256,), jnp.float32)}
  target = jnp.linspace(-0.9, 0.9, 256)

  def run(source):
    tx = optax.chain(optax.sgd(0.01), qjax.stochastic_rounding(
        grid, key=0, mask=qjax.all_floats, random_bits=source))
    p, s = params, tx.init(params)
    for _ in range(400):
      g = {"w": p["w"] - target}
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return np.asarray(p["w"])

  hashed, threefry = run("hash"), run("threefry")
  levels = np.arange(-8, 9) / 8
  assert np.all(np.isin(hashed, levels))  # on the grid
  # SR's fixed point is the target in expectation: within a gap each.
  assert np.mean(np.abs(hashed - np.asarray(target))) < 0.125
  assert np.any(hashed != threefry)


@pytest.mark.parametrize("bad", ["Hash", "philox", None, 1])
def test_bad_random_bits_are_refused(bad):
  with pytest.raises(ValueError, match="random_bits must be one of"):
    qjax.stochastic_rounding(qjax.Grid.binary(), key=0, random_bits=bad)
  with pytest.raises(ValueError, match="random_bits must be one of"):
    qjax.round_stochastic(0, jnp.zeros(3), qjax.Grid.binary(),
                          random_bits=bad)
  with pytest.raises(ValueError, match="random_bits must be one of"):
    train_lib.TrainConfig(method="sr", random_bits=bad)


def test_cli_rejects_an_unknown_random_bits_value(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(["--smoke", "--methods", "sr", "--random-bits", "fast",
                    "--out", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "threefry" in capsys.readouterr().err


BASE = ["--dataset", "digits", "--mlp-features", "16", "--methods", "sr",
        "--seeds", "0", "--batch-size", "64", "--no-progress", "--lrs",
        "0.01", "--epochs", "2"]


def _run(out, *extra):
  return train_cli.main([*BASE, "--out", str(out), *extra])


def test_cli_random_bits_is_recorded_learns_and_is_not_resumed_across(
    tmp_path, capsys):
  hashed, threefry = tmp_path / "hash", tmp_path / "threefry"
  assert _run(hashed, "--random-bits", "hash") == 0
  assert "--random-bits hash" in capsys.readouterr().err
  assert _run(threefry) == 0
  runs = {}
  for name, out in (("hash", hashed), ("threefry", threefry)):
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    runs[name] = run
  assert runs["hash"]["train_config"]["random_bits"] == "hash"
  assert runs["threefry"]["train_config"]["random_bits"] == "threefry"
  errors = {k: r["history"][-1]["test_error"][0] for k, r in runs.items()}
  # 10 classes: chance is 0.9; both learn, and they are different runs.
  assert errors["hash"] < 0.5 and errors["threefry"] < 0.5
  assert runs["hash"]["history"] != runs["threefry"]["history"]
  # Resuming the threefry run's checkpoints with hash bits is refused.
  before = (threefry / "results.json").read_bytes()
  capsys.readouterr()
  assert _run(threefry, "--random-bits", "hash") == 2
  assert "differ" in capsys.readouterr().err
  assert (threefry / "results.json").read_bytes() == before
