"""Training methods as data: a forward view, an optax chain, an initial projection.

=========  ===================  ==========================  ======================
method     forward view         update (last chain link)    stored weights
=========  ===================  ==========================  ======================
``fp``     identity             none (plain optimizer)      float
``bc``     ``Q_d(w_r)`` (STE)   :func:`latent_clipping`     float latent
``sr``     decoded codes        :func:`stochastic_rounding` grid codes (1 bit/bin)
``r``      decoded codes        :func:`nearest_rounding`    grid codes (1 bit/bin)
=========  ===================  ==========================  ======================

A training loop holds the *stored* parameters (``Method.project`` of the
initial floats: :class:`qjax.codes.Codes` for SR and R), differentiates the
loss at ``Method.view(qjax.codes.decode_tree(stored))``, initialises
``Method.tx`` on the decoded floats and applies its updates to the stored
tree with ``optax.apply_updates`` (exact for codes).

Each method runs with base optimizer ``sgd`` (the paper's equations) or
``adam`` (the "-ADAM" variants: R-ADAM, SR-ADAM, BC-ADAM; Adam moments stay in
float). A training loop needs only :class:`Method`'s fields, never the name.

Which leaves are quantized: ``mask`` (default: the kernels,
:func:`qjax.all_kernels`; biases and BatchNorm parameters stay in float). A
mask that selects no leaf is an error, not a silent float run.

Non-finite steps: every ``Method.tx`` is the whole chain wrapped in
:func:`qjax.skip_nonfinite`. A step whose gradients or updates contain a NaN
or inf changes nothing: parameters stay bit for bit (on the grid for SR/R),
the optimizer state (Adam's moments, SR's key) is kept, and the state's
``skipped`` and ``streak`` counters grow; the next finite step trains
normally. A run whose ``streak`` keeps growing has stopped training.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from qjax import codes
from qjax import grid as grid_lib
from qjax import quantizers
from qjax import transforms
from qjax.grid import Grid

PyTree = Any

METHODS = ("fp", "bc", "sr", "r")
OPTIMIZERS = ("sgd", "adam")
# How the forward pass sees the weights at evaluation time; recorded in every
# result so that "which weights were evaluated" is never implicit.
EVAL_MODES = {
    "fp": "float",
    "bc": "deterministic-quantized latent",
    "sr": "stored grid weights",
    "r": "stored grid weights",
}


class Method(NamedTuple):
  """A training method (Li et al. 2017, Sec. 3).

  Attributes:
    name: e.g. ``"sr-adam"``.
    view: float ``params -> params`` used in the forward pass (and
      evaluation), applied to the decoded parameters.
    tx: the optax chain, wrapped in :func:`qjax.skip_nonfinite` (its state is
      a :class:`qjax.transforms.SkipNonFiniteState`); its ``update`` needs
      ``params``.
    project: float ``params -> stored params``, applied once at
      initialisation: SR/R encode their quantized leaves as grid codes
      (nearest point), BC clips its latent weights into the grid's range.
    eval_mode: which weights evaluation sees, recorded in results.
  """
  name: str
  view: Callable[[PyTree], PyTree]
  tx: optax.GradientTransformationExtraArgs
  project: Callable[[PyTree], PyTree]
  eval_mode: str


def base_optimizer(optimizer: str | optax.GradientTransformation,
                   learning_rate) -> optax.GradientTransformation:
  """``'sgd'`` or ``'adam'`` with ``learning_rate`` (float, array or schedule)."""
  if not isinstance(optimizer, str):
    return optimizer
  if optimizer == "sgd":
    return optax.sgd(learning_rate)
  if optimizer == "adam":
    return optax.adam(learning_rate)
  raise ValueError(
      f"optimizer must be one of {OPTIMIZERS} or an optax transformation; "
      f"got optimizer={optimizer!r}.")


def _identity(params: PyTree) -> PyTree:
  return params


def _clip_latent(params, mask, grid):
  mask = quantizers.resolve_mask(mask, params)
  grids = quantizers.resolve_grids(grid, params, mask)

  def clip(_, w, g):
    points = grid_lib.Points(g, w.dtype)
    return jax.numpy.clip(w, points.v[0], points.v[-1]).astype(w.dtype)

  return quantizers._map_masked(clip, params, mask, grids, None)


def _encode(params, mask, grid):
  mask = quantizers.resolve_mask(mask, params)
  return codes.encode_tree(params, quantizers.resolve_grids(grid, params,
                                                            mask))


def make(name: str, learning_rate=1e-2, *, optimizer="adam",
         grid: Grid | Callable = quantizers.glorot_binary_grid, mask=None,
         key=None, ste_clip=None, scale_by_grid: bool = False) -> Method:
  """Builds method ``name`` in ``("fp", "bc", "sr", "r")``.

  Args:
    name: the method.
    learning_rate: float, array (sweepable) or optax schedule.
    optimizer: ``"sgd"``, ``"adam"`` or any optax transformation used as the
      base step ``u`` that the update rule then rounds or clips.
    grid: the grid of the quantized leaves, a Grid or ``(path, leaf) ->
      Grid``. The default is a binary grid with BinaryConnect's per-layer
      Glorot scale.
    mask: which leaves are quantized, as in :func:`qjax.resolve_mask`; the
      default is the kernels (:func:`qjax.all_kernels`; a bare array is
      quantized whole), e.g. :func:`qjax.conv_kernels` for the paper's
      convolution-only runs. Selecting nothing is an error. Ignored by
      ``"fp"``, which quantizes nothing.
    key: seed or key for SR's rounding (required for ``"sr"``).
    ste_clip: BC only: zero the STE gradient where ``|w_r| > ste_clip``.
    scale_by_grid: BC only: per-layer learning-rate scale ``1/H``.

  Returns:
    A :class:`Method`.

  Example:
    >>> m = qjax.methods.make("sr", 1e-2, optimizer="adam", key=0,
    ...                       mask=qjax.conv_kernels)
  """
  if name not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {name!r}.")
  base = base_optimizer(optimizer, learning_rate)
  label = name if not isinstance(optimizer, str) else f"{name}-{optimizer}"
  if name == "fp":
    return Method(label, _identity, transforms.skip_nonfinite(base),
                  _identity, EVAL_MODES[name])
  if name == "bc":
    view = lambda p: quantizers.quantize(p, quantizers.round_nearest, mask,
                                         grid=grid, clip=ste_clip)
    rule = transforms.latent_clipping(grid, mask, scale_by_grid)
    project = lambda p: _clip_latent(p, mask, grid)
    return Method(label, view, _guarded(base, rule), project,
                  EVAL_MODES[name])
  project = lambda p: _encode(p, mask, grid)
  if name == "sr":
    rule = transforms.stochastic_rounding(grid, key, mask)
  else:
    rule = transforms.nearest_rounding(grid, mask)
  return Method(label, _identity, _guarded(base, rule), project,
                EVAL_MODES[name])


def _guarded(base, rule) -> optax.GradientTransformationExtraArgs:
  """``base`` then the update ``rule``, skipping non-finite steps."""
  return transforms.skip_nonfinite(optax.chain(base, rule))


def fp(learning_rate=1e-2, **kwargs) -> Method:
  """Full-precision baseline (``make("fp", ...)``)."""
  return make("fp", learning_rate, **kwargs)


def bc(learning_rate=1e-2, **kwargs) -> Method:
  """BinaryConnect (``make("bc", ...)``), Li et al. 2017 Eq. 5."""
  return make("bc", learning_rate, **kwargs)


def sr(learning_rate=1e-2, **kwargs) -> Method:
  """Stochastic rounding (``make("sr", ...)``), Li et al. 2017 Eq. 3."""
  return make("sr", learning_rate, **kwargs)


def r(learning_rate=1e-2, **kwargs) -> Method:
  """Deterministic rounding (``make("r", ...)``), Li et al. 2017 Eq. 2."""
  return make("r", learning_rate, **kwargs)
