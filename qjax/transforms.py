"""Optax transformations that implement the paper's quantized update rules.

Each is the *last* link of an optax chain and needs ``params``:

* :func:`stochastic_rounding` (SR, Li et al. 2017 Eq. 3):
  ``w <- Q_s(w + u)`` where ``u`` is the incoming update (``-α g`` for SGD).
* :func:`nearest_rounding` (R, Eq. 2): ``w <- Q_d(w + u)``.
* :func:`latent_clipping` (BC, Eq. 5): ``w_r <- clip(w_r + u)`` on the float
  latent weights; the forward pass sees ``Q(w_r)`` (see :mod:`qjax.methods`).

Every rounding is explicit here: the emitted update ``δ`` is chosen so that
``optax.apply_updates`` (which computes ``p + δ`` in the parameter's dtype)
lands *exactly* on the rounded value. ``p + (q - p)`` need not equal ``q`` in
floating point (e.g. ``0.1 + (-0.2 - 0.1) != -0.2`` in float32), so the
quantizers snap grids to a power-of-two lattice on which that sum is exact
(:func:`qjax.quantizers.lattice_resolution`), and :func:`exact_delta` emits
``q - p`` with a correction for the cases outside the lattice's exact range.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax import quantizers
from qjax.grid import Grid

PyTree = Any


def exact_delta(p: jax.Array, q: jax.Array) -> jax.Array:
  """Returns ``δ`` (dtype of ``p``) with ``p + δ == q`` in floating point.

  ``q - p`` is off by at most an ulp; each correction step adds the residual
  ``q - (p + δ)`` (exact by Sterbenz's lemma once ``p + δ`` is near ``q``),
  and a final ``nextafter`` nudge settles the rare ties.
  """
  q = q.astype(p.dtype)
  delta = q - p
  for _ in range(2):
    delta = jnp.where(p + delta == q, delta, delta + (q - (p + delta)))
  for _ in range(2):
    towards = jnp.where(p + delta < q, jnp.inf, -jnp.inf).astype(p.dtype)
    delta = jnp.where(p + delta == q, delta, jnp.nextafter(delta, towards))
  return delta


def _require_params(params, name: str) -> None:
  if params is None:
    raise ValueError(
        f"{name} needs the current parameters: call "
        f"tx.update(updates, state, params). It must be the last link of an "
        "optax chain, after the optimizer (e.g. optax.chain(optax.adam(lr), "
        f"qjax.{name}(...))).")


def _check_grid(grid, name: str) -> None:
  if not (isinstance(grid, Grid) or callable(grid)):
    raise TypeError(
        f"{name}: grid must be a qjax.Grid or a callable (path, leaf) -> "
        f"Grid; got {grid!r}.")


def _rounding_update(updates, params, mask, grid, key, round_fn):
  """Shared body of SR and R: δ = exact_delta(p, Q(p + u)) on masked leaves."""
  mask = quantizers.resolve_mask(mask, params)
  grids = quantizers.resolve_grids(grid, params, mask)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  u_leaves = treedef.flatten_up_to(updates)
  keys = (None,) * len(leaves) if key is None else jax.random.split(
      key, len(leaves))
  out = []
  for k, p, u, m, g in zip(keys, leaves, u_leaves, treedef.flatten_up_to(mask),
                           treedef.flatten_up_to(grids)):
    if not m:
      out.append(u)
      continue
    ct = jnp.promote_types(quantizers._compute_dtype(p.dtype), u.dtype)
    target = p.astype(ct) + u.astype(ct)
    q = round_fn(k, target, g, p.dtype)
    out.append(exact_delta(p, q))
  return jax.tree_util.tree_unflatten(treedef, out)


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`: the key for the next draw."""
  key: jax.Array


def _as_key(key, name: str) -> jax.Array:
  if key is None:
    raise ValueError(
        f"{name} draws random numbers and needs a key; got key=None. Pass "
        "key=0 (an int seed) or key=jax.random.key(0).")
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
          or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))):
    raise TypeError(
        f"{name}: key must be an int seed or a jax.random key; got an array "
        f"of dtype {key.dtype} and shape {key.shape}.")
  return key


def stochastic_rounding(grid, key, mask=None
                        ) -> optax.GradientTransformationExtraArgs:
  """SR update rule: after ``apply_updates``, ``w = Q_s(w + u)`` exactly.

  Args:
    grid: a :class:`~qjax.Grid` or ``(path, leaf) -> Grid``.
    key: int seed or ``jax.random`` key; kept in the state and split on every
      update, so two runs from the same key are bit-identical.
    mask: which leaves to round (see :func:`qjax.resolve_mask`); others get
      the incoming update unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  Example:
    >>> tx = optax.chain(optax.adam(1e-2),
    ...                  qjax.stochastic_rounding(qjax.Grid.binary(), key=0))
  """
  _check_grid(grid, "stochastic_rounding")
  key = _as_key(key, "stochastic_rounding")

  def init_fn(params):
    del params
    return StochasticRoundingState(key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "stochastic_rounding")
    next_key, draw_key = jax.random.split(state.key)
    updates = _rounding_update(updates, params, mask, grid, draw_key,
                               quantizers.round_stochastic)
    return updates, StochasticRoundingState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nearest_rounding(grid, mask=None) -> optax.GradientTransformationExtraArgs:
  """R update rule: after ``apply_updates``, ``w = Q_d(w + u)`` exactly.

  R never moves a weight whose ``|u| < Δ/2``: with a small learning rate it
  stalls (Li et al. 2017, Sec. 3).
  """
  _check_grid(grid, "nearest_rounding")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "nearest_rounding")
    round_fn = lambda k, x, g, dtype: quantizers.round_nearest(x, g, dtype)
    return _rounding_update(updates, params, mask, grid, None, round_fn), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def latent_clipping(grid, mask=None, scale_by_grid: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
  """BC update rule on float latent weights: ``w_r <- clip(w_r + s u)``.

  The latent weights stay inside ``[grid.lo, grid.hi]`` (BinaryConnect's
  clip). With ``scale_by_grid`` the update is multiplied by ``1 / H`` with
  ``H = grid.hi`` the layer's binary scale, the per-layer learning-rate scale
  of the original BinaryConnect code.

  Args:
    grid: a bounded Grid or ``(path, leaf) -> Grid``.
    mask: which leaves are latent weights; others pass through unchanged.
    scale_by_grid: scale each masked leaf's update by ``1 / grid.hi``.
  """
  _check_grid(grid, "latent_clipping")
  if isinstance(grid, Grid) and not grid.bounded:
    raise ValueError(
        "latent_clipping needs a bounded grid (lo and hi); got an unbounded "
        f"grid {grid}. Use Grid.binary(scale) or Grid.uniform(step, lo=, hi=).")

  def clip_leaf(p, u, g):
    if not g.bounded:
      raise ValueError(f"latent_clipping: leaf grid {g} has no bounds.")
    ct = jnp.promote_types(quantizers._compute_dtype(p.dtype), u.dtype)
    u = u.astype(ct)
    if scale_by_grid:
      u = u / jnp.asarray(g.hi, ct)
    lo, hi = jnp.asarray(g.lo, p.dtype), jnp.asarray(g.hi, p.dtype)
    new = jnp.clip(p.astype(ct) + u, lo.astype(ct), hi.astype(ct))
    delta = exact_delta(p, new.astype(p.dtype))
    for _ in range(2):  # p + δ may round one ulp past a bound: nudge it in.
      delta = jnp.where(p + delta > hi, jnp.nextafter(delta, -jnp.inf), delta)
      delta = jnp.where(p + delta < lo, jnp.nextafter(delta, jnp.inf), delta)
    return delta

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "latent_clipping")
    mask_tree = quantizers.resolve_mask(mask, params)
    grids = quantizers.resolve_grids(grid, params, mask_tree)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = [clip_leaf(p, u, g) if m else u for p, u, m, g in zip(
        leaves, treedef.flatten_up_to(updates),
        treedef.flatten_up_to(mask_tree), treedef.flatten_up_to(grids))]
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
