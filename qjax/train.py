"""Training: a pure step ``(state, batch) -> (state, metrics)``, any method.

The step knows nothing about which method it runs: it differentiates the
task's loss at ``method.view(decode_tree(params), key)`` and applies
``method.tx``. The method is any registered name (:mod:`qjax.methods`);
hyperparameters that a sweep varies (``lr``, ``grid_scale``,
``weight_decay``, a method's own such as Bop's ``threshold``) arrive as
arrays in ``hparams``, so changing a value never recompiles and ``vmap``
over configs just works. The model is any Flax Linen module or NNX model,
through :func:`qjax.network.as_network`; the loss and metrics are a
:class:`Task`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from qjax import codes as codes_lib
from qjax import diagnostics
from qjax import formats
from qjax import grid as grid_lib
from qjax import grids as grids_lib
from qjax import methods as methods_lib
from qjax import models as models_lib
from qjax import network as network_lib
from qjax import quantizers
from qjax import transforms
from qjax.grid import Grid
from qjax.data import batching

PyTree = Any

MASKS = {"all": quantizers.all_kernels, "conv": quantizers.conv_kernels}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything static about a run: it decides what is compiled.

  Attributes:
    method: any registered method (:func:`qjax.methods.names`): ``"fp"``,
      ``"bc"``, ``"sbc"``, ``"sr"``, ``"r"``, ``"bop"``, or the user's own.
    optimizer: ``"adam"`` (the paper's -ADAM variants) or ``"sgd"``.
    mask: which kernels are quantized: ``"all"`` or ``"conv"`` (the paper).
    grid: the quantized layers' grid as text (:func:`qjax.grids.parse`):
      ``"glorot"`` (BinaryConnect's ±H per layer, the default), ``"binary"``
      (±1, the paper's weights), ``"ternary"``, ``"kbit:4"``,
      ``"uniform:0.05:-1:1"``, with an optional ``@glorot`` per-layer scale.
    batch_size: minibatch size (the paper: 128; "Big" SR: 1024).
    epochs: number of epochs.
    lr_decay_epochs: epochs at which the learning rate is divided by 10.
    augment: CIFAR-style augmentation (4-pixel pad, random crop, flip) of
      every training batch, with keys ``fold_in(run_key, step)``.
    steps_per_epoch: set by the engine from the dataset size.
    max_nonfinite_streak: a config whose last this many steps were all
      skipped for non-finite values stops the sweep with
      :class:`NonFiniteError` (checked after each epoch).
    random_bits: where stochastic rounding (``sr``) draws each weight's 32
      bits: ``"threefry"`` (``jax.random.bits``' stream, the default) or
      ``"hash"`` (:func:`qjax.quantizers.hash_bits`, cheaper on CPU).
  """
  method: str = "bc"
  optimizer: str = "adam"
  mask: str = "all"
  grid: str = "glorot"
  batch_size: int = 128
  epochs: int = 1
  lr_decay_epochs: tuple[int, ...] = ()
  augment: bool = False
  steps_per_epoch: int = 1
  max_nonfinite_streak: int = 20
  random_bits: str = "threefry"

  def __post_init__(self):
    methods_lib.get(self.method)  # raises for an unregistered name
    quantizers.check_random_bits(self.random_bits, "TrainConfig")
    if self.optimizer not in methods_lib.OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {methods_lib.OPTIMIZERS}; "
                       f"got {self.optimizer!r}.")
    if self.mask not in MASKS:
      raise ValueError(f"mask must be one of {tuple(MASKS)}; got "
                       f"{self.mask!r}.")
    # Canonical text, so that equal grids give equal configs and
    # fingerprints ("kbit:4" and "kbit:4:1" are one grid).
    object.__setattr__(self, "grid", str(grids_lib.parse(self.grid)))
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

  @property
  def label(self) -> str:
    """``"SR-ADAM"``: the method's display label."""
    return methods_lib.label(self.method, self.optimizer)


class NonFiniteError(RuntimeError):
  """Training kept producing non-finite losses, gradients or updates."""


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def learning_rate_schedule(config: TrainConfig, base_lr) -> optax.Schedule:
  """``base_lr`` divided by 10 at each of ``config.lr_decay_epochs``."""
  boundaries = {int(e) * config.steps_per_epoch: 0.1
                for e in config.lr_decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def config_grid(config: TrainConfig, hparams: dict) -> Callable:
  """The per-layer grid ``(path, leaf) -> Grid`` of ``config`` and hparams.

  ``config.grid`` with each layer's grid multiplied by the (possibly traced)
  ``hparams["grid_scale"]`` when it is given.
  """
  return grids_lib.parse(config.grid).factory(hparams.get("grid_scale"))


def build_method(config: TrainConfig, hparams: dict,
                 key=None) -> methods_lib.Method:
  """The method for ``config`` with the (possibly traced) ``hparams``.

  ``hparams["lr"]`` is the base learning rate; ``"grid_scale"`` multiplies
  every quantized layer's grid (so a sweep varies Δ without recompiling);
  ``"weight_decay"`` adds decoupled weight decay; any other name must be one
  of the method's own hyperparameters (an unknown name is an error).
  ``key`` is the method's own randomness, needed only to initialise its
  state (:func:`init_state` passes it; a step builds the method without one,
  the key then lives in the optimizer state).
  """
  methods_lib.check_hparams(config.method, hparams)
  own = {k: v for k, v in hparams.items()
         if k not in methods_lib.COMMON_HPARAMS}
  if "lr" not in hparams:
    raise ValueError(f"hparams must give 'lr'; got {sorted(hparams)}.")
  return methods_lib.make(
      config.method, learning_rate_schedule(config, hparams["lr"]),
      optimizer=config.optimizer, mask=MASKS[config.mask],
      grid=config_grid(config, hparams), key=key,
      weight_decay=hparams.get("weight_decay"),
      random_bits=config.random_bits, **own)


def layer_grids(config: TrainConfig, params: PyTree, hparams: dict) -> dict:
  """``{layer: {"lo", "hi", "step", "levels"}}``: each quantized layer's grid.

  For results: the stored float32 end points, the spacing and the number of
  levels of the grid every quantized layer was trained on, with the concrete
  (one config's) ``hparams``. Empty for a method that quantizes nothing.
  Unbounded grids report ``levels`` None and the points around zero.
  """
  if not methods_lib.get(config.method).quantized:
    return {}
  mask = quantizers.resolve_mask(MASKS[config.mask], params)
  grids = quantizers.resolve_grids(config_grid(config, hparams), params, mask)
  flat = jax.tree_util.tree_flatten_with_path(
      grids, is_leaf=lambda g: g is None or isinstance(
          g, (Grid, formats.FloatGrid)))[0]
  out = {}
  for path, g in flat:
    if g is None:
      continue
    name = diagnostics.layer_name(quantizers.path_names(path))
    if isinstance(g, formats.FloatGrid):
      # No one spacing: 'relative_step' is the spacing within a binade
      # relative to its lowest value (2**-m).
      out[name] = {"lo": g.lo, "hi": g.hi, "step": None,
                   "levels": g.levels, "format": g.name,
                   "relative_step": g.relative_step}
    elif g.bounded:
      v = np.asarray(grid_lib.Points(g, np.float32).v)
      out[name] = {"lo": float(v[0]), "hi": float(v[-1]),
                   "step": float(v[1] - v[0]), "levels": int(g.levels)}
    else:
      points = grid_lib.Points(g, np.float32)
      v0, v1 = (float(points.value(jnp.asarray(k))) for k in (0, 1))
      out[name] = {"lo": None, "hi": None, "step": v1 - v0, "levels": None}
  return out


def alpha_over_delta(grids: dict, lr: float) -> dict:
  """``{layer: α/Δ}``: the learning rate over each quantized layer's spacing.

  The paper's regime: an Adam step is about ``α`` whatever the gradient's
  scale, so ``α/Δ`` says how far one step moves a weight in grid cells (R
  never moves a weight when it is below 1/2; SR moves it with probability
  about ``α/Δ``). ``grids`` is :func:`layer_grids`' output; for a float
  format ``Δ`` is its relative spacing ``2**-m`` (α relative to the weight's
  magnitude). Layers with no spacing are left out.

  Example: the paper's ``±1`` (Δ = 2) at lr 0.01 gives 0.005.
  """
  out = {}
  for name, g in grids.items():
    step = g.get("step") or g.get("relative_step")
    if step:
      out[name] = float(lr) / float(step)
  return out


@dataclasses.dataclass(frozen=True)
class Task:
  """The loss and the metrics a run trains and reports.

  Attributes:
    loss: ``(outputs, labels) -> scalar`` mean loss over the batch.
    metrics: ``(outputs, labels) -> {name: scalar}`` batch means (results
      record ``train_<name>``, ``test_<name>`` and ``val_<name>``).
    name: recorded in results and fingerprints.
  """
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metrics: Callable[[jax.Array, jax.Array], dict]
  name: str


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classification_error(logits: jax.Array, labels: jax.Array) -> dict:
  return {"error": jnp.mean(jnp.argmax(logits, -1) != labels)}


CLASSIFICATION = Task(cross_entropy, classification_error, "classification")


def label_smoothing(smoothing: float) -> Task:
  """Classification with labels smoothed by ``smoothing`` (in [0, 1))."""
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing must be in [0, 1); got {smoothing!r}.")

  def loss(logits, labels):
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  return Task(loss, classification_error,
              f"classification, label smoothing {smoothing:g}")


def _squared_error(outputs, targets):
  return jnp.mean(jnp.square(outputs.reshape(targets.shape) - targets))


REGRESSION = Task(_squared_error, lambda o, t: {"mse": _squared_error(o, t)},
                  "regression (mean squared error)")


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; a pytree, so it vmaps.

  ``params`` are the method's *stored* parameters (grid codes,
  :class:`qjax.codes.Codes`, for SR, R and Bop). ``model_state`` holds the
  model's other variables (BatchNorm statistics, an NNX model's RNG state).
  ``init_signs`` holds, for the sign-change diagnostic, each quantized
  leaf's initial signs as packed bits (1 bit per weight,
  :func:`qjax.diagnostics.sign_bits`), not a float copy. ``skipped`` counts
  the steps skipped for non-finite values, ``streak`` the consecutive ones
  up to now, ``first_skipped`` the first such step (-1: none); see
  :func:`step`.
  """
  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  init_signs: tuple    # packed initial signs of the quantized leaves
  key: jax.Array       # raw uint32 key, checkpoint friendly
  skipped: jax.Array
  streak: jax.Array
  first_skipped: jax.Array

  @property
  def batch_stats(self) -> PyTree:
    """The BatchNorm running statistics (``model_state["batch_stats"]``)."""
    return self.model_state.get("batch_stats", {})


def init_state(model, config: TrainConfig, key: jax.Array,
               sample_x: jax.Array, hparams: dict) -> TrainState:
  """:func:`init` for ``config`` and one config's ``hparams``.

  ``key`` (a raw ``jax.random.PRNGKey``) is split into the model's
  initialisation key, the method's own key (SR's rounding) and the run key
  (shuffles, augmentation, dropout, stochastic views).
  """
  network = network_lib.as_network(model)
  init_key, method_key, run_key = jax.random.split(key, 3)
  method = build_method(config, hparams, method_key)
  params, model_state = network.init(init_key, sample_x)
  stored = method.project(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=stored, model_state=model_state,
      opt_state=method.tx.init(codes_lib.decode_tree(stored)),
      init_signs=diagnostics.sign_bits(stored, MASKS[config.mask]),
      key=run_key,
      skipped=jnp.zeros((), jnp.int32), streak=jnp.zeros((), jnp.int32),
      first_skipped=jnp.full((), -1, jnp.int32))


def step_keys(state: TrainState) -> dict:
  """This step's keys, all derived from ``(state.key, state.step)``.

  ``augment`` is ``fold_in(key, step)`` itself (as before dropout and
  stochastic views existed, so augmented runs reproduce); ``dropout`` and
  ``view`` are folded from it.
  """
  base = jax.random.fold_in(state.key, state.step)
  return {"augment": base, "dropout": jax.random.fold_in(base, 1),
          "view": jax.random.fold_in(base, 2)}


def step(network, method: methods_lib.Method, state: TrainState,
         batch: tuple[jax.Array, jax.Array], *, augment: bool = False,
         task: Task = CLASSIFICATION) -> tuple[TrainState, dict]:
  """One pure training step, the same for every method.

  Computes the task's loss at ``method.view(decode_tree(params), key)``
  (the STE view for BC; the decoded codes for SR, R and Bop), then
  ``updates = method.tx.update(grads, opt_state, params)`` and
  :func:`qjax.apply_updates` (``optax.apply_updates``, exact for codes, and
  for fp8 weights too).

  Non-finite values: a step whose loss, gradients, new parameters or new
  model state are not all finite is skipped: parameters, optimizer state
  and model state stay as they were (so stored grid weights are never NaN
  and never off the grid, and Adam's moments never absorb a NaN), the step
  counter advances, and ``skipped``/``streak`` count it. The engine stops a
  run whose streak reaches ``config.max_nonfinite_streak``.

  Returns:
    The new state and ``{"loss", <task metrics>, "skipped"}`` on the batch
    (``skipped`` is 1.0 for a skipped step; loss and metrics are reported as
    computed, NaN included).
  """
  network = network_lib.as_network(network)
  x, y = batch
  keys = step_keys(state)
  if augment:
    x = batching.augment_cifar(keys["augment"], x)

  def loss_fn(weights):
    outputs, new_model_state = network.apply(
        method.view(weights, keys["view"]), state.model_state, x,
        train=True, rng=keys["dropout"])
    return task.loss(outputs, y), (new_model_state, task.metrics(outputs, y))

  # Gradients at the decoded weights; codes are decoded inside the step
  # (fused by XLA), never kept as floats. Weights stored in a narrow float
  # format (bf16, fp8) are differentiated at their float32 values (exact),
  # so their gradients are float32, not rounded to the format.
  (loss, (new_model_state, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(formats.float32_view(
          codes_lib.decode_tree(state.params)))
  keep = lambda ok, new, old: jax.tree.map(
      lambda n, o: _select(ok, n, o), new, old)
  # The method's tx (qjax.skip_nonfinite, as every registered method's)
  # already skips a step whose gradients, updates, new parameters or new
  # optimizer state are not finite, leaving parameters and state bit for bit
  # as they were. The step adds the loss and the model state: when they are
  # not finite the gradients become NaN (a multiply fused into the
  # optimizer), so the tx skips too, with no second pass over parameters or
  # optimizer state (it cost a quarter of the MLP step on CPU). A hand-made
  # Method whose tx does not skip is checked and selected here instead.
  guarded = isinstance(state.opt_state, transforms.SkipNonFiniteState)
  if guarded:
    forward_ok = transforms.all_finite((loss, new_model_state))
    poison = jnp.where(forward_ok, 1.0, jnp.nan)
    grads = jax.tree.map(lambda g: g * poison.astype(g.dtype)
                         if jnp.issubdtype(g.dtype, jnp.inexact) else g,
                         grads)
  updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
  params = formats.apply_updates(state.params, updates)
  if guarded:
    finite = forward_ok & (opt_state.skipped == state.opt_state.skipped)
  else:
    finite = transforms.all_finite((loss, grads, params, new_model_state))
    params = keep(finite, params, state.params)
    opt_state = keep(finite, opt_state, state.opt_state)
  model_state = keep(finite, new_model_state, state.model_state)
  streak = jnp.where(finite, 0, state.streak + 1)
  first = jnp.where((state.first_skipped < 0) & ~finite, state.step,
                    state.first_skipped)
  new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state,
      opt_state=opt_state,
      skipped=state.skipped + (~finite).astype(jnp.int32), streak=streak,
      first_skipped=first)
  return new_state, dict(metrics, loss=loss,
                         skipped=(~finite).astype(jnp.float32))


def train_step(model, config: TrainConfig, state: TrainState,
               batch: tuple[jax.Array, jax.Array], hparams: dict, *,
               task: Task = CLASSIFICATION) -> tuple[TrainState, dict]:
  """:func:`step` with the method of ``config`` and ``hparams``.

  The method is built for the step without a key: its randomness (SR's)
  lives in the optimizer state.
  """
  return step(model, build_method(config, hparams), state, batch,
              augment=config.augment, task=task)


def _select(pred, new, old):
  """``new`` where ``pred`` else ``old``; PRNG keys always advance."""
  if jax.dtypes.issubdtype(jnp.result_type(new), jax.dtypes.prng_key):
    return new
  return jnp.where(pred, new, old)


def evaluation_model_state(network, state: TrainState) -> PyTree:
  """The model state evaluation uses: BatchNorm statistics debiased.

  A model that declares ``bn_momentum`` (all of :mod:`qjax.models`) has its
  running statistics debiased for the ``state.step`` steps taken
  (:func:`qjax.models.debiased_batch_stats`); after about 250 steps that
  changes nothing.
  """
  momentum = network_lib.as_network(network).bn_momentum
  if momentum is None or "batch_stats" not in state.model_state:
    return state.model_state
  return dict(state.model_state, batch_stats=models_lib.debiased_batch_stats(
      state.model_state["batch_stats"], state.step, momentum))


def evaluate_method(network, method: methods_lib.Method, state: TrainState,
                    x: jax.Array, y: jax.Array, batch_size: int = 1000, *,
                    task: Task = CLASSIFICATION) -> dict:
  """Loss and metrics of the method's evaluation view on ``(x, y)``.

  The view is ``method.view(decode_tree(params))`` with no key: BC and SBC
  see their deterministically quantized latent weights, SR, R and Bop their
  decoded codes, FP its floats (``Method.eval_mode``). Returns
  ``{"test_loss", "test_<metric>"...}``, every example weighted equally.
  """
  network = network_lib.as_network(network)
  params = method.view(formats.float32_view(
      codes_lib.decode_tree(state.params)))
  model_state = evaluation_model_state(network, state)
  n = (x.shape[0] // batch_size) * batch_size
  xs = x[:n].reshape(-1, batch_size, *x.shape[1:])
  ys = y[:n].reshape(-1, batch_size, *y.shape[1:])

  def sums(xb, yb):
    outputs, _ = network.apply(params, model_state, xb, train=False,
                               rng=None)
    count = yb.shape[0]
    out = {"loss": task.loss(outputs, yb) * count}
    out.update({k: v * count for k, v in task.metrics(outputs, yb).items()})
    return out

  def body(carry, xy):
    return jax.tree.map(jnp.add, carry, sums(*xy)), None

  zero = jax.tree.map(lambda v: jnp.zeros((), jnp.float32),
                      jax.eval_shape(sums, x[:1], y[:1]))
  total, _ = jax.lax.scan(body, zero, (xs, ys)) if n else (zero, None)
  if n < x.shape[0]:  # the remainder, so every example counts
    total = jax.tree.map(jnp.add, total, sums(x[n:], y[n:]))
  return {f"test_{k}": v / x.shape[0] for k, v in total.items()}


def evaluate(model, config: TrainConfig, state: TrainState, x: jax.Array,
             y: jax.Array, batch_size: int = 1000, hparams: dict | None = None,
             *, task: Task = CLASSIFICATION) -> dict:
  """:func:`evaluate_method` with the method of ``config`` and ``hparams``.

  ``hparams`` are the run's (the same the steps used): the evaluation view
  of a method may depend on them (e.g. the grid's scale).
  """
  if hparams is None:
    raise ValueError("evaluate needs the run's hparams (at least 'lr'), the "
                     "same that trained the state.")
  return evaluate_method(model, build_method(config, hparams), state, x, y,
                         batch_size, task=task)


def sign_flips(config: TrainConfig, state: TrainState) -> dict:
  """Per quantized layer, the fraction of weights whose sign changed."""
  return diagnostics.sign_flip_fractions(state.init_signs, state.params,
                                         MASKS[config.mask])
