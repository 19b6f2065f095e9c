"""Quantized arrays stored as integer grid codes.

A :class:`CodeGrid` is a bounded uniform grid: the ``levels`` points
``offset + k * step``, ``k = 0 .. levels - 1``, stored in a floating-point
``dtype`` (float32, bfloat16 or float16). Its *value table* (:func:`values`)
holds, for every code ``k``, the ``dtype`` value nearest to the exact real
number ``offset + k * step``, computed once on the host in exact rational
arithmetic. So a point the dtype can represent (``1.0``, ``0.5``) is exactly
that value, a symmetric grid is exactly symmetric, ``kbit(b)`` has exactly
``2**b`` levels in every dtype that can hold them, and nothing ever moves a
grid to make arithmetic convenient.

A :class:`Codes` is the quantized array itself: a pytree whose only leaf is
the integer codes, with the grid and the logical shape as static data.
Two-level (binary) grids pack 8 codes per byte; grids of up to 256 levels use
one ``uint8`` per code, up to 65536 one ``uint16``. "On the grid" is true by
construction, :func:`decode` is a gather from the table (the same bits
eagerly, under ``jit`` and under ``vmap``, on every backend), and updates of
the codes (:func:`step_codes`) are exact integer arithmetic.

This is how SR and R (Li, De, Xu, Studer, Samet, Goldstein, "Training
Quantized Nets: A Deeper Understanding", NeurIPS 2017) store weights: only the
quantized weights, no float copy.

Example:
  >>> from qjax import codes
  >>> grid = codes.binary(0.5)
  >>> c = codes.encode_nearest(jnp.array([0.3, -2.0, 0.0]), grid)
  >>> codes.decode(c)
  Array([ 0.5, -0.5,  0.5], dtype=float32)
  >>> codes.nbytes(c), c.data.dtype
  (1, dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
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
"""The most levels a grid may have (codes are at most ``uint16``)."""

# Grid points and spacings below this magnitude are refused: float32
# denormals are flushed to zero by some backends (XLA:CPU compares them as 0),
# so arithmetic near them would depend on the program.
_MIN_MAGNITUDE = Fraction(2)**-96

_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_F32_TINY = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------
# Exact host-side numbers.
# ----------------------------------------------------------------------------


def _exact(name: str, value: Any, where: str) -> Fraction:
  """``value`` as an exact rational number.

  A Python float (or a numpy float32/float16/float64) means the shortest
  decimal that round-trips to it, so ``0.1`` is ``1/10``; ints, strings
  (``"0.1"``, ``"1/10"``), ``Decimal`` and ``Fraction`` are taken as they
  are; other floats (bfloat16 scalars) by their exact binary value.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{where} needs a concrete {name} (its value table is computed on "
        f"the host); got a traced value {name}={value}. Build the grid "
        "outside jit/vmap with a Python number.")
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


def _round_to(q: Fraction, dtype: np.dtype, mode: str = "even") -> float:
  """``q`` rounded to ``dtype`` (``even``: nearest; or ``floor``/``ceil``)."""
  precision, emin, _ = _format(dtype)
  if q < 0:
    flip = {"even": "even", "floor": "ceil", "ceil": "floor"}[mode]
    return -_round_magnitude(-q.numerator, q.denominator, precision, emin,
                             flip)
  return _round_magnitude(q.numerator, q.denominator, precision, emin, mode)


def _fmt(q: Fraction) -> str:
  return f"{float(q):.9g}"


# ----------------------------------------------------------------------------
# Grids.
# ----------------------------------------------------------------------------


def _check_dtype(dtype, where: str) -> np.dtype:
  try:
    dt = np.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or dt.name not in _DTYPES:
    raise ValueError(
        f"{where}: dtype must be one of {', '.join(_DTYPES)} (the storage "
        f"dtype of the decoded values); got dtype={dtype!r}.")
  return _DTYPES[dt.name]


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


@dataclasses.dataclass(frozen=True)
class CodeGrid:
  """The ``levels`` points ``offset + k * step`` stored in ``dtype``.

  Use the constructors :func:`binary`, :func:`ternary`, :func:`kbit` and
  :func:`uniform` (also available as class methods). ``offset`` and
  ``step`` are kept as exact :class:`fractions.Fraction` numbers: a float
  argument means the shortest decimal that round-trips to it (``0.1`` is
  ``1/10``); pass a ``Fraction`` or a string (``"1/3"``) for anything else.
  The grid is static (hashable, compared by value): it is pytree metadata of
  :class:`Codes`, never traced.

  The decoded value of code ``k`` is ``values(grid)[k]``, the ``dtype``
  value nearest to the exact ``offset + k * step`` (ties to even). The
  constructor checks that these values are finite, strictly increasing (the
  dtype can tell all ``levels`` points apart) and not tiny (every nonzero
  point and every gap at least ``2**-96``, far above float32's denormals).

  Attributes:
    offset: the lowest point (code 0), exact.
    step: the spacing Δ > 0, exact.
    levels: the number of points, ``2 <= levels <= 65536``.
    dtype: storage dtype of the values: float32, bfloat16 or float16.

  Example:
    >>> CodeGrid(offset=0, step="0.1", levels=11).hi
    1.0
  """

  offset: Fraction
  step: Fraction
  levels: int
  dtype: np.dtype = np.dtype(np.float32)

  def __post_init__(self):
    where = "CodeGrid"
    object.__setattr__(self, "offset", _exact("offset", self.offset, where))
    step = _exact("step", self.step, where)
    if step <= 0:
      raise ValueError(
          f"{where}: step must be > 0; got step={self.step!r}. Pass a "
          "positive spacing such as step=0.1.")
    object.__setattr__(self, "step", step)
    object.__setattr__(self, "levels", _check_levels(self.levels, where))
    object.__setattr__(self, "dtype", _check_dtype(self.dtype, where))
    _tables(self)  # validates the value table (and caches it)

  # -- constructors ----------------------------------------------------------

  @classmethod
  def binary(cls, scale: ArrayLike = 1.0, dtype=jnp.float32) -> "CodeGrid":
    """The binary grid ``{-scale, +scale}`` (BinaryConnect, the paper's runs).

    Codes: 0 is ``-scale``, 1 is ``+scale``; stored 8 per byte.

    Example:
      >>> values(binary(0.5))
      array([-0.5,  0.5], dtype=float32)
    """
    s = _positive_scale(scale, "binary")
    return cls(offset=-s, step=2 * s, levels=2, dtype=dtype)

  @classmethod
  def ternary(cls, scale: ArrayLike = 1.0, dtype=jnp.float32) -> "CodeGrid":
    """The ternary grid ``{-scale, 0, +scale}`` (codes 0, 1, 2).

    Example:
      >>> values(ternary(2.0))
      array([-2.,  0.,  2.], dtype=float32)
    """
    s = _positive_scale(scale, "ternary")
    return cls(offset=-s, step=s, levels=3, dtype=dtype)

  @classmethod
  def kbit(cls, bits: int, scale: ArrayLike = 1.0,
           dtype=jnp.float32) -> "CodeGrid":
    """The symmetric ``2**bits``-level grid spanning ``[-scale, scale]``.

    Points ``-scale + k * 2 scale / (2**bits - 1)``, ``k = 0 .. 2**bits-1``
    (zero is never a point; use :func:`uniform` for a grid through zero).
    ``bits`` is a static integer 1..16 (Python or numpy int); ``bits=1`` is
    :func:`binary`.

    Example:
      >>> values(kbit(2, 1.0))
      array([-1.        , -0.33333334,  0.33333334,  1.        ], dtype=float32)
    """
    levels = 2**_check_bits(bits)
    s = _positive_scale(scale, "kbit")
    return cls(offset=-s, step=2 * s / (levels - 1), levels=levels,
               dtype=dtype)

  @classmethod
  def uniform(cls, step: ArrayLike, lo: ArrayLike, hi: ArrayLike,
              dtype=jnp.float32) -> "CodeGrid":
    """The points ``lo, lo + step, ..., hi`` (``hi - lo`` a multiple of step).

    ``hi`` may miss ``lo + n * step`` by at most ``1e-9`` steps (float
    noise such as ``3 * 0.1``); the top point is then ``lo + n * step``.

    Example:
      >>> uniform(0.25, lo=-0.5, hi=0.75).levels
      6
    """
    where = "uniform"
    step_q = _exact("step", step, where)
    if step_q <= 0:
      raise ValueError(
          f"{where}: step must be > 0; got step={step!r}. Pass a positive "
          "spacing such as step=0.1.")
    if lo is None or hi is None:
      raise ValueError(
          f"{where}: codes need a bounded grid; got lo={lo!r}, hi={hi!r}. "
          "Pass both, e.g. uniform(0.1, lo=-1, hi=1).")
    lo_q, hi_q = _exact("lo", lo, where), _exact("hi", hi, where)
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
          f"step={step!r}); codes store at most {MAX_LEVELS} (uint16). Use "
          "a larger step or a narrower range.")
    return cls(offset=lo_q, step=step_q, levels=whole + 1, dtype=dtype)

  # -- derived ---------------------------------------------------------------

  @property
  def packed(self) -> bool:
    """Whether codes are bit-packed (two levels: 8 codes per byte)."""
    return self.levels == 2

  @property
  def code_dtype(self) -> np.dtype:
    """The integer dtype of the stored codes (uint8 or uint16)."""
    return np.dtype(np.uint8 if self.levels <= 256 else np.uint16)

  @property
  def lo(self) -> float:
    """The lowest stored value (code 0), as a Python float."""
    return float(values(self)[0])

  @property
  def hi(self) -> float:
    """The highest stored value (code ``levels - 1``), as a Python float."""
    return float(values(self)[-1])

  def point(self, k: int) -> Fraction:
    """The exact (unrounded) point ``offset + k * step``."""
    return self.offset + k * self.step

  def with_dtype(self, dtype) -> "CodeGrid":
    """The same exact points stored in another dtype."""
    return dataclasses.replace(self, dtype=dtype)

  def __repr__(self) -> str:
    return (f"CodeGrid(offset={self.offset}, step={self.step}, "
            f"levels={self.levels}, dtype={self.dtype.name})")


def _positive_scale(scale, where: str) -> Fraction:
  s = _exact("scale", scale, where)
  if s <= 0:
    raise ValueError(
        f"{where}: scale must be > 0; got scale={scale!r}. Pass a positive "
        "scale such as scale=1.0.")
  return s


binary = CodeGrid.binary
ternary = CodeGrid.ternary
kbit = CodeGrid.kbit
uniform = CodeGrid.uniform


@dataclasses.dataclass(frozen=True)
class _Tables:
  values: np.ndarray      # storage dtype, read-only
  values32: np.ndarray    # the same values in float32 (exact)
  thresholds: np.ndarray  # float32[levels-1]: x >= thresholds[k] -> code > k


def _ceil_midpoints_f32(v: np.ndarray) -> np.ndarray:
  """The smallest float32 >= (v[k] + v[k+1]) / 2, for float64 values ``v``.

  Vectorized: the float64 sum is checked exact with Knuth's TwoSum (then
  halving is exact too, and numpy's float64 -> float32 cast is correctly
  rounded); the rare inexact sums fall back to exact Fractions.
  """
  a, b = v[:-1], v[1:]
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  m = s / 2
  c = m.astype(np.float32)
  c = np.where(c.astype(np.float64) < m,
               np.nextafter(c, np.float32(np.inf)), c).astype(np.float32)
  f32 = np.dtype(np.float32)
  for k in np.flatnonzero(err != 0):
    c[k] = _round_to((Fraction(a[k]) + Fraction(b[k])) / 2, f32, "ceil")
  return c


@functools.lru_cache(maxsize=512)
def _tables(grid: CodeGrid) -> _Tables:
  """The value table and the float32 rounding thresholds of ``grid``."""
  dtype, levels = grid.dtype, grid.levels
  _, _, dmax = _format(dtype)
  lo_q, hi_q = grid.point(0), grid.point(levels - 1)
  if max(abs(lo_q), abs(hi_q)) > dmax:
    raise ValueError(
        f"{grid!r} spans [{_fmt(lo_q)}, {_fmt(hi_q)}], beyond {dtype.name}'s "
        f"largest finite value {_fmt(dmax)}. Use a smaller scale or range, "
        "or a wider dtype (float32).")
  if grid.step < _MIN_MAGNITUDE:
    raise ValueError(
        f"{grid!r}: step {_fmt(grid.step)} is below the smallest supported "
        f"spacing 2**-96 ({_fmt(_MIN_MAGNITUDE)}). Use a larger step.")
  # Exact points (a + k b) / d with one common denominator d.
  d = math.lcm(grid.offset.denominator, grid.step.denominator)
  a = grid.offset.numerator * (d // grid.offset.denominator)
  b = grid.step.numerator * (d // grid.step.denominator)
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
        f"{grid!r}: points {k} and {k + 1} ({_fmt(grid.point(k))} and "
        f"{_fmt(grid.point(k + 1))}) both round to {float(out[k])!r} "
        f"({dtype.name} has {precision} significant bits). Use fewer levels, "
        "a larger step, or a wider dtype (float16 or float32).")
  nonzero = np.abs(out[out != 0])
  if nonzero.min() < 2.0**-96 or gaps.min() < 2.0**-96:
    raise ValueError(
        f"{grid!r}: points or gaps below 2**-96 ({_fmt(_MIN_MAGNITUDE)}) "
        "are not supported (float32 denormals behave differently on "
        "different backends). Use a larger scale or offset.")
  table = out.astype(dtype)
  assert np.array_equal(table.astype(np.float64), out)
  table.setflags(write=False)
  values32 = out.astype(np.float32)
  values32.setflags(write=False)
  # Round-to-nearest in float32 by comparisons only: code > k iff
  # x >= thresholds[k], the smallest float32 >= the exact midpoint between
  # values k and k+1 (ties round up, towards +inf).
  thresholds = _ceil_midpoints_f32(out)
  assert np.all((thresholds == 0) | (np.abs(thresholds) >= _F32_TINY))
  thresholds.setflags(write=False)
  return _Tables(table, values32, thresholds)


def values(grid: CodeGrid) -> np.ndarray:
  """The value table: entry ``k`` is the decoded value of code ``k``.

  ``values(grid)[k]`` is the ``grid.dtype`` value nearest to the exact real
  number ``offset + k * step`` (ties to even), computed on the host in exact
  integer arithmetic. The table is strictly increasing; a symmetric grid's
  table is exactly symmetric (``v[k] == -v[levels - 1 - k]``).

  Args:
    grid: a :class:`CodeGrid`.

  Returns:
    A read-only numpy array of shape ``(levels,)`` and dtype ``grid.dtype``.

  Example:
    >>> float(values(uniform(0.1, lo=0, hi=1, dtype=jnp.bfloat16))[-1])
    1.0
  """
  if not isinstance(grid, CodeGrid):
    raise TypeError(f"values expects a CodeGrid; got {type(grid).__name__}.")
  return _tables(grid).values


# ----------------------------------------------------------------------------
# The quantized array.
# ----------------------------------------------------------------------------


def _n_elements(shape: tuple[int, ...]) -> int:
  return math.prod(shape)


def _packed_size(shape: tuple[int, ...]) -> int:
  return -(-_n_elements(shape) // 8)


@jax.tree_util.register_pytree_with_keys_class
class Codes:
  """A quantized array: integer codes plus their :class:`CodeGrid`.

  A pytree whose only leaf is ``data`` (the stored codes); ``grid`` and the
  logical ``shape`` are static metadata. Storage of an array of shape
  ``shape``:

  * two-level grids: ``uint8[ceil(n / 8)]``, the codes of the C-order
    flattened array, element ``8 j + i`` in bit ``i`` (least significant
    first) of byte ``j``, padded with zero bits (:func:`pack_bits`);
  * up to 256 levels: ``uint8[shape]``, one code per element;
  * up to 65536 levels: ``uint16[shape]``.

  ``data`` may carry extra leading (batch) axes, e.g. codes stacked over a
  sweep's lanes: :func:`decode`, :func:`unpack` and :func:`step_codes` keep
  them. Build codes with :func:`encode_nearest`, :func:`encode_stochastic`
  or :func:`pack`; read them with :func:`decode` or :func:`unpack`.

  Attributes:
    data: the stored codes (a ``jax.Array``).
    grid: the :class:`CodeGrid`.
    shape: the logical shape of one array (without batch axes).
  """

  __slots__ = ("data", "grid", "shape")

  def __init__(self, data, grid: CodeGrid, shape):
    if not isinstance(grid, CodeGrid):
      raise TypeError(f"Codes needs a CodeGrid; got {type(grid).__name__}.")
    shape = tuple(int(s) for s in shape)
    data = jnp.asarray(data)
    if data.dtype != grid.code_dtype:
      raise ValueError(
          f"Codes for {grid!r} are stored as {grid.code_dtype.name}; got "
          f"data of dtype {data.dtype}. Build codes with pack(k, grid).")
    tail = (_packed_size(shape),) if grid.packed else shape
    if data.shape[data.ndim - len(tail):] != tail or data.ndim < len(tail):
      raise ValueError(
          f"Codes of shape {shape} for {grid!r} store data of shape "
          f"(..., {', '.join(map(str, tail))}); got {data.shape}.")
    self.data, self.grid, self.shape = data, grid, shape

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("data"), self.data),), (self.grid,
                                                               self.shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks: tree utilities rebuild pytrees with placeholders as leaves.
    obj = object.__new__(cls)
    obj.data, (obj.grid, obj.shape) = children[0], aux
    return obj

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading (batch) axes of ``data`` beyond one array's storage."""
    tail = 1 if self.grid.packed else len(self.shape)
    return tuple(self.data.shape[:self.data.ndim - tail])

  def __repr__(self) -> str:
    return (f"Codes(shape={self.shape}, grid={self.grid!r}, "
            f"data={self.data.dtype.name}{list(self.data.shape)})")


def _check_codes(codes, where: str) -> Codes:
  if not isinstance(codes, Codes):
    raise TypeError(f"{where} expects Codes; got {type(codes).__name__}.")
  return codes


def _check_grid(grid, where: str) -> CodeGrid:
  if not isinstance(grid, CodeGrid):
    raise TypeError(
        f"{where} expects a qjax.codes.CodeGrid (e.g. codes.binary(1.0)); "
        f"got {type(grid).__name__}.")
  return grid


def pack_bits(bits: ArrayLike, batch_ndim: int = 0) -> jax.Array:
  """Packs 0/1 values 8 per byte, least significant bit first.

  Element ``8 j + i`` of the C-order flattened array (per batch entry) goes
  to bit ``i`` of byte ``j``; the last byte is padded with zero bits. The
  same layout as ``np.packbits(bits.ravel(), bitorder="little")``.

  Args:
    bits: an integer or boolean array of 0s and 1s (other values: only the
      lowest bit counts).
    batch_ndim: how many leading axes are batch axes, packed separately.

  Returns:
    ``uint8[*batch, ceil(n / 8)]`` with ``n`` the number of non-batch
    elements.

  Example:
    >>> pack_bits(jnp.array([1, 0, 1, 1, 0, 0, 0, 0, 1]))
    Array([13,  1], dtype=uint8)
  """
  bits = jnp.asarray(bits)
  batch = bits.shape[:batch_ndim]
  n = _n_elements(bits.shape[batch_ndim:])
  flat = (bits.reshape(batch + (n,)).astype(jnp.uint8) & jnp.uint8(1))
  nbytes = -(-n // 8)
  pad = [(0, 0)] * len(batch) + [(0, 8 * nbytes - n)]
  flat = jnp.pad(flat, pad).reshape(batch + (nbytes, 8))
  shifts = jnp.arange(8, dtype=jnp.uint8)
  return jnp.sum(flat << shifts, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_bits`: ``uint8[*batch, *shape]`` of 0s and 1s.

  Args:
    packed: ``uint8[*batch, ceil(n / 8)]``.
    shape: the logical shape (``n`` its number of elements).

  Returns:
    The bits as ``uint8`` of shape ``batch + shape``.
  """
  packed = jnp.asarray(packed, jnp.uint8)
  shape = tuple(shape)
  n = _n_elements(shape)
  if packed.ndim < 1 or packed.shape[-1] != -(-n // 8):
    raise ValueError(
        f"unpack_bits: shape {shape} needs {-(-n // 8)} packed bytes in the "
        f"last axis; got packed of shape {packed.shape}.")
  batch = packed.shape[:-1]
  shifts = jnp.arange(8, dtype=jnp.uint8)
  bits = (packed[..., None] >> shifts) & jnp.uint8(1)
  bits = bits.reshape(batch + (8 * packed.shape[-1],))[..., :n]
  return bits.reshape(batch + shape)


def pack(k: ArrayLike, grid: CodeGrid) -> Codes:
  """Codes from integer code indices ``k`` in ``[0, grid.levels)``.

  Indices are not clipped (use :func:`step_codes` for clipped updates);
  concrete out-of-range indices raise. Bit-packs two-level grids.

  Args:
    k: an integer array of code indices (its shape is the logical shape).
    grid: the :class:`CodeGrid` the codes refer to.

  Returns:
    :class:`Codes` of ``k.shape``.

  Example:
    >>> unpack(pack(jnp.array([2, 0, 1]), ternary(1.0)))
    Array([2, 0, 1], dtype=int32)
  """
  grid = _check_grid(grid, "pack")
  k = jnp.asarray(k)
  if not (jnp.issubdtype(k.dtype, jnp.integer) or k.dtype == jnp.bool_):
    raise TypeError(
        f"pack expects integer code indices; got dtype {k.dtype}. Use "
        "encode_nearest or encode_stochastic for float values.")
  if not isinstance(k, jax.core.Tracer) and k.size:
    lo, hi = int(jnp.min(k)), int(jnp.max(k))
    if lo < 0 or hi >= grid.levels:
      raise ValueError(
          f"pack: codes of {grid!r} lie in [0, {grid.levels - 1}]; got "
          f"indices in [{lo}, {hi}]. Clip them first (see step_codes).")
  return _from_indices(k, grid)


def _from_indices(k: jax.Array, grid: CodeGrid, batch_ndim: int = 0) -> Codes:
  shape = tuple(k.shape[batch_ndim:])
  if grid.packed:
    data = pack_bits(k, batch_ndim)
  else:
    data = k.astype(grid.code_dtype)
  return Codes(data, grid, shape)


def unpack(codes: Codes) -> jax.Array:
  """The code indices ``k`` as ``int32[*batch, *shape]``.

  Example:
    >>> unpack(encode_nearest(jnp.array([-1.0, 1.0]), binary(1.0)))
    Array([0, 1], dtype=int32)
  """
  codes = _check_codes(codes, "unpack")
  if codes.grid.packed:
    k = unpack_bits(codes.data, codes.shape)
  else:
    k = codes.data
  return k.astype(jnp.int32)


def decode(codes: Codes) -> jax.Array:
  """The values of ``codes``: a gather from the grid's value table.

  ``decode(c)[i] = values(c.grid)[k_i]``, a pure table lookup (bit
  unpacking, then a gather from a constant), so it gives the same bits
  eagerly, under ``jit`` and under ``vmap``, on every backend. Codes beyond
  ``levels - 1`` (possible only in hand-made data) read the top value.

  Args:
    codes: :class:`Codes`.

  Returns:
    An array of shape ``codes.batch_shape + codes.shape`` and dtype
    ``codes.grid.dtype``.

  Example:
    >>> decode(pack(jnp.array([0, 2]), ternary(0.5)))
    Array([-0.5,  0.5], dtype=float32)
  """
  codes = _check_codes(codes, "decode")
  table = jnp.asarray(values(codes.grid))
  k = codes.data if not codes.grid.packed else unpack_bits(codes.data,
                                                           codes.shape)
  return jnp.take(table, k.astype(jnp.int32), mode="clip")


def nbytes(codes: Codes) -> int:
  """Bytes the stored codes take (``codes.data.nbytes``, padding included).

  Example:
    >>> nbytes(encode_nearest(jnp.zeros((3, 5)), binary(1.0)))
    2
  """
  codes = _check_codes(codes, "nbytes")
  return int(math.prod(codes.data.shape)) * codes.data.dtype.itemsize


def bits_per_weight(codes: Codes) -> float:
  """Stored bits per logical weight: 1.0 for binary (up to padding), 8, 16.

  Example:
    >>> bits_per_weight(encode_nearest(jnp.zeros((64, 64)), binary(1.0)))
    1.0
  """
  codes = _check_codes(codes, "bits_per_weight")
  n = math.prod(codes.batch_shape) * _n_elements(codes.shape)
  if n == 0:
    return float("nan")
  return 8.0 * nbytes(codes) / n


# ----------------------------------------------------------------------------
# Encoding.
# ----------------------------------------------------------------------------


def _as_float32(x: ArrayLike, where: str) -> jax.Array:
  """``x`` in float32, with float32 denormals set to zero explicitly.

  XLA:CPU flushes denormals in comparisons; flushing them ourselves makes
  the result the same on every backend.
  """
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating)
          or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(
        f"{where} expects a real (float or integer) array; got dtype "
        f"{x.dtype}.")
  x = x.astype(jnp.float32)
  return jnp.where(jnp.abs(x) < _F32_TINY, jnp.float32(0), x)


def _searchsorted(table: np.ndarray, x: jax.Array) -> jax.Array:
  """How many entries of the sorted ``table`` are <= ``x``."""
  method = "compare_all" if table.size <= 64 else "scan"
  return jnp.searchsorted(jnp.asarray(table), x, side="right", method=method)


def encode_nearest(x: ArrayLike, grid: CodeGrid) -> Codes:
  """Deterministic rounding ``Q_d``: the code of the nearest table value.

  ``k = argmin_k |x - values(grid)[k]|``, ties (``x`` exactly half way
  between two values) to the upper one, so on a binary grid ``0`` encodes
  as ``+scale`` like :func:`qjax.sign`. Values beyond the ends encode as
  the end codes; NaN encodes as code 0. The decision is exact: ``x`` (cast
  to float32, losslessly for bf16/f16 inputs) is compared with precomputed
  float32 thresholds, the exact midpoints rounded up, so there is no
  arithmetic that a compiler could evaluate differently. Float32 denormal
  inputs count as zero. Idempotent: ``encode_nearest(decode(c)) == c``.

  Args:
    x: a real array (float or integer) of any shape.
    grid: the :class:`CodeGrid`.

  Returns:
    :class:`Codes` of ``x.shape``.

  Example:
    >>> decode(encode_nearest(jnp.array([0.26, 0.24, -3.0]),
    ...                       uniform(0.5, lo=-1, hi=1)))
    Array([ 0.5,  0. , -1. ], dtype=float32)
  """
  grid = _check_grid(grid, "encode_nearest")
  x = _as_float32(x, "encode_nearest")
  k = _searchsorted(_tables(grid).thresholds, x)
  k = jnp.where(jnp.isnan(x), 0, k)
  return _from_indices(k, grid)


def _as_key(key, where: str):
  """A single jax.random key from a typed key, a raw key or an int seed."""
  if key is None or isinstance(key, (bool, np.bool_)):
    raise ValueError(
        f"{where} draws random numbers and needs a key; got key={key!r}. "
        "Pass key=0 (an int seed) or key=jax.random.key(0).")
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  if isinstance(key, np.ndarray):
    key = jnp.asarray(key)
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return key
  elif dtype == jnp.uint32 and shape == (2,):
    return key
  elif (dtype is not None and jnp.issubdtype(dtype, jnp.integer)
        and shape == ()):
    return jax.random.key(key)
  raise ValueError(
      f"{where}: key must be one int seed or one jax.random key (typed of "
      f"shape (), or raw uint32 of shape (2,)); got "
      f"{f'dtype {dtype}, shape {shape}' if dtype is not None else repr(key)}."
      " For a batch of keys, jax.vmap over them.")


def encode_stochastic(key, x: ArrayLike, grid: CodeGrid) -> Codes:
  """Stochastic rounding ``Q_s`` onto the table (Li et al. 2017, Eq. 3).

  With ``lo <= x < hi`` the neighbouring table values (codes ``k``,
  ``k + 1``), returns code ``k + 1`` with probability
  ``p = (x - lo) / (hi - lo)`` and ``k`` otherwise, so
  ``E[decode(Q_s(x))] = x`` and ``Var = (hi - lo)**2 p (1 - p)`` with respect
  to the *stored* values. ``p`` is computed in float32 and clipped to
  ``[0, 1]``: beyond the ends ``x`` encodes as the end code, a table value
  encodes as itself (``p = 0``). Each element compares ``p`` with its own 32
  random bits: ``P(up) = ceil(p 2**32) / 2**32``, within ``2**-32`` of ``p``.
  NaN encodes as code 0; float32 denormal inputs count as zero.

  Args:
    key: one ``jax.random`` key (typed, or raw ``uint32[2]``) or an int
      seed; the same key gives the same codes bit for bit.
    x: a real array of any shape.
    grid: the :class:`CodeGrid`.

  Returns:
    :class:`Codes` of ``x.shape``.

  Example:
    >>> c = encode_stochastic(0, jnp.full((100000,), 0.25), binary(1.0))
    >>> abs(float(decode(c).mean()) - 0.25) < 0.02   # 5 sigma is 0.015
    True
  """
  grid = _check_grid(grid, "encode_stochastic")
  key = _as_key(key, "encode_stochastic")
  x = _as_float32(x, "encode_stochastic")
  tables = _tables(grid)
  v = jnp.asarray(tables.values32)
  k = jnp.clip(_searchsorted(tables.values32, x) - 1, 0, grid.levels - 2)
  lo, hi = v[k], v[k + 1]
  p = jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)
  bits = jax.random.bits(key, x.shape, jnp.uint32)
  # p < 1 is at most 1 - 2**-24, so ceil(p * 2**32) < 2**32 fits uint32.
  threshold = jnp.ceil(jnp.where(p < 1, p, 0) * jnp.float32(2.0**32))
  up = (p >= 1) | (bits < threshold.astype(jnp.uint32))
  k = jnp.where(jnp.isnan(x), 0, k + up.astype(k.dtype))
  return _from_indices(k, grid)


# ----------------------------------------------------------------------------
# Exact integer updates.
# ----------------------------------------------------------------------------


def step_codes(codes: Codes, delta_k: ArrayLike) -> Codes:
  """Moves every code by an integer ``delta_k``, clipped to the grid.

  ``k' = clip(k + delta_k, 0, levels - 1)`` in int32 (``delta_k`` is first
  clipped to ``[-levels, levels]``, so nothing overflows), then stored again.
  Exact integer arithmetic: ``step_codes(c, 0)`` is ``c`` bit for bit.

  Args:
    codes: :class:`Codes`.
    delta_k: an integer array broadcastable to
      ``codes.batch_shape + codes.shape``.

  Returns:
    :class:`Codes` on the same grid and shape.

  Example:
    >>> c = pack(jnp.array([0, 1, 2]), ternary(1.0))
    >>> unpack(step_codes(c, jnp.array([-1, 5, -1])))
    Array([0, 2, 1], dtype=int32)
  """
  codes = _check_codes(codes, "step_codes")
  delta = jnp.asarray(delta_k)
  if not jnp.issubdtype(delta.dtype, jnp.integer):
    raise TypeError(
        f"step_codes expects integer code steps; got dtype {delta.dtype}. "
        "Round float updates explicitly (e.g. encode_nearest) instead.")
  k = unpack(codes)
  if jnp.broadcast_shapes(delta.shape, k.shape) != k.shape:
    raise ValueError(
        f"step_codes: delta_k of shape {delta.shape} does not broadcast to "
        f"the codes' shape {k.shape}.")
  levels = codes.grid.levels
  info = jnp.iinfo(delta.dtype)  # clip with bounds that fit delta's dtype
  delta = jnp.clip(delta, max(int(info.min), -levels),
                   min(int(info.max), levels))
  k = jnp.clip(k + delta.astype(jnp.int32), 0, levels - 1)
  return _from_indices(k, codes.grid, batch_ndim=len(codes.batch_shape))
