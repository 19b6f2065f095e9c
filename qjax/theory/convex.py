"""Convex problems with known optima, their constants, and the paper's bounds.

Li et al. 2017 (Sec. 4) bound the excess loss of SR and BC on convex problems.
This module gives (1) finite-sum problems whose optimum is known to float64
precision, (2) the constants the bounds need (μ, L, the Hessian-Lipschitz
constant L2, the gradient bound G measured along a run), (3) the bounds
themselves, re-derived in ``docs/theory.md`` (our statements come from
recollection and a restatement, not from the paper's PDF; constants flagged
there as uncertain), and (4) a pure training run ``run(key, hparams)`` that
uses qjax's own quantizers and optax transforms, vmappable over Δ, α, seeds.

Problems (``F(w) = (1/m) Σ f_i(w)``, ``f_i = ℓ_i + (λ/2)‖w‖²``):

* :func:`least_squares`: ``ℓ_i = (x_iᵀw - y_i)² / 2`` (closed-form optimum).
* :func:`logistic_digits`: ``ℓ_i = log(1 + exp(-y_i x_iᵀw))`` on two classes
  of scikit-learn's 8x8 digits (optimum by a float64 Newton solve).

Stochastic gradients average ``batch_size`` examples drawn with replacement,
so the gradient noise is set by the batch size.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from qjax import methods as qmethods
from qjax import quantizers
from qjax.grid import Grid

Array = jax.Array
KINDS = ("least_squares", "logistic")
METHODS = ("fp", "sr", "r", "bc")
BC_VIEWS = ("stochastic", "nearest")
SCHEDULES = ("constant", "inv_t", "inv_sqrt_t")
# max |d³/dz³ log(1 + e^{-z})| = max |σ''(z)| = 1 / (6 √3).
_LOGISTIC_THIRD = 1.0 / (6.0 * math.sqrt(3.0))


def _positive(name: str, value, allowed: str = "a finite number > 0"):
  v = np.asarray(value, dtype=np.float64)
  if not (np.all(np.isfinite(v)) and np.all(v > 0)):
    raise ValueError(f"{name} must be {allowed}; got {name}={value!r}.")


def _nonnegative(name: str, value):
  v = np.asarray(value, dtype=np.float64)
  if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
    raise ValueError(f"{name} must be a finite number >= 0; got "
                     f"{name}={value!r}.")


def _positive_int(name: str, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {name}={value!r}.")


# ----------------------------------------------------------------------------
# Problems.
# ----------------------------------------------------------------------------


class Problem(NamedTuple):
  """A finite-sum problem ``F(w) = (1/m) Σ f_i(w)`` with a known optimum.

  Attributes:
    kind: ``"least_squares"`` or ``"logistic"``.
    features: ``[m, d]`` float64 design matrix.
    targets: ``[m]`` float64 targets (``±1`` labels for logistic).
    l2: ridge strength λ > 0 (makes F λ-strongly convex).
    w_star: ``[d]`` float64 optimum.
    f_star: ``F(w_star)`` in float64.
    name: a label for results.
  """
  kind: str
  features: np.ndarray
  targets: np.ndarray
  l2: float
  w_star: np.ndarray
  f_star: float
  name: str

  @property
  def dim(self) -> int:
    return self.features.shape[1]

  @property
  def num_examples(self) -> int:
    return self.features.shape[0]


def _np_loss(kind, X, y, l2, w):
  z = X @ w
  if kind == "least_squares":
    data = 0.5 * np.mean((z - y) ** 2)
  else:
    data = np.mean(np.logaddexp(0.0, -y * z))
  return float(data + 0.5 * l2 * w @ w)


def least_squares(num_examples: int = 256, dim: int = 16, noise: float = 0.5,
                  l2: float = 0.05, seed: int = 0) -> Problem:
  """Ridge least squares on Gaussian features with scales from 1 down to 0.3.

  ``w* = (XᵀX/m + λI)⁻¹ Xᵀy/m`` in float64. The Hessian ``XᵀX/m + λI`` is
  constant, so L2 = 0 and BC's strongly-convex floor vanishes (Sec. 4).
  """
  _positive_int("num_examples", num_examples)
  _positive_int("dim", dim)
  _nonnegative("noise", noise)
  _positive("l2", l2)
  rng = np.random.default_rng(seed)
  scales = np.geomspace(1.0, 0.3, dim)
  X = rng.standard_normal((num_examples, dim)) * scales
  w_true = rng.standard_normal(dim)
  y = X @ w_true + noise * rng.standard_normal(num_examples)
  H = X.T @ X / num_examples + l2 * np.eye(dim)
  w_star = np.linalg.solve(H, X.T @ y / num_examples)
  return Problem("least_squares", X, y, float(l2), w_star,
                 _np_loss("least_squares", X, y, l2, w_star),
                 f"least_squares(m={num_examples}, d={dim})")


def _newton_logistic(X, y, l2, tol=1e-13, max_iter=100):
  w = np.zeros(X.shape[1])
  for _ in range(max_iter):
    s = 1.0 / (1.0 + np.exp(y * (X @ w)))        # σ(-y z)
    grad = -X.T @ (y * s) / len(y) + l2 * w
    if np.linalg.norm(grad) < tol:
      break
    curv = s * (1.0 - s)
    H = (X.T * curv) @ X / len(y) + l2 * np.eye(X.shape[1])
    step = np.linalg.solve(H, grad)
    t, f0 = 1.0, _np_loss("logistic", X, y, l2, w)
    while _np_loss("logistic", X, y, l2, w - t * step) > f0 - 0.25 * t * (
        grad @ step) and t > 1e-10:
      t *= 0.5
    w = w - t * step
  return w


def logistic_digits(classes: tuple[int, int] = (3, 8), l2: float = 1e-2
                    ) -> Problem:
  """l2-regularised logistic regression on two classes of sklearn's digits.

  Features are pixel intensities / 16 plus a constant 1 (65 dimensions);
  labels ``±1``. The optimum comes from a damped Newton solve in float64 to
  ``‖∇F‖ < 1e-13``. The dataset ships with scikit-learn (no download).
  """
  _positive("l2", l2)
  if len(classes) != 2 or classes[0] == classes[1] or not all(
      0 <= c <= 9 for c in classes):
    raise ValueError(f"classes must be two different digits in 0..9; got "
                     f"classes={classes!r}.")
  from sklearn.datasets import load_digits  # optional dependency.
  data = load_digits()
  keep = np.isin(data.target, classes)
  X = data.data[keep] / 16.0
  X = np.concatenate([X, np.ones((len(X), 1))], axis=1)
  y = np.where(data.target[keep] == classes[1], 1.0, -1.0)
  w_star = _newton_logistic(X, y, l2)
  return Problem("logistic", X, y, float(l2), w_star,
                 _np_loss("logistic", X, y, l2, w_star),
                 f"logistic_digits{tuple(classes)}")


# ----------------------------------------------------------------------------
# Losses and gradients (JAX, float32 by default; dtype follows w).
# ----------------------------------------------------------------------------


def _arrays(problem: Problem, dtype):
  return (jnp.asarray(problem.features, dtype),
          jnp.asarray(problem.targets, dtype))


def _data_grad_coeff(kind, z, y):
  """``dℓ_i/dz_i`` for ``z_i = x_iᵀw``."""
  if kind == "least_squares":
    return z - y
  return -y * jax.nn.sigmoid(-y * z)


def loss(problem: Problem, w: Array) -> Array:
  """``F(w)`` on the full data set."""
  X, y = _arrays(problem, w.dtype)
  z = X @ w
  if problem.kind == "least_squares":
    data = 0.5 * jnp.mean((z - y) ** 2)
  else:
    data = jnp.mean(jnp.logaddexp(0.0, -y * z))
  return data + 0.5 * problem.l2 * jnp.vdot(w, w)


def excess_loss(problem: Problem, w: Array) -> Array:
  """``F(w) - F*``; for least squares the exact quadratic form ``½ eᵀHe``."""
  if problem.kind == "least_squares":
    X, _ = _arrays(problem, w.dtype)
    e = w - jnp.asarray(problem.w_star, w.dtype)
    return 0.5 * (jnp.mean((X @ e) ** 2) + problem.l2 * jnp.vdot(e, e))
  return loss(problem, w) - jnp.asarray(problem.f_star, w.dtype)


def full_gradient(problem: Problem, w: Array) -> Array:
  """``∇F(w)``."""
  X, y = _arrays(problem, w.dtype)
  c = _data_grad_coeff(problem.kind, X @ w, y)
  return X.T @ c / X.shape[0] + problem.l2 * w


def example_gradients(problem: Problem, w: Array) -> Array:
  """``[m, d]`` per-example gradients ``∇f_i(w)`` (including the ridge)."""
  X, y = _arrays(problem, w.dtype)
  c = _data_grad_coeff(problem.kind, X @ w, y)
  return X * c[:, None] + problem.l2 * w


def minibatch_gradient(problem: Problem, key: Array, w: Array,
                       batch_size: int) -> Array:
  """Unbiased ``g = (1/B) Σ_{i∈batch} ∇f_i(w)``, batch drawn with
  replacement."""
  X, y = _arrays(problem, w.dtype)
  idx = jax.random.randint(key, (batch_size,), 0, X.shape[0])
  Xb, yb = X[idx], y[idx]
  c = _data_grad_coeff(problem.kind, Xb @ w, yb)
  return Xb.T @ c / batch_size + problem.l2 * w


def expected_sq_grad_norm(problem: Problem, w: Array, batch_size) -> Array:
  """Exact ``E‖g_B(w)‖² = ‖∇F‖² + (mean_i ‖∇f_i‖² - ‖∇F‖²) / B``."""
  per = example_gradients(problem, w)
  mean = jnp.mean(per, axis=0)
  sq_mean = jnp.vdot(mean, mean)
  return sq_mean + (jnp.mean(jnp.sum(per ** 2, axis=1)) - sq_mean) / batch_size


# ----------------------------------------------------------------------------
# Constants.
# ----------------------------------------------------------------------------


def hessian(problem: Problem, w=None) -> np.ndarray:
  """``∇²F(w)`` in float64 (at ``w*`` by default)."""
  w = problem.w_star if w is None else np.asarray(w, np.float64)
  X, y = problem.features, problem.targets
  if problem.kind == "least_squares":
    curv = np.ones(len(y))
  else:
    s = 1.0 / (1.0 + np.exp(-y * (X @ w)))
    curv = s * (1.0 - s)
  return (X.T * curv) @ X / len(y) + problem.l2 * np.eye(X.shape[1])


def curvature(problem: Problem, w=None, local: bool = False
              ) -> tuple[float, float]:
  """``(μ, L)``: strong convexity and smoothness constants.

  Global constants (valid everywhere) by default: least squares, the extreme
  eigenvalues of its constant Hessian; logistic, ``μ = λ`` and
  ``L = λ + λ_max(XᵀX/m)/4``. With ``local=True``, the extreme eigenvalues
  of ``∇²F(w)`` (at ``w*`` if ``w`` is None), an estimate of the constants
  along a run that stays near ``w``.
  """
  if local or problem.kind == "least_squares":
    eig = np.linalg.eigvalsh(hessian(problem, w))
    return float(eig[0]), float(eig[-1])
  X = problem.features
  top = np.linalg.eigvalsh(X.T @ X / len(X))[-1]
  return problem.l2, float(problem.l2 + top / 4.0)


def hessian_lipschitz(problem: Problem) -> float:
  """L2 with ``‖∇²F(u) - ∇²F(v)‖ <= L2 ‖u - v‖`` (operator norm).

  Least squares: 0. Logistic: ``∇²F = (1/m) Σ σ'(z_i) x_i x_iᵀ + λI`` and
  ``|σ''| <= 1/(6√3)``, so ``L2 <= max_i ‖x_i‖ · λ_max(XᵀX/m) / (6√3)``.
  """
  if problem.kind == "least_squares":
    return 0.0
  X = problem.features
  radius = np.max(np.linalg.norm(X, axis=1))
  return float(_LOGISTIC_THIRD * radius * np.linalg.eigvalsh(
      X.T @ X / len(X))[-1])


def gradient_bound(problem: Problem, iterates, batch_size: int) -> float:
  """G: ``sqrt(max_t E‖g_B(w_t)‖²)`` over ``iterates`` (``[..., d]``).

  The bounds need ``E‖g‖² <= G²`` at every point where a gradient is taken;
  this measures it exactly (finite sum, sampling with replacement) along a
  recorded run, so G is an estimate for the run, not a global constant.
  """
  _positive_int("batch_size", batch_size)
  ws = jnp.asarray(iterates, jnp.float32).reshape(-1, problem.dim)
  sq = jax.vmap(lambda w: expected_sq_grad_norm(problem, w, batch_size))(ws)
  return float(jnp.sqrt(jnp.max(sq)))


# ----------------------------------------------------------------------------
# Bounds (derivations and assumptions in docs/theory.md).
# ----------------------------------------------------------------------------


def lemma1_bound(d: int, delta, alpha, G):
  """Lemma 1: ``E‖Q_s(w - αg) - (w - αg)‖² <= √d Δ α G`` for ``w ∈ ΔZ^d``.

  Per coordinate ``Var = Δ² p(1-p) <= Δ · min(p, 1-p) Δ <= Δ α |g_i|``, and
  ``‖g‖₁ <= √d ‖g‖₂``. Also ``<= d Δ²/4``; this returns the paper's form.
  """
  _positive_int("d", d)
  for n, v in (("delta", delta), ("alpha", alpha), ("G", G)):
    _nonnegative(n, v)
  return np.sqrt(d) * np.asarray(delta) * np.asarray(alpha) * np.asarray(G)


def sr_floor(d: int, delta, G):
  """The floor ``√d Δ G / 2`` shared by the SR (and convex BC) bounds."""
  _positive_int("d", d)
  _nonnegative("delta", delta)
  _nonnegative("G", G)
  return 0.5 * np.sqrt(d) * np.asarray(delta) * np.asarray(G)


def sr_strongly_convex_bound(T, mu, G, d, delta, t0: float = 1.0,
                             D0: float = 0.0):
  """SR, μ-strongly convex, ``α_t = 1/(μ(t+t0))``, ``w̄_T = (1/T)Σ_{t<T} w_t``.

  With ``t0 = 1`` (the paper's schedule, ``α_t = 1/(μ(t+1))``):
  ``E[F(w̄_T) - F*] <= (1 + log(T+1)) G² / (2 μ T) + √d Δ G / 2``
  (our derivation gives ``1 + log T``; the issue's ``log(T+1)`` is looser).
  With ``t0 > 1`` the telescoping leaves ``μ (t0 - 1) D0² / (2T)`` with
  ``D0 = ‖w_0 - w*‖``, and the harmonic sum becomes
  ``Σ_{t<T} 1/(t+t0) <= 1/t0 + log((T+t0-1)/t0)``.
  """
  _positive("T", T)
  _positive("mu", mu)
  if not t0 >= 1:
    raise ValueError(f"t0 must be >= 1; got t0={t0!r}.")
  _nonnegative("D0", D0)
  T = np.asarray(T, np.float64)
  if t0 == 1:
    harmonic = 1 + np.log(T + 1)
  else:
    harmonic = 1 / t0 + np.log((T + t0 - 1) / t0)
  return (harmonic * np.asarray(G) ** 2 / (2 * mu * T)
          + mu * (t0 - 1) * D0 ** 2 / (2 * T) + sr_floor(d, delta, G))


def sr_convex_bound(T, c, D, G, d, delta):
  """SR, convex, ``α_t = c/√t`` (t = 1..T), ``‖w_t - w*‖ <= D`` (assumed).

  ``E[F(w̄_T) - F*] <= D²/(2c√T) + c G²/√T + √d Δ G / 2`` (our derivation;
  the paper's middle term may carry a ``(1 + log T)`` factor — uncertain).
  """
  _positive("T", T)
  _positive("c", c)
  _nonnegative("D", D)
  T = np.asarray(T, np.float64)
  return (np.asarray(D) ** 2 / (2 * c * np.sqrt(T))
          + c * np.asarray(G) ** 2 / np.sqrt(T) + sr_floor(d, delta, G))


def sr_constant_step_bound(T, alpha, D0, G, d, delta):
  """SR, convex, constant ``α``: ``(1/T) Σ_t E[F(w_t) - F*]`` is at most

  ``D0²/(2αT) + α G²/2 + √d Δ G / 2`` with ``D0 = ‖w_0 - w*‖``. The floor
  does not shrink with α: the first two terms do, the last one does not.
  """
  _positive("T", T)
  _positive("alpha", alpha)
  _nonnegative("D0", D0)
  alpha = np.asarray(alpha, np.float64)
  return (np.asarray(D0) ** 2 / (2 * alpha * T) + alpha * np.asarray(G) ** 2
          / 2 + sr_floor(d, delta, G))


def bc_convex_bound(T, c, D, G, d, delta):
  """BC, convex, ``α_t = c/√t``: the quantized average ``w̄_b`` satisfies

  ``E[F(w̄_b) - F*] <= D²/(2c√T) + c G²/√T + √d Δ G / 2``, the same floor
  as SR (``⟨∇F(w_b), w_r - w_b⟩ >= -G ‖w_r - w_b‖``, ``‖w_r - w_b‖ <=
  √d Δ/2`` for rounding to the nearest point).
  """
  return sr_convex_bound(T, c, D, G, d, delta)


def bc_strongly_convex_bound(T, mu, G, d, delta, L2, D):
  """BC with an unbiased (stochastic) view, μ-strongly convex, L2-Lipschitz
  Hessian, ``α_t = 1/(μ(t+1))``, float average ``w̄_r``:

  ``E[F(w̄_r) - F*] <= (1 + log(T+1)) G²/(2μT) + L2 · D · d Δ² / 8``.

  The floor is ``D · ‖E[∇F(Q_s(w_r))] - ∇F(w_r)‖ <= D (L2/2) E‖Q_s(w)-w‖²``
  with ``E‖Q_s(w)-w‖² <= dΔ²/4``: zero for a quadratic (L2 = 0). The paper's
  statement (as restated to us) has a floor ``∝ L2 √d Δ``; that constant is
  unverified. With the deterministic view ``Q_d`` the gradient is biased by
  ``∇²F (Q_d(w_r) - w_r)`` and no such bound holds (see docs/theory.md).
  """
  _positive("T", T)
  _positive("mu", mu)
  for n, v in (("L2", L2), ("D", D), ("delta", delta)):
    _nonnegative(n, v)
  _positive_int("d", d)
  T = np.asarray(T, np.float64)
  return ((1 + np.log(T + 1)) * np.asarray(G) ** 2 / (2 * mu * T)
          + L2 * D * d * np.asarray(delta) ** 2 / 8.0)


# ----------------------------------------------------------------------------
# Runs: one pure function, vmapped over (Δ, α, seed).
# ----------------------------------------------------------------------------


class RunConfig(NamedTuple):
  """Static settings of a convex run (everything that changes shapes/code).

  Attributes:
    method: ``"fp"``, ``"sr"``, ``"r"`` or ``"bc"``.
    optimizer: ``"sgd"`` or ``"adam"`` (the base step before rounding).
    num_steps: T.
    batch_size: examples per stochastic gradient.
    record_every: record metrics every this many steps.
    schedule: ``"constant"`` (α), ``"inv_t"`` (α/(t+t0)), ``"inv_sqrt_t"``
      (α/√(t+1)); t counts from 0.
    bc_view: BC's forward view: ``"stochastic"`` (``Q_s``, unbiased; the
      analysis) or ``"nearest"`` (``Q_d``, as :func:`qjax.methods.bc`).
  """
  method: str = "sr"
  optimizer: str = "sgd"
  num_steps: int = 2000
  batch_size: int = 1
  record_every: int = 20
  schedule: str = "constant"
  bc_view: str = "stochastic"
  t0: float = 1.0


def _check_config(cfg: RunConfig):
  if cfg.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got "
                     f"method={cfg.method!r}.")
  if cfg.optimizer not in qmethods.OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {qmethods.OPTIMIZERS}; got "
                     f"optimizer={cfg.optimizer!r}.")
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}; got "
                     f"schedule={cfg.schedule!r}.")
  if cfg.bc_view not in BC_VIEWS:
    raise ValueError(f"bc_view must be one of {BC_VIEWS}; got "
                     f"bc_view={cfg.bc_view!r}.")
  for n in ("num_steps", "batch_size", "record_every"):
    _positive_int(n, getattr(cfg, n))
  if not cfg.t0 >= 1:
    raise ValueError(f"t0 must be >= 1; got t0={cfg.t0!r}.")
  if cfg.num_steps % cfg.record_every:
    raise ValueError(
        f"num_steps must be a multiple of record_every; got num_steps="
        f"{cfg.num_steps}, record_every={cfg.record_every}.")


def _schedule(kind: str, lr, t0: float = 1.0) -> Callable:
  if kind == "constant":
    return lambda count: lr
  if kind == "inv_t":
    return lambda count: lr / (count + t0)
  return lambda count: lr / jnp.sqrt(count + 1.0)


def make_run(problem: Problem, config: RunConfig) -> Callable:
  """Returns ``run(key, hparams) -> results`` for one configuration.

  ``hparams`` is ``{"delta": Δ, "lr": α}`` (scalar arrays, traceable), so
  ``jax.vmap(run)`` sweeps them without recompiling. The run starts at
  ``w_0 = 0`` (a grid point) and uses qjax's own update rules:

  * ``sr`` / ``r``: :func:`qjax.methods.make` (``stochastic_rounding`` /
    ``nearest_rounding``) on the unbounded grid ΔZ,
    ``Grid.uniform(1).scaled(Δ)`` (points ``fl32(k Δ)``, Δ traced so that a
    sweep over Δ compiles once).
  * ``bc``: float latent ``w_r`` updated by plain ``sgd``/``adam``
    (:func:`qjax.methods.base_optimizer`) with the gradient taken at the view
    :func:`qjax.quantize` ``(w_r, round_stochastic | round_nearest)`` on ΔZ.
    We do not use ``latent_clipping``: the convex analysis has no clip and
    ``latent_clipping`` needs a bounded grid.
  * ``fp``: plain ``sgd``/``adam``.

  Returns per record (``[T / record_every]``): ``step``, ``excess`` (F - F*
  of the stored weights: grid weights for SR/R, the float latent for BC),
  ``excess_quantized`` (BC: ``F(Q_d(w_r)) - F*``; others: same as excess),
  ``dist`` ‖w - w*‖, ``sq_grad`` (exact ``E‖g‖²`` at the window's last
  iterate, or its ``Q_d`` for BC), ``excess_mean`` (F - F* of the running
  average of the iterates so far),
  ``moved`` (fraction of steps in the window where the weights changed),
  ``max_step_inf`` (max over the window of ``α_t ‖g_t‖_∞``); and ``final_w``,
  ``mean_w`` (average of the iterates ``w_0..w_{T-1}``).
  """
  _check_config(config)
  cfg = config
  dim = problem.dim

  def run(key, hparams):
    delta = jnp.asarray(hparams["delta"], jnp.float32)
    lr = jnp.asarray(hparams["lr"], jnp.float32)
    grid = Grid.uniform(1).scaled(delta)  # ΔZ, with Δ traced by the sweep
    sched = _schedule(cfg.schedule, lr, cfg.t0)
    key, round_key = jax.random.split(key)
    if cfg.method in ("sr", "r", "fp"):
      m = qmethods.make(cfg.method, sched, optimizer=cfg.optimizer, grid=grid,
                        key=round_key)
      tx = m.tx  # SR/R/FP views are the identity.
    else:
      tx = optax.with_extra_args_support(
          qmethods.base_optimizer(cfg.optimizer, sched))
    w0 = jnp.zeros((dim,), jnp.float32)
    state = tx.init(w0)

    def grad_point(k, w):
      if cfg.method != "bc":
        return w
      if cfg.bc_view == "stochastic":
        return quantizers.quantize(w, quantizers.round_stochastic, grid=grid,
                                   key=k)
      return quantizers.quantize(w, quantizers.round_nearest, grid=grid)

    def step(carry, t):
      w, state, wsum = carry
      k = jax.random.fold_in(key, t)
      k_view, k_batch = jax.random.split(k)
      wp = grad_point(k_view, w)
      g = minibatch_gradient(problem, k_batch, wp, cfg.batch_size)
      updates, state = tx.update(g, state, w)
      w_new = optax.apply_updates(w, updates)
      alpha_t = sched(t.astype(jnp.float32))
      metrics = (jnp.any(w_new != w).astype(jnp.float32),
                 alpha_t * jnp.max(jnp.abs(g)))
      return (w_new, state, wsum + w), metrics

    def window(carry, start):
      ts = start + jnp.arange(cfg.record_every)
      carry, (moved, step_inf) = lax.scan(step, carry, ts)
      w = carry[0]
      wq = quantizers.round_nearest(w, grid) if cfg.method == "bc" else w
      # E‖g‖² at the window's last gradient point (cheaper than every step).
      sq = expected_sq_grad_norm(problem, wq, cfg.batch_size)
      rec = {
          "step": start + cfg.record_every,
          "excess": excess_loss(problem, w),
          "excess_quantized": excess_loss(problem, wq),
          "dist": jnp.linalg.norm(w - jnp.asarray(problem.w_star,
                                                  jnp.float32)),
          "sq_grad": sq,
          "excess_mean": excess_loss(
              problem, carry[2] / (start + cfg.record_every)),
          "moved": jnp.mean(moved),
          "max_step_inf": jnp.max(step_inf),
      }
      return carry, rec

    starts = jnp.arange(0, cfg.num_steps, cfg.record_every)
    carry0 = (w0, state, jnp.zeros_like(w0))
    (w, _, wsum), records = lax.scan(window, carry0, starts)
    records["final_w"] = w
    records["mean_w"] = wsum / cfg.num_steps
    return records

  return run


def sweep(problem: Problem, config: RunConfig, deltas, lrs, seeds) -> dict:
  """Runs every (Δ, α, seed) combination as one jitted ``vmap``.

  Args:
    problem: the problem.
    config: a :class:`RunConfig`.
    deltas, lrs: 1-D sequences of grid spacings Δ > 0 and learning rates α > 0.
    seeds: 1-D sequence of int seeds.

  Returns:
    A dict of numpy arrays shaped ``[len(deltas), len(lrs), len(seeds), ...]``
    (the records of :func:`make_run`).
  """
  deltas = np.asarray(deltas, np.float32).ravel()
  lrs = np.asarray(lrs, np.float32).ravel()
  seeds = np.asarray(seeds).ravel()
  _positive("deltas", deltas)
  _positive("lrs", lrs)
  if deltas.size == 0 or lrs.size == 0 or seeds.size == 0:
    raise ValueError("deltas, lrs and seeds must each be non-empty; got "
                     f"{deltas.size}, {lrs.size}, {seeds.size} values.")
  D, A, S = np.meshgrid(deltas, lrs, seeds, indexing="ij")
  keys = jax.vmap(jax.random.key)(jnp.asarray(S.ravel(), jnp.uint32))
  hp = {"delta": jnp.asarray(D.ravel()), "lr": jnp.asarray(A.ravel())}
  out = jax.jit(jax.vmap(make_run(problem, config)))(keys, hp)
  shape = D.shape
  return {k: np.asarray(v).reshape(shape + v.shape[1:]) for k, v in out.items()}
