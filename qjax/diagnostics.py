"""Diagnostics of quantized training: sign changes, quantization error."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qjax import quantizers

PyTree = Any


def sign_flip_fraction(before: jax.Array, after: jax.Array) -> jax.Array:
  """Fraction of entries whose binary sign (``w >= 0``) differs.

  For BC the latent's sign is the sign of its binarized weight (``Q_d`` maps
  0 to ``+H``), so this is the paper's "% of weights whose sign changed since
  initialization" for BC, SR and R alike (Li et al. 2017, Fig. 4).
  """
  return jnp.mean((before >= 0) != (after >= 0))


def layer_name(path: tuple[str, ...]) -> str:
  """``('Dense_0', 'kernel') -> 'Dense_0/kernel'``."""
  return "/".join(path)


def sign_flip_fractions(before: PyTree, after: PyTree, mask) -> dict:
  """``{layer name: sign_flip_fraction}`` over the masked leaves."""
  mask = quantizers.resolve_mask(mask, before, allow_empty=True)
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = jax.tree.leaves(after)
  flat_mask = jax.tree.leaves(mask)
  return {layer_name(quantizers.path_names(path)): sign_flip_fraction(b, a)
          for (path, b), a, m in zip(flat_before, flat_after, flat_mask) if m}


def quantization_error(w: jax.Array, grid) -> jax.Array:
  """Root-mean-square distance of ``w`` to its nearest grid point."""
  return jnp.sqrt(jnp.mean(jnp.square(w - quantizers.round_nearest(w, grid))))
