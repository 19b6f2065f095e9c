"""End to end: every method learns a small real dataset (scikit-learn
digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import data, models
from qjax.sweep import SweepSpec, sweep
from qjax.train import TrainConfig


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


# R needs Adam steps above half a grid step (H ~ 0.1 here) to move at all.
LEARNING_RATES = {"fp": 0.01, "bc": 0.01, "sr": 0.01, "r": 0.1}


@pytest.mark.parametrize("method", ["fp", "bc", "sr", "r"])
def test_each_method_learns_digits_with_binary_weights(method, digits):
  model = models.get("mlp", 10, features=(64,))
  config = TrainConfig(method=method, optimizer="adam", mask="all",
                       batch_size=64, epochs=3)
  out = sweep(model, digits, config,
              SweepSpec(seeds=(0,), lrs=(LEARNING_RATES[method],)),
              model_name="mlp", progress=False)
  error = out["history"][-1]["test_error"][0]
  assert error < 0.35, f"{method}: test error {error:.3f} (chance is 0.9)"
  params = jax.tree.map(lambda v: v[0], out["final_state"].params)
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=qjax.codes.is_codes)[0]
  kernels = 0
  for path, leaf in flat:
    names = qjax.quantizers.path_names(path)
    if names[-1] != "kernel":
      continue
    kernels += 1
    fan_in, fan_out = leaf.shape
    h = np.float32(np.sqrt(1.5 / (fan_in + fan_out)))  # independent of qjax
    if method in ("sr", "r"):  # stored as 1-bit codes, decoded to exactly ±H
      assert qjax.codes.is_codes(leaf), leaf
      assert leaf.data.dtype == jnp.uint8
      assert leaf.data.size == -(-fan_in * fan_out // 8)
      values = np.unique(np.asarray(qjax.codes.decode(leaf)))
      assert set(values.tolist()) <= {float(-h), float(h)}, values
    if method == "bc":  # latent weights inside [-H, H]
      assert float(jnp.max(jnp.abs(leaf))) <= float(h)
  assert kernels == 2


def test_r_with_small_steps_never_flips_a_sign(digits):
  model = models.get("mlp", 10, features=(64,))
  config = TrainConfig(method="r", batch_size=64, epochs=1)
  out = sweep(model, digits, config, SweepSpec((0,), (0.01,)),
              model_name="mlp", progress=False)
  assert all(v == [0.0] for v in out["history"][-1]["sign_flips"].values())


def test_a_short_run_evaluates_with_the_statistics_it_trained_on(digits):
  """Four steps at lr 0 on one batch: evaluating that batch gives the loss
  the training steps reported. With Flax's raw running statistics (variance
  still 0.9**4 = 66 % its initial 1) the loss is far off."""
  from qjax import train as train_lib
  model = models.get("cnn", 10)
  config = TrainConfig(method="sr", batch_size=64)
  x, y = jnp.asarray(digits.train_x[:64]), jnp.asarray(digits.train_y[:64])
  hp = {"lr": jnp.zeros(())}
  state = train_lib.init_state(model, config, jax.random.PRNGKey(0), x, hp)
  step = jax.jit(lambda s: train_lib.train_step(model, config, s, (x, y), hp))
  for _ in range(4):
    state, metrics = step(state)
  evaluated = train_lib.evaluate(model, config, state, x, y, batch_size=64,
                                 hparams=hp)
  np.testing.assert_allclose(evaluated["test_loss"], metrics["loss"],
                             rtol=1e-3)
  raw_logits = model.apply({"params": qjax.codes.decode_tree(state.params),
                            "batch_stats": state.batch_stats}, x, train=False)
  raw_loss = train_lib.cross_entropy(raw_logits, y)
  assert abs(raw_loss - metrics["loss"]) > 0.1 * metrics["loss"], (
      raw_loss, metrics["loss"])


def test_bc_view_is_exactly_the_grid_points_and_sr_stores_codes():
  """BC's forward view of any latent is exactly ±float32(H) (H computed here
  from the shape); SR's project stores 1-bit codes that decode to the same
  points, and R's too."""
  model = models.get("mlp", 10, features=(24,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)),
                      train=False)["params"]
  params = jax.tree.map(lambda w: w * 100.0, params)  # latents beyond ±H
  h = {"Dense_0": np.float32(np.sqrt(1.5 / (64 + 24))),
       "Dense_1": np.float32(np.sqrt(1.5 / (24 + 10)))}
  bc = qjax.methods.make("bc", 1e-2)
  view = bc.view(bc.project(params))
  for layer, hl in h.items():
    assert set(np.unique(np.asarray(view[layer]["kernel"])).tolist()) <= {
        float(-hl), float(hl)}
  for name in ("sr", "r"):
    stored = qjax.methods.make(name, 1e-2, key=0).project(params)
    for layer, hl in h.items():
      c = stored[layer]["kernel"]
      assert isinstance(c, qjax.Codes) and c.data.dtype == np.uint8
      np.testing.assert_array_equal(qjax.codes.decode(c), view[layer]["kernel"])
    assert not any(isinstance(v, qjax.Codes) for layer, leaves in
                   stored.items() if layer.startswith("BatchNorm")
                   for v in leaves.values())
