"""One interface to any Flax model: Linen modules and NNX models alike.

The training engine sees a model only through a :class:`Network`: two pure
functions on plain nested dicts of arrays,

- ``init(key, x) -> (params, model_state)`` and
- ``apply(params, model_state, x, *, train, rng) -> (outputs, model_state)``,

so that parameters, BatchNorm statistics and any other model state are
ordinary pytrees that ``jit``, ``vmap``, ``grad`` and checkpoints handle.
``params`` are the trainable parameters (Linen's ``params`` collection, NNX's
:class:`flax.nnx.Param` variables); ``model_state`` is everything else the
model keeps (Linen's other collections, e.g. ``{"batch_stats": ...}``; NNX's
BatchNorm statistics and RNG streams), ``{}`` for a stateless model.

:func:`as_network` builds one from

- an unbound :class:`flax.linen.Module`. Its mode argument is found once, by
  name, in the signature of its ``__call__``: ``train`` or ``training``
  (True when training), ``deterministic`` or ``use_running_average`` (False
  when training); a module with none of them is called without one. When
  training, every ``model_state`` collection is mutable and ``rng`` is the
  ``dropout`` stream.
- a function ``rngs -> nnx.Module`` (or :func:`from_nnx`'s result). The model
  is rebuilt from the state at every call (``nnx.merge``) and put in
  ``train()`` or ``eval()`` mode, which sets every ``deterministic`` and
  ``use_running_average`` attribute (Dropout, BatchNorm).

Example:
  >>> net = as_network(qjax.models.MLP(features=(16,)))
  >>> params, state = net.init(jax.random.PRNGKey(0), x)
  >>> logits, state = net.apply(params, state, x, train=True, rng=key)
  >>> net = as_network(lambda rngs: MyNNXModel(10, rngs=rngs))
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, NamedTuple

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from qjax import codes as codes_lib
from qjax import quantizers

PyTree = Any

__all__ = ["Network", "as_network", "from_nnx", "has_conv_kernels"]


class Network(NamedTuple):
  """A model as pure functions on plain nested dicts of arrays.

  Attributes:
    init: ``init(key, x) -> (params, model_state)``; ``key`` is a raw
      ``jax.random.PRNGKey`` (or a typed key), ``x`` a sample batch. Works
      under ``jit`` and ``vmap``.
    apply: ``apply(params, model_state, x, *, train, rng) -> (outputs,
      new_model_state)``; ``rng`` is a PRNG key for this call's randomness
      (dropout) or None. With ``train=False`` the result's state is
      ``model_state`` itself.
    name: the model's class name, for messages.
    bn_momentum: the model's ``bn_momentum`` attribute, None if it declares
      none.
    definition: a textual description of the architecture, without memory
      addresses, stable across processes (for fingerprints).
  """
  init: Callable
  apply: Callable
  name: str
  bn_momentum: float | None
  definition: str


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Mode arguments of a Linen ``__call__``, in order of preference, each with
# whether its value is True when training.
_MODE_ARGS = (("train", True), ("training", True), ("deterministic", False),
              ("use_running_average", False))


def _strip_addresses(text: str) -> str:
  return _ADDRESS.sub("", text)


def _momentum(model) -> float | None:
  momentum = getattr(model, "bn_momentum", None)
  return None if momentum is None else float(momentum)


def as_network(model) -> Network:
  """The :class:`Network` of a Flax model.

  Args:
    model: a :class:`Network` (returned as is); an unbound
      :class:`flax.linen.Module`; or a function ``rngs -> nnx.Module``
      (passed to :func:`from_nnx`; an ``nnx.Module`` subclass whose only
      required argument is ``rngs`` is one).

  Raises:
    TypeError: for an ``nnx.Module`` instance (pass a function that builds
      it, so that every seed initialises its own weights), a Linen class or
      bound module, a callable that does not return an ``nnx.Module``, or
      anything else.
  """
  if isinstance(model, Network):
    return model
  if isinstance(model, nn.Module):
    return _from_linen(model)
  if isinstance(model, nnx.Module):
    raise TypeError(
        f"as_network got an nnx.Module instance ({type(model).__name__}); "
        "pass a function rngs -> module, e.g. lambda rngs: MLP(..., "
        "rngs=rngs), so that every seed initialises its own weights "
        "(qjax.network.from_nnx builds the Network from such a function).")
  if isinstance(model, type) and issubclass(model, nn.Module):
    raise TypeError(
        f"as_network got the Linen class {model.__name__}; pass an instance, "
        f"e.g. {model.__name__}(...).")
  if callable(model):  # rngs -> nnx.Module, e.g. an nnx.Module subclass
    return from_nnx(model)
  raise TypeError(
      f"as_network cannot use {type(model).__name__} {model!r}: pass an "
      "unbound flax.linen.Module, a function rngs -> nnx.Module (see "
      "qjax.network.from_nnx), or a qjax.network.Network.")


# ----------------------------------------------------------------------------
# Linen.
# ----------------------------------------------------------------------------


def _linen_mode(module: nn.Module) -> Callable[[bool], dict]:
  """``train -> kwargs`` giving the module's mode argument, if it has one."""
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (AttributeError, TypeError, ValueError):
    parameters = {}
  for name, when_training in _MODE_ARGS:
    param = parameters.get(name)
    if param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD,
                                            param.KEYWORD_ONLY):
      return lambda train, name=name, t=when_training: {
          name: train if t else not train}
  return lambda train: {}


def _from_linen(module: nn.Module) -> Network:
  """The :class:`Network` of an unbound Linen module.

  ``init`` draws the ``params`` stream from ``key`` itself (so parameters
  equal ``module.init(key, x, ...)``'s bit for bit) and gives a ``dropout``
  stream ``fold_in(key, 1)``; it calls the module in evaluation mode.
  ``model_state`` holds every collection but ``params`` and
  ``intermediates``.

  Raises:
    TypeError: if ``module`` is bound (e.g. by ``module.bind``).
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"_from_linen needs a flax.linen.Module, got {module!r}")
  if module.scope is not None:
    raise TypeError(
        f"{type(module).__name__} is bound to variables; pass the unbound "
        "module (e.g. module.unbind()[0]).")
  mode = _linen_mode(module)

  def init(key, x):
    rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
    variables = flax.core.unfreeze(module.init(rngs, x, **mode(False)))
    params = variables.pop("params", {})
    variables.pop("intermediates", None)
    return params, variables

  def apply(params, model_state, x, *, train: bool, rng=None):
    variables = {"params": params, **model_state}
    if not train:
      return module.apply(variables, x, **mode(False)), model_state
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    if not model_state:
      return module.apply(variables, x, **mode(True), **kwargs), model_state
    outputs, updates = module.apply(variables, x, **mode(True),
                                    mutable=list(model_state), **kwargs)
    updates = flax.core.unfreeze(updates)
    return outputs, {k: updates.get(k, v) for k, v in model_state.items()}

  return Network(init=init, apply=apply, name=type(module).__name__,
                 bn_momentum=_momentum(module),
                 definition=_strip_addresses(repr(module)))


# ----------------------------------------------------------------------------
# NNX.
# ----------------------------------------------------------------------------


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(abstract_key):
  """The PRNG implementation of an abstract (``ShapeDtypeStruct``) key."""
  impl = []
  jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), abstract_key)
  return impl[0]


def _flat(tree: dict) -> dict:
  return dict(traverse_util.flatten_dict(tree))


def from_nnx(make: Callable[[nnx.Rngs], nnx.Module]) -> Network:
  """The :class:`Network` of an NNX model built by ``make(rngs)``.

  ``make`` is called once abstractly (``nnx.eval_shape``, nothing computed)
  for the model's structure, then by every ``init(key, x)`` as
  ``make(nnx.Rngs(key))`` (``x`` is unused: NNX layers know their shapes).
  ``params`` are the ``nnx.Param`` variables as a pure dict; ``model_state``
  every other variable (BatchStat, RNG streams' keys and counts, ...), with
  PRNG keys stored as raw ``uint32`` data (``jax.random.key_data``) so that
  the state is a plain array tree.

  Randomness when training: with an ``rng``, every RNG stream of the model
  is reseeded for the call (the ``i``-th stream, in the state's sorted path
  order, gets key ``fold_in(rng, i)`` and count 0), so that the outputs
  depend on ``rng`` only, as Linen's ``rngs={"dropout": rng}`` does: the same
  ``rng`` gives the same masks, configs vmapped with different ``rng`` get
  independent ones. Without one (``rng=None``) the model's own streams,
  carried in ``model_state``, are used and advanced. The returned state
  holds the streams as they are after the call. A raw ``rng`` is read as a
  key of JAX's default implementation; reseeded streams take ``rng``'s.

  Raises:
    TypeError: if ``make`` does not return an ``nnx.Module``.
  """
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  if not isinstance(abstract, nnx.Module):
    raise TypeError(
        f"from_nnx needs a function rngs -> nnx.Module; {make!r} returned "
        f"{type(abstract).__name__}.")
  graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  params_tree = jax.tree.structure(nnx.to_pure_dict(abs_params))
  rest_tree = jax.tree.structure(nnx.to_pure_dict(abs_rest))
  rest_vars = nnx.to_flat_state(abs_rest)
  # Paths (in pure-dict form) of the RNG keys with their implementations,
  # and of the RNG counts.
  key_impls = {path: _key_impl(var.get_value()) for path, var in rest_vars
               if _is_key(var.get_value())}
  stream_keys = sorted((path for path, var in rest_vars
                        if isinstance(var, nnx.RngKey)), key=str)
  stream_counts = [path for path, var in rest_vars
                   if isinstance(var, nnx.RngCount)]

  def init(key, x):
    del x
    model = make(nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), _raw_keys(nnx.to_pure_dict(rest))

  def _raw_keys(pure: dict) -> dict:
    return jax.tree.map(
        lambda v: jax.random.key_data(v) if _is_key(v) else v, pure)

  def _state(abstract_state, pure: dict, treedef, what: str):
    if jax.tree.structure(pure) != treedef:
      raise ValueError(
          f"{what} do not match {type(abstract).__name__}'s: expected "
          f"{treedef}, got {jax.tree.structure(pure)}.")
    state = jax.tree.map(lambda v: v, abstract_state)  # a fresh copy
    nnx.replace_by_pure_dict(state, pure)
    return state

  def _reseed(flat: dict, rng) -> dict:
    if not _is_key(jnp.asarray(rng)):
      rng = jax.random.wrap_key_data(rng)
    flat = dict(flat)
    for i, path in enumerate(stream_keys):
      flat[path] = jax.random.fold_in(rng, i)
    for path in stream_counts:
      flat[path] = jnp.zeros_like(flat[path])
    return flat

  def apply(params, model_state, x, *, train: bool, rng=None):
    flat = _flat(model_state)
    flat = {path: (jax.random.wrap_key_data(v, impl=key_impls[path])
                   if path in key_impls else v) for path, v in flat.items()}
    if train and rng is not None:
      flat = _reseed(flat, rng)
    rest = traverse_util.unflatten_dict(flat) if flat else {}
    model = nnx.merge(
        graphdef,
        _state(abs_params, params, params_tree, "params"),
        _state(abs_rest, rest, rest_tree, "model_state"))
    if train:
      model.train()
    else:
      model.eval()
    outputs = model(x)
    if not train:
      return outputs, model_state
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return outputs, _raw_keys(nnx.to_pure_dict(new_rest))

  return Network(init=init, apply=apply, name=type(abstract).__name__,
                 bn_momentum=_momentum(abstract),
                 definition=_strip_addresses(repr(graphdef)))


# ----------------------------------------------------------------------------
# Parameter trees.
# ----------------------------------------------------------------------------


def has_conv_kernels(params: PyTree) -> bool:
  """Whether a parameter tree holds a 4-D ``kernel`` (a 2-D convolution).

  A leaf counts if its path ends in ``kernel`` (or ``kernel``, ``value``,
  as NNX state paths do) and it has 4 dimensions; grid codes
  (:class:`qjax.codes.Codes`) count by their logical shape.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, codes_lib.Codes))
  return any(
      quantizers.all_kernels(quantizers.path_names(path), leaf)
      and len(quantizers.leaf_shape(leaf)) == 4 for path, leaf in flat)


def nnx_view(model, view: Callable, key=None):
  """An NNX model whose parameters are ``view`` of ``model``'s (for BC).

  For training an NNX model with the plain optax rules and
  ``nnx.Optimizer``: the forward pass of a method with a quantized view
  (BC's ``Q_d(w_r)`` with the straight-through gradient) runs on
  ``nnx_view(model, method.view)(x)``; gradients taken with ``nnx.grad``
  with respect to ``model`` flow through the view to its latent
  parameters. Methods whose view is the identity (SR, R, FP) can call the
  model directly.

  Args:
    model: an ``nnx.Module``.
    view: ``(params, key=None) -> params`` on the pure-dict parameters
      (e.g. ``qjax.Method.view``); masks see NNX paths such as
      ``("layers", 0, "kernel")``.
    key: passed to ``view`` (stochastic views, e.g. ``sbc``).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  viewed = view(pure) if key is None else view(pure, key)
  nnx.replace_by_pure_dict(params, viewed)
  return nnx.merge(graphdef, params, rest)
