"""Quantization grids, exactly as asked for.

A :class:`Grid` is the set of points ``offset + k * step``: ``k = 0 ..
levels - 1`` for a bounded grid (binary, ternary, k-bit, uniform on
``[lo, hi]``), every integer ``k`` for an unbounded one (the paper's ``ΔZ``).
``offset`` and ``step`` are exact rational numbers (:class:`fractions.Fraction`;
a float argument means the shortest decimal that round-trips to it, so
``0.1`` is ``1/10``), and nothing ever moves a grid to make arithmetic
convenient.

Stored points. In a floating-point dtype (float32, bfloat16, float16) point
``k`` of a bounded grid is the dtype value nearest to the exact real number
``offset + k * step`` (ties to even), computed once on the host in exact
integer arithmetic (:func:`values`). So a point the dtype can represent
(``1.0``, ``0.5``) is exactly that value, a symmetric grid is exactly
symmetric, and ``kbit(b)`` has exactly ``2**b`` distinct levels in every
dtype that can hold them (otherwise: a clear error). Every rounding decision
against these points is made by comparisons with precomputed float32
thresholds, so it is the same bits eagerly, under ``jit`` and ``vmap`` and on
every backend.

Traced sizes. A sweep that varies a grid's size (its scale or Δ) without
recompiling multiplies a static grid by a traced ``scale``
(:meth:`Grid.scaled`): the points are then
``fl_dtype(fl32(values32[k] * scale))``, i.e. the float32 table value times
the scale rounded once to float32, then to the storage dtype. ``values32[k]``
is itself a float32 rounding of the exact point, so a point is within two
float32 roundings (below ``2**-23`` relative; exactly ``fl32(scale)`` times
a point that float32 represents, such as ``+-1``), plus the storage dtype's
own rounding, of the exact ``scale * (offset + k * step)``, and still
exactly symmetric for a symmetric grid (negation is exact).

Unbounded grids have no table: point ``k`` is ``fl32(o + k * d)`` with
``o = fl32(offset) * scale``,
``d = fl32(step) * scale`` (each rounded to float32) and ``k * d`` formed
from four exact partial products (:func:`_times`: within ``1.001`` ulp of
the exact product, and never fused into a multiply-add), then rounded to
the storage dtype; within about three float32 roundings of the exact point.
The scale is the grid's only pytree leaf; everything else is static.

Fused multiply-adds. XLA (CPU and GPU) contracts a product that feeds an
addition into one FMA under ``jit``, but not eagerly, so a rounded product
that is later added or subtracted would give different bits in different
programs. Points never let that happen: a scaled table is computed into
its own buffer (:func:`_materialize`) before any arithmetic on it, and the
products of unbounded grids are exact. (Arithmetic of the caller that
feeds an update into these functions, e.g. ``-lr * g``, can still be
contracted by XLA into the caller's own FMA; identical update arrays give
identical decisions.)
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

ArrayLike = Any

MAX_LEVELS = 2**16
"""The most levels a bounded grid may have (codes are at most ``uint16``)."""

# Grid points and spacings below this magnitude are refused: float32
# denormals are flushed to zero by some backends (XLA:CPU compares them as 0),
# so arithmetic near them would depend on the program.
_MIN_MAGNITUDE = Fraction(2)**-96

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
F32_TINY = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------
# Exact host-side numbers.
# ----------------------------------------------------------------------------


def exact(name: str, value: Any, where: str) -> Fraction:
  """``value`` as an exact rational number.

  A Python float (or a numpy float32/float16/float64) means the shortest
  decimal that round-trips to it, so ``0.1`` is ``1/10``; ints, strings
  (``"0.1"``, ``"1/10"``), ``Decimal`` and ``Fraction`` are taken as they
  are; other floats (bfloat16 scalars) by their exact binary value.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{where} needs a concrete {name} (the grid's points are computed "
        f"exactly on the host); got a traced value {name}={value}. Build the "
        "grid outside jit/vmap with a Python number, and sweep its size with "
        "grid.scaled(s), which may be traced.")
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    value = np.asarray(value)[()]
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{where}: {name} must be a number; got {name}={value!r}.")
  try:
    if isinstance(value, Fraction):
      q = value
    elif isinstance(value, (int, np.integer)):
      q = Fraction(int(value))
    elif isinstance(value, str):
      q = Fraction(value.strip())
    elif isinstance(value, decimal.Decimal):
      if not value.is_finite():
        raise ValueError
      q = Fraction(value)
    elif isinstance(value, (float, np.float64, np.float32, np.float16)):
      if not math.isfinite(float(value)):
        raise ValueError
      q = Fraction(np.format_float_positional(value, unique=True, trim="0"))
    elif (isinstance(value, numbers.Real) or
          (isinstance(value, np.generic)
           and jnp.issubdtype(value.dtype, jnp.floating))):
      if not math.isfinite(float(value)):
        raise ValueError
      q = Fraction(float(value))
    else:
      raise TypeError
  except (ValueError, TypeError, ZeroDivisionError, OverflowError):
    raise ValueError(
        f"{where}: {name} must be a finite real number (a Python or numpy "
        f"number, a decimal string or a Fraction); got {name}={value!r}."
    ) from None
  return q


def _format(dtype: np.dtype) -> tuple[int, int, Fraction]:
  """(significand bits incl. the implicit one, min normal exponent, max)."""
  info = ml_dtypes.finfo(dtype)
  return info.nmant + 1, int(info.minexp), Fraction(float(info.max))


def _round_magnitude(num: int, den: int, precision: int, emin: int,
                     mode: str) -> float:
  """The binary float nearest to ``num / den >= 0`` (exact integer maths).

  Args:
    num, den: the rational number, ``num >= 0``, ``den > 0``.
    precision: significand bits (24 for float32, 8 bf16, 11 f16).
    emin: exponent of the smallest normal number (subnormals below it).
    mode: ``"even"`` (nearest, ties to even), ``"floor"`` or ``"ceil"``.

  Returns:
    The result as a Python float (exact; no overflow check).
  """
  if num == 0:
    return 0.0
  e = num.bit_length() - den.bit_length()
  if (num << -e if e < 0 else num) < (den << e if e > 0 else den):
    e -= 1  # now 2**e <= num/den < 2**(e+1)
  quantum = max(e, emin) - (precision - 1)
  if quantum <= 0:
    m, r = divmod(num << -quantum, den)
  else:
    m, r = divmod(num, den << quantum)
  rem_den = den if quantum <= 0 else den << quantum
  if mode == "even":
    if 2 * r > rem_den or (2 * r == rem_den and m % 2):
      m += 1
  elif mode == "ceil":
    m += r != 0
  return math.ldexp(m, quantum)


def round_to(q: Fraction, dtype: np.dtype, mode: str = "even") -> float:
  """``q`` rounded to ``dtype`` (``even``: nearest; or ``floor``/``ceil``)."""
  precision, emin, _ = _format(dtype)
  if q < 0:
    flip = {"even": "even", "floor": "ceil", "ceil": "floor"}[mode]
    return -_round_magnitude(-q.numerator, q.denominator, precision, emin,
                             flip)
  return _round_magnitude(q.numerator, q.denominator, precision, emin, mode)


def _fmt(q: Fraction) -> str:
  return f"{float(q):.9g}"


def check_dtype(dtype, where: str) -> np.dtype:
  """``dtype`` as one of the supported storage dtypes, or a clear error."""
  try:
    dt = np.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or dt.name not in DTYPES:
    raise ValueError(
        f"{where}: the storage dtype must be one of {', '.join(DTYPES)}; got "
        f"dtype={dtype!r}.")
  return DTYPES[dt.name]


def _check_levels(levels, where: str) -> int:
  if (not isinstance(levels, (int, np.integer))
      or isinstance(levels, (bool, np.bool_))):
    raise ValueError(
        f"{where}: levels must be an integer between 2 and {MAX_LEVELS}; got "
        f"levels={levels!r}.")
  levels = int(levels)
  if not 2 <= levels <= MAX_LEVELS:
    raise ValueError(
        f"{where}: levels must be between 2 and {MAX_LEVELS} (codes are at "
        f"most uint16); got levels={levels}.")
  return levels


def _check_bits(bits) -> int:
  if isinstance(bits, jax.core.Tracer):
    raise ValueError(
        f"kbit: bits must be a static Python int between 1 and 16, not a "
        f"traced value; got bits={bits}. The number of levels fixes the "
        "grid's table and its codes' dtype: build the grid outside jit/vmap "
        "(one compiled program per bit width).")
  concrete = None
  if isinstance(bits, (int, np.integer)) and not isinstance(
      bits, (bool, np.bool_)):
    concrete = int(bits)
  elif (isinstance(bits, (np.ndarray, jax.Array))
        and not isinstance(bits, jax.core.Tracer) and np.ndim(bits) == 0
        and np.issubdtype(bits.dtype, np.integer)):
    concrete = int(bits)
  if concrete is None or not 1 <= concrete <= 16:
    raise ValueError(
        f"kbit: bits must be an integer between 1 and 16 (2**bits levels, "
        f"at most {MAX_LEVELS}); got bits={bits!r}. Use bits=1 for binary, "
        "2 for four levels, and so on.")
  return concrete


def _positive(name: str, value, where: str) -> Fraction:
  q = exact(name, value, where)
  if q <= 0:
    raise ValueError(
        f"{where}: {name} must be > 0; got {name}={value!r}. Pass a positive "
        f"{name} such as {name}=1.0.")
  return q


def _check_scale_value(scale):
  """A concrete scale must be a positive finite number; tracers pass."""
  if scale is None or isinstance(scale, jax.core.Tracer):
    return scale
  if not isinstance(scale, (int, float, np.ndarray, np.generic, jax.Array)):
    return scale  # a placeholder from a tree utility
  value = np.asarray(jax.device_get(scale), np.float64)
  if value.shape != ():
    raise ValueError(
        f"Grid.scaled: the scale must be one number (a scalar); got shape "
        f"{value.shape}. For one scale per lane of a sweep, vmap over them.")
  if not (np.isfinite(value) and value > 0
          and value <= float(np.finfo(np.float32).max)):
    raise ValueError(
        f"Grid.scaled: the scale must be a finite number > 0 that fits "
        f"float32; got scale={float(value)!r}.")
  return jnp.asarray(scale, jnp.float32)


# ----------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
class Grid:
  """The points ``offset + k * step``; ``k < levels`` when bounded.

  Use the constructors :meth:`binary`, :meth:`ternary`, :meth:`kbit` and
  :meth:`uniform`. ``offset`` (the lowest point of a bounded grid, code 0)
  and ``step`` (Δ > 0) are exact :class:`fractions.Fraction` numbers;
  ``levels`` is the number of points (``None``: unbounded, ``k`` any
  integer). ``scale`` is an optional multiplier of every point, a float32
  scalar that may be traced (a swept hyperparameter); see the module
  docstring for the precision of scaled points.

  A grid is a pytree whose only leaf is ``scale`` (none when unscaled); the
  rest is static. Grids compare equal when their static fields are equal
  and their scales are both absent, or concrete and equal.

  Example:
    >>> Grid.uniform(0.1, lo=0, hi=1).levels
    11
    >>> values(Grid.kbit(2))
    array([-1.        , -0.33333334,  0.33333334,  1.        ], dtype=float32)
  """

  __slots__ = ("offset", "step", "levels", "scale")

  def __init__(self, offset, step, levels: int | None = None, scale=None):
    where = "Grid"
    offset = exact("offset", offset, where)
    step = _positive("step", step, where)
    if levels is not None:
      levels = _check_levels(levels, where)
    if step < _MIN_MAGNITUDE:
      raise ValueError(
          f"{where}: step {_fmt(step)} is below the smallest supported "
          f"spacing 2**-96 ({_fmt(_MIN_MAGNITUDE)}). Use a larger step.")
    limit = Fraction(float(np.finfo(np.float32).max))
    span = [offset] if levels is None else [offset,
                                            offset + (levels - 1) * step]
    if levels is None:
      span.append(step)
    if max(abs(v) for v in span) > limit:
      raise ValueError(
          f"{where}: the grid's points (offset {_fmt(offset)}, step "
          f"{_fmt(step)}) must fit float32 (|x| <= {float(limit):.3g}). Use "
          "a smaller scale or range.")
    object.__setattr__(self, "offset", offset)
    object.__setattr__(self, "step", step)
    object.__setattr__(self, "levels", levels)
    object.__setattr__(self, "scale", _check_scale_value(scale))
    if levels is not None:
      _tables(offset, step, levels, "float32")  # validates in float32

  def __setattr__(self, name, value):
    raise AttributeError(f"Grid is immutable: cannot set {name!r}.")

  def __reduce__(self):  # pickling and copying rebuild from the pytree parts
    children, aux = self.tree_flatten_with_keys()
    return (_rebuild, (aux, tuple(c for _, c in children)))

  def __copy__(self):
    return self

  def __deepcopy__(self, memo):
    return self

  # -- pytree ----------------------------------------------------------------

  def tree_flatten_with_keys(self):
    children = (() if self.scale is None else
                ((jax.tree_util.GetAttrKey("scale"), self.scale),))
    return children, (self.offset, self.step, self.levels,
                      self.scale is not None)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks: tree utilities rebuild pytrees with placeholders as leaves.
    obj = object.__new__(cls)
    offset, step, levels, has_scale = aux
    object.__setattr__(obj, "offset", offset)
    object.__setattr__(obj, "step", step)
    object.__setattr__(obj, "levels", levels)
    object.__setattr__(obj, "scale", children[0] if has_scale else None)
    return obj

  # -- constructors ----------------------------------------------------------

  @classmethod
  def binary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The binary grid ``{-scale, +scale}`` (BinaryConnect, the paper's runs).

    Codes: 0 is ``-scale``, 1 is ``+scale`` (stored 8 per byte).

    Example:
      >>> values(Grid.binary(0.5))
      array([-0.5,  0.5], dtype=float32)
    """
    s = _positive("scale", scale, "Grid.binary")
    return cls(offset=-s, step=2 * s, levels=2)

  @classmethod
  def ternary(cls, scale: ArrayLike = 1.0) -> "Grid":
    """The ternary grid ``{-scale, 0, +scale}`` (codes 0, 1, 2)."""
    s = _positive("scale", scale, "Grid.ternary")
    return cls(offset=-s, step=s, levels=3)

  @classmethod
  def kbit(cls, bits: int, scale: ArrayLike = 1.0) -> "Grid":
    """The symmetric ``2**bits``-level grid spanning ``[-scale, scale]``.

    Points ``-scale + k * 2 scale / (2**bits - 1)``, ``k = 0 .. 2**bits-1``
    (zero is never a point; use :meth:`uniform` for a grid through zero).
    ``bits`` is a static integer 1..16; ``bits=1`` is :meth:`binary`.
    """
    levels = 2**_check_bits(bits)
    s = _positive("scale", scale, "Grid.kbit")
    return cls(offset=-s, step=2 * s / (levels - 1), levels=levels)

  @classmethod
  def uniform(cls, step: ArrayLike, lo: ArrayLike | None = None,
              hi: ArrayLike | None = None, *,
              offset: ArrayLike | None = None) -> "Grid":
    """Spacing ``step``: the points ``lo, lo + step, ..., hi``, or unbounded.

    Bounded (``lo`` and ``hi``): ``hi - lo`` must be a whole number of steps
    (``hi`` may miss ``lo + n * step`` by at most ``1e-9`` steps, float noise
    such as ``3 * 0.1``; the top point is then ``lo + n * step``).
    Unbounded (neither): the points ``offset + step * Z`` (``offset``
    default 0), the paper's ``ΔZ``.

    Example:
      >>> Grid.uniform(0.25, lo=-0.5, hi=0.75).levels
      6
      >>> Grid.uniform(0.1).bounded
      False
    """
    where = "Grid.uniform"
    step_q = _positive("step", step, where)
    if (lo is None) != (hi is None):
      raise ValueError(
          f"{where}: pass both lo and hi for a bounded grid, or neither for "
          f"an unbounded one; got lo={lo!r}, hi={hi!r}.")
    if lo is None:
      off = Fraction(0) if offset is None else exact("offset", offset, where)
      return cls(offset=off, step=step_q, levels=None)
    if offset is not None:
      raise ValueError(
          f"{where}: a bounded grid starts at lo; pass lo and hi without "
          f"offset (got offset={offset!r}).")
    lo_q, hi_q = exact("lo", lo, where), exact("hi", hi, where)
    if not lo_q < hi_q:
      raise ValueError(
          f"{where}: need lo < hi; got lo={lo!r}, hi={hi!r}. Swap them or "
          "widen the range.")
    n = (hi_q - lo_q) / step_q
    whole = round(n)
    if abs(n - whole) > Fraction(1, 10**9):
      raise ValueError(
          f"{where}: hi - lo must be a whole number of steps; got lo={lo!r}, "
          f"hi={hi!r}, step={step!r}, i.e. {float(n):.6g} steps. Pass e.g. "
          f"hi={_fmt(lo_q + max(math.floor(n), 1) * step_q)} or "
          f"hi={_fmt(lo_q + math.ceil(n) * step_q)}.")
    if whole + 1 > MAX_LEVELS:
      raise ValueError(
          f"{where}: the grid has {whole + 1} levels (lo={lo!r}, hi={hi!r}, "
          f"step={step!r}); at most {MAX_LEVELS} are supported (uint16 "
          "codes). Use a larger step or a narrower range, or an unbounded "
          "grid.")
    return cls(offset=lo_q, step=step_q, levels=whole + 1)

  # -- derived ---------------------------------------------------------------

  @property
  def bounded(self) -> bool:
    return self.levels is not None

  def scaled(self, scale) -> "Grid":
    """This grid with every point multiplied by ``scale`` (may be traced).

    ``scale`` is a positive float32 scalar; under ``jit``/``vmap`` it may be
    a tracer, which is how a sweep varies the grid's size without
    recompiling. Scaling a scaled grid multiplies the scales (in float32).
    """
    if self.scale is not None:
      scale = jnp.asarray(self.scale, jnp.float32) * jnp.asarray(
          scale, jnp.float32)
    obj = Grid.tree_unflatten((self.offset, self.step, self.levels, True),
                              (_check_scale_value(scale),))
    return obj

  def unscaled(self) -> "Grid":
    """The static grid without its scale."""
    return Grid.tree_unflatten((self.offset, self.step, self.levels, False),
                               ())

  def point(self, k: int) -> Fraction:
    """The exact (unrounded, unscaled) point ``offset + k * step``."""
    return self.offset + k * self.step

  def num_points(self) -> int | float:
    """How many points the grid has (``math.inf`` if unbounded)."""
    return math.inf if self.levels is None else self.levels

  @property
  def lo(self) -> float | None:
    """The lowest stored float32 point (unscaled), or None if unbounded."""
    return None if self.levels is None else float(values(self)[0])

  @property
  def hi(self) -> float | None:
    """The highest stored float32 point (unscaled), or None if unbounded."""
    return None if self.levels is None else float(values(self)[-1])

  def _static(self):
    return (self.offset, self.step, self.levels)

  def __eq__(self, other):
    if not isinstance(other, Grid) or self._static() != other._static():
      return False
    if self.scale is None or other.scale is None:
      return self.scale is None and other.scale is None
    if isinstance(self.scale, jax.core.Tracer) or isinstance(
        other.scale, jax.core.Tracer):
      return self.scale is other.scale
    return bool(np.array_equal(np.asarray(self.scale), np.asarray(other.scale)))

  def __hash__(self):
    return hash(self._static())

  def __repr__(self) -> str:
    scale = "" if self.scale is None else f", scale={self.scale}"
    if self.levels is None:
      return f"Grid(offset={self.offset}, step={self.step}, unbounded{scale})"
    return (f"Grid(offset={self.offset}, step={self.step}, "
            f"levels={self.levels}{scale})")


def _rebuild(aux, children) -> Grid:
  return Grid.tree_unflatten(aux, children)


# ----------------------------------------------------------------------------
# Host-side tables of bounded grids.
# ----------------------------------------------------------------------------


class Tables:
  """A bounded grid's points in one storage dtype, and its thresholds.

  Attributes:
    values: the points in the storage dtype (read-only).
    values32: the same values in float32 (exact).
    thresholds: float32[levels - 1], the smallest float32 >= the exact
      midpoint between values k and k+1: round-to-nearest (ties up) is
      ``code > k iff x >= thresholds[k]``.
    half_up: float32[levels], the smallest float32 >= half the gap from
      value k to value k+1 (``inf`` at the top): R moves a weight up iff its
      update is at least this.
    half_down: float32[levels], the same towards value k-1 (``inf`` at 0).
  """

  def __init__(self, values, values32, thresholds, half_up, half_down):
    self.values, self.values32, self.thresholds = values, values32, thresholds
    self.half_up, self.half_down = half_up, half_down


def _ceil_f32(q: Fraction) -> float:
  return round_to(q, DTYPES["float32"], "ceil")


@functools.lru_cache(maxsize=1024)
def _tables(offset: Fraction, step: Fraction, levels: int,
            dtype_name: str) -> Tables:
  dtype = DTYPES[dtype_name]
  desc = f"Grid(offset={offset}, step={step}, levels={levels})"
  _, _, dmax = _format(dtype)
  lo_q, hi_q = offset, offset + (levels - 1) * step
  if max(abs(lo_q), abs(hi_q)) > dmax:
    raise ValueError(
        f"{desc} spans [{_fmt(lo_q)}, {_fmt(hi_q)}], beyond {dtype.name}'s "
        f"largest finite value {_fmt(dmax)}. Use a smaller scale or range, "
        "or a wider dtype (float32).")
  # Exact points (a + k b) / d with one common denominator d.
  d = math.lcm(offset.denominator, step.denominator)
  a = offset.numerator * (d // offset.denominator)
  b = step.numerator * (d // step.denominator)
  precision, emin, _ = _format(dtype)
  out = np.empty(levels, np.float64)
  for k in range(levels):
    n = a + k * b
    if n < 0:
      out[k] = -_round_magnitude(-n, d, precision, emin, "even")
    else:
      out[k] = _round_magnitude(n, d, precision, emin, "even")
  gaps = np.diff(out)
  if not np.all(gaps > 0):
    k = int(np.argmin(gaps > 0))
    raise ValueError(
        f"{dtype.name} cannot represent the {levels} distinct points of "
        f"{desc}: points {k} and {k + 1} ({_fmt(offset + k * step)} and "
        f"{_fmt(offset + (k + 1) * step)}) both round to {float(out[k])!r} "
        f"({dtype.name} has {precision} significant bits). Use fewer levels, "
        "a larger step, or a wider dtype (float16 or float32).")
  nonzero = np.abs(out[out != 0])
  if nonzero.min() < 2.0**-96 or gaps.min() < 2.0**-96:
    raise ValueError(
        f"{desc}: points or gaps below 2**-96 ({_fmt(_MIN_MAGNITUDE)}) are "
        "not supported (float32 denormals behave differently on different "
        "backends). Use a larger scale or offset.")
  table = out.astype(dtype)
  assert np.array_equal(table.astype(np.float64), out)
  values32 = out.astype(np.float32)
  exact_v = [Fraction(float(v)) for v in out]
  thresholds = np.array([_ceil_f32((exact_v[k] + exact_v[k + 1]) / 2)
                         for k in range(levels - 1)], np.float32)
  halves = np.array([_ceil_f32((exact_v[k + 1] - exact_v[k]) / 2)
                     for k in range(levels - 1)], np.float32)
  half_up = np.append(halves, np.float32(np.inf)).astype(np.float32)
  half_down = np.insert(halves, 0, np.float32(np.inf)).astype(np.float32)
  for arr in (table, values32, thresholds, half_up, half_down):
    arr.setflags(write=False)
  return Tables(table, values32, thresholds, half_up, half_down)


def tables(grid: Grid, dtype=np.float32) -> Tables:
  """The :class:`Tables` of a bounded grid in ``dtype`` (cached)."""
  if not isinstance(grid, Grid):
    raise TypeError(
        f"Expected a qjax.Grid; got {type(grid).__name__}. Build one with "
        "Grid.binary(), Grid.ternary(), Grid.kbit(k) or Grid.uniform(step).")
  if grid.levels is None:
    raise ValueError(
        f"{grid!r} is unbounded and has no value table; use a bounded grid "
        "(e.g. Grid.uniform(step, lo=-1, hi=1)).")
  dtype = check_dtype(dtype, "Grid")
  return _tables(grid.offset, grid.step, grid.levels, dtype.name)


def values(grid: Grid, dtype=np.float32) -> np.ndarray:
  """The points of a bounded grid as stored in ``dtype`` (unscaled).

  ``values(grid, dtype)[k]`` is the ``dtype`` value nearest to the exact
  real number ``offset + k * step`` (ties to even), computed on the host in
  exact integer arithmetic. Strictly increasing; a symmetric grid's table is
  exactly symmetric.

  Example:
    >>> float(values(Grid.uniform(0.1, lo=0, hi=1), jnp.bfloat16)[-1])
    1.0
  """
  return tables(grid, dtype).values


def check_grid(grid, where: str) -> Grid:
  if not isinstance(grid, Grid):
    raise TypeError(
        f"{where}: expected a qjax.Grid (e.g. Grid.binary(1.0), "
        f"Grid.uniform(0.1)); got {type(grid).__name__}.")
  return grid


# ----------------------------------------------------------------------------
# Rounding decisions on the device.
# ----------------------------------------------------------------------------


def as_float32(x, where: str) -> jax.Array:
  """``x`` in float32, with float32 denormals set to zero explicitly.

  XLA:CPU flushes denormals in comparisons; flushing them ourselves makes
  every decision the same on every backend. bf16 and f16 inputs convert to
  float32 losslessly.
  """
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating)
          or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(
        f"{where} expects a real (float or integer) array; got dtype "
        f"{x.dtype}.")
  x = x.astype(jnp.float32)
  return jnp.where(jnp.abs(x) < F32_TINY, jnp.float32(0), x)


# Grids with at most this many points look values up by selects, not gathers.
SELECT_LEVELS = 8


class Points:
  """A grid's stored points on the device, and the decisions against them.

  Indices are int32 codes ``0 .. levels - 1`` for a bounded grid and
  integer-valued float32 numbers for an unbounded one. Every method is a
  pure function of arrays, safe under ``jit`` and ``vmap``.

  Args:
    grid: the :class:`Grid` (its scale may be traced).
    dtype: the storage dtype of the points.
  """

  def __init__(self, grid: Grid, dtype):
    self.grid = check_grid(grid, "Points")
    self.dtype = check_dtype(dtype, "Points")
    self.bounded = grid.bounded
    f32 = jnp.float32
    scale = None if grid.scale is None else jnp.asarray(grid.scale, f32)
    if scale is not None and scale.ndim:
      raise ValueError(
          f"Points: the grid's scale has shape {scale.shape} (one scale per "
          "lane of a sweep?); it must be a scalar here. jax.vmap over the "
          "lanes, as qjax.codes.decode does for stacked codes.")
    if self.bounded:
      t = tables(grid, self.dtype)
      self.levels = grid.levels
      if scale is None:
        self.v = jnp.asarray(t.values32)
        self.thr = jnp.asarray(t.thresholds)
        self.hu = jnp.asarray(t.half_up)
        self.hd = jnp.asarray(t.half_down)
      else:
        base = jnp.asarray(tables(grid, np.float32).values32)
        # Materialised before any arithmetic on it: a contracted
        # fl(base * scale) - x would differ between programs.
        self.v = _materialize((base * scale).astype(self.dtype).astype(f32))
        # Midpoints: halving is exact, the sum rounds once.
        self.thr = self.v[:-1] * 0.5 + self.v[1:] * 0.5
        halves = (self.v[1:] - self.v[:-1]) * 0.5
        inf = jnp.full((1,), jnp.inf, f32)
        self.hu = jnp.concatenate([halves, inf])
        self.hd = jnp.concatenate([inf, halves])
      # Arithmetic first guess of an index (corrected by comparisons).
      self.o = self.v[0]
      self.d = (self.v[-1] - self.v[0]) / (self.levels - 1)
    else:
      o = f32(round_to(grid.offset, DTYPES["float32"]))
      d = f32(round_to(grid.step, DTYPES["float32"]))
      if scale is None:
        self.o, self.d = jnp.asarray(o, f32), jnp.asarray(d, f32)
      else:
        # Materialised: their products with the scale must not be fused
        # into the additions of value().
        od = _materialize(jnp.stack([o * scale, d * scale], axis=-1))
        self.o, self.d = od[..., 0], od[..., 1]

  # -- values ----------------------------------------------------------------

  def value(self, k) -> jax.Array:
    """Point ``k`` as stored, returned in float32 (exact)."""
    if self.bounded:
      return self._lookup(self.v, k)
    # k * d from exact partial products (see _times), so that no FMA
    # contraction can change the sum: the same bits in every program.
    return (self.o + _times(k, self.d)).astype(self.dtype).astype(
        jnp.float32)

  def _lookup(self, table, k) -> jax.Array:
    """``table[clip(k)]``: a chain of selects on a small grid, else a gather.

    XLA:CPU emits a gather inside an elementwise loop as one scalar load per
    element; up to :data:`SELECT_LEVELS` entries a chain of ``where`` is
    the same values, vectorized (SR's decision for a 784x512 binary leaf
    measured 2.35 ms with gathers against 0.36 ms, a one-off measurement
    not kept as a benchmark).
    """
    n = table.shape[-1]
    if n > SELECT_LEVELS:
      return jnp.take(table, k, mode="clip")
    out = jnp.broadcast_to(table[0], jnp.shape(k))
    for j in range(1, n):
      out = jnp.where(k >= j, table[j], out)
    return out

  def clip(self, k):
    if not self.bounded:
      return k
    return jnp.clip(k, 0, self.levels - 1)

  def _guess(self, x, rounding):
    k = rounding((x - self.o) / self.d)
    if not self.bounded:
      return jnp.where(jnp.isfinite(k), k, 0.0)
    k = jnp.where(jnp.isnan(k), 0.0, jnp.clip(k, 0, self.levels - 1))
    return k.astype(jnp.int32)

  # -- decisions -------------------------------------------------------------

  def nearest(self, x) -> jax.Array:
    """Index of the stored point nearest to float32 ``x`` (ties upwards).

    Bounded grids: exact, by comparisons with the precomputed thresholds
    (values beyond the ends give the end codes; NaN gives code 0).
    Unbounded grids: the nearer of the two computed points around ``x``.
    """
    if self.bounded:
      if self.levels <= 8:
        k = jnp.sum(x[..., None] >= self.thr, axis=-1, dtype=jnp.int32)
      else:
        k = self._guess(x, jnp.round)
        top = self.levels - 1
        for _ in range(2):
          up = (k < top) & (x >= self._lookup(self.thr, k))
          k = jnp.where(up, k + 1, k)
          down = (k > 0) & (x < self._lookup(self.thr, k - 1))
          k = jnp.where(down, k - 1, k)
      return jnp.where(jnp.isnan(x), 0, k)
    k = self.bracket(x)
    lower, upper = self.value(k), self.value(k + 1)
    return jnp.where(upper - x <= x - lower, k + 1, k)

  def bracket(self, x) -> jax.Array:
    """``k`` with ``value(k) <= x < value(k + 1)``.

    Bounded grids clip ``k`` to ``[0, levels - 2]`` (so ``x`` beyond the
    ends is outside its bracket).
    """
    if self.bounded and self.levels <= SELECT_LEVELS:
      # Exact by comparisons with the inner points (NaN compares False: 0).
      k = jnp.zeros(jnp.shape(x), jnp.int32)
      for j in range(1, self.levels - 1):
        k = k + (x >= self.v[j]).astype(jnp.int32)
      return k
    k = self._guess(x, jnp.floor)
    if self.bounded:
      k = jnp.minimum(k, self.levels - 2)
    for _ in range(2):
      up = x >= self.value(k + 1)
      down = x < self.value(k)
      if self.bounded:
        up = up & (k < self.levels - 2)
        down = down & (k > 0)
      k = jnp.where(up, k + 1, jnp.where(down, k - 1, k))
    return k

  def stochastic(self, bits, x) -> jax.Array:
    """``Q_s``: index of ``x``'s upper neighbour with probability ``p``.

    ``p = (x - lower) / (upper - lower)`` in float32, clipped to [0, 1];
    each element compares ``p`` with its own 32 random ``bits``:
    ``P(up) = ceil(p 2**32) / 2**32``. NaN gives the lower bracket index.
    """
    k = self.bracket(x)
    lower, upper = self.value(k), self.value(k + 1)
    p = jnp.clip((x - lower) / (upper - lower), 0.0, 1.0)
    return k + _draw(bits, p).astype(k.dtype)

  def gaps(self, k):
    """(gap to point k+1, gap to point k-1) in float32 (inf past the ends)."""
    if self.bounded:
      hu = self._lookup(self.hu, k)
      hd = self._lookup(self.hd, k)
      vk = self.value(k)
      up = jnp.where(k < self.levels - 1, self.value(k + 1) - vk, jnp.inf)
      down = jnp.where(k > 0, vk - self.value(k - 1), jnp.inf)
      return up, down, hu, hd
    vk = self.value(k)
    up, down = self.value(k + 1) - vk, vk - self.value(k - 1)
    return up, down, up * 0.5, down * 0.5

  def step_nearest(self, k, u) -> jax.Array:
    """R from the stored point ``k`` with float32 update ``u``: new index.

    The nearest point to ``value(k) + u``, except that the weight moves up
    (down) only if ``u`` (``-u``) is at least half the gap to the next
    point: R never moves a weight whose update is below half its gap, and
    always moves one whose update reaches it. NaN updates move nothing.
    """
    _, _, hu, hd = self.gaps(k)
    up_ok, down_ok = u >= hu, -u >= hd
    kn = self.nearest(self.value(k) + u)
    kn = jnp.where(kn > k, jnp.where(up_ok, kn, k), kn)
    kn = jnp.where(kn < k, jnp.where(down_ok, kn, k), kn)
    kn = jnp.where(up_ok, jnp.maximum(kn, k + 1), kn)
    kn = jnp.where(down_ok, jnp.minimum(kn, k - 1), kn)
    return jnp.where(jnp.isnan(u), k, self.clip(kn))

  def step_stochastic(self, bits, k, u) -> jax.Array:
    """SR from the stored point ``k`` with float32 update ``u``: new index.

    An update smaller than the gap in its direction moves one point with
    probability ``|u| / gap`` computed from ``u`` itself (no cancellation
    in ``value(k) + u``, so updates far below an ulp of the weight still
    move it with the right probability); a larger one is ``Q_s`` of
    ``value(k) + u``. Unbiased with respect to the stored points inside
    the grid; NaN updates move nothing.
    """
    up_gap, down_gap, _, _ = self.gaps(k)
    a = jnp.abs(u)
    small = jnp.where(u >= 0, a < up_gap, a < down_gap)
    gap = jnp.where(u >= 0, up_gap, down_gap)
    p = jnp.where(small, a / gap, 0.0)
    move = _draw(bits, p).astype(k.dtype)
    near = k + jnp.where(u >= 0, move, -move)
    far = self.stochastic(bits, self.value(k) + u)
    kn = jnp.where(small, near, far)
    return jnp.where(jnp.isnan(u), k, self.clip(kn))


def _materialize(x: jax.Array) -> jax.Array:
  """``x`` itself, computed into its own buffer (last axis of size >= 2).

  XLA fuses elementwise producers into their consumers, and contracts a
  product feeding an addition into one FMA, so ``fl(a * b) - c`` under
  ``jit`` may be computed as ``fma(a, b, -c)``, rounded once. A sort is
  never fused with its producer or consumers; ``x`` is sorted along its
  last axis by a key that is already in order (an iota), which leaves it
  unchanged, and its consumers read the rounded values from memory.
  """
  keys = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jax.lax.sort((keys, x), dimension=x.ndim - 1, num_keys=1)[1]


_SPLIT = 2.0**12


def _high_bits(d: jax.Array) -> jax.Array:
  """``d`` with only its 12 leading significant bits (truncated)."""
  bits = jax.lax.bitcast_convert_type(d, jnp.uint32)
  return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000),
                                      jnp.float32)


def _times(k: jax.Array, d: jax.Array) -> jax.Array:
  """``k * d`` (integer-valued ``k``) without any inexact product.

  ``k = kh + kl`` and ``d = dh + dl`` are split into parts of at most 12
  significant bits (for ``|k| < 2**24``), so that the four partial
  products are exact and summing them rounds the same whether or not XLA
  contracts a product and a sum into an FMA. All parts have the signs of
  ``k`` and ``d``; the result is within ``(1 + 2**-10)`` ulp of the exact
  product.
  """
  kh = jnp.trunc(k * (1.0 / _SPLIT)) * _SPLIT
  kl = k - kh
  dh = _high_bits(d)
  dl = d - dh
  return kh * dh + ((kh * dl + kl * dh) + kl * dl)


def _draw(bits, p) -> jax.Array:
  """``bits < ceil(p 2**32)`` (and True for ``p >= 1``): P = p within 2**-32."""
  # p < 1 is at most 1 - 2**-24, so ceil(p * 2**32) < 2**32 fits uint32.
  threshold = jnp.ceil(jnp.where(p < 1, p, 0) * jnp.float32(2.0**32))
  return (p >= 1) | (bits < threshold.astype(jnp.uint32))


def contains(x, grid: Grid, dtype=None):
  """Elementwise: is ``x`` exactly one of ``grid``'s stored points?

  Points as stored in ``dtype`` (default ``x``'s dtype), bit for bit: a
  value produced by a qjax quantizer or decoded from codes always passes.
  For a :class:`qjax.FloatGrid`: is ``x`` a finite value of the format.
  """
  x = jnp.asarray(x)
  from qjax import formats  # pylint: disable=import-outside-toplevel
  if isinstance(grid, formats.FloatGrid):  # a finite value of the format
    x32 = x.astype(jnp.float32)
    points = formats.FormatPoints(grid, jnp.float32)
    return (x32 * 0 == 0) & (points.value(points.nearest(x32)) == x32)
  dtype = check_dtype(dtype or x.dtype, "contains")
  points = Points(check_grid(grid, "contains"), dtype)
  q = points.value(points.nearest(as_float32(x, "contains")))
  return q.astype(x.dtype) == x
