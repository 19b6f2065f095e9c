"""Training: a pure step ``(state, batch) -> (state, metrics)`` for every method.

The step knows nothing about which method it runs: it differentiates the loss
at ``method.view(params)`` and applies ``method.tx``. Hyperparameters that a
sweep varies (the learning rate) arrive as arrays in ``hparams``, and the
method is rebuilt from them inside the traced step, so changing a value never
recompiles and ``vmap`` over configs just works.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from qjax import codes as codes_lib
from qjax import diagnostics
from qjax import grid as grid_lib
from qjax import methods as methods_lib
from qjax import models as models_lib
from qjax import quantizers
from qjax.grid import Grid
from qjax.data import batching

PyTree = Any

MASKS = {"all": quantizers.all_kernels, "conv": quantizers.conv_kernels}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything static about a run: it decides what is compiled.

  Attributes:
    method: ``"fp"``, ``"bc"``, ``"sr"`` or ``"r"``.
    optimizer: ``"adam"`` (the paper's -ADAM variants) or ``"sgd"``.
    mask: which kernels are quantized: ``"all"`` or ``"conv"`` (the paper).
    batch_size: minibatch size (the paper: 128; "Big" SR: 1024).
    epochs: number of epochs.
    lr_decay_epochs: epochs at which the learning rate is divided by 10.
    augment: CIFAR-style augmentation (4-pixel pad, random crop, flip) of
      every training batch, with keys ``fold_in(run_key, step)``.
    steps_per_epoch: set by the engine from the dataset size.
    max_nonfinite_streak: a config whose last this many steps were all
      skipped for non-finite values stops the sweep with
      :class:`NonFiniteError` (checked after each epoch).
  """
  method: str = "bc"
  optimizer: str = "adam"
  mask: str = "all"
  batch_size: int = 128
  epochs: int = 1
  lr_decay_epochs: tuple[int, ...] = ()
  augment: bool = False
  steps_per_epoch: int = 1
  max_nonfinite_streak: int = 20

  def __post_init__(self):
    if self.method not in methods_lib.METHODS:
      raise ValueError(f"method must be one of {methods_lib.METHODS}; got "
                       f"{self.method!r}.")
    if self.mask not in MASKS:
      raise ValueError(f"mask must be one of {tuple(MASKS)}; got "
                       f"{self.mask!r}.")
    for name in ("batch_size", "epochs", "steps_per_epoch",
                 "max_nonfinite_streak"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {name}={value!r}.")
    bad = [e for e in self.lr_decay_epochs
           if not _is_int(e) or not 1 <= e < self.epochs]
    if bad:
      raise ValueError(
          f"lr_decay_epochs must be epochs between 1 and epochs - 1 = "
          f"{self.epochs - 1} (a decay at or after the last epoch changes "
          f"nothing); got {bad} in lr_decay_epochs={self.lr_decay_epochs}.")


class NonFiniteError(RuntimeError):
  """Training kept producing non-finite losses, gradients or updates."""


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def learning_rate_schedule(config: TrainConfig, base_lr) -> optax.Schedule:
  """``base_lr`` divided by 10 at each of ``config.lr_decay_epochs``."""
  boundaries = {int(e) * config.steps_per_epoch: 0.1
                for e in config.lr_decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def scaled_glorot_grid(scale) -> Callable:
  """Per-layer binary grid ``{-s H, +s H}``: ``s`` sweeps the grid's size Δ.

  The grid is the static ``Grid.binary(H)`` times the (possibly traced)
  scale ``s`` (:meth:`qjax.Grid.scaled`): stored points ``±fl32(fl32(H) s)``.
  """
  def grid(path, leaf):
    del path
    return Grid.binary(quantizers.glorot_scale(
        quantizers.leaf_shape(leaf))).scaled(scale)
  return grid


def build_method(config: TrainConfig, hparams: dict,
                 key=None) -> methods_lib.Method:
  """The method for ``config`` with the (possibly traced) ``hparams``.

  ``hparams["lr"]`` is the base learning rate; the optional
  ``hparams["grid_scale"]`` multiplies every layer's binary scale H (so the
  grid spacing Δ = 2 s H), which lets a sweep vary Δ without recompiling.
  """
  schedule = learning_rate_schedule(config, hparams["lr"])
  key = jax.random.PRNGKey(0) if key is None else key
  return methods_lib.make(config.method, schedule,
                          optimizer=config.optimizer, mask=MASKS[config.mask],
                          key=key, grid=_grid(hparams))


def _grid(hparams: dict) -> Callable:
  return (quantizers.glorot_binary_grid if "grid_scale" not in hparams
          else scaled_glorot_grid(hparams["grid_scale"]))


def layer_grids(config: TrainConfig, params: PyTree, hparams: dict) -> dict:
  """``{layer: {"lo", "hi", "step", "levels"}}``: each quantized layer's grid.

  For results: the stored float32 end points, the spacing and the number of
  levels of the grid every quantized layer was trained on, with the concrete
  (one config's) ``hparams``. Empty for the float method.
  """
  if config.method == "fp":
    return {}
  mask = quantizers.resolve_mask(MASKS[config.mask], params)
  grids = quantizers.resolve_grids(_grid(hparams), params, mask)
  flat = jax.tree_util.tree_flatten_with_path(
      grids, is_leaf=lambda g: g is None or isinstance(g, Grid))[0]
  out = {}
  for path, g in flat:
    if g is None:
      continue
    v = np.asarray(grid_lib.Points(g, np.float32).v)
    out[diagnostics.layer_name(quantizers.path_names(path))] = {
        "lo": float(v[0]), "hi": float(v[-1]),
        "step": float(v[1] - v[0]), "levels": int(g.levels)}
  return out


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; a pytree, so it vmaps.

  ``params`` are the method's *stored* parameters (grid codes,
  :class:`qjax.codes.Codes`, for SR and R). ``init_signs`` holds, for the
  sign-change diagnostic, each quantized leaf's initial signs as packed
  bits (1 bit per weight, :func:`qjax.diagnostics.sign_bits`), not a float
  copy. ``skipped`` counts the steps skipped for non-finite values,
  ``streak`` the consecutive ones up to now, ``first_skipped`` the first
  such step (-1: none); see :func:`train_step`.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  init_signs: tuple    # packed initial signs of the quantized leaves
  key: jax.Array       # raw uint32 key, checkpoint friendly
  skipped: jax.Array
  streak: jax.Array
  first_skipped: jax.Array


def init_state(model: nn.Module, config: TrainConfig, key: jax.Array,
               sample_x: jax.Array, hparams: dict) -> TrainState:
  """Initialises parameters, projects them for the method, builds the state.

  Args:
    model: a Flax module called as ``model.apply(v, x, train=...)``.
    config: the static training config.
    key: a raw ``jax.random.PRNGKey`` for this config (init, SR, shuffles).
    sample_x: one batch of inputs (only its shape is used).
    hparams: ``{"lr": array}``.
  """
  init_key, sr_key, run_key = jax.random.split(key, 3)
  variables = model.init(init_key, sample_x, train=False)
  method = build_method(config, hparams, sr_key)
  params = method.project(variables["params"])
  decoded = codes_lib.decode_tree(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=method.tx.init(decoded),
      init_signs=diagnostics.sign_bits(params, MASKS[config.mask]),
      key=run_key,
      skipped=jnp.zeros((), jnp.int32), streak=jnp.zeros((), jnp.int32),
      first_skipped=jnp.full((), -1, jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _forward(model, params, batch_stats, x, train: bool):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if train and batch_stats:
    logits, updates = model.apply(variables, x, train=True,
                                  mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return model.apply(variables, x, train=train), batch_stats


def train_step(model: nn.Module, config: TrainConfig, state: TrainState,
               batch: tuple[jax.Array, jax.Array], hparams: dict
               ) -> tuple[TrainState, dict]:
  """One pure training step, the same for every method.

  Computes the loss at ``method.view(decode_tree(params))`` (the STE view
  for BC; the decoded codes for SR and R), then ``updates =
  method.tx.update(grads, opt_state, params)`` and ``optax.apply_updates``
  (exact for codes).

  Non-finite values: a step whose loss, gradients, new parameters or new
  BatchNorm statistics are not all finite is skipped: parameters, optimizer
  state and statistics stay as they were (so stored grid weights are never
  NaN and never off the grid, and Adam's moments never absorb a NaN), the
  step counter advances, and ``skipped``/``streak`` count it. The engine
  stops a run whose streak reaches ``config.max_nonfinite_streak``.

  Returns:
    The new state and ``{"loss", "error", "skipped"}`` on the batch
    (``skipped`` is 1.0 for a skipped step; loss and error are reported as
    computed, NaN included).
  """
  x, y = batch
  if config.augment:
    x = batching.augment_cifar(jax.random.fold_in(state.key, state.step), x)
  method = build_method(config, hparams)

  def loss_fn(weights):
    logits, new_stats = _forward(model, method.view(weights),
                                 state.batch_stats, x, train=True)
    loss = cross_entropy(logits, y)
    return loss, (new_stats, jnp.mean(jnp.argmax(logits, -1) != y))

  # Gradients at the decoded weights; codes are decoded inside the step
  # (fused by XLA), never kept as floats.
  (loss, (new_stats, error)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(codes_lib.decode_tree(state.params))
  updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = _all_finite((loss, grads, params, new_stats))
  keep = lambda new, old: jax.tree.map(
      lambda n, o: _select(finite, n, o), new, old)
  streak = jnp.where(finite, 0, state.streak + 1)
  first = jnp.where((state.first_skipped < 0) & ~finite, state.step,
                    state.first_skipped)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(new_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~finite).astype(jnp.int32), streak=streak,
      first_skipped=first)
  return new_state, {"loss": loss, "error": error,
                     "skipped": (~finite).astype(jnp.float32)}


def _select(pred, new, old):
  """``new`` where ``pred`` else ``old``; PRNG keys always advance."""
  if jax.dtypes.issubdtype(jnp.result_type(new), jax.dtypes.prng_key):
    return new
  return jnp.where(pred, new, old)


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite."""
  checks = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def evaluate(model: nn.Module, config: TrainConfig, state: TrainState,
             x: jax.Array, y: jax.Array, batch_size: int = 1000,
             hparams: dict | None = None) -> dict:
  """Test loss and error of the method's evaluation view, in batches.

  BC is evaluated on its deterministically quantized latent weights; SR and R
  on their decoded grid codes; FP on its float weights (``Method.eval_mode``).
  A model that declares ``bn_momentum`` (all of :mod:`qjax.models`) is
  evaluated with its BatchNorm running statistics debiased for the
  ``state.step`` steps taken (:func:`qjax.models.debiased_batch_stats`);
  after about 250 steps that changes nothing.
  """
  method = build_method(config, dict(hparams or {}, lr=jnp.zeros(())))
  params = method.view(codes_lib.decode_tree(state.params))
  momentum = getattr(model, "bn_momentum", None)
  batch_stats = (state.batch_stats if momentum is None else
                 models_lib.debiased_batch_stats(state.batch_stats,
                                                 state.step, momentum))
  n = (x.shape[0] // batch_size) * batch_size
  xs = x[:n].reshape(-1, batch_size, *x.shape[1:])
  ys = y[:n].reshape(-1, batch_size)

  def body(carry, xy):
    logits, _ = _forward(model, params, batch_stats, xy[0], train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, xy[1]).sum()
    wrong = jnp.sum(jnp.argmax(logits, -1) != xy[1])
    return (carry[0] + loss, carry[1] + wrong), None

  (loss, wrong), _ = jax.lax.scan(body, (0.0, 0), (xs, ys))
  if n < x.shape[0]:  # the remainder, so every example counts
    logits, _ = _forward(model, params, batch_stats, x[n:], train=False)
    loss += optax.softmax_cross_entropy_with_integer_labels(
        logits, y[n:]).sum()
    wrong += jnp.sum(jnp.argmax(logits, -1) != y[n:])
  return {"test_loss": loss / x.shape[0], "test_error": wrong / x.shape[0]}


def sign_flips(config: TrainConfig, state: TrainState) -> dict:
  """Per quantized layer, the fraction of weights whose sign changed."""
  return diagnostics.sign_flip_fractions(state.init_signs, state.params,
                                         MASKS[config.mask])
