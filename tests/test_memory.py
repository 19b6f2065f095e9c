"""qjax.memory: exact bytes of training states, and compiled step memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import Grid
from qjax import codes
from qjax import memory
from qjax import models
from qjax import train

MLP = models.get("mlp", 10, features=(512, 512))  # MNIST 784-512-512-10, BN
SAMPLE = jnp.zeros((2, 28, 28, 1))
HP = {"lr": jnp.float32(1e-3)}


def _init(method, optimizer, key):
  config = train.TrainConfig(method=method, optimizer=optimizer)
  return train.init_state(MLP, config, key, SAMPLE, HP)


@functools.lru_cache(maxsize=None)
def mlp_state(method, optimizer):
  return _init(method, optimizer, jax.random.PRNGKey(0))


def nbytes(tree):
  """Independent count: sum of ``x.nbytes`` over the tree's leaves."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("method,optimizer", [
    ("fp", "sgd"), ("bc", "adam"), ("sr", "sgd"), ("sr", "adam"),
    ("r", "adam")])
def test_every_figure_is_the_arrays_nbytes(method, optimizer):
  state = mlp_state(method, optimizer)
  report = memory.memory_report(state)
  assert report["total"] == nbytes(state)
  code_leaves = [x for x in jax.tree.leaves(state.params,
                                            is_leaf=codes.is_codes)
                 if codes.is_codes(x)]
  float_leaves = [x for x in jax.tree.leaves(state.params,
                                             is_leaf=codes.is_codes)
                  if not codes.is_codes(x)]
  assert report["codes"] == sum(int(c.data.nbytes) for c in code_leaves)
  assert report["float_params"] == nbytes(float_leaves)
  assert report["params"] == nbytes(state.params)
  assert report["optimizer_state"] == nbytes(state.opt_state)
  assert report["batch_stats"] == nbytes(state.batch_stats)
  assert report["diagnostics_detail"]["init_signs"] == nbytes(
      state.init_signs)
  assert report["diagnostics"] == nbytes(
      (state.init_signs, state.step, state.key, state.skipped, state.streak,
       state.first_skipped))
  assert report["total_without_diagnostics"] == (
      report["total"] - report["diagnostics"])
  assert sum(r["bytes"] for r in report["layers"]) == report["params"]
  assert report["configs"] == 1 and report["all_configs_total"] == (
      report["total"])


def test_sr_sgd_is_under_a_twentieth_of_fp_sgd():
  sr = memory.memory_report(mlp_state("sr", "sgd"))
  fp = memory.memory_report(mlp_state("fp", "sgd"))
  assert sr["params"] < fp["params"] / 20
  assert sr["total_without_diagnostics"] < fp["total_without_diagnostics"] / 20
  assert fp["codes"] == 0 and fp["quantized_weights"] == 0
  assert fp["bits_per_quantized_weight"] is None


def test_sr_adam_is_eight_bytes_and_one_bit_per_quantized_weight():
  report = memory.memory_report(mlp_state("sr", "adam"))
  n = report["quantized_weights"]
  assert n == 784 * 512 + 512 * 512 + 512 * 10
  for row in report["layers"]:
    if row["kind"] == "codes":  # two float32 Adam moments, 1 bit of code
      assert row["optimizer_bytes"] == 8 * row["weights"]
      assert row["bytes"] * 8 == row["weights"]
  per_weight = report["total_without_diagnostics"] / n
  assert 8.125 <= per_weight < 8.2  # + biases, BN and their moments


def test_binary_codes_take_one_bit_and_wider_grids_their_code_width():
  assert memory.memory_report(
      mlp_state("r", "sgd"))["bits_per_quantized_weight"] == 1.0
  x = jnp.linspace(-1, 1, 24).reshape(4, 6)
  for grid, bits in [(Grid.binary(1.0), 1.0), (Grid.ternary(1.0), 8.0),
                     (Grid.kbit(4), 8.0), (Grid.kbit(10), 16.0)]:
    params = {"w": {"kernel": codes.encode_nearest(x, grid)}, "b": x[0]}
    report = memory.memory_report(params)
    assert report["bits_per_quantized_weight"] == bits
    assert report["total"] == nbytes(params)
    assert report["float_params"] == 24 and report["optimizer_state"] == 0


def test_stacked_sweep_states_are_reported_per_config():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  stacked = jax.vmap(lambda k: _init("sr", "adam", k))(keys)
  report = memory.memory_report(stacked)
  single = memory.memory_report(mlp_state("sr", "adam"))
  assert report["configs"] == 3 and "per config" in report["note"]
  for key in memory.CATEGORIES + ("total", "quantized_weights"):
    assert report[key] == single[key], key
  assert report["all_configs_total"] == nbytes(stacked)
  assert [r["shape"] for r in report["layers"]] == [
      r["shape"] for r in single["layers"]]
  # A bare stacked params tree: detected from the codes' batch axis.
  assert memory.memory_report(stacked.params)["configs"] == 3
  with pytest.raises(ValueError, match="leading axis should be 4"):
    memory.memory_report(stacked, configs=4)


def test_shapes_from_eval_shape_count_the_same():
  config = train.TrainConfig(method="sr", optimizer="adam")
  shapes = jax.eval_shape(
      lambda k: train.init_state(MLP, config, k, SAMPLE, HP),
      jax.random.PRNGKey(0))
  assert (memory.memory_report(shapes)
          == memory.memory_report(mlp_state("sr", "adam")))


def test_mask_marks_bc_latents():
  report = memory.memory_report(mlp_state("bc", "sgd"), mask=train.MASKS["all"])
  kinds = {r["name"]: r["kind"] for r in report["layers"]}
  assert kinds["Dense_0/kernel"] == "latent" and kinds["Dense_2/bias"] == (
      "float")
  assert report["latent_weights"] == 784 * 512 + 512 * 512 + 512 * 10
  assert report["quantized_weights"] == 0


def test_scaled_grid_scales_are_counted():
  params = {"kernel": codes.encode_nearest(jnp.ones((16,)),
                                           Grid.binary(1.0).scaled(0.5))}
  report = memory.memory_report(params)
  assert report["code_scales"] == 4 and report["codes"] == 2
  assert report["total"] == nbytes(params)


def test_format_report_is_a_short_table():
  text = memory.format_report(memory.memory_report(mlp_state("sr", "adam")))
  for word in ("codes", "optimizer_state", "diagnostics", "total",
               "Dense_0/kernel", "1.000 bits"):
    assert word in text


def test_not_a_state_is_a_clear_error():
  with pytest.raises(TypeError, match="TrainState or a parameter tree"):
    memory.memory_report(object())


def test_compiled_peak_bytes_of_a_training_step():
  state = mlp_state("sr", "adam")
  config = train.TrainConfig(method="sr", optimizer="adam")
  batch = (jnp.zeros((8, 28, 28, 1)), jnp.zeros((8,), jnp.int32))
  out = memory.compiled_peak_bytes(
      lambda s, b, h: train.train_step(MLP, config, s, b, h), state, batch,
      HP)
  if not out["available"]:
    pytest.skip(f"no memory analysis on {out['backend']}")
  assert out["argument_bytes"] >= nbytes(state)
  assert out["temp_bytes"] > 0
  assert out["peak_bytes"] == (out["argument_bytes"] + out["output_bytes"]
                               - out["alias_bytes"] + out["temp_bytes"])


def test_compiled_peak_bytes_without_memory_analysis(monkeypatch):
  monkeypatch.setattr(jax.stages.Compiled, "memory_analysis",
                      lambda self: None)
  out = memory.compiled_peak_bytes(lambda x: x * 2, np.ones(3, np.float32))
  assert out["available"] is False and out["peak_bytes"] is None
  assert out["temp_bytes"] is None
