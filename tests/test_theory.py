"""Tests of qjax.theory: bounds, problems, convex floors, SR Markov chains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.theory import convex
from qjax.theory import markov


@pytest.fixture(scope="module")
def ls():
  return convex.least_squares(num_examples=128, dim=8, seed=0)


# ----------------------------------------------------------------------------
# Bounds on hand-computed values.
# ----------------------------------------------------------------------------


def test_bounds_hand_computed():
  # √4 · 0.1 · 2 / 2 = 0.2
  assert convex.sr_floor(4, 0.1, 2.0) == pytest.approx(0.2)
  assert convex.lemma1_bound(9, 0.1, 0.5, 2.0) == pytest.approx(0.3)
  # (1 + log 11) · 4 / (2 · 0.5 · 10) + 0.2
  want = (1 + math.log(11)) * 4 / 10 + 0.2
  assert convex.sr_strongly_convex_bound(10, 0.5, 2.0, 4, 0.1) == \
      pytest.approx(want)
  # D²/(2c√T) + cG²/√T + floor with T=100, c=0.5, D=1, G=2.
  want = 1 / (2 * 0.5 * 10) + 0.5 * 4 / 10 + 0.2
  assert convex.sr_convex_bound(100, 0.5, 1.0, 2.0, 4, 0.1) == \
      pytest.approx(want)
  assert convex.bc_convex_bound(100, 0.5, 1.0, 2.0, 4, 0.1) == \
      pytest.approx(want)
  # Quadratic (L2 = 0): BC's strongly convex floor vanishes.
  assert convex.bc_strongly_convex_bound(1e12, 1.0, 1.0, 4, 0.1, 0.0, 1.0) \
      < 1e-10
  assert convex.bc_strongly_convex_bound(10, 0.5, 2.0, 4, 0.1, 3.0, 2.0) == \
      pytest.approx((1 + math.log(11)) * 4 / 10 + 3.0 * 2.0 * 4 * 0.01 / 8)
  assert convex.sr_constant_step_bound(100, 0.1, 1.0, 2.0, 4, 0.1) == \
      pytest.approx(1 / 20 + 0.2 + 0.2)


def test_lemma1_holds_numerically(key):
  d, delta, alpha = 64, 0.1, 0.03
  grid = qjax.Grid.uniform(delta)
  kw, kg, kq = jax.random.split(key, 3)
  w = qjax.round_nearest(jax.random.normal(kw, (d,)), grid)
  g = 2.0 * jax.random.normal(kg, (d,))
  v = w - alpha * g
  q = jax.jit(jax.vmap(lambda k: qjax.round_stochastic(k, v, grid)))(
      jax.random.split(kq, 4000))
  err = float(jnp.mean(jnp.sum((q - v) ** 2, axis=1)))
  assert err <= float(convex.lemma1_bound(d, delta, alpha,
                                          jnp.linalg.norm(g)))
  # And Var = Δ² p(1-p) summed: the exact value, within 5 standard errors.
  p = (v - jnp.floor(v / delta) * delta) / delta
  exact = float(jnp.sum(delta ** 2 * p * (1 - p)))
  se = float(jnp.std(jnp.sum((q - v) ** 2, axis=1))) / math.sqrt(4000)
  assert abs(err - exact) < 5 * se


@pytest.mark.parametrize("call, name", [
    (lambda: convex.sr_floor(0, 0.1, 1.0), "d"),
    (lambda: convex.sr_floor(4, -0.1, 1.0), "delta"),
    (lambda: convex.sr_strongly_convex_bound(10, 0.0, 1.0, 4, 0.1), "mu"),
    (lambda: convex.least_squares(l2=0.0), "l2"),
    (lambda: convex.logistic_digits(classes=(3, 3)), "classes"),
    (lambda: convex.RunConfig(method="sgd").__class__ and convex.make_run(
        None, convex.RunConfig(method="sgd")), "method"),
    (lambda: convex.make_run(None, convex.RunConfig(num_steps=10,
                                                    record_every=3)),
     "num_steps"),
    (lambda: markov.make_chain(lambda x: x, 0.3, -1.0, 1.0), "delta"),
    (lambda: markov.make_chain(lambda x: x, 0.1, 1.0, -1.0), "lo"),
    (lambda: markov.make_chain(lambda x: x, 0.1, -1.0, 1.0, dim=3), "dim"),
    (lambda: markov.transition_matrix(
        markov.make_chain(lambda x: x, 0.1, -1.0, 1.0), -1.0), "alpha"),
    (lambda: markov.mixing_time(np.eye(2), eps=1.5), "eps"),
])
def test_bad_inputs_raise_clear_errors(call, name):
  with pytest.raises(ValueError, match=name):
    call()


# ----------------------------------------------------------------------------
# Problems and constants.
# ----------------------------------------------------------------------------


def test_optima_are_optima(ls):
  lg = convex.logistic_digits()
  for p in (ls, lg):
    w = jnp.asarray(p.w_star, jnp.float32)
    assert float(jnp.max(jnp.abs(convex.full_gradient(p, w)))) < 1e-5
    assert abs(float(convex.excess_loss(p, w))) < 1e-6
    mu, L = convex.curvature(p)
    assert 0 < mu <= L
  assert convex.hessian_lipschitz(ls) == 0.0
  assert convex.hessian_lipschitz(lg) > 0.0


def test_expected_sq_grad_norm_is_exact(ls, key):
  w = jnp.zeros(ls.dim)
  g = jax.vmap(lambda k: convex.minibatch_gradient(ls, k, w, 4))(
      jax.random.split(key, 20000))
  sq = jnp.sum(g ** 2, axis=1)
  se = float(jnp.std(sq)) / math.sqrt(len(sq))
  want = float(convex.expected_sq_grad_norm(ls, w, 4))
  assert abs(float(jnp.mean(sq)) - want) < 5 * se


# ----------------------------------------------------------------------------
# Convex floors (small sweeps).
# ----------------------------------------------------------------------------


def _floor(res):
  q = res["excess"].shape[-1] // 4
  return res["excess"][..., -q:].mean(-1).mean(-1)


@pytest.fixture(scope="module")
def sr_sweep(ls):
  cfg = convex.RunConfig(method="sr", num_steps=3000, record_every=50)
  return convex.sweep(ls, cfg, [0.025, 0.1, 0.4], [0.02, 0.08], [0, 1])


def test_sr_floor_grows_with_delta_not_alpha(sr_sweep):
  floor = _floor(sr_sweep)  # [Δ, α]
  # Increasing with Δ, roughly linearly (log-log slope in [0.6, 1.6]).
  assert np.all(np.diff(floor, axis=0) > 0)
  slope = np.polyfit(np.log([0.025, 0.1, 0.4]), np.log(floor[:, 0]), 1)[0]
  assert 0.6 < slope < 1.6, slope
  # At the coarsest grid, a 4x smaller α does not shrink the floor 4x (it
  # would for SGD's noise term αG²/2): ratio within [0.5, 2].
  ratio = floor[-1, 0] / floor[-1, 1]
  assert 0.5 < ratio < 2.0, ratio


def test_sr_floor_below_bound(ls, sr_sweep):
  G = np.sqrt(sr_sweep["sq_grad"].max(axis=(-1, -2)))
  bound = convex.sr_constant_step_bound(
      2250, np.array([0.02, 0.08]), np.linalg.norm(ls.w_star), G, ls.dim,
      np.array([0.025, 0.1, 0.4])[:, None])
  assert np.all(_floor(sr_sweep) <= bound)


def test_sr_floor_shrinks_with_batch(ls):
  f = {}
  for b in (1, 32):
    cfg = convex.RunConfig(method="sr", num_steps=2000, record_every=50,
                           batch_size=b)
    f[b] = _floor(convex.sweep(ls, cfg, [0.2], [0.05], [0, 1]))[0, 0]
  assert f[32] < 0.8 * f[1], f


def test_bc_approaches_quadratic_optimum(ls):
  cfg = convex.RunConfig(method="bc", num_steps=3000, record_every=50,
                         bc_view="stochastic")
  floor = _floor(convex.sweep(ls, cfg, [0.2], [0.08, 0.02], [0, 1]))[0]
  sr = _floor(convex.sweep(ls, cfg._replace(method="sr"), [0.2], [0.08, 0.02],
                           [0, 1]))[0]
  assert floor[1] < 0.5 * floor[0], floor  # shrinks with α
  assert floor[1] < 0.25 * sr[1], (floor, sr)  # far below SR's floor


def test_r_frozen_when_step_below_half_delta(ls):
  cfg = convex.RunConfig(method="r", num_steps=500, record_every=10)
  res = convex.sweep(ls, cfg, [0.05, 0.5, 2.0], [0.01, 0.05], [0])
  small = res["max_step_inf"] < np.array([0.05, 0.5, 2.0])[:, None, None,
                                                           None] / 2
  assert small.any() and (~small).any()
  assert np.all(res["moved"][small] == 0)
  # Δ = 2, α = 0.01: from w = 0 every step is < Δ/2, so w never moves.
  assert np.all(res["final_w"][2, 0, 0] == 0)


def test_sr_iterates_stay_on_grid(ls):
  cfg = convex.RunConfig(method="sr", num_steps=200, record_every=50)
  res = convex.sweep(ls, cfg, [0.1], [0.05], [0])
  w = jnp.asarray(res["final_w"][0, 0, 0])
  assert bool(jnp.all(qjax.contains(w, qjax.Grid.uniform(0.1))))


# ----------------------------------------------------------------------------
# Markov chains.
# ----------------------------------------------------------------------------


def _double_well(delta=0.1, sigma=2.0):
  return markov.make_chain(lambda x: x ** 3 - x + 0.2, delta, -1.5, 1.5,
                           sigma=sigma)


def test_transition_matrix_rows_and_mean():
  chain = _double_well()
  P = markov.transition_matrix(chain, 0.05)
  assert np.allclose(P.sum(1), 1.0)
  # SR is unbiased away from the ends: E[w'] = w - α f'(w).
  x = chain.axis
  inner = slice(5, -5)
  mean = P @ x
  assert np.allclose(mean[inner], (x - 0.05 * (x ** 3 - x + 0.2))[inner],
                     atol=1e-9)


def test_exact_and_simulated_chains_agree(key):
  chain = _double_well()
  n, T, N, alpha = len(chain.axis), 60, 8000, 0.1
  P = markov.transition_matrix(chain, alpha)
  start = np.zeros(n)
  start[n // 2] = 1
  exact = start @ np.linalg.matrix_power(P, T)
  final = markov.simulate(chain, alpha, key, np.full(N, n // 2), T)
  emp = markov.empirical_distribution(final, n)
  assert markov.tv_distance(emp, exact) < markov.tv_tolerance(exact, N)
  # One step from every state (empirical transition frequencies).
  per = 1000
  init = np.repeat(np.arange(n), per)
  nxt = markov.simulate(chain, alpha, jax.random.fold_in(key, 1), init, 1)
  for i in range(n):
    row = markov.empirical_distribution(nxt[init == i], n)
    assert markov.tv_distance(row, P[i]) < markov.tv_tolerance(
        P[i], per, 1e-3 / n)


def test_finite_sum_noise_chain_agrees(key):
  shifts = jnp.array([-1.5, 0.0, 1.5])
  ex = lambda x: (x ** 3 - x)[..., None] + (
      shifts if isinstance(x, jax.Array) else np.asarray(shifts))
  chain = markov.make_chain(lambda x: x ** 3 - x, 0.1, -1.5, 1.5,
                            example_grads=ex)
  n, N, alpha = len(chain.axis), 6000, 0.1
  P = markov.transition_matrix(chain, alpha)
  assert np.allclose(P.sum(1), 1.0)
  final = markov.simulate(chain, alpha, key, np.full(N, n // 2), 30)
  start = np.zeros(n)
  start[n // 2] = 1
  exact = start @ np.linalg.matrix_power(P, 30)
  assert markov.tv_distance(markov.empirical_distribution(final, n),
                            exact) < markov.tv_tolerance(exact, N)


def test_stationary_converges_as_alpha_shrinks_with_full_support():
  chain = _double_well()
  pi0 = markov.limit_stationary(chain)
  tvs = [markov.tv_distance(markov.stationary_distribution(
      markov.transition_matrix(chain, a)), pi0) for a in (0.1, 0.03, 0.01)]
  assert tvs[0] > tvs[1] > tvs[2] and tvs[2] < 1e-3, tvs
  assert pi0.min() > 1e-8  # full support: mass on every state
  # π_0 is not concentrated: no state holds more than half the mass.
  assert pi0.max() < 0.5


def test_mixing_time_grows_like_inverse_alpha():
  chain = _double_well()
  alphas = np.array([0.01, 0.003, 0.001])
  t = np.array([markov.mixing_time(markov.transition_matrix(chain, a))
                for a in alphas])
  slope = np.polyfit(np.log(alphas), np.log(t), 1)[0]
  assert -1.2 < slope < -0.8, (t, slope)


def test_mixing_time_small_cases():
  P = np.array([[0.5, 0.5], [0.5, 0.5]])
  assert markov.mixing_time(P, 0.1) == 1
  P = np.array([[0.9, 0.1], [0.1, 0.9]])  # TV_t = 0.5 · 0.8^t
  assert markov.mixing_time(P, 0.1) == math.ceil(math.log(0.2) / math.log(0.8))


def test_2d_transition_matrix_matches_simulation(key):
  grad = lambda w: w ** 3 - w
  chain = markov.make_chain(grad, 0.5, -1.5, 1.5, dim=2, sigma=1.0)
  P = markov.transition_matrix(chain, 0.2)
  S, N, T = len(P), 5000, 20
  assert np.allclose(P.sum(1), 1.0)
  start = np.zeros(S)
  start[S // 2] = 1
  exact = start @ np.linalg.matrix_power(P, T)
  final = markov.simulate(chain, 0.2, key, np.full(N, S // 2), T)
  assert markov.tv_distance(markov.empirical_distribution(final, S),
                            exact) < markov.tv_tolerance(exact, N)


def test_experiment_smoke_configs_exist():
  from experiments import convex_floors, markov_chain
  assert convex_floors.config("smoke")["num_steps"] <= 1000
  assert markov_chain.config("smoke")["num_chains"] <= 4000
