"""SR as a Markov chain on a grid: exact transition matrices and simulations.

Li et al. 2017 (Sec. 5) view the SR iterates ``w ← Q_s(w - α g(w))`` as a
Markov chain on the grid. Here the grid is ``ΔZ^D`` (D = 1 or 2) restricted to
a window ``[lo, hi]^D`` (points outside clip to the ends, as
:func:`qjax.round_stochastic` does on a bounded :class:`qjax.Grid`), the
gradient is ``g = ∇f(w) + σ ξ`` with ``ξ ~ N(0, I)`` (or, in 1-D, one
example's gradient ``∇f_i(w)`` drawn uniformly from a finite sum).

* :func:`transition_matrix`: the exact matrix. For Gaussian noise each
  coordinate's step ``y = w_i - α g_i ~ N(m, s²)``; ``Q_s`` puts mass
  ``E[hat((y - x_j)/Δ)]`` on point ``x_j`` (``hat(u) = max(0, 1 - |u|)``),
  which has a closed form in Φ and φ (the integral of the step density done
  analytically, not by quadrature). Coordinates are independent given ``w``,
  so a 2-D row is an outer product.
* :func:`stationary_distribution`, :func:`mixing_time`, :func:`tv_distance`.
* :func:`limit_stationary`: the α → 0 limit. For small α,
  ``P_α = I + (α/Δ) A + o(α)`` where ``A`` moves one step ``-Δ e_i`` at rate
  ``E[g_i⁺]`` and ``+Δ e_i`` at rate ``E[g_i⁻]``; ``π_α → π_0`` with
  ``π_0 A = 0``, which has full support when the noise does, and the mixing
  time grows like ``1/α``.
* :func:`simulate`: many chains vmapped, stepping with
  :func:`qjax.round_stochastic` itself (the code training uses).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from qjax import quantizers
from qjax.grid import Grid

GradFn = Callable[[np.ndarray], np.ndarray]


class Chain(NamedTuple):
  """An SR chain on the grid ``{lo + kΔ}^D ∩ [lo, hi]^D`` (``D = len(grad)``).

  Attributes:
    grad: ``w [..., D] -> ∇f(w) [..., D]``, written with ``numpy``-compatible
      operations (it is called with numpy arrays and with JAX arrays).
    delta: grid spacing Δ.
    lo, hi: the window's end points (grid points: ``(hi - lo)/Δ`` integer).
    dim: D (1 or 2).
    sigma: std of the Gaussian gradient noise (ignored if ``example_grads``).
    example_grads: optional 1-D finite sum ``w [...] -> [..., m]`` per-example
      gradients; the stochastic gradient is one of them, uniformly.
  """
  grad: GradFn
  delta: float
  lo: float
  hi: float
  dim: int = 1
  sigma: float = 1.0
  example_grads: GradFn | None = None

  @property
  def axis(self) -> np.ndarray:
    n = int(round((self.hi - self.lo) / self.delta)) + 1
    return self.lo + self.delta * np.arange(n)

  @property
  def states(self) -> np.ndarray:
    """``[S, D]`` states, row-major (last coordinate fastest)."""
    ax = self.axis
    mesh = np.meshgrid(*([ax] * self.dim), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=-1)

  @property
  def grid(self) -> Grid:
    return Grid.uniform(self.delta, lo=self.lo, hi=self.hi)


def make_chain(grad: GradFn, delta: float, lo: float, hi: float, dim: int = 1,
               sigma: float = 1.0, example_grads: GradFn | None = None
               ) -> Chain:
  """Builds and validates a :class:`Chain` (errors name the bad argument)."""
  if dim not in (1, 2):
    raise ValueError(f"dim must be 1 or 2; got dim={dim!r}.")
  for name, v in (("delta", delta), ("sigma", sigma)):
    if not (np.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be a finite number > 0; got "
                       f"{name}={v!r}.")
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise ValueError(f"need finite lo < hi; got lo={lo!r}, hi={hi!r}.")
  n = (hi - lo) / delta
  if abs(n - round(n)) > 1e-9 * max(1.0, n):
    raise ValueError(
        f"(hi - lo) / delta must be an integer so both ends are grid points; "
        f"got (hi - lo) / delta = {n!r} for lo={lo}, hi={hi}, delta={delta}.")
  if example_grads is not None and dim != 1:
    raise ValueError(f"example_grads is supported for dim=1 only; got "
                     f"dim={dim}.")
  return Chain(grad, float(delta), float(lo), float(hi), dim, float(sigma),
               example_grads)


def _check_alpha(alpha):
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a finite number > 0; got alpha={alpha!r}.")


# ----------------------------------------------------------------------------
# Exact transition matrices.
# ----------------------------------------------------------------------------


def _psi(mean, std, c):
  """``E[(u - c)⁺]`` for ``u ~ N(mean, std²)`` (std may be 0)."""
  std = np.asarray(std, np.float64)
  z = np.where(std > 0, (mean - c) / np.where(std > 0, std, 1.0), 0.0)
  smooth = std * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) + (
      mean - c) * special.ndtr(z)
  return np.where(std > 0, smooth, np.maximum(mean - c, 0.0))


def sr_axis_distribution(mean, std, axis: np.ndarray) -> np.ndarray:
  """Law of ``Q_s(y)`` on the window ``axis`` for ``y ~ N(mean, std²)``.

  Args:
    mean, std: arrays of the same shape ``[...]`` (std >= 0).
    axis: the 1-D grid points ``lo + kΔ``, k = 0..n-1.

  Returns:
    ``[..., n]`` probabilities: ``E[hat((y - x_k)/Δ)]`` for inner points, and
    at the ends also the mass of everything beyond (clipped).
  """
  delta = axis[1] - axis[0]
  mean = np.asarray(mean, np.float64)[..., None]
  std = np.broadcast_to(np.asarray(std, np.float64)[..., None], mean.shape)
  u = (mean - axis) / delta
  s = std / delta
  hat = _psi(u, s, -1.0) - 2 * _psi(u, s, 0.0) + _psi(u, s, 1.0)
  # Ends: sum of the hats of every point at or beyond the end.
  u0, un = u[..., :1], u[..., -1:]
  low = 1.0 - (_psi(u0, s[..., :1], 0.0) - _psi(u0, s[..., :1], 1.0))
  high = _psi(un, s[..., -1:], -1.0) - _psi(un, s[..., -1:], 0.0)
  out = hat.copy()
  out[..., :1] = low
  out[..., -1:] = high
  out = np.clip(out, 0.0, None)
  return out / out.sum(-1, keepdims=True)


def _sr_split_discrete(y, axis):
  """Law of ``Q_s(y)`` for deterministic ``y [...]``: ``[..., n]``."""
  delta = axis[1] - axis[0]
  t = np.clip((y - axis[0]) / delta, 0.0, len(axis) - 1)
  k = np.minimum(np.floor(t).astype(int), len(axis) - 2)
  frac = t - k
  out = np.zeros(y.shape + (len(axis),))
  np.put_along_axis(out, k[..., None], (1 - frac)[..., None], axis=-1)
  np.put_along_axis(out, (k + 1)[..., None],
                    np.take_along_axis(out, (k + 1)[..., None], -1)
                    + frac[..., None], axis=-1)
  return out


def transition_matrix(chain: Chain, alpha: float) -> np.ndarray:
  """The exact ``[S, S]`` transition matrix of SR with step ``α`` (float64).

  ``P[s, s'] = Pr(Q_s(w_s - α g(w_s)) = w_s')``, rows sum to 1.
  """
  _check_alpha(alpha)
  axis, states = chain.axis, chain.states
  if chain.example_grads is not None:
    x = states[:, 0]
    y = x[:, None] - alpha * np.asarray(chain.example_grads(x))  # [S, m]
    return _sr_split_discrete(y, axis).mean(axis=1)
  mean = states - alpha * np.asarray(chain.grad(states))  # [S, D]
  per_axis = sr_axis_distribution(mean, alpha * chain.sigma, axis)  # [S,D,n]
  if chain.dim == 1:
    return per_axis[:, 0, :]
  row = per_axis[:, 0, :, None] * per_axis[:, 1, None, :]
  return row.reshape(len(states), -1)


def stationary_distribution(P: np.ndarray) -> np.ndarray:
  """``π`` with ``π P = π``, ``Σ π = 1`` (least squares on the stacked
  system)."""
  P = np.asarray(P, np.float64)
  if P.ndim != 2 or P.shape[0] != P.shape[1]:
    raise ValueError(f"P must be a square matrix; got shape {P.shape}.")
  n = P.shape[0]
  A = np.vstack([P.T - np.eye(n), np.ones((1, n))])
  b = np.zeros(n + 1)
  b[-1] = 1.0
  pi = np.linalg.lstsq(A, b, rcond=None)[0]
  pi = np.clip(pi, 0.0, None)
  return pi / pi.sum()


def tv_distance(p, q) -> np.ndarray:
  """Total variation ``½ Σ |p - q|`` over the last axis."""
  return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)


def mixing_time(P: np.ndarray, eps: float = 0.25, pi=None,
                max_steps: int = 2 ** 26) -> int:
  """ε-mixing time: the least t with ``max_x TV(P^t(x, ·), π) <= ε``.

  Doubles ``P^(2^k)`` until it mixes, then binary-searches with the stored
  powers (``O(log t)`` matrix products). Raises if not mixed by max_steps.
  """
  if not 0 < eps < 1:
    raise ValueError(f"eps must be in (0, 1); got eps={eps!r}.")
  pi = stationary_distribution(P) if pi is None else np.asarray(pi)
  dist = lambda M: float(np.max(tv_distance(M, pi[None, :])))
  if dist(np.eye(len(pi))) <= eps:
    return 0
  powers = [np.asarray(P, np.float64)]  # powers[k] = P^(2^k)
  while dist(powers[-1]) > eps:
    if 2 ** len(powers) > max_steps:
      raise ValueError(f"chain not {eps}-mixed after max_steps={max_steps}.")
    powers.append(powers[-1] @ powers[-1])
  if len(powers) == 1:
    return 1
  # P^(2^(K-1)) is not mixed, P^(2^K) is: add lower powers greedily.
  t, M = 2 ** (len(powers) - 2), powers[-2]
  for k in range(len(powers) - 3, -1, -1):
    cand = M @ powers[k]
    if dist(cand) > eps:
      t, M = t + 2 ** k, cand
  return t + 1


# ----------------------------------------------------------------------------
# The α → 0 limit.
# ----------------------------------------------------------------------------


def _gauss_parts(mean, sigma):
  """``(E[g⁺], E[g⁻])`` for ``g ~ N(mean, σ²)``."""
  pos = _psi(mean, sigma, 0.0)
  return pos, pos - mean


def limit_generator(chain: Chain) -> np.ndarray:
  """Generator ``A`` with ``P_α = I + (α/Δ) A + o(α)`` (rows sum to 0).

  From ``w``, coordinate i moves down by Δ at rate ``E[g_i⁺]`` and up at rate
  ``E[g_i⁻]`` (moves out of the window are dropped: the chain clips there).
  """
  states, n = chain.states, len(chain.axis)
  S = len(states)
  idx = np.round((states - chain.lo) / chain.delta).astype(int)
  if chain.example_grads is not None:
    g = np.asarray(chain.example_grads(states[:, 0]))
    pos = np.maximum(g, 0).mean(-1)[:, None]
    neg = np.maximum(-g, 0).mean(-1)[:, None]
  else:
    pos, neg = _gauss_parts(np.asarray(chain.grad(states)), chain.sigma)
  A = np.zeros((S, S))
  strides = [n ** (chain.dim - 1 - i) for i in range(chain.dim)]
  for i in range(chain.dim):
    for rate, shift in ((pos[:, i], -1), (neg[:, i], +1)):
      ok = (idx[:, i] + shift >= 0) & (idx[:, i] + shift < n)
      src = np.nonzero(ok)[0]
      A[src, src + shift * strides[i]] += rate[src]
  A[np.arange(S), np.arange(S)] = -A.sum(1)
  return A


def limit_stationary(chain: Chain) -> np.ndarray:
  """``π_0 = lim_{α→0} π_α``, the null vector of the generator ``A``."""
  A = limit_generator(chain)
  return stationary_distribution(np.eye(len(A)) + A / (
      2 * np.max(np.abs(np.diag(A)))))


# ----------------------------------------------------------------------------
# Simulation with qjax's own quantizer.
# ----------------------------------------------------------------------------


def simulate(chain: Chain, alpha, key, init_index, num_steps: int,
             record_every: int = 0):
  """Runs ``len(init_index)`` independent SR chains in parallel (vmapped).

  Each step draws ``ξ`` and applies ``w ← qjax.round_stochastic(k, w - α(∇f(w)
  + σξ), chain.grid)`` in float32 (or, with ``example_grads``, uses one
  uniformly drawn example's gradient).

  Args:
    chain: the :class:`Chain` (its ``grad`` must accept JAX arrays).
    alpha: step size (traceable).
    key: a ``jax.random`` key.
    init_index: ``[N]`` int state indices (rows of ``chain.states``).
    num_steps: T.
    record_every: if > 0, also return the state indices every this many
      steps (``[T // record_every, N]``).

  Returns:
    ``[N]`` final state indices, and the recorded ``[R, N]`` indices if asked.
  """
  _check_alpha(alpha)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got num_steps={num_steps!r}.")
  grid = chain.grid
  states = jnp.asarray(chain.states, jnp.float32)
  w0 = states[jnp.asarray(init_index)]
  n = len(chain.axis)

  def one_step(w, k):
    k_noise, k_round = jax.random.split(k)
    if chain.example_grads is not None:
      grads = chain.example_grads(w[..., 0])
      i = jax.random.randint(k_noise, w.shape[:1], 0, grads.shape[-1])
      g = jnp.take_along_axis(grads, i[:, None], axis=-1)
    else:
      g = chain.grad(w) + chain.sigma * jax.random.normal(k_noise, w.shape)
    return quantizers.round_stochastic(k_round, w - alpha * g, grid)

  def to_index(w):
    k = jnp.round((w - chain.lo) / chain.delta).astype(jnp.int32)
    strides = jnp.asarray([n ** (chain.dim - 1 - i) for i in range(chain.dim)])
    return jnp.sum(k * strides, axis=-1)

  every = record_every if record_every > 0 else num_steps
  if num_steps % every:
    raise ValueError(f"num_steps must be a multiple of record_every; got "
                     f"{num_steps} and {record_every}.")

  @jax.jit
  def run(key, w0):
    def window(w, k):
      w = jax.lax.fori_loop(
          0, every, lambda t, w: one_step(w, jax.random.fold_in(k, t)), w)
      return w, to_index(w)
    keys = jax.random.split(key, num_steps // every)
    return jax.lax.scan(window, w0, keys)

  w, recorded = run(key, w0)
  final = np.asarray(to_index(w))
  return (final, np.asarray(recorded)) if record_every > 0 else final


def empirical_distribution(indices, num_states: int) -> np.ndarray:
  """Histogram of state indices, normalised to a probability vector."""
  counts = np.bincount(np.asarray(indices).ravel(), minlength=num_states)
  return counts / counts.sum()


def tv_tolerance(p, num_samples: int, confidence: float = 1e-3) -> float:
  """A bound on ``TV(p̂_N, p)`` for N iid samples, exceeded w.p. <= confidence.

  ``E TV <= ½ Σ sqrt(p_k (1 - p_k) / N)`` (Cauchy-Schwarz per cell) and TV has
  bounded differences ``1/N``, so McDiarmid adds ``sqrt(log(1/δ) / (2N))``.
  """
  p = np.asarray(p, np.float64)
  mean = 0.5 * np.sum(np.sqrt(p * (1 - p) / num_samples))
  return float(mean + np.sqrt(np.log(1 / confidence) / (2 * num_samples)))
