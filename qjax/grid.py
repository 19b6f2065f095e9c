"""Uniform quantization grids.

A grid is the set of points ``offset + k * step`` for integer ``k``, optionally
restricted to ``[lo, hi]``. Every quantizer in qjax takes a :class:`Grid`.

The numeric fields are JAX arrays (or Python floats), never static Python
branches, so a sweep can ``vmap`` over the spacing or the scale without
recompiling. Whether a grid is bounded is part of its pytree structure
(``lo``/``hi`` are ``None`` for an unbounded grid), so it is static.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ArrayLike = Any


def _concrete(value: ArrayLike) -> np.ndarray | None:
  """A numpy copy of ``value``, or None when it is traced (checked later)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(jax.device_get(value), dtype=np.float64)
  except Exception:  # pragma: no cover - exotic array types
    return None


def _check_positive(name: str, value: ArrayLike) -> None:
  concrete = _concrete(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)) or not np.all(concrete > 0):
    raise ValueError(
        f"Grid {name} must be a finite number > 0; got {name}={concrete!r}. "
        f"Pass a positive spacing/scale such as {name}=0.1.")


@struct.dataclass
class Grid:
  """The points ``offset + k * step``, clipped to ``[lo, hi]`` when bounded.

  Use the constructors :meth:`binary`, :meth:`ternary`, :meth:`kbit` and
  :meth:`uniform` rather than the raw fields. For a bounded grid ``lo`` and
  ``hi`` are themselves grid points.

  Attributes:
    step: spacing Δ between neighbouring points (> 0).
    offset: any one grid point; the grid is ``offset + step * Z``.
    lo: smallest point, or None for an unbounded grid.
    hi: largest point, or None for an unbounded grid.
  """

  step: ArrayLike
  offset: ArrayLike = 0.0
  lo: ArrayLike | None = None
  hi: ArrayLike | None = None

  @property
  def bounded(self) -> bool:
    return self.lo is not None

  @classmethod
  def uniform(cls, step: ArrayLike, offset: ArrayLike = 0.0,
              lo: ArrayLike | None = None,
              hi: ArrayLike | None = None) -> "Grid":
    """A grid of spacing ``step`` through ``offset``; bounded if lo/hi given.

    ``lo`` and ``hi`` should themselves be grid points. With neither, the
    grid is unbounded (the paper's ``Δ Z`` in its convex analysis).

    Example:
      >>> g = Grid.uniform(0.1)                     # Δ = 0.1, unbounded
      >>> g = Grid.uniform(0.25, lo=-1.0, hi=1.0)   # 9 points in [-1, 1]
    """
    _check_positive("step", step)
    if (lo is None) != (hi is None):
      raise ValueError(
          f"Grid bounds must be given together; got lo={lo!r}, hi={hi!r}. "
          "Pass both lo and hi for a bounded grid, or neither.")
    if lo is not None:
      clo, chi = _concrete(lo), _concrete(hi)
      if clo is not None and chi is not None:
        if not (np.all(np.isfinite(clo)) and np.all(np.isfinite(chi))):
          raise ValueError(
              f"Grid bounds must be finite; got lo={clo!r}, hi={chi!r}.")
        if np.any(clo >= chi):
          raise ValueError(
              f"Grid needs lo < hi; got lo={clo!r}, hi={chi!r}. "
              "Swap them or use a wider range.")
    return cls(step=step, offset=offset, lo=lo, hi=hi)

  @classmethod
  def binary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The binary grid ``{-scale, +scale}`` (BinaryConnect, the paper's runs)."""
    _check_positive("scale", scale)
    return cls(step=2.0 * jnp.asarray(scale), offset=-jnp.asarray(scale),
               lo=-jnp.asarray(scale), hi=jnp.asarray(scale))

  @classmethod
  def ternary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The ternary grid ``{-scale, 0, +scale}``."""
    _check_positive("scale", scale)
    scale = jnp.asarray(scale)
    return cls(step=scale, offset=0.0 * scale, lo=-scale, hi=scale)

  @classmethod
  def kbit(cls, bits: int, scale: ArrayLike = 1.0) -> "Grid":
    """The symmetric ``2**bits``-level grid on ``[-scale, scale]``.

    Points are ``-scale + i * 2 scale / (2**bits - 1)``, ``i = 0..2**bits-1``;
    ``bits=1`` is :meth:`binary`. Zero is a point only for odd level counts,
    i.e. never: use :meth:`uniform` for a grid that contains zero.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
      raise ValueError(
          f"Grid.kbit needs an integer bits >= 1; got bits={bits!r}. "
          "Use bits=1 for binary, 2 for four levels, and so on.")
    if bits > 24:
      raise ValueError(
          f"Grid.kbit supports bits <= 24 (float32 grid indices); got "
          f"bits={bits}.")
    _check_positive("scale", scale)
    scale = jnp.asarray(scale)
    levels = 2 ** bits
    return cls(step=2.0 * scale / (levels - 1), offset=-scale, lo=-scale,
               hi=scale)

  def point(self, k, dtype=jnp.float32):
    """The ideal grid point ``offset + k * step`` (``k`` a float array)."""
    return jnp.asarray(self.offset, dtype) + k * jnp.asarray(self.step, dtype)

  def num_points(self) -> int | float:
    """How many points a bounded grid has (``math.inf`` if unbounded)."""
    if not self.bounded:
      return math.inf
    step = float(self.step)
    return int(round((float(self.hi) - float(self.lo)) / step)) + 1


def contains(x, grid: Grid, dtype=None):
  """Elementwise: is ``x`` exactly a point of ``grid`` (bit for bit)?

  The reference point is the grid point computed the way every qjax quantizer
  computes it (in float32 or wider, then cast to ``x``'s dtype), so a value
  produced by a quantizer always passes.
  """
  from qjax import quantizers  # local import: quantizers depends on grid.
  dtype = dtype or jnp.asarray(x).dtype
  return jnp.asarray(quantizers.round_nearest(x, grid), dtype) == x
