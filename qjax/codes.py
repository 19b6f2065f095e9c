"""Quantized arrays stored as integer grid codes.

A :class:`Codes` is a quantized array: a pytree holding the integer codes of
its points on a bounded :class:`qjax.Grid` (and the grid's scale, when it has
one), with the grid's static fields, the logical shape and the storage dtype
as static data. Two-level (binary) grids pack 8 codes per byte; grids of up
to 256 levels use one ``uint8`` per code, up to 65536 one ``uint16``.

"On the grid" is true by construction: :func:`decode` is a gather from the
grid's value table (:func:`qjax.grid.values`: the storage-dtype value nearest
to the exact point ``offset + k * step``), the same bits eagerly, under
``jit`` and under ``vmap``, on every backend; every rounding decision is a
comparison with precomputed thresholds, and updates of the codes are exact
integer arithmetic.

This is how SR and R (Li, De, Xu, Studer, Samet, Goldstein, "Training
Quantized Nets: A Deeper Understanding", NeurIPS 2017) store weights in qjax:
only the quantized weights, no float copy. The update rules
(:func:`qjax.stochastic_rounding`, :func:`qjax.nearest_rounding`) turn a float
update into new codes and emit the difference of the stored bytes (modulo
256), which ``optax.apply_updates`` adds back exactly.

Example:
  >>> from qjax import codes, Grid
  >>> c = codes.encode_nearest(jnp.array([0.3, -2.0, 0.0]), Grid.binary(0.5))
  >>> codes.decode(c)
  Array([ 0.5, -0.5,  0.5], dtype=float32)
  >>> codes.nbytes(c), c.data.dtype
  (1, dtype('uint8'))
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.grid import Grid
from qjax.grid import Points
from qjax.grid import as_float32
from qjax.grid import check_dtype
from qjax.grid import values

ArrayLike = Any
PyTree = Any


def code_dtype(grid: Grid) -> np.dtype:
  """The integer dtype of ``grid``'s stored codes (uint8 or uint16)."""
  return np.dtype(np.uint8 if grid.levels <= 256 else np.uint16)


def packed(grid: Grid) -> bool:
  """Whether ``grid``'s codes are bit-packed (two levels: 8 per byte)."""
  return grid.levels == 2


def _n_elements(shape: tuple[int, ...]) -> int:
  return math.prod(shape)


def _packed_size(shape: tuple[int, ...]) -> int:
  return -(-_n_elements(shape) // 8)


def _check_bounded(grid, where: str) -> Grid:
  if not isinstance(grid, Grid):
    raise TypeError(
        f"{where} expects a qjax.Grid (e.g. Grid.binary(1.0)); got "
        f"{type(grid).__name__}.")
  if not grid.bounded:
    raise ValueError(
        f"{where}: codes need a bounded grid (a finite number of levels); "
        f"got {grid!r}. Use e.g. Grid.uniform(step, lo=-1, hi=1).")
  return grid


@jax.tree_util.register_pytree_with_keys_class
class Codes:
  """A quantized array: integer codes on a bounded :class:`qjax.Grid`.

  A pytree whose leaves are ``data`` (the stored codes) and the grid's
  ``scale`` when it has one; the grid's static fields, the logical ``shape``
  and the storage ``dtype`` of the decoded values are static metadata.
  Storage of an array of shape ``shape``:

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
    grid: the :class:`qjax.Grid` (bounded).
    shape: the logical shape of one array (without batch axes).
    dtype: the storage dtype of the decoded values (float32, bfloat16 or
      float16).
  """

  __slots__ = ("data", "grid", "shape", "dtype")

  def __init__(self, data, grid: Grid, shape, dtype=np.float32):
    grid = _check_bounded(grid, "Codes")
    dtype = check_dtype(dtype, "Codes")
    values(grid, dtype)  # the grid must be representable in dtype
    shape = tuple(int(s) for s in shape)
    data = jnp.asarray(data)
    want = code_dtype(grid)
    if data.dtype != want:
      raise ValueError(
          f"Codes for {grid!r} are stored as {want.name}; got data of dtype "
          f"{data.dtype}. Build codes with pack(k, grid).")
    tail = (_packed_size(shape),) if packed(grid) else shape
    if data.ndim < len(tail) or data.shape[data.ndim - len(tail):] != tail:
      raise ValueError(
          f"Codes of shape {shape} for {grid!r} store data of shape "
          f"(..., {', '.join(map(str, tail))}); got {data.shape}.")
    self.data, self.grid, self.shape, self.dtype = data, grid, shape, dtype

  def tree_flatten_with_keys(self):
    return (((jax.tree_util.GetAttrKey("data"), self.data),
             (jax.tree_util.GetAttrKey("grid"), self.grid)),
            (self.shape, self.dtype))

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks: tree utilities rebuild pytrees with placeholders as leaves.
    obj = object.__new__(cls)
    obj.data, obj.grid = children
    obj.shape, obj.dtype = aux
    return obj

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading (batch) axes of ``data`` beyond one array's storage."""
    tail = 1 if packed(self.grid) else len(self.shape)
    return tuple(self.data.shape[:self.data.ndim - tail])

  def __repr__(self) -> str:
    data = getattr(self.data, "dtype", None)
    data = (f"{data.name}{list(self.data.shape)}" if data is not None
            else repr(self.data))
    return (f"Codes(shape={self.shape}, grid={self.grid!r}, "
            f"dtype={self.dtype.name}, data={data})")


def is_codes(x) -> bool:
  """Whether ``x`` is a :class:`Codes` (for ``is_leaf`` in tree maps)."""
  return isinstance(x, Codes)


def _check_codes(codes, where: str) -> Codes:
  if not isinstance(codes, Codes):
    raise TypeError(f"{where} expects Codes; got {type(codes).__name__}.")
  return codes


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


def pack(k: ArrayLike, grid: Grid, dtype=np.float32) -> Codes:
  """Codes from integer code indices ``k`` in ``[0, grid.levels)``.

  Indices are not clipped (use :func:`step_codes` for clipped updates);
  concrete out-of-range indices raise. Bit-packs two-level grids.

  Args:
    k: an integer array of code indices (its shape is the logical shape).
    grid: the bounded :class:`qjax.Grid` the codes refer to.
    dtype: the storage dtype of the decoded values.

  Example:
    >>> unpack(pack(jnp.array([2, 0, 1]), Grid.ternary(1.0)))
    Array([2, 0, 1], dtype=int32)
  """
  grid = _check_bounded(grid, "pack")
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
  return from_indices(k, grid, dtype)


def from_indices(k: jax.Array, grid: Grid, dtype=np.float32,
                 batch_ndim: int = 0) -> Codes:
  """Codes from in-range int indices (no checks; traceable)."""
  shape = tuple(k.shape[batch_ndim:])
  if packed(grid):
    data = pack_bits(k, batch_ndim)
  else:
    data = k.astype(code_dtype(grid))
  obj = object.__new__(Codes)
  obj.data, obj.grid, obj.shape, obj.dtype = data, grid, shape, check_dtype(
      dtype, "Codes")
  return obj


def unpack(codes: Codes) -> jax.Array:
  """The code indices ``k`` as ``int32[*batch, *shape]``."""
  codes = _check_codes(codes, "unpack")
  if packed(codes.grid):
    k = unpack_bits(codes.data, codes.shape)
  else:
    k = codes.data
  return k.astype(jnp.int32)


def decode(codes: Codes) -> jax.Array:
  """The values of ``codes``: a gather from the grid's stored points.

  ``decode(c)[i]`` is point ``k_i`` of ``c.grid`` stored in ``c.dtype``: the
  value-table entry (:func:`qjax.grid.values`) for an unscaled grid, a pure
  table lookup that gives the same bits eagerly, under ``jit`` and ``vmap``,
  on every backend; ``fl_dtype(fl32(values32[k] * scale))`` for a scaled
  grid. Codes beyond ``levels - 1`` (possible only in hand-made data) read
  the top value.

  Returns:
    An array of shape ``codes.batch_shape + codes.shape``, dtype
    ``codes.dtype``.

  Example:
    >>> decode(pack(jnp.array([0, 2]), Grid.ternary(0.5)))
    Array([-0.5,  0.5], dtype=float32)
  """
  codes = _check_codes(codes, "decode")
  scale = codes.grid.scale
  if scale is not None and jnp.ndim(scale) > 0:
    # Codes stacked over a sweep's lanes with one scale per lane.
    if jnp.shape(scale) != codes.batch_shape[:jnp.ndim(scale)]:
      raise ValueError(
          f"decode: a scale of shape {jnp.shape(scale)} does not match the "
          f"codes' batch shape {codes.batch_shape}.")
    return jax.vmap(decode)(codes)
  return Points(codes.grid, codes.dtype).value(unpack(codes)).astype(
      codes.dtype)


def nbytes(codes: Codes) -> int:
  """Bytes the stored codes take (``codes.data.nbytes``, padding included).

  The scale of a scaled grid (4 bytes per array) is not counted here.
  """
  codes = _check_codes(codes, "nbytes")
  return int(math.prod(codes.data.shape)) * codes.data.dtype.itemsize


def bits_per_weight(codes: Codes) -> float:
  """Stored bits per logical weight: 1.0 for binary (up to padding), 8, 16."""
  codes = _check_codes(codes, "bits_per_weight")
  n = math.prod(codes.batch_shape) * _n_elements(codes.shape)
  if n == 0:
    return float("nan")
  return 8.0 * nbytes(codes) / n


# ----------------------------------------------------------------------------
# Encoding.
# ----------------------------------------------------------------------------


def encode_nearest(x: ArrayLike, grid: Grid, dtype=None) -> Codes:
  """Deterministic rounding ``Q_d``: the code of the nearest stored point.

  Ties (``x`` exactly half way between two stored points) go to the upper
  one, so on a binary grid ``0`` encodes as ``+scale`` like
  :func:`qjax.sign`. Values beyond the ends encode as the end codes; NaN
  encodes as code 0. For an unscaled grid the decision is exact: ``x``
  (cast to float32, losslessly for bf16/f16 inputs) is compared with
  precomputed float32 thresholds, the exact midpoints rounded up. Float32
  denormal inputs count as zero. Idempotent:
  ``encode_nearest(decode(c)) == c``.

  Args:
    x: a real array (float or integer) of any shape.
    grid: a bounded :class:`qjax.Grid`.
    dtype: storage dtype of the decoded values (default: ``x``'s dtype if
      it is bfloat16 or float16, else float32).
  """
  grid = _check_bounded(grid, "encode_nearest")
  dtype = _default_dtype(x, dtype)
  x = as_float32(x, "encode_nearest")
  return from_indices(Points(grid, dtype).nearest(x), grid, dtype)


def _default_dtype(x, dtype):
  if dtype is not None:
    return check_dtype(dtype, "codes")
  dt = getattr(x, "dtype", None)
  if dt is not None and np.dtype(dt).name in ("bfloat16", "float16"):
    return check_dtype(dt, "codes")
  return np.dtype(np.float32)


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


def encode_stochastic(key, x: ArrayLike, grid: Grid, dtype=None) -> Codes:
  """Stochastic rounding ``Q_s`` onto the stored points (Li et al., Eq. 3).

  With ``lo <= x < hi`` the neighbouring stored points (codes ``k``,
  ``k + 1``), returns code ``k + 1`` with probability
  ``p = (x - lo) / (hi - lo)`` and ``k`` otherwise, so
  ``E[decode(Q_s(x))] = x`` and ``Var = (hi - lo)**2 p (1 - p)`` with respect
  to the *stored* values. ``p`` is computed in float32 and clipped to
  ``[0, 1]``: beyond the ends ``x`` encodes as the end code, a stored point
  encodes as itself. Each element compares ``p`` with its own 32 random
  bits: ``P(up) = ceil(p 2**32) / 2**32``, within ``2**-32`` of ``p``. NaN
  encodes as its lower bracket code; float32 denormal inputs count as zero.

  Args:
    key: one ``jax.random`` key (typed, or raw ``uint32[2]``) or an int
      seed; the same key gives the same codes bit for bit.
    x: a real array of any shape.
    grid: a bounded :class:`qjax.Grid`.
    dtype: storage dtype of the decoded values (as in :func:`encode_nearest`).
  """
  grid = _check_bounded(grid, "encode_stochastic")
  key = _as_key(key, "encode_stochastic")
  dtype = _default_dtype(x, dtype)
  x = as_float32(x, "encode_stochastic")
  bits = jax.random.bits(key, x.shape, jnp.uint32)
  return from_indices(Points(grid, dtype).stochastic(bits, x), grid, dtype)


# ----------------------------------------------------------------------------
# Exact integer updates.
# ----------------------------------------------------------------------------


def step_codes(codes: Codes, delta_k: ArrayLike) -> Codes:
  """Moves every code by an integer ``delta_k``, clipped to the grid.

  ``k' = clip(k + delta_k, 0, levels - 1)`` in int32 (``delta_k`` is first
  clipped to ``[-levels, levels]``, so nothing overflows), then stored again.
  Exact integer arithmetic: ``step_codes(c, 0)`` is ``c`` bit for bit.
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
  return from_indices(k, codes.grid, codes.dtype,
                      batch_ndim=len(codes.batch_shape))


def update(old: Codes, new: Codes) -> Codes:
  """The update that ``optax.apply_updates(old, update)`` turns into ``new``.

  A :class:`Codes` whose ``data`` is ``new.data - old.data`` modulo 256 (or
  65536) byte by byte: ``old.data + update.data`` wraps around to exactly
  ``new.data``, packed bytes included. The grid's scale gets a zero update.
  Both must have the same grid, shape and dtype.
  """
  _check_codes(old, "update")
  _check_codes(new, "update")
  if (old.grid.unscaled() != new.grid.unscaled() or old.shape != new.shape
      or old.dtype != new.dtype):
    raise ValueError(
        f"update: codes differ in grid, shape or dtype: {old!r} vs {new!r}.")
  delta = new.data - old.data  # unsigned: wraps modulo 2**bits
  grid = old.grid
  if grid.scale is not None:
    grid = Grid.tree_unflatten(
        (grid.offset, grid.step, grid.levels, True),
        (jnp.zeros_like(jnp.asarray(grid.scale, jnp.float32)),))
  obj = object.__new__(Codes)
  obj.data, obj.grid, obj.shape, obj.dtype = delta, grid, old.shape, old.dtype
  return obj


# ----------------------------------------------------------------------------
# Trees.
# ----------------------------------------------------------------------------


def decode_tree(tree: PyTree) -> PyTree:
  """``tree`` with every :class:`Codes` decoded to its float values.

  Other leaves are returned as they are; this is the forward-pass view of a
  parameter tree that stores some leaves as codes.
  """
  return jax.tree.map(lambda x: decode(x) if is_codes(x) else x, tree,
                      is_leaf=is_codes)


def encode_tree(params: PyTree, grids: PyTree, key=None) -> PyTree:
  """Masked leaves of ``params`` as :class:`Codes` (nearest, or ``Q_s``).

  Args:
    params: a float parameter tree.
    grids: a tree like ``params`` holding a bounded Grid for every leaf to
      encode and ``None`` elsewhere (see :func:`qjax.quantizers.leaf_grids`).
    key: ``None`` for round-to-nearest, else a key for stochastic rounding
      (split into one key per leaf).

  Each leaf keeps its dtype as the codes' storage dtype (bfloat16 and
  float16 stay; other floats decode as float32).
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grid_leaves = treedef.flatten_up_to(grids)
  keys = ([None] * len(leaves) if key is None
          else list(jax.random.split(_as_key(key, "encode_tree"),
                                     len(leaves))))
  out = []
  for k, leaf, g in zip(keys, leaves, grid_leaves):
    if g is None:
      out.append(leaf)
    elif k is None:
      out.append(encode_nearest(leaf, g))
    else:
      out.append(encode_stochastic(k, leaf, g))
  return jax.tree_util.tree_unflatten(treedef, out)


def tree_nbytes(tree: PyTree, select: Callable[[Any], bool] | None = None
                ) -> int:
  """Total bytes of the arrays in ``tree`` (codes counted as stored)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if select is None or select(leaf):
      total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
  return total


# ----------------------------------------------------------------------------
# Flax state dicts (checkpoints): codes are their stored arrays.
# ----------------------------------------------------------------------------


def _grid_to_state(grid: Grid) -> dict:
  return {} if grid.scale is None else {"scale": grid.scale}


def _grid_from_state(target: Grid, state: dict) -> Grid:
  if target.scale is None:
    return target
  return Grid.tree_unflatten(
      (target.offset, target.step, target.levels, True), (state["scale"],))


def _codes_to_state(c: Codes) -> dict:
  out = {"data": c.data}
  out.update(_grid_to_state(c.grid))
  return out


def _codes_from_state(target: Codes, state: dict) -> Codes:
  obj = object.__new__(Codes)
  obj.data = state["data"]
  obj.grid = _grid_from_state(target.grid, state)
  obj.shape, obj.dtype = target.shape, target.dtype
  return obj


def _register_serialization():
  from flax import serialization  # flax is a dependency of qjax
  serialization.register_serialization_state(
      Codes, _codes_to_state, _codes_from_state, override=True)
  serialization.register_serialization_state(
      Grid, _grid_to_state, _grid_from_state, override=True)


_register_serialization()
