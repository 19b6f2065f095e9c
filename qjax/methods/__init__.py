"""Training methods as data, and the registry that names them.

A method is a forward view, an optax chain and the way it stores its
quantized leaves (:class:`Method`). A method is registered once, by name,
with a factory from its hyperparameters, grid, mask and key to a
:class:`Method` (:func:`register`); the engine, the command line, results,
tables and plots then accept the name without any other change.

=========  =====================  ==========================  ================
method     forward view           update (last chain link)    stored weights
=========  =====================  ==========================  ================
``fp``     identity               none (plain optimizer)      float
``bc``     ``Q_d(w_r)`` (STE)     :func:`latent_clipping`     float latent
``sbc``    ``Q_s(w_r)`` (STE)     :func:`latent_clipping`     float latent
``sr``     decoded codes          :func:`stochastic_rounding` grid codes
``r``      decoded codes          :func:`nearest_rounding`    grid codes
``bop``    decoded codes          :func:`qjax.methods.bop.bop` binary codes
=========  =====================  ==========================  ================

A training loop holds the *stored* parameters (``Method.project`` of the
initial floats: :class:`qjax.codes.Codes` for SR, R and Bop), differentiates
the loss at ``Method.view(qjax.codes.decode_tree(stored), key)``, initialises
``Method.tx`` on the decoded floats and applies its updates to the stored
tree with ``optax.apply_updates`` (exact for codes). It needs only
:class:`Method`'s fields, never the name.

Hyperparameters: every method takes ``lr`` (the base learning rate, a float,
array or optax schedule), and the engine adds ``grid_scale`` (multiplies the
grid) and ``weight_decay``; a method declares its own (Bop's ``threshold``
and ``gamma``) with defaults when it is registered. Values may be traced
arrays, so a sweep over them compiles once. An unknown name is an error.

Each method runs with base optimizer ``sgd`` (the paper's equations) or
``adam`` (the "-ADAM" variants; Adam moments stay in float). Which leaves are
quantized: ``mask`` (default: the kernels, :func:`qjax.all_kernels`). A mask
that selects no leaf is an error, not a silent float run.

Non-finite steps: every ``Method.tx`` is the whole chain wrapped in
:func:`qjax.skip_nonfinite`: a step whose gradients or updates contain a NaN
or inf changes nothing (parameters, optimizer state and keys are kept). With
the built-in Adam or SGD (no weight decay) the skip is decided from the
step's inputs (:meth:`Setup.precheck`, :func:`qjax.transforms.bounded_step`);
a new method that puts its own rule after ``setup.base()`` should pass
``setup.precheck()`` only if its rule maps finite values to finite values.

Example, a new method in a user's own file::

    @qjax.methods.register("sr_half", label="SR/2", eval_mode="stored grid "
                           "weights", stores="grid codes")
    def sr_half(setup):
      rule = setup.masked(qjax.stochastic_rounding(
          setup.grid, setup.key, qjax.all_floats))
      tx = optax.chain(setup.base(), optax.scale(0.5), rule)
      return qjax.Method("sr_half", qjax.methods.identity_view,
                         qjax.skip_nonfinite(tx), setup.encode, "stored "
                         "grid weights")
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import optax

from qjax import codes
from qjax import formats
from qjax import quantizers
from qjax import transforms
from qjax.formats import FloatGrid
from qjax.grid import Grid

PyTree = Any

OPTIMIZERS = ("sgd", "adam")
# Hyperparameters every method accepts; the engine interprets the last two.
COMMON_HPARAMS = {
    "lr": "base learning rate (float, array or optax schedule)",
    "grid_scale": "multiplies every quantized layer's grid (its spacing)",
    "weight_decay": "decoupled weight decay on the decoded weights",
}


class Method(NamedTuple):
  """A training method (Li et al. 2017, Sec. 3).

  Attributes:
    name: e.g. ``"sr-adam"``.
    view: ``(params, key=None) -> params``, the weights the forward pass
      sees, applied to the decoded parameters. Training passes a fresh key
      per step (used by stochastic views such as ``sbc``); evaluation passes
      none and gets the deterministic view.
    tx: the optax chain, wrapped in :func:`qjax.skip_nonfinite`; its
      ``update`` needs ``params``.
    project: float ``params -> stored params``, applied once at
      initialisation (e.g. SR/R encode their quantized leaves as codes).
    eval_mode: which weights evaluation sees, recorded in results.
  """
  name: str
  view: Callable[..., PyTree]
  tx: optax.GradientTransformationExtraArgs
  project: Callable[[PyTree], PyTree]
  eval_mode: str


def identity_view(params: PyTree, key=None) -> PyTree:
  """The view of methods whose forward pass sees the stored weights."""
  del key
  return params


def identity(params: PyTree) -> PyTree:
  """The projection of methods that store their initial floats as they are."""
  return params


def base_optimizer(optimizer: str | optax.GradientTransformation,
                   learning_rate, weight_decay=None
                   ) -> optax.GradientTransformation:
  """``'sgd'`` or ``'adam'`` with ``learning_rate``, optionally decayed.

  With ``weight_decay`` (a float or traced array) the step is AdamW's
  decoupled decay (``optax.adamw``) or SGD with ``w * weight_decay`` added
  to the gradient, computed on the decoded weights (:func:`qjax.decoded`),
  so it works on codes. A custom transformation gets
  ``optax.add_decayed_weights`` after it, scaled by ``-learning_rate``.
  """
  if isinstance(weight_decay, (int, float)) and not weight_decay >= 0:
    raise ValueError(f"weight_decay must be >= 0 (a negative decay grows the "
                     f"weights); got {weight_decay!r}.")
  if weight_decay is None:
    if not isinstance(optimizer, str):
      return optimizer
    if optimizer == "sgd":
      return optax.sgd(learning_rate)
    if optimizer == "adam":
      return optax.adam(learning_rate)
  elif optimizer == "adam":
    return transforms.decoded(optax.adamw(learning_rate,
                                          weight_decay=weight_decay))
  elif optimizer == "sgd":
    return transforms.decoded(optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate)))
  elif not isinstance(optimizer, str):
    return optax.chain(optimizer, transforms.decoded(optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))))
  raise ValueError(
      f"optimizer must be one of {OPTIMIZERS} or an optax transformation; "
      f"got optimizer={optimizer!r}.")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a method's factory is built from.

  Attributes:
    name: the registered name.
    learning_rate: float, array or optax schedule.
    optimizer: ``"sgd"``, ``"adam"`` or an optax transformation.
    grid: a :class:`~qjax.Grid` or ``(path, leaf) -> Grid``.
    mask: which leaves are quantized (see :func:`qjax.resolve_mask`).
    key: a key for the method's own randomness (SR's rounding), or ``None``.
      The engine passes one when it initialises the state and ``None`` when
      it only updates, so a factory must not need the key to build ``tx``
      (only ``tx.init`` may need it).
    hparams: the method's own hyperparameters, defaults filled in.
    weight_decay: ``None`` or the decay (see :func:`base_optimizer`).
    random_bits: where stochastic rounding draws its 32 bits per weight
      (``"threefry"`` or ``"hash"``; :func:`qjax.stochastic_rounding`).
  """
  name: str
  learning_rate: Any
  optimizer: Any
  grid: Any
  mask: Any
  key: Any
  hparams: Mapping[str, Any]
  weight_decay: Any = None
  random_bits: str = "threefry"

  def base(self) -> optax.GradientTransformation:
    """The base step ``u`` (Adam or SGD, with the weight decay if any).

    Its state and arithmetic are float32 even for weights stored in a
    narrower format (:func:`qjax.float32_moments`; the identity for
    float32 weights and codes).
    """
    return formats.float32_moments(base_optimizer(
        self.optimizer, self.learning_rate, self.weight_decay))

  def precheck(self):
    """:func:`qjax.transforms.bounded_step` for the built-in Adam and SGD
    without weight decay, else None (:func:`qjax.skip_nonfinite` then
    checks the step's outputs)."""
    if self.optimizer in ("adam", "sgd") and self.weight_decay is None:
      return transforms.bounded_step(self.optimizer, self.learning_rate)
    return None

  @property
  def label(self) -> str:
    """``"sr-adam"``: the name and the optimizer, as in results."""
    if isinstance(self.optimizer, str):
      return f"{self.name}-{self.optimizer}"
    return self.name

  def masked(self, rule: optax.GradientTransformation
             ) -> optax.GradientTransformationExtraArgs:
    """``rule`` on the quantized leaves only, via ``optax.masked``.

    Build ``rule`` with ``mask=qjax.all_floats`` (it acts on every leaf it
    is given); the other leaves pass the base step through unchanged.
    """
    return transforms.masked(rule, self.mask)

  def encode(self, params: PyTree) -> PyTree:
    """Masked leaves as grid codes (nearest point): SR/R's projection.

    Leaves on an unbounded grid (no codes for them) stay float, rounded to
    the nearest stored point; leaves on a :class:`~qjax.FloatGrid` are
    rounded to nearest and stored in the format (the value is the code).
    """
    mask = quantizers.resolve_mask(self.mask, params)
    grids = quantizers.resolve_grids(self.grid, params, mask)
    as_codes = lambda g: isinstance(g, Grid) and g.bounded
    bounded = jax.tree.map(lambda g: g if as_codes(g) else None,
                           grids, is_leaf=_is_grid_or_none)
    unbounded = jax.tree.map(
        lambda g: g if g is not None and not as_codes(g) else None, grids,
        is_leaf=_is_grid_or_none)
    params = quantizers.map_masked(
        lambda _, w, g: w if g is None else quantizers.round_nearest(w, g),
        params, _present(unbounded), unbounded, None)
    return codes.encode_tree(params, bounded)

  def clip_latent(self, params: PyTree) -> PyTree:
    """Masked leaves clipped into their grid's range: BC's projection."""
    mask = quantizers.resolve_mask(self.mask, params)
    grids = quantizers.resolve_grids(self.grid, params, mask)

    def clip(_, w, g):
      lo, hi = quantizers.grid_bounds(g, w.dtype)
      return jax.numpy.clip(w, lo, hi).astype(w.dtype)

    return quantizers.map_masked(clip, params, mask, grids, None)


def _is_grid_or_none(g) -> bool:
  return g is None or isinstance(g, (Grid, FloatGrid))


def _present(grids: PyTree) -> PyTree:
  return jax.tree.map(lambda g: g is not None, grids, is_leaf=_is_grid_or_none)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A registered method: its factory and what results say about it.

  Attributes:
    name: the registered name (``"sr"``).
    build: ``Setup -> Method``.
    label: the display name without the optimizer (``"SR"``; ``""`` for the
      float baseline, whose label is the optimizer's, ``"ADAM"``).
    hparams: the method's own hyperparameters and their defaults; numbers
      (and ``None``) are sweepable, bools are static options.
    eval_mode: which weights evaluation sees.
    stores: what the train state stores for the quantized leaves.
    quantized: whether the method quantizes anything (``fp`` does not).
    doc: one line for ``--help``.
  """
  name: str
  build: Callable[[Setup], Method]
  label: str
  hparams: Mapping[str, float]
  eval_mode: str
  stores: str
  quantized: bool = True
  doc: str = ""

  def display(self, optimizer: str = "adam") -> str:
    """``"SR-ADAM"``; the float baseline is just ``"ADAM"``."""
    opt = optimizer.upper() if isinstance(optimizer, str) else "CUSTOM"
    return f"{self.label}-{opt}" if self.label else opt


_REGISTRY: dict[str, Spec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str, *, label: str, eval_mode: str, stores: str,
             hparams: Mapping[str, float] | None = None,
             quantized: bool = True, doc: str = "",
             replace: bool = False) -> Callable:
  """Registers a method factory ``Setup -> Method`` under ``name``.

  Use as a decorator. ``hparams`` maps the method's own hyperparameters to
  their defaults (numbers or ``None``: a sweep passes them as arrays; a bool
  default makes a static option that cannot be swept). After this the
  name works everywhere a method name does: :func:`make`,
  :class:`qjax.train.TrainConfig`, the sweep, the command line, results.

  Raises:
    ValueError: a malformed or already registered name (pass
      ``replace=True`` to redefine one), or an hparam that shadows a common
      one.
  """
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(f"method names are lowercase identifiers "
                     f"([a-z][a-z0-9_]*); got {name!r}.")
  if name in _REGISTRY and not replace:
    raise ValueError(f"method {name!r} is already registered (by "
                     f"{_REGISTRY[name].build.__module__}); pass "
                     "replace=True to redefine it.")
  hparams = dict(hparams or {})
  clash = sorted(set(hparams) & set(COMMON_HPARAMS))
  if clash:
    raise ValueError(f"method {name!r}: hparams {clash} are common to every "
                     "method; choose other names.")
  for k, v in hparams.items():
    if not _NAME.match(k) or not (v is None or isinstance(v, (int, float))):
      raise ValueError(f"method {name!r}: hparam {k!r} needs an identifier "
                       "name and a numeric, bool or None default; got "
                       f"{k!r}={v!r}.")

  def decorator(build: Callable[[Setup], Method]):
    _REGISTRY[name] = Spec(name, build, label, hparams, eval_mode, stores,
                           quantized, doc or (build.__doc__ or "").strip()
                           .split("\n")[0])
    return build
  return decorator


def unregister(name: str) -> None:
  """Removes ``name`` from the registry (for tests and notebooks)."""
  get(name)
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Spec:
  """The :class:`Spec` registered as ``name``.

  Raises:
    ValueError: ``name`` is not registered (the message lists those that
      are).
  """
  spec = _REGISTRY.get(name) if isinstance(name, str) else None
  if spec is None:
    raise ValueError(f"method must be one of {names()}; got {name!r}. A new "
                     "method is added with qjax.methods.register.")
  return spec


def hparam_names(name: str) -> tuple[str, ...]:
  """Every hyperparameter method ``name`` accepts (common ones first)."""
  return tuple(COMMON_HPARAMS) + tuple(get(name).hparams)


def check_hparams(name: str, given: Iterable[str]) -> None:
  """Raises unless every name in ``given`` is a hyperparameter of ``name``.

  A typo (``"treshold"``) is an error, never a silently ignored setting.
  """
  allowed = hparam_names(name)
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise ValueError(f"method {name!r} has no hyperparameter(s) {unknown}; "
                     f"it accepts {allowed}.")


def sweepable(name: str, hparam: str) -> bool:
  """Whether ``hparam`` of method ``name`` may take traced (swept) values."""
  check_hparams(name, (hparam,))
  return not isinstance(get(name).hparams.get(hparam), bool)


def label(name: str, optimizer: str = "adam") -> str:
  """``"SR-ADAM"``: the display label of method ``name`` with ``optimizer``."""
  return get(name).display(optimizer)


def make(name: str, learning_rate=1e-2, *, optimizer="adam",
         grid: Grid | Callable = quantizers.glorot_binary_grid, mask=None,
         key=None, weight_decay=None, random_bits: str = "threefry",
         **hparams) -> Method:
  """Builds the registered method ``name``.

  Args:
    name: a registered method (:func:`names`): ``"fp"``, ``"bc"``, ``"sbc"``,
      ``"sr"``, ``"r"``, ``"bop"``, or one registered by the user.
    learning_rate: float, array (sweepable) or optax schedule.
    optimizer: ``"sgd"``, ``"adam"`` or any optax transformation used as the
      base step ``u`` that the update rule then rounds or clips.
    grid: the grid of the quantized leaves, a Grid or ``(path, leaf) ->
      Grid``. The default is a binary grid with BinaryConnect's per-layer
      Glorot scale.
    mask: which leaves are quantized, as in :func:`qjax.resolve_mask`; the
      default is the kernels. Selecting nothing is an error.
    key: seed or key for the method's randomness (required to initialise
      ``sr``'s state; ``None`` builds a method that can only update).
    weight_decay: optional decoupled weight decay (:func:`base_optimizer`).
    random_bits: where stochastic rounding draws its bits (``"threefry"``,
      the default, or ``"hash"``; :func:`qjax.stochastic_rounding`).
    **hparams: the method's own hyperparameters (e.g. Bop's ``threshold``
      and ``gamma``; BC's ``ste_clip`` and ``scale_by_grid``).

  Returns:
    A :class:`Method`.

  Example:
    >>> m = qjax.methods.make("sr", 1e-2, optimizer="adam", key=0,
    ...                       mask=qjax.conv_kernels)
  """
  spec = get(name)
  check_hparams(name, hparams)
  own = dict(spec.hparams)
  own.update(hparams)
  if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
    raise ValueError(
        f"optimizer must be one of {OPTIMIZERS} or an optax transformation; "
        f"got optimizer={optimizer!r}.")
  quantizers.check_random_bits(random_bits, f"method {name!r}")
  return spec.build(Setup(name, learning_rate, optimizer, grid, mask, key,
                          own, weight_decay, random_bits))


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


def guarded(base: optax.GradientTransformation,
            rule: optax.GradientTransformation, precheck=None
            ) -> optax.GradientTransformationExtraArgs:
  """``base`` then the update ``rule``, skipping non-finite steps
  (``precheck``: see :func:`qjax.skip_nonfinite`; e.g.
  :meth:`Setup.precheck` for a qjax rule after the built-in step)."""
  return transforms.skip_nonfinite(optax.chain(base, rule), precheck)


# The built-in methods register themselves on import; each lives in its own
# file with its registration.
from qjax.methods import paper  # noqa: E402,F401  pylint: disable=wrong-import-position
from qjax.methods import stochastic_bc  # noqa: E402,F401  pylint: disable=wrong-import-position
from qjax.methods import bop  # noqa: E402,F401  pylint: disable=wrong-import-position
