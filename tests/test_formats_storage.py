"""bf16 and fp8 weights through checkpoints, export and sign diagnostics."""

import jax
import ml_dtypes
import numpy as np
import pytest

import qjax.diagnostics
import qjax.export
from qjax import models
from qjax.sweep import SweepSpec, sweep
from qjax.train import MASKS, TrainConfig

FORMAT_DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16),
                 "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}


def _model():
  return models.get("mlp", 10, features=(32,))


def _config(method, grid, epochs):
  return TrainConfig(method=method, grid=grid, batch_size=64, epochs=epochs)


@pytest.fixture(scope="module")
def runs(small_digits, tmp_path_factory):
  """Per (method, format): an unbroken 2-epoch sweep and one stopped after
  epoch 1 and resumed to 2 from its checkpoint."""
  out = {}
  spec = SweepSpec(seeds=(0, 1), lrs=(0.01,))
  for grid in FORMAT_DTYPES:
    for method in ("sr", "r"):
      d = tmp_path_factory.mktemp(f"{method}_{grid}")
      full = sweep(_model(), small_digits, _config(method, grid, 2), spec,
                   checkpoint_dir=str(d / "a"), progress=False)
      sweep(_model(), small_digits, _config(method, grid, 1), spec,
            checkpoint_dir=str(d / "b"), progress=False)
      resumed = sweep(_model(), small_digits, _config(method, grid, 2), spec,
                      checkpoint_dir=str(d / "b"), progress=False)
      out[method, grid] = full, resumed
  return out


CASES = [(m, g) for g in FORMAT_DTYPES for m in ("sr", "r")]


@pytest.mark.parametrize("method, grid", CASES)
def test_resume_in_a_format_equals_the_unbroken_run(runs, method, grid):
  full, resumed = runs[method, grid]
  kernels = [k for k in jax.tree.leaves(resumed["final_state"].params)
             if k.ndim == 3]  # [configs, in, out]
  assert kernels and all(k.dtype == FORMAT_DTYPES[grid] for k in kernels)
  for a, b in zip(jax.tree.leaves(full["final_state"]),
                  jax.tree.leaves(resumed["final_state"])):
    assert a.dtype == b.dtype
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert [h["test_error"] for h in full["history"]] == [
      h["test_error"] for h in resumed["history"]]


@pytest.mark.parametrize("method, grid", CASES)
def test_export_of_format_weights_round_trips(runs, method, grid, tmp_path):
  params = jax.tree.map(lambda v: v[1], runs[method, grid][1][
      "final_state"].params)
  path = tmp_path / "w.npz"
  meta = qjax.export.export(path, params, method=method)
  kernel = params["Dense_0"]["kernel"]
  entry = next(e for e in meta["leaves"] if e["name"] == "Dense_0/kernel")
  assert entry["dtype"] == FORMAT_DTYPES[grid].name
  back = qjax.export.load(path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert a.dtype == b.dtype
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # numpy alone reads the exact values (as float32).
  plain = qjax.export.load_numpy(path)["Dense_0/kernel"]
  assert plain.dtype == np.float32
  assert np.array_equal(plain, np.asarray(kernel).astype(np.float32))


def test_export_still_refuses_float32_weights_for_sr():
  params = {"Dense_0": {"kernel": np.ones((3, 2), np.float32)}}
  with pytest.raises(ValueError, match="stores its quantized weights as"):
    qjax.export.export("/nonexistent/w.npz", params, method="sr")


@pytest.mark.parametrize("grid", list(FORMAT_DTYPES))
def test_sign_bits_of_format_weights(runs, grid):
  params = jax.tree.map(lambda v: v[0], runs["sr", grid][1][
      "final_state"].params)
  bits = qjax.diagnostics.sign_bits(params, MASKS["all"])
  kernels = [params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]]
  assert len(bits) == 2
  for b, k in zip(bits, kernels):
    want = np.packbits(np.asarray(k).astype(np.float32).reshape(-1) >= 0,
                       bitorder="little")
    assert np.array_equal(np.asarray(b).reshape(-1), want)
  flips = qjax.diagnostics.sign_flip_fractions(bits, params, MASKS["all"])
  assert [float(v) for v in flips.values()] == [0.0, 0.0]
  negated = jax.tree.map(lambda k: -k if k.ndim == 2 else k, params)
  flips = qjax.diagnostics.sign_flip_fractions(bits, negated, MASKS["all"])
  for name, k in zip(sorted(flips), kernels):
    kf = np.asarray(k).astype(np.float32)
    # -w >= 0 differs from w >= 0 except at w == 0 (both signs of zero).
    assert float(flips[name]) == pytest.approx(np.mean(kf != 0), abs=1e-6)
