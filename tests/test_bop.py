"""Bop (Helwegen et al. 2019) as a registered method: its update rule against
an independent numpy implementation, its hyperparameters, and training on
digits through the sweep with binary codes and one compilation.

The rule: ``m <- (1 - gamma) m + gamma g``; ``w <- -w`` where ``|m| >
threshold`` and ``sign(m) == sign(w)``. Expected values are computed here in
numpy, never read from the code under test.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import models
from qjax import grids as grids_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib
from qjax.methods import bop as bop_lib

STEPS = 50
SIZE = 96


def _signs(rng, n=SIZE):
  return np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)


def _grads(rng, steps=STEPS, n=SIZE):
  # A drift per weight plus noise, so that EMAs build up both ways.
  drift = rng.normal(size=n).astype(np.float32)
  noise = rng.normal(size=(steps, n)).astype(np.float32)
  return (0.5 * drift + noise).astype(np.float32)


def _reference(w0, grads, threshold, gamma):
  """Bop in numpy float32: per step the EMA, the flips and the weights."""
  w, m = w0.copy(), np.zeros_like(w0)
  one_minus, g32 = np.float32(1 - gamma), np.float32(gamma)
  out = []
  for g in grads:
    m = (one_minus * m + g32 * g).astype(np.float32)
    flip = (np.abs(m) > threshold) & (np.sign(m) == np.sign(w))
    w = np.where(flip, -w, w).astype(np.float32)
    out.append((m.copy(), flip, w.copy()))
  return out


def _bop_state(opt_state):
  """The BopState anywhere inside a (wrapped, chained) optimizer state."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, bop_lib.BopState))
           if isinstance(s, bop_lib.BopState)]
  assert len(found) == 1, opt_state
  return found[0]


def _well_posed(reference, threshold):
  """No EMA within float noise of the threshold (flips are then decided)."""
  gaps = [np.min(np.abs(np.abs(m) - threshold)) for m, _, _ in reference]
  assert min(gaps) > 1e-5, min(gaps)


def _coverage(reference, w0):
  """The reference run exercises every branch of the rule."""
  w_before = [w0] + [w for _, _, w in reference[:-1]]
  flips = sum(int(f.sum()) for _, f, _ in reference)
  big_wrong_sign = sum(int(((np.abs(m) > 0.3) & (np.sign(m) != np.sign(w)))
                           .sum()) for (m, _, _), w in
                       zip(reference, w_before))
  small_same_sign = sum(int(((np.abs(m) <= 0.3) & (np.sign(m) == np.sign(w)))
                            .sum()) for (m, _, _), w in
                        zip(reference, w_before))
  assert flips > 50 and big_wrong_sign > 50 and small_same_sign > 50


@pytest.mark.parametrize("jit", [False, True])
def test_bop_on_float_params_matches_numpy_step_by_step(jit):
  rng = np.random.default_rng(0)
  w0, grads = _signs(rng), _grads(rng)
  threshold, gamma = 0.3, 0.2
  reference = _reference(w0, grads, threshold, gamma)
  _well_posed(reference, threshold)
  _coverage(reference, w0)

  tx = bop_lib.bop(threshold, gamma, mask=lambda path, leaf: True)
  update = tx.update
  if jit:  # hyperparameters as traced arrays, as in a sweep
    update = jax.jit(lambda g, s, p, t, c: bop_lib.bop(
        t, c, mask=lambda path, leaf: True).update(g, s, p))
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  np.testing.assert_array_equal(state.ema["w"], np.zeros(SIZE, np.float32))
  for t, (m, flip, w) in enumerate(reference):
    before = np.asarray(params["w"])
    g = {"w": jnp.asarray(grads[t])}
    if jit:
      updates, state = update(g, state, params, jnp.float32(threshold),
                              jnp.float32(gamma))
    else:
      updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    got = np.asarray(params["w"])
    np.testing.assert_array_equal(got != before, flip, err_msg=f"step {t}")
    np.testing.assert_array_equal(got, w, err_msg=f"step {t}")  # exactly ±1
    np.testing.assert_allclose(state.ema["w"], m, rtol=1e-6, atol=1e-7)
    assert set(np.unique(got).tolist()) <= {-1.0, 1.0}


def test_bop_on_codes_matches_numpy_and_stays_plus_minus_scale():
  """make("bop") stores the kernel as 1-bit codes; the bias gets the base
  optimizer (SGD here: b <- b - lr g)."""
  rng = np.random.default_rng(1)
  scale = 0.375  # exact in float32
  w0, grads = scale * _signs(rng), _grads(rng)
  bias0 = rng.normal(size=4).astype(np.float32)
  bias_grads = rng.normal(size=(STEPS, 4)).astype(np.float32)
  threshold, gamma, lr = 0.3, 0.2, 0.01
  reference = _reference(w0, grads, threshold, gamma)
  _well_posed(reference, threshold)
  _coverage(reference, w0)

  method = qjax.methods.make("bop", lr, optimizer="sgd",
                             grid=qjax.Grid.binary(scale), threshold=threshold,
                             gamma=gamma)
  stored = method.project({"kernel": jnp.asarray(w0),
                           "bias": jnp.asarray(bias0)})
  kernel = stored["kernel"]
  assert qjax.codes.is_codes(kernel) and kernel.data.dtype == np.uint8
  assert kernel.data.shape == (SIZE // 8,)  # 8 weights per byte
  np.testing.assert_array_equal(qjax.codes.decode(kernel), w0)
  opt_state = method.tx.init(qjax.codes.decode_tree(stored))
  bias = bias0.copy()
  for t, (m, flip, w) in enumerate(reference):
    before = np.asarray(qjax.codes.decode(stored["kernel"]))
    g = {"kernel": jnp.asarray(grads[t]), "bias": jnp.asarray(bias_grads[t])}
    updates, opt_state = method.tx.update(g, opt_state, stored)
    stored = optax.apply_updates(stored, updates)
    assert qjax.codes.is_codes(stored["kernel"])
    got = np.asarray(qjax.codes.decode(stored["kernel"]))
    np.testing.assert_array_equal(got != before, flip, err_msg=f"step {t}")
    np.testing.assert_array_equal(got, w, err_msg=f"step {t}")
    assert set(np.unique(got).tolist()) <= {-scale, scale}
    np.testing.assert_allclose(_bop_state(opt_state).ema["kernel"], m,
                               rtol=1e-6, atol=1e-7)
    bias = (bias - np.float32(lr) * bias_grads[t]).astype(np.float32)
    np.testing.assert_allclose(stored["bias"], bias, rtol=1e-6, atol=1e-7)
  # No EMA for the float bias (masked out: None or optax's MaskedNode).
  assert not jax.tree.leaves(_bop_state(opt_state).ema["bias"])


def test_codes_from_encode_tree_flip_like_float_params():
  rng = np.random.default_rng(2)
  w0, grads = _signs(rng), _grads(rng, steps=20)
  grid = qjax.Grid.binary(1.0)
  codes = qjax.codes.encode_tree({"kernel": jnp.asarray(w0)},
                                 {"kernel": grid})
  floats = {"kernel": jnp.asarray(w0)}
  tx = bop_lib.bop(0.3, 0.2)  # default mask: the kernels
  s_codes, s_floats = tx.init(codes), tx.init(floats)
  for g in grads:
    g = {"kernel": jnp.asarray(g)}
    u, s_codes = tx.update(g, s_codes, codes)
    codes = optax.apply_updates(codes, u)
    u, s_floats = tx.update(g, s_floats, floats)
    floats = optax.apply_updates(floats, u)
    np.testing.assert_array_equal(qjax.codes.decode(codes["kernel"]),
                                  floats["kernel"])
    np.testing.assert_array_equal(s_codes.ema["kernel"],
                                  s_floats.ema["kernel"])


def test_huge_threshold_never_flips():
  rng = np.random.default_rng(3)
  w0 = _signs(rng)
  grads = 1e3 * _grads(rng)
  tx = bop_lib.bop(threshold=1e30, gamma=1.0, mask=lambda path, leaf: True)
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], w0)
  # gamma = 1: the EMA is the last gradient itself.
  np.testing.assert_array_equal(state.ema["w"], grads[-1])


def test_zero_threshold_flips_every_weight_whose_ema_agrees_in_sign():
  rng = np.random.default_rng(4)
  w, grads = _signs(rng), _grads(rng, steps=10)
  gamma = 0.5
  tx = bop_lib.bop(threshold=0.0, gamma=gamma, mask=lambda path, leaf: True)
  params = {"w": jnp.asarray(w)}
  state = tx.init(params)
  m = np.zeros_like(w)
  for g in grads:
    m = (np.float32(1 - gamma) * m + np.float32(gamma) * g).astype(np.float32)
    assert np.all(m != 0)
    expected = np.where(np.sign(m) == np.sign(w), -w, w)
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], expected)
    assert 0 < np.sum(expected != w) < SIZE
    w = expected


@pytest.mark.parametrize("kwargs,says", [
    ({"gamma": 0}, "gamma must be in (0, 1]"),
    ({"gamma": 0.0}, "gamma must be in (0, 1]"),
    ({"gamma": 1.5}, "gamma must be in (0, 1]"),
    ({"gamma": -0.1}, "gamma must be in (0, 1]"),
    ({"threshold": -1e-3}, "threshold must be >= 0"),
])
def test_bad_hyperparameters_are_refused(kwargs, says):
  with pytest.raises(ValueError, match=re.escape(f"bop: {says}")):
    bop_lib.bop(**kwargs)
  with pytest.raises(ValueError, match=re.escape(says)):
    qjax.methods.make("bop", 1e-3, **kwargs)


def test_gamma_one_is_allowed():
  bop_lib.bop(threshold=0.0, gamma=1.0)
  qjax.methods.make("bop", 1e-3, threshold=0.0, gamma=1)


def test_bad_hyperparameters_are_refused_by_the_sweep_before_training(
    small_digits):
  config = train_lib.TrainConfig(method="bop", batch_size=64, epochs=1)
  for hparams in ({"gamma": (1e-3, 0.0)}, {"threshold": (-1.0,)},
                  {"gamma": (2.0,)}):
    with pytest.raises(ValueError, match="bop: "):
      sweep_lib.sweep(_model(16), small_digits, config,
                      sweep_lib.SweepSpec(seeds=(0,), lrs=(1e-3,),
                                          hparams=hparams), progress=False)


def test_non_binary_codes_are_refused():
  w = jnp.asarray(np.linspace(-1, 1, 16, dtype=np.float32))
  kbit2 = grids_lib.parse("kbit:2").factory()((), w)
  assert kbit2.levels == 4
  params = {"kernel": qjax.codes.encode_nearest(w, kbit2)}
  tx = bop_lib.bop()
  with pytest.raises(ValueError, match="binary grid.*4 levels"):
    tx.init(params)
  state = tx.init({"kernel": qjax.codes.encode_nearest(
      w, qjax.Grid.binary(1.0))})
  with pytest.raises(ValueError, match="binary grid.*4 levels"):
    tx.update({"kernel": w}, state, params)
  # A float leaf with a non-binary grid given to the method.
  method = qjax.methods.make("bop", 1e-3, grid=kbit2)
  with pytest.raises(ValueError, match="binary grid.*4 levels"):
    method.tx.init({"kernel": w})


def test_bop_needs_params():
  tx = bop_lib.bop()
  params = {"kernel": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(params, tx.init(params))


# ----------------------------------------------------------------------------
# Training through the sweep.
# ----------------------------------------------------------------------------


def _model(width):
  return models.get("mlp", 10, features=(width,))


@pytest.fixture(scope="module")
def bop_sweep(small_digits):
  """threshold x gamma (2 x 2), 3 epochs; a width no other test uses, so
  that the program cache holds this sweep's program only."""
  model = _model(40)
  config = train_lib.TrainConfig(method="bop", batch_size=32, epochs=3)
  spec = sweep_lib.SweepSpec(seeds=(0,), lrs=(3e-3,), hparams={
      "threshold": (1e-8, 1e-1), "gamma": (1e-4, 1e-3)})
  out = sweep_lib.sweep(model, small_digits, config, spec, progress=False)
  return model, config, out


def test_bop_learns_digits_with_binary_codes(bop_sweep):
  _, _, out = bop_sweep
  configs = out["configs"]
  assert [(c["threshold"], c["gamma"]) for c in configs] == [
      (1e-8, 1e-4), (1e-8, 1e-3), (1e-1, 1e-4), (1e-1, 1e-3)]
  errors = out["history"][-1]["test_error"]
  # Chance is 0.9; measured about 0.13 and 0.19 at threshold 1e-8.
  assert errors[0] < 0.4 and errors[1] < 0.4, errors
  params = out["final_state"].params
  for name, (fan_in, fan_out) in (("Dense_0", (64, 40)),
                                  ("Dense_1", (40, 10))):
    codes = params[name]["kernel"]
    assert qjax.codes.is_codes(codes)
    assert codes.data.dtype == np.uint8
    assert codes.data.shape == (4, -(-fan_in * fan_out // 8))  # 1 bit each
    h = np.float32(np.sqrt(1.5 / (fan_in + fan_out)))
    values = np.asarray(qjax.codes.decode(codes))
    assert set(np.unique(values).tolist()) <= {float(-h), float(h)}
  # Leaves that are not binary get the base optimizer (Adam): they moved.
  assert np.all(np.abs(params["BatchNorm_0"]["bias"]).max(axis=1) > 0)
  assert np.all(np.abs(params["Dense_1"]["bias"]).max(axis=1) > 0)


def test_threshold_changes_the_result(bop_sweep):
  _, _, out = bop_sweep
  last = out["history"][-1]
  flips = np.array(list(last["sign_flips"].values()))  # [layers, configs]
  assert flips.shape == (2, 4)
  assert np.all(flips[:, :2] > 0.05), flips  # threshold 1e-8: many flips
  np.testing.assert_array_equal(flips[:, 2:], 0.0)  # 1e-1: never
  errors = last["test_error"]
  assert abs(errors[0] - errors[2]) > 0.1 and abs(errors[1] - errors[3]) > 0.1
  # With no flip the kernels are still their initial signs: same seed, same
  # initialisation, so the two gammas at threshold 1e-1 store equal codes.
  for name in ("Dense_0", "Dense_1"):
    data_ = out["final_state"].params[name]["kernel"].data
    np.testing.assert_array_equal(data_[2], data_[3])
    assert not np.array_equal(data_[0], data_[2])


def test_bop_sweep_compiles_the_epoch_program_once(bop_sweep, small_digits):
  model, config, out = bop_sweep
  assert out["train_config"]["steps_per_epoch"] == 512 // 32
  full = dataclasses.replace(config, steps_per_epoch=512 // 32)
  strategy = sweep_lib.Strategy(**out["strategy"])
  programs = sweep_lib.programs(model, full, strategy,
                                train_lib.CLASSIFICATION)
  assert sweep_lib.compiled_count(programs.epoch) == 1  # one device here


def test_bop_on_a_non_binary_grid_is_refused_by_the_engine(small_digits):
  config = train_lib.TrainConfig(method="bop", grid="kbit:2", batch_size=64)
  with pytest.raises(ValueError, match="binary grid"):
    sweep_lib.sweep(_model(16), small_digits, config,
                    sweep_lib.SweepSpec(seeds=(0,), lrs=(1e-3,)),
                    progress=False)
