"""How many bytes a training state takes, by category, and a step's peak memory.

:func:`memory_report` counts the stored arrays of a
:class:`qjax.train.TrainState` (or of a bare parameter tree) exactly: every
figure is a sum of the arrays' ``nbytes`` (``prod(shape) * itemsize``; shape
structs from ``jax.eval_shape`` count the same), and the categories partition
the state, so ``total`` is the sum of ``nbytes`` over
``jax.tree.leaves(state)``. Categories:

* ``codes``: the ``data`` of every :class:`qjax.codes.Codes` leaf of the
  parameters (bit-packed binary codes, ``uint8``/``uint16`` codes), padding
  of the last packed byte included.
* ``code_scales``: the scale of scaled grids (:meth:`qjax.Grid.scaled`, a
  float32 scalar per Codes leaf when a sweep varies the grid's size; 0
  otherwise).
* ``float_params``: every other parameter leaf: BC's float latent weights,
  FP's weights, biases, BatchNorm scales and offsets.
* ``optimizer_state``: every array of ``opt_state``: Adam's moments (float,
  one of each per parameter, also for weights stored as codes), step
  counts, SR's rounding key, the non-finite counters of
  :func:`qjax.skip_nonfinite`.
* ``batch_stats``: the model's other state (``TrainState.model_state``):
  BatchNorm running means and variances, an NNX model's RNG state.
* ``diagnostics``: what the state keeps only to report on training, and
  bookkeeping: ``init_signs`` (the packed initial signs of the quantized
  leaves, 1 bit per weight, for the sign-flip diagnostic), and the scalars
  ``step``, ``key`` (the run's raw uint32 key), ``skipped``, ``streak`` and
  ``first_skipped``. ``diagnostics_detail`` splits it into
  ``init_signs`` and ``counters_and_key``.

Sweeps. A state stacked over configs (``jax.vmap`` of
:func:`qjax.train.init_state`, as :mod:`qjax.sweep` runs it) has a leading
axis of length ``C`` on every array; the report then gives every figure *per
config* (the stacked arrays hold ``C`` times as much, ``all_configs_total``)
and says so in ``configs`` and ``note``.

:func:`compiled_peak_bytes` reads XLA's memory analysis of a compiled
function (e.g. a training step): its temporary buffers, arguments and
outputs.

Example:
  >>> report = qjax.memory.memory_report(state)
  >>> print(qjax.memory.format_report(report))
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from qjax import codes as codes_lib
from qjax import quantizers

PyTree = Any

CATEGORIES = ("codes", "code_scales", "float_params", "optimizer_state",
              "batch_stats", "diagnostics")
_DIAGNOSTIC_FIELDS = ("init_signs", "step", "key", "skipped", "streak",
                      "first_skipped")


def leaf_nbytes(x) -> int:
  """Bytes of one array (or shape struct): ``prod(shape) * itemsize``.

  Typed PRNG keys count as their key data (8 bytes for threefry keys).
  """
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    x = np.asarray(x)
    shape, dtype = x.shape, x.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    itemsize = dtype.itemsize
  else:
    itemsize = np.dtype(dtype).itemsize
  return int(math.prod(shape)) * int(itemsize)


def _tree_nbytes(tree) -> int:
  return sum(leaf_nbytes(x) for x in jax.tree.leaves(tree))


def _is_train_state(x) -> bool:
  from qjax import train  # local import: train imports much of qjax
  return isinstance(x, train.TrainState)


def _detect_configs(state, params) -> int:
  """How many configs a state is stacked over (1: not stacked)."""
  if _is_train_state(state):
    ndim = len(np.shape(state.step))
    if ndim == 0:
      return 1
    if ndim == 1:
      return int(np.shape(state.step)[0])
    raise ValueError(
        f"memory_report: state.step has shape {np.shape(state.step)}; a "
        "state is either one config (shape ()) or stacked over configs "
        "(shape (C,)).")
  for leaf in jax.tree.leaves(params, is_leaf=codes_lib.is_codes):
    if codes_lib.is_codes(leaf):
      batch = leaf.batch_shape
      if len(batch) > 1:
        raise ValueError(
            f"memory_report: codes with batch shape {batch}; only one "
            "leading configs axis is supported.")
      return int(batch[0]) if batch else 1
  return 1  # float-only params: pass configs= when they are stacked


def _per_config(nbytes: int, leaf, configs: int, where: str) -> int:
  if configs == 1:
    return nbytes
  shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
  if not shape or shape[0] != configs:
    raise ValueError(
        f"memory_report: the state is stacked over {configs} configs, but "
        f"{where} has shape {shape} (its leading axis should be {configs}).")
  return nbytes // configs


def memory_report(state, mask=None, *, configs: int | None = None) -> dict:
  """Bytes of a training state (or a parameter tree) by category, exactly.

  Args:
    state: a :class:`qjax.train.TrainState`, or a bare parameter tree (then
      only ``codes``, ``code_scales`` and ``float_params`` are non-zero).
      Arrays or ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape``).
    mask: optional; which *float* parameter leaves are latent weights of a
      quantized view (BC), as in :func:`qjax.resolve_mask`. They are still
      counted in ``float_params``; the per-layer rows mark them ``latent``
      and ``latent_weights`` counts them. Codes are always quantized.
    configs: how many configs the state is stacked over; default: detected
      (``state.step``'s shape, or the codes' batch axis of a bare tree; a
      stacked bare tree of floats only needs it given).

  Returns:
    A dict (figures per config, ints in bytes):

    * ``codes``, ``code_scales``, ``float_params``, ``optimizer_state``,
      ``batch_stats``, ``diagnostics`` (see the module docstring) and
      ``total``, their sum; ``params`` (codes + code scales + float params)
      and ``total_without_diagnostics``;
    * ``diagnostics_detail``: ``{"init_signs", "counters_and_key"}``;
    * ``quantized_weights``: logical weights stored as codes;
      ``bits_per_quantized_weight``: ``8 * codes / quantized_weights``
      (``None`` without codes); ``latent_weights`` (see ``mask``);
    * ``layers``: one row per parameter leaf: ``name``, ``kind``
      (``codes``, ``latent`` or ``float``), logical ``shape``, ``weights``,
      stored ``bytes`` (a code scale included), ``bits_per_weight``,
      ``levels`` (codes only) and ``optimizer_bytes``: the optimizer-state
      arrays of that leaf (those whose tree path ends with the leaf's path
      and whose shape is its shape: Adam's two moments);
    * ``configs``, ``all_configs_total`` (``configs * total``, the stacked
      arrays' bytes) and ``note``.
  """
  if _is_train_state(state):
    params = state.params
  elif isinstance(state, (list, tuple, dict)) or codes_lib.is_codes(state) or (
      hasattr(state, "shape") and hasattr(state, "dtype")):
    params = state
  else:
    raise TypeError(
        f"memory_report expects a qjax.train.TrainState or a parameter tree "
        f"(dicts, lists, arrays, Codes); got {type(state).__name__}.")
  detected = _detect_configs(state, params)
  if configs is None:
    configs = detected
  elif (not isinstance(configs, (int, np.integer)) or isinstance(configs, bool)
        or configs < 1):
    raise ValueError(f"memory_report: configs must be an int >= 1; got "
                     f"configs={configs!r}.")
  configs = int(configs)

  sizes = dict.fromkeys(CATEGORIES, 0)
  flat = jax.tree_util.tree_flatten_with_path(params,
                                              is_leaf=codes_lib.is_codes)[0]
  latent = [False] * len(flat)
  if mask is not None:
    resolved = quantizers.resolve_mask(mask, params, allow_empty=True)
    latent = jax.tree_util.tree_structure(
        params, is_leaf=codes_lib.is_codes).flatten_up_to(resolved)
  layers, quantized, latent_weights = [], 0, 0
  for (path, leaf), is_latent in zip(flat, latent):
    names = quantizers.path_names(path)
    name = "/".join(names) or "<root>"
    if codes_lib.is_codes(leaf):
      data = _per_config(leaf_nbytes(leaf.data), leaf.data, configs, name)
      scale = 0
      if leaf.grid.scale is not None:
        s = leaf.grid.scale
        scale = _per_config(leaf_nbytes(s), s, configs, name + " (scale)")
      sizes["codes"] += data
      sizes["code_scales"] += scale
      n = math.prod(leaf.shape)
      quantized += n
      layers.append({
          "name": name, "path": names, "kind": "codes",
          "shape": tuple(leaf.shape), "weights": n, "bytes": data + scale,
          "bits_per_weight": 8 * data / n if n else None,
          "levels": leaf.grid.levels, "optimizer_bytes": 0})
    else:
      nbytes = _per_config(leaf_nbytes(leaf), leaf, configs, name)
      sizes["float_params"] += nbytes
      shape = tuple(np.shape(leaf) if not hasattr(leaf, "shape")
                    else leaf.shape)[1 if configs > 1 else 0:]
      n = math.prod(shape)
      kind = "latent" if is_latent and not codes_lib.is_codes(leaf) else "float"
      latent_weights += n if kind == "latent" else 0
      layers.append({
          "name": name, "path": names, "kind": kind, "shape": shape,
          "weights": n, "bytes": nbytes,
          "bits_per_weight": 8 * nbytes / n if n else None, "levels": None,
          "optimizer_bytes": 0})

  detail = {"init_signs": 0, "counters_and_key": 0}
  if _is_train_state(state):
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        state.opt_state)[0]:
      nbytes = _per_config(leaf_nbytes(leaf), leaf, configs,
                           "opt_state" + jax.tree_util.keystr(path))
      sizes["optimizer_state"] += nbytes
      row = _owner(layers, quantizers.path_names(path), leaf, configs)
      if row is not None:
        row["optimizer_bytes"] += nbytes
    sizes["batch_stats"] = sum(
        _per_config(leaf_nbytes(x), x, configs, "batch_stats")
        for x in jax.tree.leaves(state.model_state))
    for field in _DIAGNOSTIC_FIELDS:
      nbytes = sum(_per_config(leaf_nbytes(x), x, configs, field)
                   for x in jax.tree.leaves(getattr(state, field)))
      detail["init_signs" if field == "init_signs"
             else "counters_and_key"] += nbytes
    sizes["diagnostics"] = sum(detail.values())

  total = sum(sizes.values())
  report = dict(sizes)
  report.update(
      total=total,
      params=sizes["codes"] + sizes["code_scales"] + sizes["float_params"],
      total_without_diagnostics=total - sizes["diagnostics"],
      diagnostics_detail=detail,
      quantized_weights=quantized,
      bits_per_quantized_weight=(8 * sizes["codes"] / quantized
                                 if quantized else None),
      latent_weights=latent_weights,
      layers=layers,
      configs=configs,
      all_configs_total=total * configs,
      note=("figures per config; the stacked state holds "
            f"{configs} x these ({total * configs} bytes in all)"
            if configs > 1 else "one config"),
  )
  return report


def _owner(layers: list[dict], opt_path: tuple[str, ...], leaf,
           configs: int) -> dict | None:
  """The parameter row an optimizer-state array belongs to, if any."""
  shape = tuple(leaf.shape)[1 if configs > 1 else 0:]
  best = None
  for row in layers:
    p = row["path"]
    if (p and len(p) <= len(opt_path) and tuple(opt_path[-len(p):]) == p
        and shape == row["shape"]
        and (best is None or len(p) > len(best["path"]))):
      best = row
  return best


def compiled_peak_bytes(fn: Callable, *args, **kwargs) -> dict:
  """XLA's memory analysis of ``jax.jit(fn)`` compiled for ``args``.

  Args:
    fn: a function of arrays (close over static things such as the model).
    *args, **kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes",
    "peak_bytes", "xla_peak_bytes", "available", "backend"}``: XLA's
    ``temp_size_in_bytes`` (scratch buffers of the program: activations,
    gradients, intermediate updates), ``argument_size_in_bytes``,
    ``output_size_in_bytes`` and ``alias_size_in_bytes`` (outputs that
    reuse an argument's buffer); ``peak_bytes`` is ``argument + output -
    alias + temp``, what the program needs allocated at once by XLA's buffer
    assignment. ``xla_peak_bytes`` is the backend's own
    ``peak_memory_in_bytes`` when it gives one (XLA:CPU reported less than
    the temp size for a training step, so it is passed on as is, not used).
    On a backend without memory analysis every figure is ``None`` and
    ``available`` is False.
  """
  compiled = jax.jit(fn).lower(*args, **kwargs).compile()
  out = {"temp_bytes": None, "argument_bytes": None, "output_bytes": None,
         "alias_bytes": None, "peak_bytes": None, "xla_peak_bytes": None,
         "available": False, "backend": jax.default_backend()}
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    stats = None
  if stats is None:
    return out
  fields = {"temp_bytes": "temp_size_in_bytes",
            "argument_bytes": "argument_size_in_bytes",
            "output_bytes": "output_size_in_bytes",
            "alias_bytes": "alias_size_in_bytes"}
  for key, attr in fields.items():
    value = getattr(stats, attr, None)
    out[key] = None if value is None else int(value)
  if all(out[k] is None for k in fields):
    return out
  out["available"] = True
  get = lambda k: out[k] or 0
  out["peak_bytes"] = (get("argument_bytes") + get("output_bytes")
                       - get("alias_bytes") + get("temp_bytes"))
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["xla_peak_bytes"] = None if peak is None else int(peak)
  return out


def _fmt_bytes(n) -> str:
  if n is None:
    return "-"
  for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_report(report: dict, layers: bool = True) -> str:
  """A short human-readable table of a :func:`memory_report`."""
  lines = [f"memory ({report['note']})",
           f"{'category':17} {'bytes':>12} {'':>11}"]
  for key in CATEGORIES + ("total",):
    if key == "code_scales" and not report[key]:
      continue
    lines.append(f"{key:17} {report[key]:>12,} {_fmt_bytes(report[key]):>11}")
  d = report["diagnostics_detail"]
  if report["diagnostics"]:
    lines.append(f"  (diagnostics: init_signs {d['init_signs']:,}, counters "
                 f"and key {d['counters_and_key']:,})")
  if report["quantized_weights"]:
    lines.append(f"quantized weights {report['quantized_weights']:,} at "
                 f"{report['bits_per_quantized_weight']:.3f} bits each")
  if layers and report["layers"]:
    lines.append(f"{'layer':24} {'kind':6} {'shape':18} {'weights':>9} "
                 f"{'bytes':>10} {'bits/w':>6} {'opt bytes':>10}")
    for r in report["layers"]:
      bits = ("-" if r["bits_per_weight"] is None
              else f"{r['bits_per_weight']:.2f}")
      lines.append(f"{r['name'][:24]:24} {r['kind']:6} "
                   f"{str(r['shape'])[:18]:18} {r['weights']:>9,} "
                   f"{r['bytes']:>10,} {bits:>6} {r['optimizer_bytes']:>10,}")
  return "\n".join(lines)
