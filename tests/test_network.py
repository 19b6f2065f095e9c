"""Tests of qjax.network: one interface to Linen and NNX models."""

import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qjax.models import MLP
from qjax.models import SmallCNN
from qjax.network import Network
from qjax.network import as_network
from qjax.network import from_nnx
from qjax.network import has_conv_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K0, K1, K2 = (jax.random.PRNGKey(i) for i in range(3))


def _x(shape=(4, 4), seed=7):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_trees_close(a, b, **kwargs):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kwargs), a, b)


def _differ(a, b) -> bool:
  return not np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Linen.
# ----------------------------------------------------------------------------


class TwoLayer(nn.Module):
  """No mode argument, no state."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class DropTrain(nn.Module):

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dropout(0.5)(nn.Dense(16)(x), deterministic=not train)
    return nn.Dense(3)(x)


class DropDeterministic(nn.Module):

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dropout(0.5)(nn.Dense(16)(x), deterministic=deterministic)
    return nn.Dense(3)(x)


class ModeTraining(nn.Module):
  """Doubles its input when called with training=True."""

  @nn.compact
  def __call__(self, x, training: bool):
    return nn.Dense(2)(x) * (2.0 if training else 1.0)


class ModeRunningAverage(nn.Module):

  @nn.compact
  def __call__(self, x, *, use_running_average: bool):
    return nn.BatchNorm(use_running_average=use_running_average)(x)


def test_linen_mlp_is_bitwise_the_models_own_apply():
  model = MLP(num_classes=10, features=(16,))
  x = _x((4, 6, 6, 1))
  net = as_network(model)
  params, state = net.init(K0, x)
  variables = model.init(K0, x, train=False)
  _assert_trees_equal(params, dict(variables["params"]))
  _assert_trees_equal(state, {"batch_stats": dict(variables["batch_stats"])})
  assert type(params) is dict and type(state["batch_stats"]) is dict

  v = {"params": params, "batch_stats": state["batch_stats"]}
  want, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
  got, new_state = net.apply(params, state, x, train=True, rng=K1)
  _assert_trees_equal(got, want)
  _assert_trees_equal(new_state, {"batch_stats": updates["batch_stats"]})
  assert _differ(new_state["batch_stats"]["BatchNorm_0"]["mean"],
                 state["batch_stats"]["BatchNorm_0"]["mean"])

  got, same = net.apply(params, state, x, train=False, rng=None)
  _assert_trees_equal(got, model.apply(v, x, train=False))
  assert same is state

  # Compiled, as the engine runs it.
  jit_net = jax.jit(lambda p, s: net.apply(p, s, x, train=True, rng=K1))
  jit_model = jax.jit(lambda v: model.apply(v, x, train=True,
                                            mutable=["batch_stats"]))
  got, new_state = jit_net(params, state)
  want, updates = jit_model(v)
  _assert_trees_equal(got, want)
  _assert_trees_equal(new_state["batch_stats"], updates["batch_stats"])

  assert net.name == "MLP" and net.bn_momentum == 0.9
  assert net.definition == re.sub(r" at 0x[0-9a-fA-F]+", "", repr(model))
  assert "0x" not in net.definition


def test_linen_without_mode_argument_or_state():
  module = TwoLayer()
  x = _x()
  net = as_network(module)
  params, state = net.init(K0, x)
  assert state == {}
  _assert_trees_equal(params, dict(module.init(K0, x)["params"]))
  want = module.apply({"params": params}, x)
  for train, rng in ((True, K1), (True, None), (False, None)):
    got, new_state = net.apply(params, state, x, train=train, rng=rng)
    _assert_trees_equal(got, want)
    assert new_state == {}
  assert net.name == "TwoLayer" and net.bn_momentum is None


@pytest.mark.parametrize("module,mode", [
    (DropTrain(), lambda train: {"train": train}),
    (DropDeterministic(), lambda train: {"deterministic": not train}),
], ids=["train", "deterministic"])
def test_linen_dropout(module, mode):
  x = _x((4, 5))
  net = as_network(module)
  params, state = net.init(K0, x)
  assert state == {}
  v = {"params": params}

  out1, _ = net.apply(params, state, x, train=True, rng=K1)
  again, _ = net.apply(params, state, x, train=True, rng=K1)
  out2, _ = net.apply(params, state, x, train=True, rng=K2)
  _assert_trees_equal(out1, again)
  assert _differ(out1, out2)
  _assert_trees_equal(out1, module.apply(v, x, **mode(True),
                                         rngs={"dropout": K1}))

  want = module.apply(v, x, **mode(False))
  for rng in (None, K1, K2):
    got, _ = net.apply(params, state, x, train=False, rng=rng)
    _assert_trees_equal(got, want)
  assert _differ(out1, want)


def test_linen_mode_argument_names():
  x = _x()
  net = as_network(ModeTraining())
  params, _ = net.init(K0, x)
  base = ModeTraining().apply({"params": params}, x, training=False)
  _assert_trees_equal(net.apply(params, {}, x, train=True, rng=None)[0],
                      2.0 * base)
  _assert_trees_equal(net.apply(params, {}, x, train=False, rng=None)[0],
                      base)

  net = as_network(ModeRunningAverage())
  params, state = net.init(K0, x)
  assert set(state) == {"batch_stats"}
  _, new_state = net.apply(params, state, x, train=True, rng=None)
  assert _differ(new_state["batch_stats"]["BatchNorm_0"]["mean"],
                 state["batch_stats"]["BatchNorm_0"]["mean"])
  got, same = net.apply(params, state, x, train=False, rng=None)
  assert same is state
  _assert_trees_equal(got, ModeRunningAverage().apply(
      {"params": params, **state}, x, use_running_average=True))


# ----------------------------------------------------------------------------
# NNX.
# ----------------------------------------------------------------------------


class NNXNet(nnx.Module):
  bn_momentum = 0.99

  def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.5):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _nnx_net(**kwargs) -> Network:
  return from_nnx(lambda rngs: NNXNet(rngs=rngs, **kwargs))


def _direct_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_nnx_init_under_jit_and_vmap():
  net = as_network(lambda rngs: NNXNet(rngs=rngs))
  assert net.name == "NNXNet" and net.bn_momentum == 0.99
  x = _x()
  params, state = jax.jit(net.init)(K0, x)
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {"l1": {"kernel": (4, 8), "bias": (8,)},
                    "bn": {"scale": (8,), "bias": (8,)},
                    "l2": {"kernel": (8, 3), "bias": (3,)}}
  _assert_trees_equal(params, _direct_params(NNXNet(rngs=nnx.Rngs(K0))))
  # A plain array tree: BatchNorm statistics, the dropout stream's raw key.
  assert set(state) == {"bn", "drop"}
  assert type(params) is dict and type(state["drop"]["rngs"]) is dict
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)
    assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)

  keys = jax.random.split(K0, 3)
  many, states = jax.vmap(net.init, in_axes=(0, None))(keys, x)
  assert jax.tree.map(jnp.shape, many) == jax.tree.map(
      lambda s: (3,) + s, shapes, is_leaf=lambda s: isinstance(s, tuple))
  kernels = many["l1"]["kernel"]
  assert _differ(kernels[0], kernels[1]) and _differ(kernels[1], kernels[2])
  _assert_trees_equal(jax.tree.map(lambda a: a[2], many),
                      _direct_params(NNXNet(rngs=nnx.Rngs(keys[2]))))
  assert jax.tree.structure(states) == jax.tree.structure(state)


def test_nnx_apply_modes_match_the_model():
  net = _nnx_net()
  x = _x((6, 4))
  params, state = net.init(K0, x)

  # Evaluation: running statistics, no dropout, state returned as given.
  model = NNXNet(rngs=nnx.Rngs(K0))
  model.eval()
  got, same = net.apply(params, state, x, train=False, rng=K1)
  np.testing.assert_allclose(got, model(x), rtol=1e-6, atol=1e-6)
  assert same is state

  # Training without rng: the model's own dropout stream, carried in the
  # state, and BatchNorm updates, as the model itself does them.
  model = NNXNet(rngs=nnx.Rngs(K0))
  model.train()
  want = model(x)
  got, new_state = net.apply(params, state, x, train=True, rng=None)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new_state["bn"]["mean"], model.bn.mean[...],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(new_state["bn"]["var"], model.bn.var[...],
                             rtol=1e-6, atol=1e-7)
  assert _differ(new_state["bn"]["mean"], state["bn"]["mean"])
  # The stream advanced: the next call draws another mask.
  count = state["drop"]["rngs"]["count"]
  assert new_state["drop"]["rngs"]["count"] == count + 1
  next_out, _ = net.apply(params, new_state, x, train=True, rng=None)
  assert _differ(next_out, got)


def test_nnx_dropout_follows_rng():
  net = _nnx_net()
  x = _x((6, 4))
  params, state = net.init(K0, x)
  out1, s1 = net.apply(params, state, x, train=True, rng=K1)
  again, s1_again = net.apply(params, state, x, train=True, rng=K1)
  out2, _ = net.apply(params, state, x, train=True, rng=K2)
  _assert_trees_equal(out1, again)
  _assert_trees_equal(s1, s1_again)
  assert _differ(out1, out2)
  typed, _ = net.apply(params, state, x, train=True,
                       rng=jax.random.wrap_key_data(K1))
  _assert_trees_equal(typed, out1)
  # The rng decides, not the carried stream.
  _, advanced = net.apply(params, state, x, train=True, rng=None)
  _assert_trees_equal(net.apply(params, advanced, x, train=True, rng=K1)[0],
                      out1)
  # Without dropout the two rngs agree (only the masks differ).
  off = _nnx_net(dropout=0.0)
  p0, s0 = off.init(K0, x)
  _assert_trees_equal(off.apply(p0, s0, x, train=True, rng=K1)[0],
                      off.apply(p0, s0, x, train=True, rng=K2)[0])

  # Configs vmapped with their own keys get independent masks; each equals
  # its unbatched call.
  keys = jax.random.split(K0, 3)
  many, states = jax.vmap(net.init, in_axes=(0, None))(keys, x)
  rngs = jax.random.split(K1, 3)
  apply = jax.jit(jax.vmap(
      lambda p, s, r: net.apply(p, s, x, train=True, rng=r)))
  outs, new_states = apply(many, states, rngs)
  same_params = jax.tree.map(lambda a: jnp.stack([a[0]] * 3), many)
  same_states = jax.tree.map(lambda a: jnp.stack([a[0]] * 3), states)
  masks, _ = apply(same_params, same_states, rngs)
  assert _differ(masks[0], masks[1]) and _differ(masks[1], masks[2])
  one = jax.tree.map(lambda a: a[1], (many, states))
  np.testing.assert_allclose(
      outs[1], net.apply(*one, x, train=True, rng=rngs[1])[0],
      rtol=1e-5, atol=1e-6)
  assert (jax.tree.structure(new_states)
          == jax.tree.structure(states))


def test_gradients_linen_and_nnx():
  x = _x((6, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2])

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  model = MLP(num_classes=3, features=(8,))
  net = as_network(model)
  params, state = net.init(K0, x)
  got = jax.grad(lambda p: loss(
      net.apply(p, state, x, train=True, rng=K1)[0]))(params)
  want = jax.grad(lambda p: loss(model.apply(
      {"params": p, **state}, x, train=True, mutable=["batch_stats"])[0]))(
          params)
  _assert_trees_equal(got, want)

  net = _nnx_net(dropout=0.0)
  params, state = net.init(K0, x)
  got = jax.grad(lambda p: loss(
      net.apply(p, state, x, train=True, rng=K1)[0]))(params)
  direct = NNXNet(rngs=nnx.Rngs(K0), dropout=0.0)
  direct.train()
  want = nnx.to_pure_dict(nnx.grad(lambda m: loss(m(x)))(direct))
  _assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(got))


class Stack(nnx.Module):
  """List-like submodules: integer keys in the pure dicts."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs),
                            nnx.BatchNorm(5, rngs=rngs),
                            nnx.Linear(5, 2, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_nnx_list_submodules():
  net = as_network(Stack)
  x = _x((6, 4))
  params, state = net.init(K0, x)
  assert set(params["layers"]) == {0, 1, 2}
  model = Stack(nnx.Rngs(K0))
  model.train()
  want = model(x)
  got, new_state = jax.jit(
      lambda p, s: net.apply(p, s, x, train=True, rng=K1))(params, state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["layers"][1]["mean"],
                             model.layers[1].mean[...], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Errors, conv detection, fingerprints.
# ----------------------------------------------------------------------------


def test_as_network_rejects_instances_and_others():
  with pytest.raises(TypeError, match="from_nnx"):
    as_network(NNXNet(rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="rngs -> module"):
    as_network(NNXNet(rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError):
    as_network(42)
  with pytest.raises(TypeError, match="instance"):
    as_network(TwoLayer)
  with pytest.raises(TypeError, match="nnx.Module"):
    from_nnx(lambda rngs: 3)
  x = _x()
  bound = TwoLayer().bind(TwoLayer().init(K0, x))
  with pytest.raises(TypeError, match="unbound"):
    as_network(bound)
  net = as_network(TwoLayer())
  assert as_network(net) is net


def test_has_conv_kernels():
  x = jnp.zeros((1, 28, 28, 1))
  cnn = SmallCNN(features=(4, 8), hidden=16)
  cnn_params, _ = jax.eval_shape(as_network(cnn).init, K0, x)
  assert has_conv_kernels(cnn_params)
  mlp_params, _ = as_network(MLP(features=(8,))).init(K0, x)
  assert not has_conv_kernels(mlp_params)
  assert not has_conv_kernels({})

  conv = from_nnx(lambda rngs: nnx.Conv(1, 4, (3, 3), rngs=rngs))
  assert has_conv_kernels(jax.eval_shape(conv.init, K0, x)[0])
  assert not has_conv_kernels(_nnx_net().init(K0, _x())[0])


_DEFINITION_SOURCE = textwrap.dedent("""
    from flax import nnx
    from qjax.models import MLP
    from qjax.network import as_network

    class Small(nnx.Module):
      def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs),
                                nnx.BatchNorm(4, rngs=rngs)])
        self.drop = nnx.Dropout(0.1, rngs=rngs)

      def __call__(self, x):
        for layer in self.layers:
          x = layer(x)
        return self.drop(x)

    definitions = (as_network(lambda rngs: Small(rngs)).definition,
                   as_network(MLP(features=(8,))).definition)
""")


def test_definitions_are_stable_across_processes():
  namespace = {"__name__": "__main__"}
  exec(_DEFINITION_SOURCE, namespace)  # pylint: disable=exec-used
  here = namespace["definitions"]
  script = _DEFINITION_SOURCE + "\nprint(repr(definitions))\n"
  there = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
  assert repr(here) + "\n" == there
  nnx_definition, linen_definition = here
  assert "0x" not in nnx_definition and "Linear" in nnx_definition
  assert "0x" not in linen_definition and "MLP" in linen_definition
  assert nnx_definition != _nnx_net().definition
