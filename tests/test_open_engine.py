"""The open engine: methods registered by the user, grids written as text,
any named hyperparameter swept, Linen and NNX models, tasks, a validation
split and an epoch callback, through ``qjax.sweep.sweep`` and the command
line (``experiments.train.main``, in-process).

Expected values (grid points, losses, label sets) are computed here
independently of the code under test. Every run is a small MLP on a subset
of scikit-learn's 8x8 digits (chance error: 0.9).
"""

import dataclasses
import json
import re
import sys
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from experiments import train as train_cli
from qjax import data, models
from qjax import grids as grids_lib
from qjax import network as network_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib
from qjax.sweep import SweepSpec, sweep
from qjax.train import TrainConfig

CLI_BASE = ["--dataset", "digits", "--mlp-features", "16", "--seeds", "0",
            "--batch-size", "64", "--no-progress", "--no-checkpoint",
            "--lrs", "0.01", "--epochs", "1", "--train-subset", "512"]


def _mlp(width):
  # Each test module's sweep uses its own width where it counts
  # compilations, so that the program cache holds only its program.
  return models.get("mlp", 10, features=(width,))


def _f32(q: Fraction) -> float:
  """The float32 nearest to the exact rational ``q`` (ties to even)."""
  x = np.float32(float(q))
  candidates = [np.nextafter(x, np.float32(-np.inf)), x,
                np.nextafter(x, np.float32(np.inf))]
  best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - q),
                                        int(np.float32(c).view(np.int32)) & 1))
  return float(best)


def _leaves(tree):
  return jax.tree.leaves(tree)


def _codes_paths(params):
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=qjax.codes.is_codes)[0]
  return sorted(qjax.quantizers.path_names(p) for p, leaf in flat
                if qjax.codes.is_codes(leaf))


# ----------------------------------------------------------------------------
# A method registered here: SR on updates scaled by 0.5.
# ----------------------------------------------------------------------------


def sr_half_factory(setup):
  """SR of half the base step."""
  rule = setup.masked(qjax.stochastic_rounding(setup.grid, setup.key,
                                               qjax.all_floats))
  tx = optax.chain(setup.base(), optax.scale(0.5), rule)
  return qjax.Method(setup.label, qjax.methods.identity_view,
                     qjax.skip_nonfinite(tx), setup.encode,
                     "stored grid weights")


@pytest.fixture(scope="module")
def sr_half(request):
  qjax.methods.register("sr_half", label="SR/2",
                        eval_mode="stored grid weights",
                        stores="grid codes")(sr_half_factory)
  request.addfinalizer(lambda: qjax.methods.unregister("sr_half"))
  return "sr_half"


def test_registered_method_trains_through_sweep(sr_half, small_digits):
  """SR/2 at lr 2a is SR at lr a (halving is exact): the same codes."""
  model = _mlp(32)
  half = sweep(model, small_digits, TrainConfig(method=sr_half, batch_size=32,
                                          epochs=2),
               SweepSpec(seeds=(0,), lrs=(0.02,)), progress=False)
  plain = sweep(model, small_digits, TrainConfig(method="sr", batch_size=32,
                                           epochs=2),
                SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
  error = half["history"][-1]["test_error"][0]
  assert error < 0.5, error  # measured 0.30
  params = half["final_state"].params
  assert _codes_paths(params) == [("Dense_0", "kernel"),
                                  ("Dense_1", "kernel")]
  for name in ("Dense_0", "Dense_1"):
    a = np.asarray(qjax.codes.unpack(params[name]["kernel"]))
    b = np.asarray(qjax.codes.unpack(plain["final_state"].params[name]
                                     ["kernel"]))
    assert np.mean(a == b) > 0.99, np.mean(a == b)
  np.testing.assert_allclose(params["Dense_1"]["bias"],
                             plain["final_state"].params["Dense_1"]["bias"],
                             rtol=1e-5, atol=1e-6)
  assert abs(error - plain["history"][-1]["test_error"][0]) < 0.02


def test_registered_method_trains_through_the_command_line(sr_half, tmp_path):
  out = tmp_path / "out"
  assert train_cli.main([*CLI_BASE, "--methods", sr_half, "--out",
                         str(out)]) == 0
  payload = json.loads((out / "results.json").read_text())
  (run,) = payload["runs"]
  assert run["method"] == "sr_half"
  assert run["label"] == "SR/2-ADAM"
  assert run["eval_mode"] == "stored grid weights"
  assert run["history"][-1]["test_error"][0] < 0.9
  assert "SR/2-ADAM" in (out / "table.md").read_text()


def test_unregistered_method_is_exit_2_naming_the_registered(sr_half,
                                                             tmp_path, capsys):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main([*CLI_BASE, "--methods", "sr_third", "--out", str(out)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--methods" in err and "sr_third" in err and sr_half in err
  assert "Traceback" not in err
  assert not out.exists()
  with pytest.raises(ValueError, match="qjax.methods.register"):
    TrainConfig(method="sr_third")


def test_registering_twice_needs_replace():
  for name in ("sr", "bop", "fp"):
    with pytest.raises(ValueError, match="already registered.*replace=True"):
      qjax.methods.register(name, label="X", eval_mode="e", stores="s")
  name = "tmp_registry_method"
  try:
    qjax.methods.register(name, label="T1", eval_mode="e",
                          stores="s")(sr_half_factory)
    assert name in qjax.methods.names()
    with pytest.raises(ValueError, match="already registered"):
      qjax.methods.register(name, label="T2", eval_mode="e", stores="s")
    qjax.methods.register(name, label="T2", eval_mode="e", stores="s",
                          hparams={"alpha": 0.5},
                          replace=True)(sr_half_factory)
    assert qjax.methods.get(name).label == "T2"
    assert qjax.methods.hparam_names(name)[-1] == "alpha"
    assert qjax.methods.label(name, "sgd") == "T2-SGD"
  finally:
    qjax.methods.unregister(name)
  assert name not in qjax.methods.names()
  with pytest.raises(ValueError, match="method must be one of"):
    qjax.methods.get(name)
  with pytest.raises(ValueError, match="method must be one of"):
    qjax.methods.unregister(name)


@pytest.mark.parametrize("name,kwargs,says", [
    ("SR-half", {}, "lowercase identifiers"),
    ("1sr", {}, "lowercase identifiers"),
    ("ok_name", {"hparams": {"lr": 0.1}}, "common to every method"),
    ("ok_name", {"hparams": {"grid_scale": 1.0}}, "common to every method"),
    ("ok_name", {"hparams": {"alpha": "x"}}, "numeric, bool or None"),
])
def test_bad_registrations_are_refused(name, kwargs, says):
  with pytest.raises(ValueError, match=re.escape(says)):
    qjax.methods.register(name, label="X", eval_mode="e", stores="s",
                          **kwargs)
  assert name not in qjax.methods.names()


def test_import_flag_registers_a_plugin_method(tmp_path, monkeypatch):
  module = "qjax_test_plugin_method"
  (tmp_path / f"{module}.py").write_text(
      "import qjax\n"
      "from qjax.methods import paper\n"
      "qjax.methods.register('plugin_sr', label='PSR', eval_mode='e', "
      "stores='grid codes')(paper.sr)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    args = train_cli.parse_args([*CLI_BASE, "--import", module, "--methods",
                                 "plugin_sr,sr"])
    assert args.methods == ("plugin_sr", "sr")
    assert TrainConfig(method="plugin_sr").label == "PSR-ADAM"
  finally:
    if "plugin_sr" in qjax.methods.names():
      qjax.methods.unregister("plugin_sr")
    sys.modules.pop(module, None)


def test_import_of_a_missing_module_is_exit_2(tmp_path, capsys):
  assert train_cli.main([*CLI_BASE, "--import", "no_such_qjax_plugin",
                         "--out", str(tmp_path / "out")]) == 2
  assert "no_such_qjax_plugin" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Stochastic BinaryConnect.
# ----------------------------------------------------------------------------


def test_sbc_learns_digits(small_digits):
  out = sweep(_mlp(32), small_digits, TrainConfig(method="sbc", batch_size=32,
                                            epochs=3),
              SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
  error = out["history"][-1]["test_error"][0]
  assert error < 0.4, error  # measured 0.17
  params = out["final_state"].params
  for name, (fan_in, fan_out) in (("Dense_0", (64, 32)), ("Dense_1",
                                                          (32, 10))):
    h = np.float32(np.sqrt(1.5 / (fan_in + fan_out)))
    latent = np.asarray(params[name]["kernel"])  # float latent weights
    assert latent.dtype == np.float32 and np.max(np.abs(latent)) <= h


def _sbc_params(seed=0):
  h = np.float32(np.sqrt(1.5 / (64 + 32)))
  rng = np.random.default_rng(seed)
  kernel = rng.uniform(-h, h, size=(64, 32)).astype(np.float32)
  bias = rng.normal(size=32).astype(np.float32)
  return h, {"Dense_0": {"kernel": jnp.asarray(kernel),
                         "bias": jnp.asarray(bias)}}


def test_sbc_training_view_is_random_and_eval_view_is_bc():
  h, params = _sbc_params()
  sbc = qjax.methods.make("sbc", 0.01)
  bc = qjax.methods.make("bc", 0.01)
  a = sbc.view(params, jax.random.key(0))
  b = sbc.view(params, jax.random.key(1))
  again = sbc.view(params, jax.random.key(0))
  for view in (a, b):
    values = np.unique(np.asarray(view["Dense_0"]["kernel"]))
    np.testing.assert_array_equal(values, [-h, h])
    np.testing.assert_array_equal(view["Dense_0"]["bias"],
                                  params["Dense_0"]["bias"])
  differ = np.mean(np.asarray(a["Dense_0"]["kernel"])
                   != np.asarray(b["Dense_0"]["kernel"]))
  assert differ > 0.2, differ  # independent draws of uniform latents
  np.testing.assert_array_equal(a["Dense_0"]["kernel"],
                                again["Dense_0"]["kernel"])
  # Evaluation (no key): the deterministic view, BC's bit for bit.
  deterministic = sbc.view(params)
  for x, y in zip(_leaves(deterministic), _leaves(bc.view(params))):
    np.testing.assert_array_equal(x, y)
  w = np.asarray(params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(deterministic["Dense_0"]["kernel"],
                                np.where(w >= 0, h, -h))


def test_sbc_training_view_is_unbiased():
  """E[Q_s(w)] = w for w in [-H, H]."""
  h, params = _sbc_params(1)
  sbc = qjax.methods.make("sbc", 0.01)
  keys = jax.random.split(jax.random.key(2), 400)
  views = jax.vmap(lambda k: sbc.view(params, k)["Dense_0"]["kernel"])(keys)
  mean = np.asarray(views).mean(axis=0)
  w = np.asarray(params["Dense_0"]["kernel"])
  # Standard error of a mean of 400 draws: at most H / 20.
  assert np.mean(np.abs(mean - w)) < 0.06 * h
  assert np.max(np.abs(mean - w)) < 0.2 * h


# ----------------------------------------------------------------------------
# Ternary and k-bit SR through the command line.
# ----------------------------------------------------------------------------


def test_ternary_and_4bit_sr_through_the_command_line(tmp_path, monkeypatch):
  captured = []
  real_sweep = sweep_lib.sweep

  def capture(*args, **kwargs):
    out = real_sweep(*args, **kwargs)
    captured.append((args[2], out))
    return out
  monkeypatch.setattr(sweep_lib, "sweep", capture)
  out = tmp_path / "out"
  assert train_cli.main([*CLI_BASE, "--methods", "sr", "--grids",
                         "ternary:1,kbit:4", "--out", str(out)]) == 0
  payload = json.loads((out / "results.json").read_text())
  runs = {r["grid"]: r for r in payload["runs"]}
  assert sorted(runs) == ["kbit:4:1", "ternary:1"]
  kbit4 = [_f32(Fraction(2 * k - 15, 15)) for k in range(16)]
  expected = {
      "ternary:1": {"lo": -1.0, "hi": 1.0, "step": 1.0, "levels": 3},
      "kbit:4:1": {"lo": -1.0, "hi": 1.0, "step": float(
          np.float32(kbit4[1]) - np.float32(kbit4[0])), "levels": 16},
  }
  for grid, run in runs.items():
    assert run["method"] == "sr"
    assert run["label"] == f"SR-ADAM [{grid}]"
    (per_config,) = run["grids"]
    assert per_config == {"Dense_0/kernel": expected[grid],
                          "Dense_1/kernel": expected[grid]}
  assert runs["kbit:4:1"]["grids"][0]["Dense_0/kernel"]["step"] == (
      pytest.approx(2 / 15, rel=1e-6))
  # The weights the command trained: exactly points of the grid.
  points = {"ternary:1": [-1.0, 0.0, 1.0], "kbit:4:1": kbit4}
  assert [c.grid for c, _ in captured] == ["ternary:1", "kbit:4:1"]
  for config, result in captured:
    table = np.asarray(points[config.grid], np.float32)
    np.testing.assert_array_equal(
        qjax.grid.values(grids_lib.parse(config.grid).grid()), table)
    params = result["final_state"].params
    for name in ("Dense_0", "Dense_1"):
      codes = params[name]["kernel"]
      assert codes.data.dtype == np.uint8  # one code per weight
      assert codes.data.shape[1:] == codes.shape
      decoded = np.asarray(qjax.codes.decode(codes))
      np.testing.assert_array_equal(
          decoded, table[np.asarray(qjax.codes.unpack(codes))])
      assert np.isin(decoded, table).all()
  # kbit:4 uses several levels (ternary:1 rounds these small weights to 0:
  # its grid is far coarser than the initial weights, measured 92 % error).
  kbit_params = captured[1][1]["final_state"].params
  assert len(np.unique(np.asarray(qjax.codes.decode(
      kbit_params["Dense_0"]["kernel"])))) > 4


# ----------------------------------------------------------------------------
# A sweep over the spacing Δ.
# ----------------------------------------------------------------------------

DELTAS = (0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def delta_sweep():
  ds = data.load("digits")
  ds = ds._replace(train_x=ds.train_x[:256], train_y=ds.train_y[:256])
  model = _mlp(24)
  config = TrainConfig(method="sr", grid="uniform:1:-8:8", batch_size=32,
                       epochs=2)
  out = sweep(model, ds, config, SweepSpec(seeds=(0,), lrs=(0.01,),
                                           grid_scales=DELTAS),
              progress=False)
  return model, config, out


def test_delta_sweep_puts_each_config_on_its_own_grid(delta_sweep):
  _, config, out = delta_sweep
  assert config.grid == "uniform:1:-8:8"
  assert [c["grid_scale"] for c in out["configs"]] == list(DELTAS)
  assert all(e < 0.9 for e in out["history"][-1]["test_error"])
  # qjax.grid: a scaled point is fl32(values32[k] * fl32(scale)); the
  # unscaled points of uniform(1, -8, 8) are the integers -8..8.
  k = np.arange(-8, 9).astype(np.float32)
  for name in ("Dense_0", "Dense_1"):
    codes = out["final_state"].params[name]["kernel"]
    assert codes.grid.levels == 17
    np.testing.assert_array_equal(codes.grid.scale,
                                  np.asarray(DELTAS, np.float32))
    decoded = np.asarray(qjax.codes.decode(codes))
    indices = np.asarray(qjax.codes.unpack(codes))
    for i, delta in enumerate(DELTAS):
      points = k * np.float32(delta)
      assert points.dtype == np.float32
      np.testing.assert_array_equal(decoded[i], points[indices[i]])
      assert np.isin(decoded[i], points).all()
      assert len(np.unique(decoded[i])) > 3


def test_delta_sweep_compiles_the_epoch_program_once(delta_sweep):
  model, config, out = delta_sweep
  full = dataclasses.replace(config, steps_per_epoch=256 // 32)
  assert out["train_config"]["steps_per_epoch"] == 256 // 32
  programs = sweep_lib.programs(model, full,
                                sweep_lib.Strategy(**out["strategy"]),
                                train_lib.CLASSIFICATION)
  assert sweep_lib.compiled_count(programs.epoch) == 1  # one device here


def test_programs_with_the_default_task_is_the_sweeps_program(delta_sweep):
  """Before: programs(model, config, strategy) was another lru_cache entry
  than the sweep's programs(model, config, strategy, task), a fresh
  Programs that had compiled nothing."""
  model, config, _ = delta_sweep
  full = dataclasses.replace(config, steps_per_epoch=256 // 32)
  strategy = sweep_lib.choose_strategy("mlp")
  assert sweep_lib.programs(model, full, strategy) is sweep_lib.programs(
      model, full, strategy, train_lib.CLASSIFICATION)
  assert sweep_lib.compiled_count(
      sweep_lib.programs(model, full, strategy).epoch) == 1


# ----------------------------------------------------------------------------
# Grid specs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec,expected", [
    ("binary", [-1.0, 1.0]),
    ("binary:0.5", [-0.5, 0.5]),
    ("ternary", [-1.0, 0.0, 1.0]),
    ("ternary:0.25", [-0.25, 0.0, 0.25]),
    ("kbit:1", [-1.0, 1.0]),
    ("kbit:2", [-1.0, _f32(Fraction(-1, 3)), _f32(Fraction(1, 3)), 1.0]),
    ("kbit:4", [_f32(Fraction(2 * k - 15, 15)) for k in range(16)]),
    ("kbit:2:0.5", [-0.5, _f32(Fraction(-1, 6)), _f32(Fraction(1, 6)), 0.5]),
    ("uniform:0.25:-1:1", [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75,
                           1.0]),
    ("uniform:0.5:-1:0.5", [-1.0, -0.5, 0.0, 0.5]),
])
def test_grid_spec_stored_values(spec, expected):
  grid = grids_lib.parse(spec).factory()(("Dense_0", "kernel"),
                                         np.zeros((4, 4), np.float32))
  values = qjax.grid.values(grid, np.float32)
  assert values.dtype == np.float32
  np.testing.assert_array_equal(values, np.asarray(expected, np.float32))
  assert grid.levels == len(expected)


def test_unbounded_uniform_spec():
  grid = grids_lib.parse("uniform:0.125").grid()
  assert not grid.bounded and grid.step == Fraction(1, 8)


@pytest.mark.parametrize("text,canonical", [
    ("kbit:4", "kbit:4:1"), ("binary", "binary:1"), ("glorot", "glorot"),
    ("binary@glorot", "glorot"), ("ternary:0.5", "ternary:0.5"),
    ("kbit:2@glorot", "kbit:2:1@glorot"), ("uniform:0.25:-1:1",
                                           "uniform:0.25:-1:1")])
def test_grid_spec_canonical_text(text, canonical):
  assert str(grids_lib.parse(text)) == canonical
  assert TrainConfig(method="sr", grid=text).grid == canonical


def test_glorot_spec_is_glorot_binary_grid():
  leaf = np.zeros((784, 256), np.float32)
  path = ("Dense_0", "kernel")
  h = np.float32(np.sqrt(1.5 / (784 + 256)))
  for text in ("glorot", "binary@glorot"):
    grid = grids_lib.parse(text).factory()(path, leaf)
    reference = qjax.glorot_binary_grid(path, leaf)
    assert grid == reference
    np.testing.assert_array_equal(qjax.grid.values(grid),
                                  qjax.grid.values(reference))
    np.testing.assert_array_equal(qjax.grid.values(grid), [-h, h])
  # A per-layer rule on another kind: kbit:2 spans [-H, H].
  grid = grids_lib.parse("kbit:2@glorot").factory()(path, leaf)
  values = qjax.grid.values(grid)
  assert len(values) == 4
  np.testing.assert_allclose([values[0], values[-1]], [-h, h], rtol=1e-6)


@pytest.mark.parametrize("text", [
    "kbit:0", "kbit:17", "kbit:40", "kbit", "kbit:2.5", "kbit:2:0", "tern",
    "uniform:-1", "uniform:0", "uniform:0.25:0.5:1", "uniform:0.3:-1:1",
    "uniform:0.25:-1", "binary:0", "binary:-1", "binary:x", "binary:1:2",
    "ternary:1:2", "binary@foo", "glorot:2", "glorot@glorot", "", "   "])
def test_bad_grid_specs_are_refused(text):
  with pytest.raises(ValueError, match="(?i)grid"):
    grids_lib.parse(text)


def test_bad_grid_in_config_and_command_line(tmp_path, capsys):
  with pytest.raises(ValueError, match="bits must be in 1..16"):
    TrainConfig(method="sr", grid="kbit:40")
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main([*CLI_BASE, "--methods", "sr", "--grids", "kbit:40",
                    "--out", str(out)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--grids" in err and "kbit:40" in err and "1..16" in err
  assert "Traceback" not in err and not out.exists()


# ----------------------------------------------------------------------------
# Swept hyperparameter names.
# ----------------------------------------------------------------------------


def test_unknown_hparam_is_an_error_at_sweep_time(small_digits):
  config = TrainConfig(method="bop", batch_size=64)
  spec = SweepSpec(seeds=(0,), lrs=(1e-3,), hparams={"treshold": (1.0,)})
  with pytest.raises(ValueError, match=r"'bop' has no hyperparameter\(s\) "
                     r"\['treshold'\].*threshold"):
    sweep(_mlp(16), small_digits, config, spec, progress=False)
  # A method's own name is unknown to another method.
  with pytest.raises(ValueError, match="threshold"):
    sweep(_mlp(16), small_digits, TrainConfig(method="sr", batch_size=64),
          SweepSpec(seeds=(0,), lrs=(1e-3,), hparams={"threshold": (1.0,)}),
          progress=False)


def test_bool_option_cannot_be_swept(small_digits):
  assert not qjax.methods.sweepable("bc", "scale_by_grid")
  assert qjax.methods.sweepable("bop", "threshold")
  assert qjax.methods.sweepable("bc", "ste_clip")
  with pytest.raises(ValueError, match="static option"):
    sweep(_mlp(16), small_digits, TrainConfig(method="bc", batch_size=64),
          SweepSpec(seeds=(0,), lrs=(1e-3,),
                    hparams={"scale_by_grid": (0.0, 1.0)}), progress=False)


def test_unknown_hparam_on_the_command_line_is_exit_2(tmp_path, capsys):
  out = tmp_path / "out"
  assert train_cli.main([*CLI_BASE, "--methods", "bop", "--sweep",
                         "treshold=1", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "treshold" in err and "threshold" in err
  assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("flags,says", [
    (["--methods", "bc", "--sweep", "scale_by_grid=0,1"], "static option"),
    (["--methods", "bop", "--sweep", "gamma=0"], "gamma must be in (0, 1]"),
    (["--methods", "bop", "--sweep", "threshold=-1"],
     "threshold must be >= 0"),
])
def test_bad_swept_values_on_the_command_line_are_exit_2(flags, says,
                                                         tmp_path, capsys):
  """Before: an uncaught ValueError from the sweep (a traceback), after
  --out was created and locked."""
  out = tmp_path / "out"
  assert train_cli.main([*CLI_BASE, *flags, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err
  assert not out.exists()


# ----------------------------------------------------------------------------
# NNX and Linen models.
# ----------------------------------------------------------------------------


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(64, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


NNX_NET = network_lib.from_nnx(lambda rngs: NNXNet(rngs))
NNX_KERNELS = [("fc1", "kernel"), ("fc2", "kernel")]


def test_nnx_mask_selects_exactly_the_kernels(small_digits):
  params, model_state = NNX_NET.init(jax.random.PRNGKey(0),
                                     small_digits.train_x[:2])
  mask = qjax.resolve_mask(qjax.all_kernels, params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  selected = sorted(qjax.quantizers.path_names(p) for p, m in flat if m)
  assert selected == NNX_KERNELS
  assert len(flat) == 6  # fc1, fc2: kernel and bias; bn: scale and bias
  assert "mean" in model_state["bn"] and "var" in model_state["bn"]


@pytest.mark.parametrize("method", ["sr", "bc"])
def test_nnx_model_trains_through_sweep(method, small_digits):
  out = sweep(NNX_NET, small_digits, TrainConfig(method=method, batch_size=32,
                                           epochs=2),
              SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
  error = out["history"][-1]["test_error"][0]
  assert error < 0.5, error  # measured about 0.27
  params = out["final_state"].params
  if method == "sr":
    assert _codes_paths(params) == NNX_KERNELS
    for layer, (fan_in, fan_out) in (("fc1", (64, 32)), ("fc2", (32, 10))):
      h = np.float32(np.sqrt(1.5 / (fan_in + fan_out)))
      values = np.unique(np.asarray(qjax.codes.decode(
          params[layer]["kernel"])))
      assert set(values.tolist()) <= {float(-h), float(h)}
  else:
    assert _codes_paths(params) == []
  assert not qjax.codes.is_codes(params["bn"]["scale"])
  # BatchNorm statistics were updated in training.
  assert np.any(np.asarray(out["final_state"].model_state["bn"]["mean"])
                != 0)


class DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


class PlainMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="hidden")(x.reshape((x.shape[0], -1))))
    return nn.Dense(10, name="out")(x)


def test_linen_dropout_model_is_reproducible_and_seed_dependent(small_digits):
  config = TrainConfig(method="sr", batch_size=32, epochs=2)
  spec = SweepSpec(seeds=(0, 1), lrs=(0.01,))
  first = sweep(DropoutMLP(), small_digits, config, spec, progress=False)
  second = sweep(DropoutMLP(), small_digits, config, spec, progress=False)
  assert all(e < 0.7 for e in first["history"][-1]["test_error"])
  assert _codes_paths(first["final_state"].params) == [
      ("Dense_0", "kernel"), ("Dense_1", "kernel")]
  a, b = _leaves(first["final_state"].params), _leaves(
      second["final_state"].params)
  assert len(a) == len(b) == 4
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert first["history"][-1]["train_loss"] == second["history"][-1][
      "train_loss"]
  for x in a:  # config 0 and config 1 (seeds 0 and 1) differ
    assert not np.array_equal(np.asarray(x)[0], np.asarray(x)[1])


def test_linen_model_without_train_argument_trains(small_digits):
  out = sweep(PlainMLP(), small_digits, TrainConfig(method="fp", batch_size=32,
                                              epochs=2),
              SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
  error = out["history"][-1]["test_error"][0]
  assert error < 0.5, error
  assert out["final_state"].model_state == {}
  assert set(out["final_state"].params) == {"hidden", "out"}


# ----------------------------------------------------------------------------
# Tasks, validation, the epoch callback.
# ----------------------------------------------------------------------------


def test_label_smoothing_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=6).astype(np.int32)
  task = train_lib.label_smoothing(0.1)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  targets = np.full((6, 10), 0.1 / 10)
  targets[np.arange(6), labels] += 0.9
  expected = np.mean(-(targets * log_p).sum(axis=1))
  np.testing.assert_allclose(task.loss(jnp.asarray(logits),
                                       jnp.asarray(labels)), expected,
                             rtol=1e-5)
  error = task.metrics(jnp.asarray(logits), jnp.asarray(labels))["error"]
  assert float(error) == np.mean(logits.argmax(axis=1) != labels)
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="smoothing"):
      train_lib.label_smoothing(bad)


@pytest.fixture(scope="module")
def callback_run():
  """Label smoothing, two configs, two epochs, with an on_epoch callback."""
  ds = data.load("digits")
  ds = ds._replace(train_x=ds.train_x[:256], train_y=ds.train_y[:256])
  calls = []
  out = sweep(_mlp(16), ds, TrainConfig(method="fp", batch_size=32,
                                        epochs=2),
              SweepSpec(seeds=(0, 1), lrs=(0.01,)),
              task=train_lib.label_smoothing(0.1), progress=False,
              on_epoch=lambda record, configs: calls.append(
                  (record, configs)))
  return ds, out, calls


def test_label_smoothing_task_trains(callback_run):
  _, out, _ = callback_run
  errors = out["history"][-1]["test_error"]
  assert all(e < 0.5 for e in errors), errors


def test_on_epoch_is_called_once_per_epoch(callback_run):
  _, out, calls = callback_run
  assert len(calls) == 2
  for epoch, (record, configs) in enumerate(calls, start=1):
    assert record["epoch"] == epoch
    assert configs == out["configs"] == [{"seed": 0, "lr": 0.01},
                                         {"seed": 1, "lr": 0.01}]
    history = out["history"][epoch - 1]
    for key in ("train_loss", "train_error", "test_loss", "test_error"):
      assert len(record[key]) == 2
      assert record[key] == history[key]


def test_on_epoch_gets_each_chunks_configs(callback_run):
  ds, _, _ = callback_run
  calls = []
  out = sweep(_mlp(16), ds, TrainConfig(method="fp", batch_size=32,
                                        epochs=2),
              SweepSpec(seeds=(0, 1), lrs=(0.01,)), progress=False,
              max_configs_per_chunk=1,
              on_epoch=lambda record, configs: calls.append(
                  (record["epoch"], configs, len(record["test_error"]))))
  assert calls == [(1, [{"seed": 0, "lr": 0.01}], 1),
                   (2, [{"seed": 0, "lr": 0.01}], 1),
                   (1, [{"seed": 1, "lr": 0.01}], 1),
                   (2, [{"seed": 1, "lr": 0.01}], 1)]
  assert len(out["history"]) == 2 and len(out["history"][0]
                                          ["test_error"]) == 2


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(x.reshape((x.shape[0], -1)))


def test_regression_task_reports_a_decreasing_test_mse(small_digits):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(320, 8, 8, 1)).astype(np.float32)
  w = (rng.normal(size=64) / 8).astype(np.float32)
  y = (x.reshape(320, 64) @ w).astype(np.float32)
  dataset = small_digits._replace(
      name="linear", train_x=x[:256], train_y=y[:256], test_x=x[256:],
      test_y=y[256:], num_classes=1)
  out = sweep(Linear(), dataset, TrainConfig(method="fp", batch_size=32,
                                             epochs=3),
              SweepSpec(seeds=(0,), lrs=(0.03,)), task=train_lib.REGRESSION,
              progress=False)
  history = out["history"]
  mse = [h["test_mse"][0] for h in history]
  assert all("test_error" not in h and "train_mse" in h for h in history)
  assert mse[0] > mse[1] > mse[2], mse
  assert mse[-1] < 0.5 * np.var(y[256:]), (mse, np.var(y[256:]))
  # The reported test MSE is the final model's, computed here in numpy.
  params = jax.tree.map(lambda v: np.asarray(v)[0],
                        out["final_state"].params)
  pred = x[256:].reshape(64, 64) @ params["Dense_0"]["kernel"][:, 0] + (
      params["Dense_0"]["bias"][0])
  np.testing.assert_allclose(mse[-1], np.mean((pred - y[256:])**2),
                             rtol=1e-4)
  np.testing.assert_allclose(history[-1]["test_loss"][0], mse[-1], rtol=1e-6)


def test_validation_holds_out_the_last_examples_untrained():
  ds = data.load("digits")
  ds = ds._replace(train_x=ds.train_x[:500], train_y=ds.train_y[:500])
  model = _mlp(20)
  config = TrainConfig(method="fp", batch_size=50, epochs=2)
  spec = SweepSpec(seeds=(0,), lrs=(0.01,))
  held = sweep(model, ds, config, spec, validation=0.1, progress=False)
  assert held["train_config"]["steps_per_epoch"] == 450 // 50  # not 10
  last = held["history"][-1]
  assert 0 <= last["val_error"][0] < 0.5 and "val_loss" in last
  assert last["val_error"][0] * 50 == pytest.approx(
      round(last["val_error"][0] * 50), abs=1e-4)  # 50 held-out examples
  # The same run on the first 450 examples, tested on the last 50: the
  # same weights bit for bit (the 50 were never trained on), and its test
  # metrics are the held-out run's validation metrics.
  split = ds._replace(train_x=ds.train_x[:450], train_y=ds.train_y[:450],
                      test_x=ds.train_x[450:], test_y=ds.train_y[450:])
  plain = sweep(model, split, config, spec, progress=False)
  for x, y in zip(_leaves(held["final_state"].params),
                  _leaves(plain["final_state"].params)):
    np.testing.assert_array_equal(x, y)
  assert plain["history"][-1]["test_error"] == last["val_error"]
  assert plain["history"][-1]["test_loss"] == last["val_loss"]
  assert "val_error" not in plain["history"][-1]
