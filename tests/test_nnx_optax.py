"""NNX models with the plain optax rules (``nnx.Optimizer``), and logging.

The engine's NNX path is tested in ``test_open_engine.py``; here an NNX
model trains with ``qjax.methods.make(...).tx`` through ``nnx.Optimizer``
(BC through :func:`qjax.network.nnx_view`), and a sweep logs to TensorBoard
through ``on_epoch``.
"""

import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import data
from qjax import grid as grid_lib
from qjax import models
from qjax import results
from qjax.sweep import SweepSpec, sweep
from qjax.train import TrainConfig


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)
    self.l2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.bn(self.l1(x.reshape(x.shape[0], -1)))))


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


def _train_nnx(method, digits, epochs=6):
  model = _MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, method.tx, wrt=nnx.Param)
  x, y = jnp.asarray(digits.train_x[:1024]), jnp.asarray(digits.train_y[:1024])

  @nnx.jit
  def step(model, opt, xb, yb):
    def loss_fn(model):
      logits = qjax.network.nnx_view(model, method.view)(xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = nnx.grad(loss_fn)(model)
    opt.update(model, grads)

  for _ in range(epochs):
    for i in range(0, 1024, 64):
      step(model, opt, x[i:i + 64], y[i:i + 64])
  model.eval()
  logits = qjax.network.nnx_view(model, method.view)(jnp.asarray(
      digits.test_x))
  error = float(jnp.mean(jnp.argmax(logits, -1)
                         != jnp.asarray(digits.test_y)))
  return model, error


@pytest.mark.parametrize("name", ["sr", "bc"])
def test_nnx_optimizer_trains_with_qjax_rules(name, digits):
  grid = qjax.Grid.binary(0.1)
  method = qjax.methods.make(name, 3e-3, grid=grid, key=0)
  model, error = _train_nnx(method, digits)
  assert error < 0.3, error  # chance is 0.9
  points = set(grid_lib.values(grid).tolist())
  for layer in (model.l1, model.l2):
    kernel = np.asarray(layer.kernel[...])
    if name == "sr":  # the stored kernels are exactly the grid's points
      assert set(np.unique(kernel).tolist()) <= points
    else:  # BC keeps float latents in [-0.1, 0.1]; its view is binary
      assert np.unique(kernel).size > 2
      assert np.all(np.abs(kernel) <= 0.1)
  biases = np.asarray(model.l1.bias[...])
  assert np.unique(biases).size > 2  # the mask left the biases in float
  if name == "bc":
    viewed = qjax.network.nnx_view(model, method.view)
    assert set(np.unique(np.asarray(viewed.l1.kernel[...])).tolist()) == (
        points)


def _events(path):
  """(tag, step, value) of every scalar in a TFRecord event file."""
  from tensorboardX.proto import event_pb2
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      payload = f.read(length)
      f.read(4)
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        out.append((value.tag, event.step, value.simple_value))
  return out


def test_tensorboard_logger_writes_every_config_and_epoch(tmp_path, digits):
  pytest.importorskip("tensorboardX")
  small = digits._replace(train_x=digits.train_x[:256],
                          train_y=digits.train_y[:256])
  log = results.tensorboard_logger(str(tmp_path), prefix="sr/")
  out = sweep(models.get("mlp", 10, features=(16,)), small,
              TrainConfig(method="sr", batch_size=64, epochs=2),
              SweepSpec(seeds=(0, 1), lrs=(0.01,)), progress=False,
              on_epoch=log)
  log.close()
  for i, config in enumerate(out["configs"]):
    folder = tmp_path / "sr" / results.config_name(config)
    files = [f for f in os.listdir(folder) if "tfevents" in f]
    assert len(files) == 1
    events = _events(folder / files[0])
    errors = {step: v for tag, step, v in events if tag == "test_error"}
    assert sorted(errors) == [1, 2]
    for record in out["history"]:
      assert errors[record["epoch"]] == pytest.approx(
          record["test_error"][i], abs=1e-7)
    assert any(tag.startswith("sign_flips/") for tag, _, _ in events)
