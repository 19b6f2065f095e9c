"""Uniform quantization grids.

A grid is the set of points ``offset + k * step`` for integer ``k``, optionally
restricted to ``[lo, hi]``. Every quantizer in qjax takes a :class:`Grid`.

The numeric fields are JAX arrays (or Python floats), never static Python
branches, so a sweep can ``vmap`` over the spacing or the scale without
recompiling. Whether a grid is bounded is part of its pytree structure
(``lo``/``hi`` are ``None`` for an unbounded grid), so it is static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _concrete(value: ArrayLike) -> np.ndarray | None:
  """A numpy copy of a concrete number, or None (traced, placeholder, None).

  Grid fields may be tracers under ``jit``/``vmap`` or arbitrary objects when
  a tree utility rebuilds a Grid; those are not checked here.
  """
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  if not isinstance(value, (int, float, np.ndarray, np.generic, jax.Array)):
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


def _check_fits_float32(what: str, value: ArrayLike, fix: str) -> None:
  """Grid arithmetic runs in float32: ``value`` must not overflow it."""
  concrete = _concrete(value)
  if concrete is None or not np.all(np.isfinite(concrete)):
    return  # non-finite values are reported by the finiteness checks
  if np.any(np.abs(concrete) > _FLOAT32_MAX):
    raise ValueError(
        f"Grid {what} must fit in float32 (|x| <= {_FLOAT32_MAX:.3g}), where "
        f"grid arithmetic runs; got {what}={concrete!r}. {fix}")


def _check_finite(name: str, value: ArrayLike) -> None:
  concrete = _concrete(value)
  if concrete is not None and not np.all(np.isfinite(concrete)):
    raise ValueError(
        f"Grid {name} must be finite; got {name}={concrete!r}. Pass a finite "
        f"number such as {name}=0.0.")


def _check_bounds(lo: ArrayLike | None, hi: ArrayLike | None) -> None:
  if (lo is None) != (hi is None):
    raise ValueError(
        f"Grid bounds must be given together; got lo={lo!r}, hi={hi!r}. "
        "Pass both lo and hi for a bounded grid, or neither.")
  clo, chi = _concrete(lo), _concrete(hi)
  if clo is None or chi is None:
    return
  if not (np.all(np.isfinite(clo)) and np.all(np.isfinite(chi))):
    raise ValueError(
        f"Grid bounds must be finite; got lo={clo!r}, hi={chi!r}. Pass "
        "finite end points, or neither for an unbounded grid.")
  if np.any(clo >= chi):
    raise ValueError(
        f"Grid needs lo < hi; got lo={clo!r}, hi={chi!r}. "
        "Swap them or use a wider range.")
  _check_fits_float32("range hi - lo", chi - clo, "Use a smaller range.")


def _check_bits(bits) -> int:
  """``bits`` as a Python int >= 1: ints, numpy ints, concrete int arrays."""
  concrete = None
  if isinstance(bits, (int, np.integer)) and not isinstance(
      bits, (bool, np.bool_)):
    concrete = int(bits)
  elif (isinstance(bits, (np.ndarray, jax.Array))
        and not isinstance(bits, jax.core.Tracer) and np.ndim(bits) == 0
        and jnp.issubdtype(bits.dtype, jnp.integer)):
    concrete = int(bits)
  if isinstance(bits, jax.core.Tracer):
    raise ValueError(
        f"Grid.kbit needs a static integer bits >= 1 (it fixes the number of "
        f"levels); got a traced value bits={bits}. Pass a Python int, or "
        "sweep the grid's scale instead of its bit count.")
  if concrete is None or concrete < 1:
    raise ValueError(
        f"Grid.kbit needs an integer bits >= 1; got bits={bits!r}. "
        "Use bits=1 for binary, 2 for four levels, and so on.")
  if concrete > 24:
    raise ValueError(
        f"Grid.kbit supports bits <= 24 (float32 grid indices); got "
        f"bits={concrete}. Use bits between 1 and 24.")
  return concrete


def _check_scale(scale: ArrayLike, points_span: float) -> None:
  """A constructor's scale: positive, and its points' span fits float32."""
  _check_positive("scale", scale)
  concrete = _concrete(scale)
  if concrete is not None and np.any(points_span * concrete > _FLOAT32_MAX):
    raise ValueError(
        f"Grid scale is too large: the grid spans {points_span:g} * scale, "
        f"which overflows float32 (max {_FLOAT32_MAX:.3g}); got "
        f"scale={concrete!r}. Use scale <= {_FLOAT32_MAX / points_span:.3g}.")


@dataclasses.dataclass(frozen=True)
class Grid:
  """The points ``offset + k * step``, clipped to ``[lo, hi]`` when bounded.

  Use the constructors :meth:`binary`, :meth:`ternary`, :meth:`kbit` and
  :meth:`uniform` rather than the raw fields. For a bounded grid ``lo`` and
  ``hi`` are themselves grid points. Concrete fields are validated on
  construction (``step`` finite and > 0, ``offset`` finite, ``lo < hi``
  finite, everything within float32's range); traced fields (under ``jit`` or
  ``vmap``) are not, and rebuilding a Grid from its pytree leaves skips the
  checks.

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

  def __post_init__(self):
    # Only concrete values are checked: under jit/vmap the fields are tracers.
    _check_positive("step", self.step)
    _check_fits_float32("step", self.step, "Use a smaller spacing or scale.")
    _check_finite("offset", self.offset)
    _check_fits_float32("offset", self.offset,
                        "Use an offset closer to zero (any grid point works).")
    _check_bounds(self.lo, self.hi)

  @property
  def bounded(self) -> bool:
    return self.lo is not None

  def replace(self, **updates) -> "Grid":
    """A copy with some fields replaced (validated like the constructor)."""
    return dataclasses.replace(self, **updates)

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
    return cls(step=step, offset=offset, lo=lo, hi=hi)

  @classmethod
  def binary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The binary grid ``{-scale, +scale}`` (BinaryConnect, the paper's runs)."""
    _check_scale(scale, points_span=2.0)
    return cls(step=2.0 * jnp.asarray(scale), offset=-jnp.asarray(scale),
               lo=-jnp.asarray(scale), hi=jnp.asarray(scale))

  @classmethod
  def ternary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The ternary grid ``{-scale, 0, +scale}``."""
    _check_scale(scale, points_span=2.0)
    scale = jnp.asarray(scale)
    return cls(step=scale, offset=0.0 * scale, lo=-scale, hi=scale)

  @classmethod
  def kbit(cls, bits: int, scale: ArrayLike = 1.0) -> "Grid":
    """The symmetric ``2**bits``-level grid on ``[-scale, scale]``.

    Points are ``-scale + i * 2 scale / (2**bits - 1)``, ``i = 0..2**bits-1``;
    ``bits=1`` is :meth:`binary`. Zero is a point only for odd level counts,
    i.e. never: use :meth:`uniform` for a grid that contains zero. ``bits``
    is a static integer (a Python or numpy int, or a concrete integer array).
    """
    levels = 2 ** _check_bits(bits)
    _check_scale(scale, points_span=2.0)
    scale = jnp.asarray(scale)
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


_FIELDS = ("step", "offset", "lo", "hi")


def _flatten_with_keys(grid: Grid):
  return tuple((jax.tree_util.GetAttrKey(name), getattr(grid, name))
               for name in _FIELDS), None


def _flatten(grid: Grid):
  return tuple(getattr(grid, name) for name in _FIELDS), None


def _unflatten(aux, children) -> Grid:
  """Rebuilds a Grid without ``__post_init__``.

  JAX rebuilds pytrees with tracers, placeholder objects and whatever a
  ``tree.map`` returns (e.g. ``0`` for an ``in_axes`` tree), so checking
  here would reject valid programs (and would copy every concrete field to
  the host); only explicit construction is validated.
  """
  del aux
  grid = object.__new__(Grid)
  for name, value in zip(_FIELDS, children):
    object.__setattr__(grid, name, value)
  return grid


# ``lo``/``hi`` = None are empty subtrees: boundedness is static structure.
jax.tree_util.register_pytree_with_keys(Grid, _flatten_with_keys, _unflatten,
                                        _flatten)


def contains(x, grid: Grid, dtype=None):
  """Elementwise: is ``x`` exactly a point of ``grid`` (bit for bit)?

  The reference point is the grid point computed the way every qjax quantizer
  computes it (in float32 or wider, then cast to ``x``'s dtype), so a value
  produced by a quantizer always passes.
  """
  from qjax import quantizers  # local import: quantizers depends on grid.
  dtype = dtype or jnp.asarray(x).dtype
  return jnp.asarray(quantizers.round_nearest(x, grid), dtype) == x
