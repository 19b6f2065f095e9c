"""Diagnostics of quantized training: sign changes, quantization error."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qjax import codes
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


def _masked(params: PyTree, mask):
  """``[(layer name, leaf)]`` of the masked (or codes) leaves, in order."""
  mask = quantizers.resolve_mask(mask, params, allow_empty=True)
  flat = jax.tree_util.tree_flatten_with_path(params,
                                              is_leaf=codes.is_codes)[0]
  flat_mask = jax.tree.leaves(mask)
  return [(layer_name(quantizers.path_names(path)), leaf)
          for (path, leaf), m in zip(flat, flat_mask)
          if m or codes.is_codes(leaf)]


def _signs(leaf) -> jax.Array:
  """``w >= 0`` of a float leaf or of decoded codes."""
  w = codes.decode(leaf) if codes.is_codes(leaf) else leaf
  return w >= 0


def sign_bits(params: PyTree, mask) -> tuple:
  """The signs (``w >= 0``) of the masked leaves, packed 8 per byte.

  One ``uint8`` array per masked leaf (codes count as masked), in tree
  order: 1 bit per weight, what the sign-change diagnostic keeps of the
  initial weights instead of a float copy.
  """
  return tuple(codes.pack_bits(_signs(leaf)) for _, leaf in
               _masked(params, mask))


def sign_flip_fractions(init_signs: tuple, params: PyTree, mask) -> dict:
  """``{layer name: fraction of weights whose sign changed}``.

  Args:
    init_signs: :func:`sign_bits` of the initial parameters.
    params: the current parameters (floats or codes).
    mask: the mask ``init_signs`` was taken with.
  """
  masked = _masked(params, mask)
  if len(masked) != len(init_signs):
    raise ValueError(
        f"sign_flip_fractions: {len(init_signs)} initial sign arrays for "
        f"{len(masked)} masked leaves; take both with the same mask.")
  out = {}
  for (name, leaf), before in zip(masked, init_signs):
    now = _signs(leaf)
    was = codes.unpack_bits(before, now.shape).astype(jnp.bool_)
    out[name] = jnp.mean(was != now)
  return out


def quantization_error(w: jax.Array, grid) -> jax.Array:
  """Root-mean-square distance of ``w`` to its nearest grid point."""
  return jnp.sqrt(jnp.mean(jnp.square(w - quantizers.round_nearest(w, grid))))
