"""Export quantized parameters to a ``.npz`` file that numpy alone can read.

:func:`export` writes a parameter tree (or ``{"params": ..., "batch_stats":
...}``, everything an inference needs) as a zip archive of ``.npy`` arrays
plus a ``meta.json`` entry, the layout of ``numpy.savez``, uncompressed so
that file sizes are the stored bytes:

* every :class:`qjax.codes.Codes` leaf as its stored codes ``data``
  (``uint8`` bit-packed 8 per byte for two-level grids, else ``uint8`` or
  ``uint16`` per weight) and ``values``, the float32 table of its grid's
  stored points (``values[k]`` is exactly what :func:`qjax.codes.decode`
  gives for code ``k``; a scaled grid stacked over configs has one table per
  config, ``float32[*batch, levels]``), and ``scale`` for a scaled grid;
* every other leaf as an array in its dtype (bfloat16 and fp8 as float32, which
  holds it exactly; :func:`load` casts it back);
* ``meta.json``: the format and its version, how to decode (in words), and
  for each leaf in tree order its path, name (``"Dense_0/kernel"``), kind,
  entry names, logical ``shape``, ``batch_shape``, ``dtype``, ``levels``,
  ``bits`` (1: packed, 8, 16), the bit order (``"little"``) and the grid
  (exact ``offset`` and ``step`` as fractions).

BC stores float latent weights; its forward pass sees them rounded to the
nearest grid point. ``export(path, params, method="bc")`` (or any ``grid=``)
encodes the masked float leaves with :func:`qjax.codes.encode_nearest`, so a
BC model is exported as the binary weights it is evaluated with, 1 bit
each.

:func:`load` gives back the tree with :class:`Codes` bit for bit;
:func:`load_numpy` decodes with numpy only. Reading a file without qjax,
the whole recipe (what :func:`load_numpy` runs)::

    import json, zipfile
    import numpy as np

    def load_numpy(path):
      with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("meta.json"))
      out = {}
      with np.load(path) as arrays:
        for leaf in meta["leaves"]:
          if leaf["kind"] == "array":
            out[leaf["name"]] = arrays[leaf["array"]]
            continue
          batch, shape = tuple(leaf["batch_shape"]), tuple(leaf["shape"])
          k = arrays[leaf["data"]]
          if leaf["bits"] == 1:  # 8 codes a byte, least significant bit first
            n = int(np.prod(shape))
            k = np.unpackbits(k, axis=-1, bitorder="little")[..., :n]
          k = k.reshape(batch + (-1,)).astype(np.intp)
          table = arrays[leaf["values"]]  # float32[levels] or [*batch, levels]
          table = np.broadcast_to(table, batch + table.shape[-1:])
          out[leaf["name"]] = np.take_along_axis(table, k, -1).reshape(
              batch + shape)
      return out

Decoded values come out in float32 (bfloat16 and float16 codes hold values
that float32 represents exactly; ``dtype`` in the metadata says which).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import codes as codes_lib
from qjax import formats
from qjax import methods as methods_lib
from qjax import quantizers
from qjax.grid import Grid
from qjax.grid import Points

# Float dtypes numpy cannot store in .npz; written as float32 (exactly).
_ML_FLOATS_BY_NAME = {np.dtype(t).name: np.dtype(t) for t in (
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}
_ML_FLOATS = tuple(_ML_FLOATS_BY_NAME.values())

PyTree = Any

FORMAT = "qjax-export"
VERSION = 1
DECODE_IN_WORDS = (
    "Each leaf of kind 'codes' stores integer codes k of a bounded grid in "
    "entry `data`; its value is values[k], with `values` the float32 table of "
    "the grid's stored points (shape [levels], or [*batch_shape, levels] for a "
    "scaled grid stacked over configs). When bits == 1 the codes are "
    "bit-packed: element 8*j+i of the C-order flattened array (per batch "
    "entry) is bit i (least significant first, numpy bitorder='little') of "
    "byte j of the last axis, the last byte padded with zeros; otherwise "
    "data is uint8 or uint16 of shape batch_shape + shape. Reshape the "
    "decoded values to batch_shape + shape. Leaves of kind 'array' are "
    "stored as they are (bfloat16 and fp8 as float32, exactly; `dtype` "
    "names the stored format).")


def _method_name(method) -> str | None:
  if method is None:
    return None
  name = method.name if isinstance(method, methods_lib.Method) else method
  if not isinstance(name, str):
    raise TypeError(
        f"export: method must be None, a name such as 'bc' or 'sr-adam', or "
        f"a qjax.Method; got {type(method).__name__}.")
  base = name.split("-")[0]
  if base not in methods_lib.names():
    raise ValueError(
        f"export: method must be one of {methods_lib.names()} (optionally "
        f"with an optimizer suffix such as 'bc-adam'); got {name!r}.")
  return base


def _path_entry(entry) -> list:
  tu = jax.tree_util
  if isinstance(entry, tu.DictKey):
    key = entry.key
    if not isinstance(key, (str, int)) or isinstance(key, bool):
      key = str(key)
    return ["key", key]
  if isinstance(entry, tu.SequenceKey):
    return ["idx", int(entry.idx)]
  if isinstance(entry, tu.GetAttrKey):
    return ["attr", entry.name]
  if isinstance(entry, tu.FlattenedIndexKey):
    return ["idx", int(entry.key)]
  return ["key", str(entry)]


def _quantized_view(params, method, mask, grid):
  """``params`` with the leaves to export as codes encoded (nearest)."""
  name = _method_name(method)
  if name is not None and not methods_lib.get(name).quantized:
    if grid is not None:
      raise ValueError(
          "export: method 'fp' has no quantized view; drop grid= (or pass "
          "method='bc' to export latent weights as their binary view).")
    return params
  latent = (name is not None
            and methods_lib.get(name).stores == "float latent")
  if latent and grid is None:
    grid = quantizers.glorot_binary_grid  # methods.make's default grid
  masked = quantizers.resolve_mask(mask, params, allow_empty=True)
  leaves, treedef = jax.tree_util.tree_flatten(params,
                                               is_leaf=codes_lib.is_codes)
  selected = treedef.flatten_up_to(masked)
  floats = [m and not codes_lib.is_codes(x) for x, m in zip(leaves, selected)]
  if grid is None:
    # SR/R onto a float format store the rounded values themselves (bf16,
    # f16, fp8): those leaves are the stored parameters, exported as they are.
    if name in ("sr", "r") and any(
        f and not _in_format(x) for x, f in zip(leaves, floats)):
      raise ValueError(
          f"export: method {name!r} stores its quantized weights as codes, "
          "but the mask selects float leaves; pass the stored parameters "
          "(TrainState.params, Method.project of the floats), or grid= to "
          "encode the floats onto a grid.")
    return params
  if not any(floats):
    return params
  grids = quantizers.resolve_grids(grid, params, masked)
  grid_leaves = treedef.flatten_up_to(grids)
  out = []
  for x, f, g in zip(leaves, floats, grid_leaves):
    if f:
      if not isinstance(g, Grid) or not g.bounded:
        raise ValueError(
            f"export: encoding a latent needs a bounded qjax.Grid; got {g!r}.")
      x = codes_lib.encode_nearest(x, g, dtype=_storage_dtype(x))
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _in_format(x) -> bool:
  """A leaf stored in a narrow float format (bf16, f16, fp8)."""
  try:
    formats.format_name(getattr(x, "dtype", None))
  except (TypeError, ValueError):
    return False
  return True


def _storage_dtype(x):
  name = np.dtype(x.dtype).name
  return name if name in ("bfloat16", "float16") else "float32"


def _values_table(c: codes_lib.Codes) -> np.ndarray:
  """float32 values of ``c``'s stored points, exactly what decode gives."""
  grid = c.grid
  if grid.scale is None:
    return np.asarray(Points(grid, c.dtype).v, np.float32)
  scale = jnp.asarray(grid.scale, jnp.float32)
  aux = (grid.offset, grid.step, grid.levels, True)
  table = jax.vmap(lambda s: Points(Grid.tree_unflatten(aux, (s,)),
                                    c.dtype).v)(scale.reshape(-1))
  return np.asarray(table, np.float32).reshape(scale.shape + (grid.levels,))


def _frac(q: Fraction) -> str:
  return f"{q.numerator}/{q.denominator}"


def export(path, params: PyTree, *, method=None, mask=None, grid=None) -> dict:
  """Writes ``params`` to the ``.npz`` file ``path`` (see the module doc).

  Args:
    path: the file to write (written as given, no suffix added; replaced
      atomically).
    params: a parameter tree of arrays and :class:`qjax.codes.Codes` (e.g.
      ``TrainState.params``, or ``{"params": state.params, "batch_stats":
      state.batch_stats}`` for everything an inference needs).
    method: ``None``, a method name (``"bc"``, ``"sr-adam"``, ...) or a
      :class:`qjax.Method`. ``"bc"`` exports the masked float latents as
      their quantized view: codes of the nearest point of ``grid`` (default
      :func:`qjax.glorot_binary_grid`, BC's default). ``"fp"`` exports floats.
    mask: which float leaves are quantized (as in :func:`qjax.resolve_mask`;
      default the kernels); used when latents are encoded.
    grid: a :class:`qjax.Grid` or ``(path, leaf) -> Grid``: encode the
      masked float leaves onto it (nearest point), whatever ``method``.

  Returns:
    The metadata written to ``meta.json``.
  """
  if hasattr(params, "opt_state") and hasattr(params, "params"):
    raise TypeError(
        "export expects a parameter tree, not a TrainState; pass "
        "state.params, or {'params': state.params, 'batch_stats': "
        "state.batch_stats}.")
  tree = _quantized_view(params, method, mask, grid)
  flat = jax.tree_util.tree_flatten_with_path(tree,
                                              is_leaf=codes_lib.is_codes)[0]
  arrays, leaves = {}, []
  for i, (kpath, leaf) in enumerate(flat):
    names = quantizers.path_names(kpath)
    entry = {"name": "/".join(names) or "<root>",
             "path": [_path_entry(e) for e in kpath]}
    if codes_lib.is_codes(leaf):
      g = leaf.grid
      data = np.asarray(jax.device_get(leaf.data))
      entry.update(
          kind="codes", data=f"leaf{i}.data", values=f"leaf{i}.values",
          scale=None if g.scale is None else f"leaf{i}.scale",
          shape=list(leaf.shape), batch_shape=list(leaf.batch_shape),
          dtype=np.dtype(leaf.dtype).name, levels=g.levels,
          bits=1 if codes_lib.packed(g) else 8 * data.dtype.itemsize,
          packed=codes_lib.packed(g), bitorder="little",
          code_dtype=data.dtype.name,
          grid={"offset": _frac(g.offset), "step": _frac(g.step),
                "levels": g.levels, "scaled": g.scale is not None})
      arrays[entry["data"]] = data
      arrays[entry["values"]] = _values_table(leaf)
      if g.scale is not None:
        arrays[entry["scale"]] = np.asarray(jax.device_get(g.scale),
                                            np.float32)
    else:
      dtype = getattr(leaf, "dtype", None)
      if dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key):
        raise TypeError(
            f"export: leaf {entry['name']} is a typed PRNG key; export "
            "parameters only (or jax.random.key_data of the key).")
      value = np.asarray(jax.device_get(leaf))
      dtype_name = value.dtype.name
      if value.dtype in _ML_FLOATS:  # bf16, fp8: not numpy types
        value = value.astype(np.float32)  # exact
      if value.dtype.kind not in "biuf":
        raise TypeError(
            f"export: leaf {entry['name']} has dtype {value.dtype}; only "
            "numeric arrays and Codes can be exported.")
      entry.update(kind="array", array=f"leaf{i}", shape=list(value.shape),
                   dtype=dtype_name)
      arrays[entry["array"]] = value
    leaves.append(entry)
  from qjax import __version__
  meta = {"format": FORMAT, "version": VERSION, "qjax_version": __version__,
          "method": None if method is None else (
              method.name if isinstance(method, methods_lib.Method)
              else method),
          "decode": DECODE_IN_WORDS, "leaves": leaves}
  _write(os.fspath(path), arrays, meta)
  return meta


def _write(path: str, arrays: dict, meta: dict) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=".npz")
  os.close(fd)
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
      for name, value in arrays.items():
        with z.open(name + ".npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.ascontiguousarray(value),
                                    allow_pickle=False)
      z.writestr("meta.json", json.dumps(meta, indent=1))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_meta(path) -> dict:
  """The ``meta.json`` of an exported file (checks format and version)."""
  try:
    with zipfile.ZipFile(path) as z:
      meta = json.loads(z.read("meta.json"))
  except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
    raise ValueError(
        f"{path} is not a qjax export (a zip with meta.json): {e}") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(
        f"{path}: unsupported export format {meta.get('format')!r} version "
        f"{meta.get('version')!r}; this qjax reads {FORMAT!r} version "
        f"{VERSION}.")
  return meta


def _grid_of(entry: dict, arrays) -> Grid:
  g = entry["grid"]
  grid = Grid(Fraction(g["offset"]), Fraction(g["step"]), g["levels"])
  if g["scaled"]:
    grid = Grid.tree_unflatten((grid.offset, grid.step, grid.levels, True),
                               (jnp.asarray(arrays[entry["scale"]]),))
  return grid


def _build(entries: list, leaves: list):
  """Nested dicts (lists for sequence indices) from the stored paths."""
  if len(entries) == 1 and not entries[0]["path"]:
    return leaves[0]

  def build(items):  # [(remaining path, leaf)], every path non-empty
    groups: dict = {}
    for path, leaf in items:
      groups.setdefault(path[0][1], []).append((path[1:], leaf))
    out = {key: sub[0][1] if len(sub) == 1 and not sub[0][0] else build(sub)
           for key, sub in groups.items()}
    if items[0][0][0][0] == "idx":
      return [out[i] for i in sorted(out)]
    return out

  return build([(e["path"], leaf) for e, leaf in zip(entries, leaves)])


def load(path, target: PyTree | None = None) -> PyTree:
  """Reads an exported file back: codes as :class:`Codes`, bit for bit.

  Args:
    path: a file written by :func:`export`.
    target: optional tree with the structure to rebuild (e.g. the exported
      ``params`` or their ``jax.eval_shape``); its leaf paths must match.
      Without it the tree is rebuilt as nested dicts (lists for sequence
      indices), which is what Flax parameters are.

  Returns:
    The tree: :class:`qjax.codes.Codes` with the stored data, grid (exact
    offset and step, the scale if any), shape and dtype, and ``jax.Array``
    leaves for the rest (bfloat16 and fp8 leaves cast back from float32
    exactly).
  """
  meta = read_meta(path)
  leaves = []
  with np.load(path, allow_pickle=False) as arrays:
    for entry in meta["leaves"]:
      if entry["kind"] == "codes":
        leaves.append(codes_lib.Codes(
            jnp.asarray(arrays[entry["data"]]), _grid_of(entry, arrays),
            tuple(entry["shape"]), entry["dtype"]))
      else:
        value = arrays[entry["array"]]
        if entry["dtype"] in _ML_FLOATS_BY_NAME:
          value = value.astype(_ML_FLOATS_BY_NAME[entry["dtype"]])
        leaves.append(jnp.asarray(value))
  if target is None:
    return _build(meta["leaves"], leaves)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      target, is_leaf=codes_lib.is_codes)
  want = [[_path_entry(e) for e in p] for p, _ in flat]
  have = [e["path"] for e in meta["leaves"]]
  if want != have:
    raise ValueError(
        f"load: {path} holds leaves {[e['name'] for e in meta['leaves']]}; "
        "target has "
        f"{['/'.join(quantizers.path_names(p)) for p, _ in flat]}.")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def load_numpy(path):
  """``{leaf name: decoded numpy array}`` using only numpy, json and zipfile.

  The same code as the recipe in the module docstring: codes decoded to
  float32 through the stored value tables, other leaves as stored.
  """
  with zipfile.ZipFile(path) as z:
    meta = json.loads(z.read("meta.json"))
  out = {}
  with np.load(path) as arrays:
    for leaf in meta["leaves"]:
      if leaf["kind"] == "array":
        out[leaf["name"]] = arrays[leaf["array"]]
        continue
      batch, shape = tuple(leaf["batch_shape"]), tuple(leaf["shape"])
      k = arrays[leaf["data"]]
      if leaf["bits"] == 1:  # 8 codes a byte, least significant bit first
        n = int(np.prod(shape))
        k = np.unpackbits(k, axis=-1, bitorder="little")[..., :n]
      k = k.reshape(batch + (-1,)).astype(np.intp)
      table = arrays[leaf["values"]]  # float32[levels] or [*batch, levels]
      table = np.broadcast_to(table, batch + table.shape[-1:])
      out[leaf["name"]] = np.take_along_axis(table, k, -1).reshape(
          batch + shape)
  return out
