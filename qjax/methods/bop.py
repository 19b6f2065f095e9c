"""Bop: the latent-free binary optimizer (Helwegen et al., NeurIPS 2019).

"Latent weights do not exist": a binary weight has no float latent copy.
Bop keeps an exponential moving average ``m`` of each binary weight's
gradient and flips the weight's sign when the average is large and points
the same way as the weight (so that the step ``-g`` pushes it across zero)::

    m <- (1 - gamma) m + gamma g
    w <- -w   where |m| > threshold and sign(m) == sign(w)

``threshold`` (τ) and ``gamma`` (γ, the adaptivity) are the method's own
hyperparameters, sweepable as arrays. The binary weights are stored as codes
(1 bit each, like SR's); the state adds ``m``, one float32 per binary weight.
Leaves that are not quantized (biases, BatchNorm) get the base optimizer
(Adam or SGD at ``lr``), as Larq's ``CaseOptimizer`` does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax import codes as codes_lib
from qjax import quantizers
from qjax import transforms
from qjax.methods import Method
from qjax.methods import identity_view
from qjax.methods import register

DEFAULTS = {"threshold": 1e-8, "gamma": 1e-4}


class BopState(NamedTuple):
  """The gradient EMA ``m`` of every binary leaf (``None`` elsewhere)."""
  ema: Any


def _selected(mask, params):
  """The resolved mask, with every :class:`~qjax.Codes` leaf selected."""
  return quantizers.resolve_mask_and_codes(mask, params)[1]


def _check_binary(p, grid=None):
  levels = p.grid.levels if codes_lib.is_codes(p) else (
      None if grid is None else grid.levels)
  if levels is not None and levels != 2:
    raise ValueError(f"bop flips signs, so its quantized leaves must be on a "
                     f"binary grid; got a grid with {levels} levels.")


def bop(threshold=DEFAULTS["threshold"], gamma=DEFAULTS["gamma"],
        mask=None, grid=None) -> optax.GradientTransformationExtraArgs:
  """Bop's update rule as an optax transformation.

  The incoming updates of the masked leaves must be raw gradients (put the
  base optimizer of the other leaves under ``optax.masked``, as
  :func:`make_bop` does); unmasked leaves pass their updates through.

  Args:
    threshold: τ, a float or traced array: flip when ``|m| > τ``.
    gamma: γ in (0, 1], a float or traced array: the EMA's adaptivity.
    mask: which leaves are binary (default: the kernels); leaves stored as
      :class:`~qjax.Codes` always are, and must be on a binary grid.
    grid: optional, for float leaves only: checked to be binary.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state :class:`BopState`)
    whose ``update`` needs ``params``. On codes the update flips code bits
    exactly; on float leaves it is ``-2 w`` where a weight flips (exact).
  """
  if isinstance(threshold, (int, float)) and threshold < 0:
    raise ValueError(f"bop: threshold must be >= 0; got {threshold!r}.")
  if isinstance(gamma, (int, float)) and not 0 < gamma <= 1:
    raise ValueError(f"bop: gamma must be in (0, 1]; got {gamma!r}.")

  def init_fn(params):
    selected = _selected(mask, params)
    grids = (None if grid is None else
             quantizers.resolve_grids(grid, params, selected))

    def zeros(_, p, g):
      _check_binary(p, g)
      return jnp.zeros(quantizers.leaf_shape(p), jnp.float32)

    ema = quantizers.map_masked(
        zeros, params, selected,
        grids if grids is not None else jax.tree.map(
            lambda _: None, selected), None)
    ema = jax.tree.map(lambda m, e: e if m else None, selected, ema)
    return BopState(ema=ema)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("bop needs the current parameters: "
                       "tx.update(updates, state, params).")
    selected = _selected(mask, params)
    is_codes = codes_lib.is_codes
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_codes)
    new_updates, new_ema = [], []
    for p, g, m, on in zip(leaves, treedef.flatten_up_to(updates),
                           treedef.flatten_up_to(state.ema),
                           treedef.flatten_up_to(selected)):
      if not on:
        new_updates.append(g)
        new_ema.append(None)
        continue
      _check_binary(p)
      m = (1 - gamma) * m + gamma * jnp.asarray(g, jnp.float32)
      w = codes_lib.decode(p) if is_codes(p) else p
      flip = (jnp.abs(m) > threshold) & (jnp.sign(m) == jnp.sign(w))
      if is_codes(p):
        k = codes_lib.unpack(p)
        new = codes_lib.from_indices(jnp.where(flip, 1 - k, k), p.grid,
                                     p.dtype, batch_ndim=len(p.batch_shape))
        new_updates.append(codes_lib.update(p, new))
      else:
        new_updates.append(transforms.exact_delta(p, jnp.where(flip, -w, w)))
      new_ema.append(m)
    return (jax.tree_util.tree_unflatten(treedef, new_updates),
            BopState(ema=jax.tree_util.tree_unflatten(treedef, new_ema)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@register("bop", label="Bop", eval_mode="stored grid weights",
          stores="binary codes + gradient EMA", hparams=DEFAULTS,
          doc="Bop (Helwegen et al. 2019): latent-free sign flips")
def make_bop(setup) -> Method:
  """Bop on the masked (binary) leaves, the base optimizer elsewhere."""
  mask = setup.mask

  def others(params):
    return jax.tree.map(lambda m: not m, _selected(mask, params))

  tx = optax.chain(optax.masked(setup.base(), others),
                   setup.masked(bop(setup.hparams["threshold"],
                                    setup.hparams["gamma"],
                                    quantizers.all_floats, setup.grid)))
  return Method(setup.label, identity_view, transforms.skip_nonfinite(tx),
                setup.encode, "stored grid weights")
