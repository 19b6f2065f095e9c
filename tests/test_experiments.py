"""The paper's experiments: smoke runs, paper configs, computed statements."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import sweep_throughput
from experiments import batch_size, bit_width, common, sign_flips, table1
from experiments import convex_floors, markov_chain
from experiments import train as train_command
from qjax import grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = (table1, sign_flips, batch_size, bit_width)
THEORY = (convex_floors, markov_chain)
# A --set per module: a key in its (smoke) config and a new value for it.
KEY = {table1: "seeds=[3]", sign_flips: "epochs=3", batch_size: "seeds=[3]",
       bit_width: "seeds=[3]",
       convex_floors: "seeds=[3]", markov_chain: "num_chains=10"}


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(autouse=True)
def no_persistent_cache(request, monkeypatch):
  if not request.node.name.startswith("test_enable_compilation_cache"):
    monkeypatch.setattr(common, "enable_compilation_cache", lambda: None)


def test_enable_compilation_cache_respects_a_configured_dir(tmp_path,
                                                            monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv("QJAX_COMPILATION_CACHE", str(tmp_path / "new"))
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    common.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", None)
    common.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "new")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def _check_outputs(out_dir, results, pngs, files):
  for name in files:
    assert os.path.isfile(os.path.join(out_dir, name)), name
  with open(os.path.join(out_dir, "results.json")) as f:
    assert json.load(f)["scale"] == "smoke"
  assert pngs and all(os.path.isfile(p) and p.endswith(".png") for p in pngs)
  json.dumps(results)  # JSON-able


def test_table1_smoke(tmp_path):
  results = table1.run(table1.config("smoke"), out_dir=str(tmp_path))
  (exp,) = results["experiments"]
  rows = {r["label"]: r for r in exp["rows"]}
  assert list(rows) == ["ADAM", "BC-ADAM", "Big SR-ADAM",
                        "Big SR-ADAM (same steps)", "SR-ADAM", "R-ADAM"]
  big, same, small = (rows["Big SR-ADAM"], rows["Big SR-ADAM (same steps)"],
                      rows["SR-ADAM"])
  assert big["batch_size"] == same["batch_size"] > small["batch_size"]
  assert big["steps"] < small["steps"]
  # Same steps: 4x the epochs at batch 256 against 64, at Big SR's lr.
  assert same["epochs"] == 4 * exp["config"]["epochs"]
  assert same["steps"] == 4 * big["steps"] and same["lrs"] == [big["best_lr"]]
  for r in exp["rows"]:
    assert len(r["test_error"]) == 2
    # Chosen on validation: the lr with the lowest mean final val error.
    if len(r["lrs"]) > 1:
      val = [sum(b["history"][-1]["val_error"]) for b in r["by_lr"]]
      assert r["best_lr"] == r["lrs"][val.index(min(val))]
      assert r["test_error"] == r["by_lr"][r["best_index"]]["test_error"]
    # α/Δ of every conv kernel (mask conv) on ±1 (Δ = 2), computed by hand.
    for lr, a in zip(r["lrs"], r["alpha_over_delta"]):
      if r["method"] == "fp":
        assert a == {}
      else:
        assert set(a) == {"Conv_0/kernel", "Conv_1/kernel"}
        assert all(v == pytest.approx(lr / 2) for v in a.values())
  assert exp["ordering"]["text"].startswith(("holds", "does not hold"))
  assert "digits/allconv" in results["table_md"]
  assert "α/Δ 0.015" in results["table_md"]
  assert exp["data"]["validation_examples"] == 297
  pngs = table1.plot(results, str(tmp_path))
  assert [os.path.basename(p) for p in pngs] == ["table1_errors.png",
                                                  "table1_curves.png"]
  _check_outputs(tmp_path, results, pngs,
                 ["results.json", "table.md", "table.csv"])


def test_sign_flips_smoke(tmp_path):
  results = sign_flips.run(sign_flips.config("smoke"), out_dir=str(tmp_path))
  (exp,) = results["experiments"]
  assert set(exp["final"]) == {"R-ADAM", "SR-ADAM", "BC-ADAM"}
  # Conv kernels only (mask conv), on ±1 at lr 0.01: α/Δ 0.005.
  assert set(exp["curves"]["SR-ADAM"]) == {"Conv_0/kernel", "Conv_1/kernel"}
  curve = exp["curves"]["SR-ADAM"]["Conv_0/kernel"]["mean"]
  assert len(curve) == 2 and all(0 <= v <= 100 for v in curve)
  assert "| 0.005 |" in results["table_md"]
  pngs = sign_flips.plot(results, str(tmp_path))
  _check_outputs(tmp_path, results, pngs,
                 ["results.json", "table.md", "flips.csv"])


def test_batch_size_smoke_through_main(tmp_path, capsys):
  assert batch_size.main(["--scale", "smoke", "--out", str(tmp_path),
                          "--no-progress"]) == 0
  assert "paper's finding" in capsys.readouterr().out
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  rows = results["experiments"][0]["rows"]
  assert [(r["method"], r["batch_size"], r["budget"]) for r in rows] == [
      ("SR-ADAM", 32, "epochs"), ("SR-ADAM", 128, "epochs"),
      ("SR-ADAM", 128, "steps"), ("BC-ADAM", 32, "epochs"),
      ("BC-ADAM", 128, "epochs"), ("BC-ADAM", 128, "steps")]
  assert rows[0]["steps"] > rows[1]["steps"]
  # Same steps: 1 epoch x 128 / 32 = 4 epochs of batch 128.
  assert (rows[2]["epochs"], rows[2]["steps"]) == (4, 4 * rows[1]["steps"])
  assert abs(rows[2]["steps"] - rows[0]["steps"]) <= 0.1 * rows[0]["steps"]
  found = results["experiments"][0]["statement"]
  assert set(found["same_steps"]) >= {"holds", "sr", "bc", "text"}
  assert "same steps" in results["table_md"]
  assert all(r["alpha_over_delta"] == "0.005" for r in rows)
  _check_outputs(tmp_path, results,
                 [str(tmp_path / "batch_size_digits_allconv.png")],
                 ["results.json", "table.md", "table.csv"])


def test_table1_paper_config():
  cfg = table1.config("paper")
  exps = {e["name"]: e for e in cfg["experiments"]}
  assert set(exps) == {"cifar10/vgg9", "cifar10/vgg_bc", "cifar10/wrn56_2",
                       "cifar10/resnet56", "cifar100/resnet56",
                       "imagenet2012/resnet18"}
  for name, e in exps.items():
    assert e["mask"] == "conv" and e["optimizer"] == "adam"
    # The paper's regime: ±1 weights (Δ = 2) at Adam lr 0.01, α/Δ = 0.005.
    assert e["lrs"] == [0.01] and e["grid"] == "binary"
    assert grids.parse(e["grid"]).grid(1).step == 2
    assert not e["big_same_steps"] and e["validation"] is None
    assert (e["batch_size"], e["big_batch_size"]) == (128, 1024)
    assert e["runtime"] and e["command"]
    if name.startswith("cifar"):
      assert (e["lr_decay_epochs"], e["epochs"]) == ([82, 122], 160)
      assert e["augment"] and e["normalize"]
      assert f"--only {name}" in e["command"]
  imagenet = exps["imagenet2012/resnet18"]
  assert (imagenet["lr_decay_epochs"], imagenet["epochs"]) == ([30, 60], 90)
  rows = {r["label"]: r for r in cfg["rows"]}
  assert rows["Big SR-ADAM"] == {"label": "Big SR-ADAM", "method": "sr",
                                 "big_batch": True, "same_steps": False}
  assert rows["Big SR-ADAM (same steps)"]["same_steps"]
  assert not rows["SR-ADAM"]["big_batch"]


@pytest.mark.parametrize("module", [sign_flips, batch_size])
def test_other_paper_configs(module):
  (e,) = module.config("paper")["experiments"]
  assert e["dataset"] == "cifar10" and e["mask"] == "conv"
  assert (e["lr"], e["lr_decay_epochs"], e["epochs"]) == (0.01, [82, 122], 160)
  if module is batch_size:
    assert e["batch_sizes"][0] == 128 and e["batch_sizes"][-1] == 2048


def test_allconv_net_is_a_fresh_copy_and_checks_its_size():
  a = common.allconv_net("cpu")
  assert a == {"model": "allconv", "downsample": 2, "mask": "conv",
               "model_kwargs": {"conv_spec": [16, "M", 32, "M", 64]}}
  a["model_kwargs"]["conv_spec"].append(128)  # a config's override
  assert common.allconv_net("cpu")["model_kwargs"]["conv_spec"][-1] == 64
  for module in (table1, sign_flips, batch_size, bit_width):
    e = module.config("cpu")["experiments"][0]
    assert e["model_kwargs"]["conv_spec"] == [16, "M", 32, "M", 64]
  with pytest.raises(ValueError, match="allconv_net size 'big'"):
    common.allconv_net("big")


def test_cpu_configs():
  cfg = table1.config("cpu")
  names = [e["name"] for e in cfg["experiments"]]
  assert names == ["mnist/allconv", "fashion_mnist/allconv"]
  for e in cfg["experiments"]:
    assert len(e["lrs"]) >= 4 and len(e["seeds"]) >= 3
    assert e["validation"] and e["big_same_steps"] and e["grid"] == "binary"
    assert min(e["lrs"]) / 2 <= 0.005 < max(e["lrs"]) / 2  # from α/Δ 0.005 up
    assert e["lr_decay_epochs"] == table1.scaled_decays(e["epochs"])
    model = common.build_model(e, 10)
    x = jax.ShapeDtypeStruct((1, 14, 14, 1), jax.numpy.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                                 train=False), x)["params"]
    leaves = jax.tree.leaves(params)
    conv = sum(v.size for v in leaves if v.ndim == 4)
    assert conv / sum(v.size for v in leaves) >= 0.9
  assert "0.005" in table1.__doc__ and "±1" in table1.__doc__
  for module in MODULES + THEORY:
    for scale in common.SCALES:
      assert module.config(scale)["scale"] == scale
    with pytest.raises(ValueError, match="scale must be one of"):
      module.config("huge")
  for module in (sign_flips, batch_size):  # the paper's α/Δ: ±1 at lr 0.01
    for scale in common.SCALES:
      assert all(e["grid"] == "binary" and e["lr"] == 0.01
                 and e["model"] in ("allconv", "vgg9")
                 for e in module.config(scale)["experiments"])
  for module in THEORY:  # numerical experiments: paper scale = cpu scale
    assert module.config("paper") == {**module.config("cpu"),
                                      "scale": "paper"}
    assert module.config("smoke")["name"] == module.NAME


def _errors(**per_seed):
  return {k.replace("_", "-").replace("Big-", "Big "): v
          for k, v in per_seed.items()}


def test_scaled_decays_are_the_papers_fractions():
  assert table1.scaled_decays(160) == [82, 122]
  assert table1.scaled_decays(6) == [3, 5]
  assert table1.scaled_decays(1) == []


def test_paired_differences_by_hand():
  # d = [1, 2, 3]: mean 2, se = 1 / sqrt(3) = 0.577; 2 > 2 se: holds.
  out = table1.paired([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
  assert out["mean"] == pytest.approx(2.0)
  assert out["se"] == pytest.approx(3 ** -0.5)
  assert out["verdict"] == "holds"
  assert table1.paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])["verdict"] == (
      "reversed")
  # d = [1, -1, 1.5]: mean 0.5, se 0.76: within 2 se.
  assert table1.paired([0.0, 0.0, 0.0], [1.0, -1.0, 1.5])["verdict"] == (
      "not resolved")


def test_ordering_holds():
  out = table1.ordering(_errors(ADAM=[1.0, 1.1, 0.9], BC_ADAM=[2.0, 2.2, 2.1],
                                Big_SR_ADAM=[3.0, 3.1, 3.3],
                                SR_ADAM=[4.0, 4.4, 4.2],
                                R_ADAM=[30.0, 31.0, 29.0]))
  assert out["holds"] and all(p["verdict"] == "holds" for p in out["r_worst"])
  assert out["text"].startswith("holds")


def test_ordering_reports_reversed_and_unresolved_pairs():
  out = table1.ordering(_errors(ADAM=[1.0, 1.1, 0.9], BC_ADAM=[1.2, 0.9, 1.0],
                                Big_SR_ADAM=[5.0, 5.2, 5.1],
                                SR_ADAM=[4.0, 4.1, 4.0],
                                R_ADAM=[30.0, 31.0, 29.0]))
  assert not out["holds"]
  assert [p["verdict"] for p in out["pairs"]] == [
      "not resolved", "holds", "reversed"]
  assert "Big SR-ADAM < SR-ADAM: -1.07 ± 0.03 pp (reversed)" in out["text"]


def test_table1_chooses_the_lr_on_validation_not_test():
  hist = lambda val, test: [{"val_error": val, "test_error": test}]
  record = {"alpha_over_delta": [{"a": 0.05}, {"a": 0.005}], "by_lr": [
      {"lr": 0.1, "test_error": [0.01, 0.01], "history": hist([.3, .3],
                                                              [.01, .01])},
      {"lr": 0.01, "test_error": [0.2, 0.2], "history": hist([.1, .1],
                                                             [.2, .2])}]}
  chosen = common.choose_lr(record)
  assert chosen["best_lr"] == 0.01 and chosen["test_error"] == [0.2, 0.2]
  assert chosen["alpha_over_delta_best"] == {"a": 0.005}


def test_several_lrs_without_validation_are_refused(tmp_path, capsys):
  assert table1.main(["--scale", "paper", "--only", "cifar10/vgg9", "--set",
                      "lrs=[0.03,0.01]", "--out", str(tmp_path / "o"),
                      "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "needs a validation split" in err and "Traceback" not in err
  assert not (tmp_path / "o").exists()


def test_batch_size_same_steps_scales_epochs_and_decays():
  (e,) = batch_size.config("paper")["experiments"]
  assert not e["same_steps"]  # 16x the paper's cost; --set same_steps=true
  big = batch_size.same_steps_exp(e, 1024)  # 8x the smallest batch, 128
  assert (big["epochs"], big["lr_decay_epochs"]) == (1280, [656, 976])
  assert (e["epochs"], e["lr_decay_epochs"]) == (160, [82, 122])  # untouched
  (cpu,) = batch_size.config("cpu")["experiments"]
  assert cpu["same_steps"]
  four = batch_size.same_steps_exp(cpu, 512)
  assert (four["epochs"], four["lr_decay_epochs"]) == (24, [12, 20])
  assert (cpu["epochs"], cpu["lr_decay_epochs"]) == (6, [3, 5])


def test_batch_size_refuses_a_single_batch_size(tmp_path, capsys):
  # One batch size (or one repeated) compares nothing: refused before any
  # training, with the key to change, and nothing written.
  for sizes in ("[32]", "[64,64]"):
    assert batch_size.main(["--scale", "smoke", "--set",
                            f"batch_sizes={sizes}", "--out",
                            str(tmp_path / "o"), "--no-progress"]) == 2
    assert "at least two distinct batch sizes" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_batch_size_statement():
  # Per seed (3 seeds): SR gains 4 pp at 1024 with a spread of 0.1.
  holds = batch_size.statement(
      {"SR-ADAM": {128: [9.0, 9.1, 8.9], 1024: [5.0, 5.0, 5.0]},
       "BC-ADAM": {128: [3.0, 3.0, 3.0], 1024: [2.9, 3.0, 2.8]}})
  assert holds["holds"] and holds["sr"]["best_batch"] == 1024
  assert holds["sr"]["gain"] == pytest.approx(4.0)
  pair = holds["sr"]["pairs"][1024]
  d = np.array([4.0, 4.1, 3.9])  # 128 minus 1024, per seed
  assert pair["mean"] == pytest.approx(d.mean())
  assert pair["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
  assert "1024: +4.00 ± 0.06 (holds)" in holds["text"]
  # The same mean gain, but seeds disagree: not resolved, so no claim.
  noisy = batch_size.statement(
      {"SR-ADAM": {128: [13.0, 5.0, 9.0], 1024: [5.0, 9.0, 1.0]},
       "BC-ADAM": {128: [3.0, 3.0, 3.0], 1024: [3.0, 3.0, 3.0]}})
  assert noisy["sr"]["gain"] == pytest.approx(4.0)
  assert noisy["sr"]["pairs"][1024]["verdict"] == "not resolved"
  assert not noisy["holds"]
  fails = batch_size.statement(
      {"SR-ADAM": {128: [5.0, 5.0], 1024: [6.0, 6.1]},
       "BC-ADAM": {128: [3.0, 3.0], 1024: [3.5, 3.4]}})
  assert not fails["holds"] and fails["sr"]["gain"] == 0.0


def test_sign_flips_statement():
  out = sign_flips.statement({"SR-ADAM": {"a": 40.0, "b": 5.0},
                              "BC-ADAM": {"a": 20.0, "b": 6.0},
                              "R-ADAM": {"a": 0.0, "b": 0.0}})
  assert not out["sr_more_than_bc"] and out["r_almost_none"]
  assert "layer(s) b" in out["text"]


def test_sign_flips_last_epoch_statement():
  final = {"SR-ADAM": {"a": 30.0, "b": 40.0},
           "BC-ADAM": {"a": 35.0, "b": 30.0}}
  curves = {"SR-ADAM": {"a": {"mean": [20.0, 30.0]},
                        "b": {"mean": [35.0, 40.0]}},
            "BC-ADAM": {"a": {"mean": [34.0, 35.0]},
                        "b": {"mean": [31.0, 30.0]}}}
  out = sign_flips.statement(final, curves)
  assert out["last_epoch_pp"] == {"SR-ADAM": {"a": 10.0, "b": 5.0},
                                  "BC-ADAM": {"a": 1.0, "b": -1.0}}
  assert out["sr_still_exploring"] and not out["sr_more_than_bc"]
  assert "a +10.00 vs +1.00" in out["text"]
  curves["SR-ADAM"]["b"]["mean"] = [40.0, 40.0]
  curves["BC-ADAM"]["b"]["mean"] = [28.0, 30.0]
  out = sign_flips.statement(final, curves)
  assert not out["sr_still_exploring"] and "not in every layer" in out["text"]
  one_epoch = {k: {n: {"mean": c["mean"][-1:]} for n, c in v.items()}
               for k, v in curves.items()}
  assert "sr_still_exploring" not in sign_flips.statement(final, one_epoch)


def test_imagenet_raises_a_clear_error():
  cfg = common.select(table1.config("paper"), ["imagenet2012/resnet18"])
  with pytest.raises(common.UnsupportedExperimentError,
                     match="imagenet2012.*(not installed|not prepared|cannot)"
                     ) as info:
    table1.run(cfg)
  assert "tfds build" in str(info.value) and "--only" in str(info.value)
  with pytest.raises(common.UnsupportedExperimentError):
    table1.run(table1.config("paper"))  # before any CIFAR training


def test_main_reports_unsupported(tmp_path, capsys):
  code = table1.main(["--scale", "paper", "--only", "imagenet2012/resnet18",
                      "--out", str(tmp_path), "--no-progress"])
  assert code == 2
  assert "imagenet2012" in capsys.readouterr().err


def test_select_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown experiment"):
    common.select(table1.config("cpu"), ["cifar10/vgg9"])


@pytest.mark.parametrize("name", ["table1", "sign_flips", "batch_size",
                                  "bit_width", "convex_floors",
                                  "markov_chain"])
def test_module_entry_point(name):
  out = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  assert "--scale" in out.stdout and f"results/{name}" in out.stdout


def test_imagenet_config_streams_through_tfds_with_mock_data():
  """The paper's ImageNet path end to end, on TFDS's offline mock data."""
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = common.select(table1.config("paper"), ["imagenet2012/resnet18"])
  exp = dict(cfg["experiments"][0], model="mlp", model_kwargs={"features": [8]},
             mask="all", epochs=1, lr_decay_epochs=[], seeds=[0])
  with tfds.testing.mock_data(num_examples=16,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = common.dataset_for(exp)
    x, _ = next(iter(ds.train_batches(0, 4)))
    assert x.shape == (4, 224, 224, 3)
    res = common.train_method(exp, "sr", batch_size=4, label="SR-ADAM")
  assert res["steps"] == 4 and len(res["test_error"]) == 1


@pytest.mark.parametrize("main", [
    table1.main, train_command.main, sweep_throughput.main],
                         ids=["table1", "train", "benchmark"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cpu_devices_flag_refuses_bad_counts(main, value, capsys):
  """Every command with --cpu-devices stops in argparse, before any work,
  saying what it expected and what it got."""
  with pytest.raises(SystemExit) as exit_info:
    main(["--cpu-devices", value])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"--cpu-devices: expected an int >= 1, got {value!r}" in err


def test_set_overrides_reach_the_run(tmp_path, capsys):
  assert table1.main(["--scale", "smoke", "--set", "epochs=1", "--set",
                      "seeds=[0]", "--out", str(tmp_path),
                      "--no-progress"]) == 0
  assert "digits/allconv" in capsys.readouterr().out
  with open(tmp_path / "results.json") as f:
    (exp,) = json.load(f)["experiments"]
  assert exp["config"]["seeds"] == [0] and exp["config"]["epochs"] == 1
  assert all(r["seeds"] == [0] and len(r["test_error"]) == 1
             for r in exp["rows"])


@pytest.mark.parametrize("module", MODULES + THEORY,
                         ids=lambda m: m.NAME)
def test_set_unknown_key_is_refused_naming_the_keys(module, tmp_path,
                                                    monkeypatch, capsys):
  monkeypatch.setattr(module, "run", _no_run)
  assert module.main(["--scale", "smoke", "--set", "nope=1", "--out",
                      str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "no config key 'nope'" in err
  assert KEY[module].partition("=")[0] in err and "scale" in err


def test_set_wrong_type_is_refused(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(table1, "run", _no_run)
  monkeypatch.setattr(convex_floors, "run", _no_run)
  assert table1.main(["--scale", "smoke", "--set", "epochs=1.5", "--out",
                      str(tmp_path)]) == 2
  assert "--set epochs=1.5: expected a value like 2" in (
      capsys.readouterr().err)
  assert convex_floors.main(["--scale", "smoke", "--set", "logistic=3",
                             "--out", str(tmp_path)]) == 2
  assert "logistic=3" in capsys.readouterr().err
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("module", MODULES + THEORY,
                         ids=lambda m: m.NAME)
def test_show_prints_the_config_without_running(module, tmp_path,
                                                monkeypatch, capsys):
  monkeypatch.setattr(module, "run", _no_run)
  assert module.main(["--scale", "smoke", "--set", KEY[module], "--show",
                      "--out", str(tmp_path)]) == 0
  shown = json.loads(capsys.readouterr().out)
  expected = common.override(module.config("smoke"), [KEY[module]])
  assert shown == expected and shown["scale"] == "smoke"
  key, _, value = KEY[module].partition("=")
  for e in shown.get("experiments", [shown]):
    assert e[key] == json.loads(value) != module.config("smoke").get(key)
  assert not os.listdir(tmp_path)


def _no_run(*args, **kwargs):
  raise AssertionError("run() called")


class _Stop(Exception):
  """Raised by a stubbed sweep, once it has seen its TrainConfig."""


@pytest.mark.parametrize("grid", [None, "ternary", "kbit:4"])
def test_set_grid_reaches_the_train_config(grid, tmp_path, monkeypatch):
  seen = []

  def sweep(model, ds, config, spec, **kwargs):
    seen.append(config)
    raise _Stop

  monkeypatch.setattr(common.sweep_lib, "sweep", sweep)
  argv = ["--scale", "smoke", "--out", str(tmp_path), "--no-progress"]
  with pytest.raises(_Stop):
    sign_flips.main(argv + (["--set", f"grid={grid}"] if grid else []))
  (config,) = seen
  assert config.grid == str(grids.parse(grid or "binary"))


@pytest.mark.parametrize("module", THEORY, ids=lambda m: m.NAME)
def test_theory_smoke_through_main(module, tmp_path, capsys):
  assert module.main(["--scale", "smoke", "--out", str(tmp_path),
                      "--no-progress"]) == 0
  out = capsys.readouterr().out
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["name"] == module.NAME and results["scale"] == "smoke"
  assert results["config"] == module.config("smoke")
  pngs = sorted(p.name for p in tmp_path.glob("*.png"))
  if module is convex_floors:
    assert "| check | expected | measured |" in out
    assert pngs == ["convex_excess_vs_iterations.png",
                    "convex_floor_vs_delta_alpha.png",
                    "convex_sr_theorem.png"]
    assert "sr_floor_vs_delta_slope_per_alpha" in results["summary"]
  else:
    assert "**Fig. 1**" in out and "| α | steps | SR | BC |" in out
    assert pngs == ["markov_exact_vs_simulated.png", "markov_figure1.png",
                    "markov_limit_mixing.png", "markov_toy2d.png"]
    assert "chain" not in results["toy2d"]


@pytest.mark.parametrize("module, setting, match", [
    (table1, "lrs=[-0.01]", "distinct positive numbers"),
    (table1, "lrs=[0.01,0]", "distinct positive numbers"),
    (table1, "lrs=[0.01,0.01]", "repeated values"),
    (table1, "seeds=[]", "empty"),
    (table1, "seeds=[0,0]", "repeated values"),
    (sign_flips, "epochs=0", "epochs must be an int >= 1"),
    (sign_flips, 'mask="nope"', "mask must be one of"),
    (batch_size, "batch_sizes=[128,0]", "batch_size must be an int >= 1"),
], ids=lambda v: getattr(v, "NAME", v))
def test_bad_training_values_are_refused_before_run(module, setting, match,
                                                    tmp_path, monkeypatch,
                                                    capsys):
  ran = []
  monkeypatch.setattr(module, "run", lambda *a, **k: ran.append(1))
  assert module.main(["--scale", "smoke", "--set", setting, "--out",
                      str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert match in err and "Traceback" not in err
  assert not ran and not (tmp_path / "o").exists()
