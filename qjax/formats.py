"""Floating-point formats as grids: bfloat16, float16 and the fp8 formats.

A :class:`FloatGrid` is the set of finite values of a floating-point format
(non-uniform: the spacing doubles at each binade, and is constant through
the subnormals). It goes wherever a :class:`qjax.Grid` goes:
:func:`qjax.round_nearest`, :func:`qjax.round_stochastic`,
:func:`qjax.stochastic_rounding`, :func:`qjax.nearest_rounding`,
:func:`qjax.latent_clipping`, the methods and the engine (``--grid bf16``).

=================  ==============  =====  ========  ===================
grid text          dtype           bits   mantissa  largest finite
=================  ==============  =====  ========  ===================
``bf16``           bfloat16        16     7         3.39e38
``f16``            float16         16     10        65504
``fp8_e4m3``       float8_e4m3fn   8      3         448
``fp8_e5m2``       float8_e5m2     8      2         57344
=================  ==============  =====  ========  ===================

The stored value is the code. A parameter on a float grid is an array *of the
format's dtype* (2 bytes per bf16 weight, 1 per fp8 weight); there is no
float32 copy of it anywhere in a train state. The update rules compute in
float32 and emit a float32 update ``δ`` with ``p + δ`` equal to the rounded
value (exact in float32, so the final narrowing is exact and no later
compiler rewrite of a convert can change it); :func:`qjax.apply_updates`
adds it (``optax.apply_updates`` does the same for bfloat16 and float16, but
JAX refuses to promote fp8 implicitly).

Index. Every decision is made on an integer index ``k`` (int32) that orders
the format's finite values: ``k`` is the magnitude of the value's bit
pattern, negated for negative values (``+0`` and ``-0`` are both 0), so
neighbouring values have neighbouring indices and ``|k| <= kmax`` (the
largest finite value's pattern). The decisions of :class:`qjax.grid.Points`
(nearest, bracket, stochastic, and the R and SR steps from a stored value)
then apply unchanged (:class:`FormatPoints`).

Rounding from a float32 value ``x`` (:func:`qjax.round_stochastic`):
``x`` between neighbouring values ``a <= x < b`` rounds to ``b`` with
probability ``(x - a) / (b - a)``, computed in float32 (exactly: ``x - a``
is exact and ``b - a`` is a power of two) and compared with the element's
own 32 random bits. Inside the normal binades the probability is a multiple
of ``2**-(23 - m)`` (``m`` mantissa bits), so ``P(up)`` is exact; in the
float16 and fp8 subnormals it is exact to within ``2**-32``. Binade
boundaries need no special case (the neighbours are found on the index).

The update rules from a stored weight ``p`` (index ``k``) with a float32
update ``u`` (:meth:`qjax.grid.Points.step_stochastic`): an update smaller
than the gap to the next value in its direction moves the weight by one
value with probability ``|u| / gap`` computed from ``u`` itself (no
cancellation in ``p + u``), so updates far below an ulp move it with the
right probability (any nonzero update can move a weight; ``P(move) =
ceil(2**32 |u| / gap) / 2**32``, exact to within ``2**-32``); a larger one
rounds ``p + u`` (float32) stochastically, once. Round-to-nearest (R,
:meth:`qjax.grid.Points.step_nearest`) never moves a weight whose update is
below half the gap in its direction, and always moves one whose update
reaches it.

Policy at the edges.

* Overflow saturates: a value beyond the largest finite value ``M`` rounds
  to ``±M`` (as fp8 training does), in every format, whether or not the
  format has infinities. SR is unbiased on ``[-M, M]``.
* NaN and infinite *inputs* of the quantizers: NaN stays NaN, ``±inf``
  saturates to ``±M`` (a bounded grid's end points). In the update rules a
  non-finite *update* gives NaN (never a silent finite value): inside
  :func:`qjax.skip_nonfinite`, as in every qjax method, the step is skipped.
* ``round_nearest`` onto a format rounds ties to even: the same value as
  ``x.astype(dtype)`` for ``|x| <= M`` (zero is always ``+0``: both zeros
  have index 0). The R *update rule* moves a weight whose update is
  exactly half a gap (as on every qjax grid).
* Subnormals. The quantizers decide on the bits of ``x`` (integer
  arithmetic), so they are exact in every format's subnormals, bfloat16's
  included (which are float32's own subnormals, ``|x| < 2**-126``).
  float16 and fp8 subnormals are normal float32 numbers; to find them the
  quantizers scale ``|x|`` by a power of two, and count a float32 subnormal
  input as zero there (explicitly: XLA:CPU flushes them in arithmetic, so
  every backend gives the same bits; such an input is more than ``2**100``
  times below the format's smallest subnormal). The update rules compute
  ``p + u`` and the gaps in float32 arithmetic, which XLA:CPU flushes below
  ``2**-126``: on the CPU a bfloat16 weight there counts as zero.

Example (bf16 weights, no float32 master copy)::

    params = qjax.formats.cast(params, jnp.bfloat16)
    tx = optax.chain(qjax.float32_moments(optax.adam(1e-3)),
                     qjax.stochastic_rounding(qjax.FloatGrid(jnp.bfloat16),
                                              key=0, mask=qjax.all_floats))
    state = tx.init(params)
    grads = jax.grad(loss)(qjax.formats.float32_view(params))
    updates, state = tx.update(grads, state, params)
    params = qjax.apply_updates(params, updates)        # still bfloat16
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from qjax import grid as grid_lib

PyTree = Any

# name in grid texts -> numpy dtype.
FORMATS = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
ALIASES = {"bfloat16": "bf16", "float16": "f16", "fp16": "f16",
           "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
           "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2"}
_UINT = {1: jnp.uint8, 2: jnp.uint16}
_F32_MIN_NORMAL_BITS = 0x00800000


def format_name(dtype) -> str:
  """``"bf16"`` for bfloat16, ...; a clear error for anything else."""
  if isinstance(dtype, str):
    key = dtype.strip().lower()
    key = ALIASES.get(key, key)
    if key in FORMATS:
      return key
  else:
    try:
      dt = np.dtype(dtype)
    except TypeError:
      dt = None
    for name, fmt in FORMATS.items():
      if dt == fmt:
        return name
  raise ValueError(
      f"FloatGrid: {dtype!r} is not a supported floating-point format; use "
      f"one of {tuple(FORMATS)} (jnp.bfloat16, jnp.float16, "
      "jnp.float8_e4m3fn, jnp.float8_e5m2). float32 is the reference "
      "precision every decision is computed in, not a grid.")


class FloatGrid:
  """The finite values of a floating-point format, as a grid.

  Args:
    dtype: ``jnp.bfloat16``, ``jnp.float16``, ``jnp.float8_e4m3fn`` or
      ``jnp.float8_e5m2`` (or their names, e.g. ``"bf16"``).

  Attributes:
    name: ``"bf16"``, ``"f16"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    dtype: the numpy dtype; parameters on this grid are stored in it.
    mantissa: explicit mantissa bits ``m`` (the relative spacing within a
      binade is ``2**-m``).
    kmax: index of the largest finite value (see the module docstring).
    levels: the number of distinct finite values (``+0 == -0``).

  A grid with no pytree leaves: it has no scale (a sweep cannot scale a
  format), and equal formats compare equal.

  Example:
    >>> g = FloatGrid(jnp.bfloat16)
    >>> float(g.hi), g.levels
    (3.3895313892515355e+38, 65279)
  """

  __slots__ = ("name", "dtype", "mantissa", "emin", "kmax", "levels")
  bounded = True
  scale = None

  def __init__(self, dtype):
    name = format_name(dtype)
    dt = FORMATS[name]
    info = ml_dtypes.finfo(dt)
    bits = np.array(info.max, dt).view(_UINT[dt.itemsize].dtype)
    set_ = object.__setattr__
    set_(self, "name", name)
    set_(self, "dtype", dt)
    set_(self, "mantissa", int(info.nmant))
    set_(self, "emin", int(info.minexp))
    set_(self, "kmax", int(bits))
    set_(self, "levels", 2 * int(bits) + 1)

  def __setattr__(self, name, value):
    raise AttributeError("FloatGrid is immutable")

  def __reduce__(self):
    return (FloatGrid, (self.name,))

  @property
  def lo(self) -> float:
    return -self.hi

  @property
  def hi(self) -> float:
    return float(ml_dtypes.finfo(self.dtype).max)

  @property
  def relative_step(self) -> float:
    """``2**-m``: the spacing within a binade relative to its lowest value."""
    return 2.0**-self.mantissa

  def scaled(self, scale) -> "FloatGrid":
    raise ValueError(
        f"{self!r} is a floating-point format: its values are fixed and "
        "it has no scale. Drop grid_scale / --grid-scales for a float grid "
        "(sweep the learning rate instead).")

  def __eq__(self, other):
    return isinstance(other, FloatGrid) and other.name == self.name

  def __hash__(self):
    return hash(("FloatGrid", self.name))

  def __repr__(self) -> str:
    return f"FloatGrid({self.dtype.name})"


jax.tree_util.register_pytree_node(
    FloatGrid, lambda g: ((), g.name), lambda name, _: FloatGrid(name))


def is_float_grid(g) -> bool:
  return isinstance(g, FloatGrid)


def check_storage(grid: FloatGrid, dtype, where: str) -> np.dtype:
  """``dtype`` if it holds every value of ``grid`` exactly, else an error."""
  dt = np.dtype(grid.dtype if dtype is None else dtype)
  if dt == grid.dtype or dt == np.dtype(np.float32):
    return dt
  raise ValueError(
      f"{where}: {grid!r} stores its values in {grid.dtype.name} (or, "
      f"exactly, in float32); got dtype {dt.name}, which cannot hold them "
      f"all. Pass dtype=None ({grid.dtype.name}) or jnp.float32.")


def _bits32(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


class FormatPoints(grid_lib.Points):
  """A format's values on the device, with :class:`~qjax.grid.Points`'
  decisions.

  Indices are int32 (see the module docstring); :meth:`value` is exact in
  float32. The inherited :meth:`stochastic`, :meth:`step_nearest` and
  :meth:`step_stochastic` work on these indices unchanged.
  """

  def __init__(self, grid: FloatGrid, dtype=None):  # pylint: disable=super-init-not-called
    if not isinstance(grid, FloatGrid):
      raise TypeError(f"FormatPoints needs a FloatGrid; got {grid!r}.")
    self.grid = grid
    self.dtype = check_storage(grid, dtype, "FormatPoints")
    self.bounded = True
    self.levels = grid.levels
    self.kmax = grid.kmax
    m = grid.mantissa
    self._drop = 23 - m
    # float16 and fp8 subnormals lie below 2**emin; bfloat16's are float32's
    # own subnormals, handled by the float32 flush.
    self._sub = grid.emin > -126
    self._min_normal_bits = (grid.emin + 127) << 23
    if self._sub:
      self._to_units = np.float32(2.0**(m - grid.emin))
      self._unit = np.float32(2.0**(grid.emin - m))

  # -- index <-> value -------------------------------------------------------

  def _codes(self, k) -> jax.Array:
    """The format's bit patterns (unsigned) of indices ``k``."""
    uint = _UINT[self.grid.dtype.itemsize]
    k = jnp.asarray(k, jnp.int32)
    mag = jnp.abs(k).astype(uint)
    sign = jnp.asarray(1 << (8 * self.grid.dtype.itemsize - 1), uint)
    return jnp.where(k < 0, mag | sign, mag)

  def stored(self, k) -> jax.Array:
    """The values of indices ``k`` in the format's dtype (bit exact)."""
    return jax.lax.bitcast_convert_type(self._codes(self.clip(k)),
                                        self.grid.dtype)

  def value(self, k) -> jax.Array:
    """The value of index ``k`` in float32 (exact).

    bfloat16 widens by a shift. The other formats are built from the
    index's bits: a normal code ``c`` has float32 bits ``(c + (126 +
    emin) * 2**m) << (23 - m)`` (the exponent re-biased), a subnormal one
    is ``c * 2**(emin - m)``. XLA:CPU converts fp8 in software, and this
    integer form measured cheaper in the fp8 R and SR steps; it gives the
    conversion's values bit for bit (tested on every code).
    """
    if self.grid.name == "bf16":
      return self.stored(k).astype(jnp.float32)
    k = self.clip(jnp.asarray(k, jnp.int32))
    mag = jnp.abs(k).astype(jnp.uint32)
    m = self.grid.mantissa
    rebias = jnp.uint32((126 + self.grid.emin) << m)
    v = jax.lax.bitcast_convert_type((mag + rebias) << self._drop,
                                     jnp.float32)
    v = jnp.where(mag < (1 << m), mag.astype(jnp.float32) * self._unit, v)
    return jnp.where(k < 0, -v, v)

  def index(self, p) -> jax.Array:
    """The index of ``p``, an array of the format's dtype."""
    p = jnp.asarray(p)
    if p.dtype != self.grid.dtype:
      raise ValueError(
          f"{self.grid!r}: a stored weight must be {self.grid.dtype.name}; "
          f"got dtype {p.dtype}.")
    nbits = 8 * self.grid.dtype.itemsize
    code = jax.lax.bitcast_convert_type(p, _UINT[self.grid.dtype.itemsize])
    code = code.astype(jnp.int32)
    mag = code & ((1 << (nbits - 1)) - 1)
    return jnp.where(code >> (nbits - 1) != 0, -mag, mag)

  def clip(self, k):
    return jnp.clip(k, -self.kmax, self.kmax)

  def _split(self, x):
    """(float32 bits of ``|x|``, sign bit set, is NaN)."""
    b = _bits32(jnp.asarray(x, jnp.float32))
    mag = b & jnp.uint32(0x7FFFFFFF)
    return mag, (b >> 31) != 0, mag > jnp.uint32(0x7F800000)

  def _units(self, mag: jax.Array) -> jax.Array:
    """``|x|`` in units of the subnormal spacing ``2**(emin - m)`` (exact,
    a power-of-two scaling; float32 subnormals flushed, as XLA:CPU would,
    explicitly so that every backend agrees)."""
    mag = jnp.where(mag < _F32_MIN_NORMAL_BITS, jnp.uint32(0), mag)
    return jax.lax.bitcast_convert_type(mag, jnp.float32) * self._to_units

  def _from_units(self, t: jax.Array, mag: jax.Array,
                  out: jax.Array) -> jax.Array:
    """``out``, or below ``2**emin`` the bits of ``t`` subnormal units."""
    if not self._sub:
      return out
    return jnp.where(mag < self._min_normal_bits, _bits32(t * self._unit),
                     out)

  def _to_index(self, out_bits: jax.Array, negative: jax.Array) -> jax.Array:
    """Signed index of float32 magnitude bits ``out_bits``, saturated.

    ``out_bits`` hold a value of the format or one beyond its largest."""
    top = _bits32(jnp.float32(self.grid.hi))
    out_bits = jnp.minimum(out_bits, top)
    if self.grid.name == "bf16":  # the high half, exact for subnormals too
      mag = (out_bits >> 16).astype(jnp.int32)
    else:  # a value of the format: its code from its bits (see value())
      m = self.grid.mantissa
      normal = ((out_bits >> self._drop).astype(jnp.int32)
                - ((126 + self.grid.emin) << m))
      v = jax.lax.bitcast_convert_type(out_bits, jnp.float32)
      sub = (v * self._to_units).astype(jnp.int32)  # exact: whole units
      mag = jnp.where(out_bits < self._min_normal_bits, sub, normal)
    return jnp.where(negative, -mag, mag)

  # -- decisions -------------------------------------------------------------

  def nearest(self, x) -> jax.Array:
    """Index of the value nearest to float32 ``x``, ties to even.

    Beyond ``±M`` (``±inf`` included) saturates; NaN gives index 0.
    """
    mag, neg, nan = self._split(x)
    drop = self._drop
    odd = (mag >> drop) & jnp.uint32(1)
    out = ((mag + jnp.uint32((1 << (drop - 1)) - 1) + odd)
           & ~jnp.uint32((1 << drop) - 1))
    if self._sub:
      out = self._from_units(jnp.round(self._units(mag)), mag, out)
    return jnp.where(nan, 0, self._to_index(out, neg))

  def bracket(self, x) -> jax.Array:
    """``k`` with ``value(k) <= x < value(k + 1)``, clipped to
    ``[-kmax, kmax - 1]`` (``x`` beyond the ends is outside its bracket;
    NaN gives 0)."""
    mag, neg, nan = self._split(x)
    down = mag & ~jnp.uint32((1 << self._drop) - 1)
    if self._sub:
      down = self._from_units(jnp.floor(self._units(mag)), mag, down)
    k = self._to_index(down, neg)
    # Below zero, truncation went up (towards zero) unless x is a value.
    k = jnp.where(neg & (down != mag), k - 1, k)
    k = jnp.clip(k, -self.kmax, self.kmax - 1)
    return jnp.where(nan, 0, k)

  def stochastic(self, bits, x) -> jax.Array:
    """``Q_s``: the index of ``x`` rounded away from zero with probability
    ``(|x| - |a|) / (|b| - |a|)`` (``a``, ``b`` its neighbours towards and
    away from zero), saturating at ``±M``; NaN gives index 0.

    In the normal binades (and everywhere for bfloat16, subnormals
    included) the top ``23 - m`` of the element's 32 ``bits`` are added to
    the ``23 - m`` float32 mantissa bits the format drops: the carry is
    the round-up, with exactly that probability. In the float16 and fp8
    subnormals the fraction is compared with all 32 bits (exact to
    ``2**-32``).
    """
    mag, neg, nan = self._split(x)
    drop = self._drop
    bits = jnp.asarray(bits, jnp.uint32)
    out = (mag + (bits >> (32 - drop))) & ~jnp.uint32((1 << drop) - 1)
    if self._sub:
      t = self._units(mag)
      whole = jnp.floor(t)
      up = grid_lib._draw(bits, t - whole)  # pylint: disable=protected-access
      out = self._from_units(whole + up.astype(jnp.float32), mag, out)
    return jnp.where(nan, 0, self._to_index(out, neg))

  def gaps(self, k):
    """(gap to index k+1, gap to k-1, their halves); inf past the ends."""
    vk = self.value(k)
    up = jnp.where(k < self.kmax, self.value(k + 1) - vk, jnp.inf)
    down = jnp.where(k > -self.kmax, vk - self.value(k - 1), jnp.inf)
    return up, down, up * 0.5, down * 0.5


# ----------------------------------------------------------------------------
# Trees of parameters stored in a format.
# ----------------------------------------------------------------------------


def _low_precision(leaf) -> bool:
  dt = getattr(leaf, "dtype", None)
  return (dt is not None and jnp.issubdtype(dt, jnp.floating)
          and np.dtype(dt).itemsize < 4)


def cast(params: PyTree, dtype, mask=None) -> PyTree:
  """``params`` with the masked float leaves rounded to nearest onto the
  format ``dtype`` and stored in it (default mask: every float leaf).

  Example:
    >>> params = qjax.formats.cast(params, jnp.bfloat16)
  """
  from qjax import quantizers  # pylint: disable=import-outside-toplevel
  grid = FloatGrid(dtype)
  mask = quantizers.resolve_mask(
      quantizers.all_floats if mask is None else mask, params)
  grids = quantizers.resolve_grids(grid, params, mask)
  return quantizers.map_masked(
      lambda _, w, g: quantizers.round_nearest(w, g), params, mask, grids,
      None)


def float32_view(tree: PyTree) -> PyTree:
  """``tree`` with every float leaf narrower than float32 cast to float32.

  What gradients and optimizer moments of format-stored weights are
  computed at (exact: every bf16, f16 and fp8 value is a float32 value).
  Other leaves (float32, integers, :class:`qjax.Codes`) are returned as
  they are.
  """
  from qjax import codes as codes_lib  # pylint: disable=import-outside-toplevel
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if _low_precision(x) else x, tree,
      is_leaf=codes_lib.is_codes)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
  """``optax.apply_updates``, also for parameters stored in fp8.

  Each leaf is ``(p + u).astype(p.dtype)`` with the sum in the wider of the
  two dtypes: exactly what ``optax.apply_updates`` computes for float32,
  bfloat16, float16 and :class:`qjax.Codes` leaves; for fp8 leaves (which
  JAX never promotes implicitly) the sum is computed in the update's dtype.
  """
  from qjax import codes as codes_lib  # pylint: disable=import-outside-toplevel

  def add(p, u):
    if p is None:
      return None
    if codes_lib.is_codes(p) or codes_lib.is_codes(u):
      return optax.apply_updates(p, u)
    p = jnp.asarray(p)
    u = jnp.asarray(u)
    if (jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize == 1
        and u.dtype != p.dtype):
      return (p.astype(u.dtype) + u).astype(p.dtype)
    return jnp.asarray(p + u).astype(p.dtype)

  return jax.tree.map(add, params, updates, is_leaf=codes_lib.is_codes)


def float32_moments(inner: optax.GradientTransformation,
                    dtype=jnp.float32) -> optax.GradientTransformationExtraArgs:
  """``inner`` (e.g. Adam) with its state and arithmetic in ``dtype``.

  For parameters stored in a format: ``optax.adam`` initialised on bf16
  parameters keeps bf16 moments, whose update ``(1 - b2) g**2`` is below
  half a bf16 ulp of the second moment and is lost. This wrapper passes
  ``inner`` the parameters and incoming updates cast to float32 (exact),
  so its moments are float32 (``dtype=jnp.bfloat16`` keeps them in bf16,
  rounded to nearest after each step, when memory matters more), and
  returns float32 updates for the rounding rule that follows.
  """
  inner = optax.with_extra_args_support(inner)
  dt = np.dtype(dtype)

  def store(state):
    if dt == np.dtype(np.float32):
      return state
    return jax.tree.map(
        lambda s: s.astype(dt) if jnp.issubdtype(jnp.result_type(s),
                                                 jnp.floating) else s, state)

  def init_fn(params):
    return store(inner.init(float32_view(params)))

  def update_fn(updates, state, params=None, **extra_args):
    state32 = float32_view(state)
    params = None if params is None else float32_view(params)
    new, state32 = inner.update(float32_view(updates), state32, params,
                                **extra_args)
    return new, store(state32)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
