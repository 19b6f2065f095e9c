"""The shared table of update rules that the common invariant tests run on.

A new method registered in qjax.methods joins automatically; add an entry to
OVERRIDES if it needs special settings.

Every name in :func:`qjax.methods.names` at import time gets one
:class:`Rule` in :data:`RULES`, built from :data:`DEFAULTS` updated by its
entry in :data:`OVERRIDES` (if any), so the tests of
``tests/test_rules_common.py`` (grid membership, determinism, jit == eager,
vmap lanes, non-finite skips, learning, storage) run on it with no other
change. Also here: the small parameter tree (:func:`init_params`), the
quadratic-ish loss towards a target on the grid (:func:`loss`) and the
reference training step of ``qjax.train.step`` (:func:`init`,
:func:`step`), shared by every test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax

GRID = qjax.Grid.binary(0.5)
"""The grid every rule trains on: points -0.5 and +0.5 (gap 1)."""

OPTIMIZERS = ("adam", "sgd")

SHAPES = {"dense": {"kernel": (8, 16), "bias": (16,)},
          "out": {"kernel": (16, 4)}}
"""The parameter tree: two kernels (quantized by default) and a bias."""

# What a method stores for its quantized leaves, as the tests check it:
# "codes" (qjax.Codes), "latent" (float latents inside the grid's range, the
# view on the grid) or "float" (nothing quantized).
STORAGE_KINDS = ("codes", "latent", "float")

# Which weights evaluation sees (Method.eval_mode); a new mode must be added
# here on purpose, since results and tables record it.
EVAL_MODES = ("float", "deterministic-quantized latent",
              "stored grid weights")

DEFAULTS = {
    # The grid of the quantized leaves (a Grid or (path, leaf) -> Grid).
    "grid": GRID,
    # Base learning rate per optimizer, for the learning test (30 steps).
    "lr": {"adam": 0.05, "sgd": 0.05},
    # The method's own hyperparameters passed to qjax.methods.make.
    "hparams": {},
    # Which leaves are quantized (None: the kernels).
    "mask": None,
    # Whether the loss must go down in a few steps at this learning rate.
    "learns": True,
    # Whether steps below half a grid gap never move a weight (R's stall);
    # then steps above it must move them.
    "stalls": False,
    # None: derived from Spec.stores (see storage_kind).
    "storage": None,
}

OVERRIDES: dict[str, dict[str, Any]] = {
    # R at a small step never moves a weight (Li et al. 2017, Sec. 3); the
    # tests check the stall and the move above half the gap instead.
    "r": {"learns": False, "stalls": True},
}


def storage_kind(stores: str) -> str | None:
  """The storage kind of a ``Spec.stores`` description (None: unknown)."""
  if "codes" in stores:
    return "codes"
  if stores == "float latent":
    return "latent"
  if stores == "float":
    return "float"
  return None


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of the table: a registered method and its test settings."""
  name: str
  grid: Any
  lr: dict
  hparams: dict
  mask: Any
  learns: bool
  stalls: bool
  storage: str | None

  @property
  def spec(self):
    return qjax.methods.get(self.name)

  def make(self, optimizer: str, key=0, lr=None) -> qjax.Method:
    """``qjax.methods.make`` with this row's settings."""
    return qjax.methods.make(
        self.name, self.lr[optimizer] if lr is None else lr,
        optimizer=optimizer, grid=self.grid, mask=self.mask, key=key,
        **self.hparams)


def rule(name: str) -> Rule:
  """The row of method ``name``: DEFAULTS updated by OVERRIDES[name]."""
  settings = dict(DEFAULTS)
  unknown = set(OVERRIDES.get(name, {})) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"OVERRIDES[{name!r}] has unknown keys {sorted(unknown)}"
                     f"; allowed: {sorted(DEFAULTS)}.")
  settings.update(OVERRIDES.get(name, {}))
  if settings["storage"] is None:
    settings["storage"] = storage_kind(qjax.methods.get(name).stores)
  return Rule(name=name, **settings)


RULES = tuple(rule(name) for name in qjax.methods.names())
NAMES = tuple(r.name for r in RULES)
BY_NAME = {r.name: r for r in RULES}


# ----------------------------------------------------------------------------
# The problem: a small parameter tree and a loss towards a grid target.
# ----------------------------------------------------------------------------


def init_params(seed: int = 0, scale: float = 0.3) -> dict:
  """Float32 params of :data:`SHAPES`, normal with std ``scale``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, scale, s), jnp.float32), SHAPES,
      is_leaf=lambda s: isinstance(s, tuple))


def is_kernel(path) -> bool:
  return qjax.quantizers.path_names(path)[-1] == "kernel"


def target_params(seed: int = 1) -> dict:
  """The target: kernels on :data:`GRID`'s points (±0.5), biases floats."""
  rng = np.random.default_rng(seed)
  points = np.asarray(qjax.grid.values(GRID), np.float32)

  def leaf(path, s):
    if is_kernel(path):
      return jnp.asarray(rng.choice(points, s), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)

  return jax.tree_util.tree_map_with_path(
      leaf, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def curvatures(seed: int = 2) -> dict:
  """Per-weight curvature of the loss, in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32), SHAPES,
      is_leaf=lambda s: isinstance(s, tuple))


TARGET = target_params()
CURVATURE = curvatures()


def leaf_losses(params) -> dict:
  """Per leaf ``sum(c (w - t)**2 + 0.1 (w - t)**4)``: separable, min at t."""
  def one(w, t, c):
    d = w - t
    return jnp.sum(c * d * d + 0.1 * (d * d) * (d * d))
  return jax.tree.map(one, params, TARGET, CURVATURE)


def loss(params) -> jax.Array:
  """The quadratic-ish loss: the sum of :func:`leaf_losses`."""
  return sum(jax.tree.leaves(leaf_losses(params)))


def kernel_loss(params) -> jax.Array:
  """The loss of the kernels only (the quantized leaves by default)."""
  flat = jax.tree_util.tree_flatten_with_path(leaf_losses(params))[0]
  return sum(v for path, v in flat if is_kernel(path))


# ----------------------------------------------------------------------------
# The reference step, as qjax.train.step does it.
# ----------------------------------------------------------------------------


def init(method: qjax.Method, params):
  """``(stored, opt_state)``: the projection and the optimizer state."""
  stored = method.project(params)
  return stored, method.tx.init(qjax.codes.decode_tree(stored))


def grads_at(method: qjax.Method, stored, key):
  """The loss gradients at ``method.view(decode_tree(stored), key)``."""
  return jax.grad(lambda w: loss(method.view(w, key)))(
      qjax.codes.decode_tree(stored))


def apply(method: qjax.Method, stored, opt_state, grads):
  """``tx.update`` then ``optax.apply_updates``: ``(stored, opt_state)``."""
  updates, opt_state = method.tx.update(grads, opt_state, stored)
  return optax.apply_updates(stored, updates), opt_state


def step(method: qjax.Method, stored, opt_state, key):
  """One training step with view key ``key``: ``(stored, opt_state)``."""
  return apply(method, stored, opt_state, grads_at(method, stored, key))


def view_key(key, i):
  """The view key of step ``i`` (as ``qjax.train.step_keys`` folds it)."""
  return jax.random.fold_in(key, i)


def eval_view(method: qjax.Method, stored):
  """What evaluation sees: the view of the decoded params, no key."""
  return method.view(qjax.codes.decode_tree(stored))
