"""Pure quantizers: deterministic and stochastic rounding, binarization, scales.

Everything here is a pure function of arrays (and an explicit ``jax.random``
key for the stochastic ones), safe under ``jit``, ``vmap`` and ``grad``.
Rounding decisions are made in float32 against the grid's points as stored in
the result's dtype (:class:`qjax.grid.Points`), so that bf16/f16 arithmetic
adds no bias and the points are exactly the grid asked for.

Notation (Li et al. 2017, Sec. 3): ``Q_d`` rounds to the nearest grid point,
``Q_s`` rounds up with probability equal to the fractional distance, so that
``E[Q_s(x)] = x`` for ``x`` inside the grid's range.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import codes as codes_lib
from qjax import formats
from qjax import grid as grid_lib
from qjax.formats import FloatGrid
from qjax.grid import Grid

Array = jax.Array
ArrayLike = Any
PyTree = Any
Predicate = Callable[[tuple, Any], bool]


# ----------------------------------------------------------------------------
# Rounding onto a grid.
# ----------------------------------------------------------------------------


def _as_float(x, fn_name: str) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{fn_name} needs a floating-point array; got dtype {x.dtype}. "
        "Cast integer inputs with x.astype(jnp.float32) first.")
  return x


def _storage_dtype(x: Array, dtype, fn_name: str):
  """The result dtype: ``dtype``, else ``x``'s (float32 for float64 input)."""
  if dtype is None:
    dtype = x.dtype if jnp.dtype(x.dtype).name in grid_lib.DTYPES else (
        jnp.float32)
  return grid_lib.check_dtype(dtype, fn_name)


def round_nearest(x: ArrayLike, grid: Grid, dtype=None) -> Array:
  """Deterministic rounding ``Q_d``: the nearest stored grid point.

  The points are the grid's points as stored in ``dtype`` (for a bounded
  grid, the dtype values nearest to the exact points, :func:`qjax.grid.values`).
  Ties round up (towards +inf), so on the binary grid ``0`` maps to ``+s``
  like :func:`sign`. Values outside a bounded grid's range clip to its end
  points; NaN stays NaN. Idempotent: ``round_nearest(round_nearest(x)) ==
  round_nearest(x)`` bit for bit. The decision is made in float32 (bf16 and
  f16 inputs convert losslessly; float32 denormals count as zero).

  Args:
    x: floating-point array of any dtype.
    grid: the :class:`~qjax.Grid` to round onto, or a
      :class:`~qjax.FloatGrid` (a floating-point format's finite values:
      ties to even, beyond the largest value saturates, the value of
      ``x.astype(format)`` inside the range; :mod:`qjax.formats`).
    dtype: storage dtype of the result (default ``x.dtype``; float32 for
      float64 input; the format's own dtype for a FloatGrid, or float32).
      Pass it to round a float32 value straight onto a bf16 parameter's
      points without an intermediate (biasing) cast.

  Returns:
    An array of ``x``'s shape and ``dtype`` whose entries are stored points.

  Example:
    >>> round_nearest(jnp.array([0.26, -3.0]), Grid.uniform(0.5, lo=-1., hi=1.))
    Array([ 0.5, -1. ], dtype=float32)
  """
  x = _as_float(x, "round_nearest")
  if isinstance(grid, FloatGrid):
    points = formats.FormatPoints(grid, dtype)
    x32 = jnp.asarray(x, jnp.float32)
    q = points.stored(points.nearest(x32)).astype(points.dtype)
    return jnp.where(jnp.isnan(x32), jnp.nan, q).astype(points.dtype)
  grid = grid_lib.check_grid(grid, "round_nearest")
  dtype = _storage_dtype(x, dtype, "round_nearest")
  x32 = grid_lib.as_float32(x, "round_nearest")
  points = grid_lib.Points(grid, dtype)
  q = points.value(points.nearest(x32))
  return jnp.where(jnp.isnan(x32), jnp.nan, q).astype(dtype)


_VMAP_ROUNDING = ("jax.vmap over the keys, e.g. jax.vmap(lambda k: "
                  "qjax.round_stochastic(k, x, grid))(keys)")


def _batched_key_error(name: str, key, hint: str) -> ValueError:
  return ValueError(
      f"{name} expects one key; got a batch of keys of shape {key.shape} "
      f"(dtype {key.dtype}). Pass a single key such as keys[0], or {hint}.")


def as_key(key, name: str = "key", vmap_hint: str = _VMAP_ROUNDING):
  """One ``jax.random`` key from an int seed, a typed key or a raw key.

  Accepts a Python or numpy integer or an integer scalar array (a seed,
  turned into ``jax.random.key(seed)``), a typed key of shape ``()`` or a raw
  ``uint32`` key of shape ``(2,)`` (returned as given, so results stay bit
  for bit those of that key).

  Raises:
    ValueError: for ``None`` or a batch of keys (typed keys of shape
      ``(n,)``, raw keys of shape ``(n, 2)``); ``vmap_hint`` says how to
      use several keys instead.
    TypeError: for anything else.
  """
  if key is None:
    raise ValueError(
        f"{name} draws random numbers and needs a key; got key=None. Pass "
        "key=0 (an int seed) or key=jax.random.key(0).")
  if isinstance(key, (int, np.integer)) and not isinstance(
      key, (bool, np.bool_)):
    return jax.random.key(int(key))
  if not isinstance(key, jax.Array):
    key = jnp.asarray(key) if isinstance(key, np.ndarray) else key
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape:
      raise _batched_key_error(name, key, vmap_hint)
    return key
  if dtype == jnp.uint32 and len(shape) >= 2:
    raise _batched_key_error(name, key, vmap_hint)
  if dtype == jnp.uint32 and len(shape) == 1:
    return key
  if (dtype is not None and jnp.issubdtype(dtype, jnp.integer)
      and shape == ()):
    return jax.random.key(key)
  description = (f"an array of dtype {dtype} and shape {shape}"
                 if dtype is not None else repr(key))
  raise TypeError(
      f"{name}: key must be an int seed or a jax.random key (typed, or raw "
      f"uint32 of shape (2,)); got {description}. Pass e.g. key=0 or "
      "key=jax.random.key(0).")


def _threefry_words(key) -> Array | None:
  """The ``uint32[2]`` Threefry key of ``key``, or None for other PRNGs."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape or "threefry" not in str(jax.random.key_impl(key)):
      return None
    key = jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    return None
  return key


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), fully unrolled.

  Bit for bit JAX's ``threefry2x32_p`` (tested). JAX lowers that primitive
  on CPU as a rolled loop over the rounds, which XLA cannot fuse with its
  consumer: every round group reads and writes the whole array, and a
  vmapped draw of 16 x 270k variates no longer fits in cache. Unrolled, the
  hash fuses into the rounding itself.
  """
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
      x1 = x0 ^ x1
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def uniform(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """``jax.random.uniform(key, shape, dtype)``, bit for bit, fusable on CPU.

  For a Threefry key (the default, typed or raw ``uint32[2]``) in float32,
  this computes exactly what ``jax.random.uniform`` computes under JAX's
  default partitionable Threefry (one hash of the element's counter per
  element, the two output words XORed, the top 23 bits as the mantissa), but
  with the rounds unrolled (:func:`_threefry2x32`) so that XLA fuses the hash
  into stochastic rounding. Measured on 2 CPU cores, 270k variates feeding a
  comparison: 0.59 ms instead of 1.79 ms for one key, 7.1 ms instead of
  78.9 ms vmapped over 16 keys. Other dtypes, PRNG implementations and the
  non-partitionable Threefry mode call ``jax.random.uniform`` itself.
  """
  words = _threefry_words(key)
  size = int(np.prod(shape, dtype=np.int64))
  if (words is None or jnp.dtype(dtype) != jnp.float32 or size >= 2**32
      or not jax.config.jax_threefry_partitionable):
    return jax.random.uniform(key, shape, dtype)
  hi, lo = _threefry2x32(words[0], words[1], jnp.zeros((size,), jnp.uint32),
                         lax.iota(jnp.uint32, size))
  mantissa = ((hi ^ lo) >> 9) | jnp.uint32(0x3F800000)  # [1, 2) in float32
  return (lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0).reshape(shape)


# Where the 32 random bits per element come from (``random_bits=``).
RANDOM_BITS = ("threefry", "hash")


def check_random_bits(source, name: str) -> str:
  """``source`` if it is one of :data:`RANDOM_BITS`, else a ValueError."""
  if not isinstance(source, str) or source not in RANDOM_BITS:
    raise ValueError(f"{name}: random_bits must be one of {RANDOM_BITS} "
                     f"('threefry': jax.random.bits' stream; 'hash': qjax's "
                     f"cheaper keyed hash); got random_bits={source!r}.")
  return source


def _lowbias32(x: Array) -> Array:
  """C. Wellons' ``lowbias32`` 32-bit integer mixer (a bijection)."""
  x = (x ^ (x >> jnp.uint32(16))) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> jnp.uint32(15))) * jnp.uint32(0x846CA68B)
  return x ^ (x >> jnp.uint32(16))


def hash_bits(key, shape: tuple[int, ...]) -> Array:
  """32 random bits per element from a keyed integer hash, cheaper than
  Threefry.

  Element ``i`` (row-major) gets ``h(h(i * 0x9E3779B9 + k0) ^ k1)`` with
  ``h`` :func:`_lowbias32` and ``(k0, k1)`` the key's two words (a raw or
  typed Threefry key; for other PRNGs, two words drawn from the key). Five
  32-bit multiplies and a dozen shifts and XORs per element, against about
  a hundred operations for one Threefry-2x32-20 hash. Measured on the SR
  update of one 784x512 bf16 leaf (2 AVX2 cores, other work running):
  0.31 ms against 0.75 ms, round-to-nearest 0.19 ms; the SR/R step ratio
  of ``python -m benchmarks.format_step`` went from 1.07-1.17 to 1.09-1.10
  on bf16 and from 1.09-1.14 to 1.01-1.06 on fp8 e4m3.

  What it is and is not: for one key the map from ``i`` to bits is a
  bijection of 32-bit words (no two elements of one draw share their bits),
  and the keys come from ``jax.random.split`` (Threefry), so every step's
  draw has fresh, independent words. It is a statistical hash, not a
  counter-based PRNG with Threefry's cryptographic margin; qjax tests its
  bit balance, its serial and cross-key correlations and SR's unbiasedness
  with it (tests/test_random_bits.py). It is not JAX's stream: a run with
  ``random_bits="hash"`` draws other numbers than the default.
  """
  key = as_key(key, "hash_bits")
  words = _threefry_words(key)
  if words is None:
    words = jax.random.bits(key, (2,), jnp.uint32)
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(f"hash_bits: at most 2**32 - 1 elements per draw; got "
                     f"shape {shape}.")
  x = lax.iota(jnp.uint32, size) * jnp.uint32(0x9E3779B9) + words[0]
  return _lowbias32(_lowbias32(x) ^ words[1]).reshape(shape)


def random_bits(key, shape: tuple[int, ...],
                source: str = "threefry") -> Array:
  """32 random bits per element of ``shape``, from ``source``.

  ``"threefry"`` (the default) is ``jax.random.bits(key, shape,
  jnp.uint32)``, bit for bit, but fusable on CPU: the same unrolled Threefry
  as :func:`uniform` (the XOR of the two output words is what
  ``jax.random.bits`` returns under the partitionable Threefry); other
  PRNGs and modes call ``jax.random.bits`` itself. ``"hash"`` is
  :func:`hash_bits`.
  """
  if check_random_bits(source, "random_bits") == "hash":
    return hash_bits(key, shape)
  words = _threefry_words(key)
  size = int(np.prod(shape, dtype=np.int64))
  if (words is None or size >= 2**32
      or not jax.config.jax_threefry_partitionable):
    return jax.random.bits(key, shape, jnp.uint32)
  hi, lo = _threefry2x32(words[0], words[1], jnp.zeros((size,), jnp.uint32),
                         lax.iota(jnp.uint32, size))
  return (hi ^ lo).reshape(shape)


_draw_bits = random_bits  # the keyword random_bits= below shadows the name


def round_stochastic(key: Array, x: ArrayLike, grid: Grid,
                     dtype=None, *, random_bits: str = "threefry") -> Array:
  """Stochastic rounding ``Q_s`` (Li et al. 2017, Eq. 3).

  With ``x`` between neighbouring stored points ``a <= x < b``, returns
  ``b`` with probability ``p = (x - a) / (b - a)`` and ``a`` otherwise, so
  ``E[Q_s(x)] = x`` and ``Var[Q_s(x)] = (b - a)² p (1 - p)`` with respect to
  the points as stored in ``dtype``. ``p`` is computed in float32; every
  element compares it with its own 32 random bits
  (``P(up) = ceil(p 2**32) / 2**32``). Values outside a bounded range clip to
  the end points; NaN stays NaN.

  Args:
    key: one ``jax.random`` key (typed, or raw ``uint32[2]``) or an int seed;
      the same key gives bit-identical results. For a batch of keys, use
      ``jax.vmap`` (see :func:`as_key`).
    x: floating-point array of any dtype.
    grid: the :class:`~qjax.Grid` to round onto, or a
      :class:`~qjax.FloatGrid` (a floating-point format; exactly unbiased
      on ``[-M, M]`` including binade boundaries and subnormals, beyond
      that saturating; random bits used as in
      :meth:`qjax.formats.FormatPoints.stochastic`).
    dtype: storage dtype of the result (default ``x.dtype``; the format's
      own dtype for a FloatGrid, or float32); the probabilities are
      computed in float32 from ``x`` itself.
    random_bits: where each element's 32 bits come from: ``"threefry"``
      (``jax.random.bits``' stream) or ``"hash"`` (:func:`hash_bits`,
      cheaper).

  Returns:
    An array of ``x``'s shape and ``dtype`` whose entries are stored points.
  """
  key = as_key(key, "round_stochastic", _VMAP_ROUNDING)
  source = check_random_bits(random_bits, "round_stochastic")
  x = _as_float(x, "round_stochastic")
  if isinstance(grid, FloatGrid):
    return _round_stochastic_format(key, x, grid, dtype, source)
  grid = grid_lib.check_grid(grid, "round_stochastic")
  dtype = _storage_dtype(x, dtype, "round_stochastic")
  x32 = grid_lib.as_float32(x, "round_stochastic")
  points = grid_lib.Points(grid, dtype)
  bits = _draw_bits(key, x.shape, source)
  q = points.value(points.stochastic(bits, x32))
  return jnp.where(jnp.isnan(x32), jnp.nan, q).astype(dtype)


def _round_stochastic_format(key, x, grid: FloatGrid, dtype,
                             source: str) -> Array:
  points = formats.FormatPoints(grid, dtype)
  x32 = jnp.asarray(x, jnp.float32)  # exact; float32 subnormals kept
  k = points.stochastic(random_bits(key, x.shape, source), x32)
  q = points.stored(k).astype(points.dtype)
  return jnp.where(jnp.isnan(x32), jnp.nan, q).astype(points.dtype)


# ----------------------------------------------------------------------------
# Binarization and scales.
# ----------------------------------------------------------------------------


def sign(x: ArrayLike, scale: ArrayLike = 1.0) -> Array:
  """Deterministic binarization ``scale * sign(x)`` with ``sign(0) = +1``."""
  x = _as_float(x, "sign")
  scale = jnp.asarray(scale, x.dtype)
  return jnp.where(x >= 0, scale, -scale).astype(x.dtype)


def stochastic_binarize(key: Array, x: ArrayLike,
                        scale: ArrayLike = 1.0) -> Array:
  """BinaryConnect's stochastic binarization (Courbariaux et al. 2015).

  Returns ``+scale`` with probability ``hard_sigmoid(x / scale) =
  clip((x / scale + 1) / 2, 0, 1)`` and ``-scale`` otherwise. This is exactly
  :func:`round_stochastic` on ``Grid.binary(scale)``.
  """
  grid = (Grid.binary(scale) if isinstance(scale, (int, float))
          else Grid.binary(1.0).scaled(scale))
  return round_stochastic(key, x, grid)


def glorot_scale(shape: tuple[int, ...]) -> float:
  """BinaryConnect's per-layer binary scale
  ``H = sqrt(1.5 / (fan_in + fan_out))``.

  For a Flax kernel the last axis is the output: dense ``(in, out)`` has
  ``fan_in = in``; a conv kernel ``(h, w, in, out)`` has ``fan_in = h w in``
  and ``fan_out = h w out`` (as in BinaryConnect's Lasagne code).
  """
  if len(shape) < 2:
    raise ValueError(
        f"glorot_scale needs a kernel of rank >= 2; got shape={shape}.")
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
  return float(np.sqrt(1.5 / (fan_in + fan_out)))


def mean_abs_scale(w: ArrayLike, axis: int = -1) -> Array:
  """Per-output-channel ``mean |w|`` (XNOR-Net / BWN), broadcastable to ``w``.

  Args:
    w: a kernel.
    axis: the output-channel axis (Flax kernels: the last).
  """
  w = _as_float(w, "mean_abs_scale")
  axis = axis % w.ndim
  others = tuple(a for a in range(w.ndim) if a != axis)
  return jnp.mean(jnp.abs(w), axis=others, keepdims=True)


# ----------------------------------------------------------------------------
# Straight-through estimators.
# ----------------------------------------------------------------------------


def straight_through_value(x: Array, q: Array,
                           clip: ArrayLike | None = None) -> Array:
  """Returns ``q`` exactly in the forward pass with the gradient of ``x``.

  ``x - stop_gradient(x)`` is exactly zero for finite ``x``, so the value is
  ``q`` bit for bit (unlike ``x + stop_gradient(q - x)``). With ``clip``, the
  gradient is zeroed where ``|x| > clip`` (BinaryConnect's clipped STE).
  """
  zero = x - lax.stop_gradient(x)
  if clip is not None:
    zero = zero * lax.stop_gradient(jnp.abs(x) <= clip).astype(x.dtype)
  return zero + lax.stop_gradient(q).astype(x.dtype)


def straight_through(quantizer: Callable[..., Array],
                     clip: ArrayLike | None = None) -> Callable[..., Array]:
  """Wraps any quantizer ``f(x, *args)`` so that its gradient is the identity.

  The wrapped function returns ``f(x, *args)`` exactly; its derivative with
  respect to ``x`` is 1 (or ``1{|x| <= clip}`` when ``clip`` is given). For a
  stochastic quantizer the key comes first: pass ``key`` as a keyword.

  Example:
    >>> ste_sign = straight_through(sign)
    >>> jax.grad(lambda w: ste_sign(w).sum())(jnp.array([0.3, -2.0]))
    Array([1., 1.], dtype=float32)
  """
  def quantize_with_ste(x, *args, **kwargs):
    x = jnp.asarray(x)
    if "key" in kwargs:
      q = quantizer(kwargs.pop("key"), x, *args, **kwargs)
    else:
      q = quantizer(x, *args, **kwargs)
    return straight_through_value(x, q, clip)
  return quantize_with_ste


# ----------------------------------------------------------------------------
# Masks and tree-level quantization.
# ----------------------------------------------------------------------------


def path_names(path) -> tuple[str, ...]:
  """``(('params', 'Conv_0', 'kernel'))``-style names of a tree path."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:  # pragma: no cover
      names.append(str(entry))
  return tuple(names)


def all_kernels(path: tuple[str, ...], leaf) -> bool:
  """Mask predicate: every weight matrix/tensor named ``kernel``.

  Flax Linen paths end in ``kernel``; Flax NNX state paths end in
  ``kernel``, ``value`` (e.g. ``('layers', '0', 'kernel', 'value')``).
  """
  del leaf
  return bool(path) and (path[-1] == "kernel"
                         or tuple(path[-2:]) == ("kernel", "value"))


def conv_kernels(path: tuple[str, ...], leaf) -> bool:
  """Mask predicate: convolution kernels only (rank >= 3), as in the paper."""
  return all_kernels(path, leaf) and len(leaf_shape(leaf)) >= 3


def leaf_shape(leaf) -> tuple[int, ...]:
  """The logical shape of a parameter leaf (an array or :class:`Codes`)."""
  if isinstance(leaf, codes_lib.Codes):
    return leaf.shape
  return tuple(jnp.shape(leaf))


def all_floats(path: tuple[str, ...], leaf) -> bool:
  """Mask predicate: every floating-point leaf."""
  del path
  return jnp.issubdtype(_leaf_dtype(leaf), jnp.floating)


def default_mask(path: tuple[str, ...], leaf) -> bool:
  """The mask used for ``mask=None``: :func:`all_kernels`.

  Biases, BatchNorm scales and other small leaves stay in float, as in the
  paper. When the parameters are a single bare array (path ``()``, as in
  :mod:`qjax.theory`), that array is the weight and is selected.
  """
  return not path or all_kernels(path, leaf)


def _leaf_dtype(leaf):
  dtype = getattr(leaf, "dtype", None)
  return jnp.result_type(leaf) if dtype is None else dtype


def _static_bool(value, path: tuple[str, ...], source: str) -> bool:
  """A mask entry as a Python bool; tracers and non-bools are clear errors."""
  where = "/".join(path) or "<root>"
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"masks must be static Python bools or predicates; the {source} gave "
        f"a traced value {value.aval} for leaf {where}. A mask passed to a "
        "jitted function as an argument, or built with jnp inside it, is "
        "traced: use Python True/False, build the mask outside jit and close "
        "over it, or pass a predicate such as qjax.all_kernels.")
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
      and value.dtype == jnp.bool_):
    return bool(value)
  if source == "predicate" and not isinstance(value, (np.ndarray, jax.Array)):
    return bool(value)
  raise TypeError(
      f"masks must hold one Python bool per leaf; the {source} gave "
      f"{value!r} for leaf {where}. Use True/False (not arrays of values "
      "or numbers), or a predicate (path, leaf) -> bool.")


def _describe_paths(params: PyTree, limit: int = 10) -> str:
  paths = ["/".join(path_names(p)) or "<root>"
           for p, _ in jax.tree_util.tree_flatten_with_path(
               params, is_leaf=codes_lib.is_codes)[0]]
  if not paths:
    return "the parameter tree has no leaves"
  shown = ", ".join(repr(p) for p in paths[:limit])
  more = f", ... and {len(paths) - limit} more" if len(paths) > limit else ""
  return f"its {len(paths)} leaves are {shown}{more}"


def _check_selected(mask: PyTree, params: PyTree, allow_empty: bool) -> None:
  """Selected leaves are floats; something is selected (unless allowed)."""
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=codes_lib.is_codes)[0]
  selected = jax.tree_util.tree_structure(
      params, is_leaf=codes_lib.is_codes).flatten_up_to(mask)
  for (path, leaf), m in zip(flat, selected):
    dtype = _leaf_dtype(leaf)
    if m and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          "quantized leaves must be floating point; the mask selects leaf "
          f"{'/'.join(path_names(path)) or '<root>'} of dtype {dtype}. "
          "Leave it out of the mask (e.g. with a predicate that also checks "
          "jnp.issubdtype(leaf.dtype, jnp.floating)) or cast it to float.")
  if not allow_empty and not any(selected):
    raise ValueError(
        "mask selects no parameter, so nothing would be quantized and the "
        f"run would silently train in float; {_describe_paths(params)}. Pass "
        "a mask that selects your kernels: a predicate (path, leaf) -> bool "
        "(e.g. lambda path, leaf: path[-1] == 'w' for Haiku, or "
        "qjax.all_floats for every float leaf), or a tree of bools shaped "
        "like the parameters. The default, qjax.all_kernels, selects leaves "
        "named 'kernel' (Flax Linen, and NNX paths ending 'kernel', 'value').")


def resolve_mask(mask, params: PyTree, *, allow_empty: bool = False) -> PyTree:
  """Turns ``mask`` into a tree of Python bools shaped like ``params``.

  Args:
    mask: ``None`` (:func:`default_mask`: the kernels, or a bare array
      itself), a predicate ``(path_names, leaf) -> bool`` such as
      :func:`conv_kernels`, or a tree of bools with exactly the structure of
      ``params``. Entries must be static: Python or numpy bools, or concrete
      (not traced) boolean scalars, converted with ``bool()``.
    params: the parameter tree.
    allow_empty: accept a mask that selects no leaf (for callers to whom an
      empty selection is legitimate, e.g. a diagnostic of a float run).

  Raises:
    ValueError: if a mask tree's structure differs from ``params``, if an
      entry is traced, or if nothing is selected and not ``allow_empty``.
    TypeError: if an entry is not a bool, or a selected leaf is not
      floating point.
  """
  if mask is None:
    mask = default_mask
  if callable(mask):
    resolved = jax.tree_util.tree_map_with_path(
        lambda p, leaf: _static_bool(mask(path_names(p), leaf), path_names(p),
                                     "predicate"), params,
        is_leaf=codes_lib.is_codes)
  else:
    params_def = jax.tree_util.tree_structure(params,
                                              is_leaf=codes_lib.is_codes)
    mask_def = jax.tree_util.tree_structure(mask)
    if params_def != mask_def:
      raise ValueError(
          "mask must be a predicate (path, leaf) -> bool or a tree of bools "
          f"with the same structure as the parameters.\n  mask tree:   "
          f"{mask_def}\n  params tree: {params_def}\nBuild it with "
          "qjax.resolve_mask(predicate, params) or jax.tree.map(lambda _: "
          "True, params).")
    resolved = jax.tree_util.tree_map_with_path(
        lambda p, _, m: _static_bool(m, path_names(p), "mask tree"),
        params, mask, is_leaf=codes_lib.is_codes)
  _check_selected(resolved, params, allow_empty)
  return resolved


def resolve_mask_and_codes(mask, params: PyTree) -> tuple[PyTree, PyTree]:
  """``(resolved mask, selected)``: ``selected`` adds every Codes leaf.

  For update rules: a leaf stored as :class:`~qjax.Codes` is always acted
  on (its update can only be a code step), whatever the mask says, so a mask
  that selects no float leaf is accepted when there are codes.
  """
  is_codes = codes_lib.is_codes
  has_codes = any(is_codes(p) for p in jax.tree.leaves(params,
                                                       is_leaf=is_codes))
  resolved = resolve_mask(mask, params, allow_empty=has_codes)
  selected = jax.tree.map(lambda m, p: bool(m) or is_codes(p), resolved,
                          params, is_leaf=is_codes)
  return resolved, selected


def resolve_grids(grid, params: PyTree, mask: PyTree) -> PyTree:
  """A tree like ``params`` holding each masked leaf's Grid (None elsewhere).

  Args:
    grid: a :class:`Grid` shared by every masked leaf, or a callable
      ``(path_names, leaf) -> Grid`` (e.g. :func:`glorot_binary_grid`).
    params: the parameter tree (arrays or shape structs).
    mask: a resolved boolean mask tree (see :func:`resolve_mask`).
  """
  if isinstance(grid, (Grid, FloatGrid)):
    make = lambda path, leaf: grid
  elif callable(grid):
    make = grid
  else:
    raise TypeError(
        f"grid must be a qjax.Grid or a callable (path, leaf) -> Grid; got "
        f"{type(grid).__name__}.")
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf, m: make(path_names(p), leaf) if m else None,
      params, mask, is_leaf=codes_lib.is_codes)


def glorot_binary_grid(path: tuple[str, ...], leaf) -> Grid:
  """Per-leaf binary grid ``{-H, +H}`` with BinaryConnect's Glorot scale H."""
  del path
  return Grid.binary(glorot_scale(leaf_shape(leaf)))


def grid_bounds(grid: Grid, dtype=jnp.float32) -> tuple[Array, Array]:
  """A bounded grid's lowest and highest stored points in ``dtype``."""
  if isinstance(grid, FloatGrid):
    dtype = formats.check_storage(grid, dtype, "grid_bounds")
    return jnp.asarray(grid.lo, dtype), jnp.asarray(grid.hi, dtype)
  if not grid.bounded:
    raise ValueError(f"grid {grid} is unbounded: it has no end points.")
  points = grid_lib.Points(grid, dtype)
  return points.v[0], points.v[-1]


def map_masked(fn, params, mask, grids, key, updates=None):
  """Applies ``fn`` to the masked leaves of ``params`` only.

  The one walker over (params, mask, grids[, updates]) that the quantizers,
  the update rules and the methods share: :class:`~qjax.Codes` count as
  leaves, and ``key`` (or ``None``) is split into one key per leaf.

  Args:
    fn: ``fn(key_or_None, leaf, grid)``, or with ``updates``
      ``fn(key_or_None, leaf, grid, update)``.
    params: the parameter tree.
    mask: a resolved boolean tree like ``params`` (:func:`resolve_mask`).
    grids: a tree like ``params`` of Grids (or None), e.g.
      :func:`resolve_grids`.
    key: ``None`` or a key.
    updates: optional tree like ``params``; an unmasked leaf then maps to
      its update (an optax rule passes those through), else to itself.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params,
                                               is_leaf=codes_lib.is_codes)
  masks = treedef.flatten_up_to(mask)
  grid_leaves = treedef.flatten_up_to(grids)
  keys = ([None] * len(leaves) if key is None
          else list(jax.random.split(key, len(leaves))))
  if updates is None:
    out = [fn(k, leaf, g) if m else leaf
           for k, leaf, m, g in zip(keys, leaves, masks, grid_leaves)]
  else:
    out = [fn(k, leaf, g, u) if m else u for k, leaf, m, g, u in zip(
        keys, leaves, masks, grid_leaves, treedef.flatten_up_to(updates))]
  return jax.tree_util.tree_unflatten(treedef, out)


def quantize(params: PyTree, quantizer: Callable[..., Array] = round_nearest,
             mask=None, *, grid=None, key: Array | None = None,
             clip: ArrayLike | None = None) -> PyTree:
  """The forward-pass view of ``params`` with masked leaves quantized (STE).

  Each selected leaf ``w`` becomes ``quantizer(w, grid)`` (or
  ``quantizer(w)`` when ``grid`` is None; with ``key``, the quantizer is
  stochastic and is called as ``quantizer(leaf_key, w[, grid])``). Gradients
  pass straight through: identity, or zero where ``|w| > clip``. This is
  BinaryConnect's forward pass ``g(Q(w_r))`` (Li et al. 2017, Eq. 5).

  Args:
    params: parameter tree.
    quantizer: e.g. :func:`round_nearest`, :func:`round_stochastic`,
      :func:`sign`.
    mask: which leaves to quantize (see :func:`resolve_mask`); the default
      is the kernels (:func:`default_mask`). Selecting nothing is an error.
    grid: a Grid, or ``(path, leaf) -> Grid``, passed to the quantizer.
    key: for stochastic quantizers (a key or an int seed); split into one
      key per leaf.
    clip: optional STE clip.

  Returns:
    A tree like ``params``.

  Example:
    >>> view = quantize(params, round_nearest, conv_kernels,
    ...                 grid=Grid.binary())
  """
  mask = resolve_mask(mask, params)
  key = None if key is None else as_key(key, "quantize")
  grids = (jax.tree.map(lambda _: None, params) if grid is None
           else resolve_grids(grid, params, mask))

  def quantize_leaf(k, w, g):
    args = () if g is None else (g,)
    q = quantizer(w, *args) if k is None else quantizer(k, w, *args)
    return straight_through_value(w, q, clip)

  return map_masked(quantize_leaf, params, mask, grids, key)

