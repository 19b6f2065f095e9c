"""The paper's experiments: smoke runs, paper configs, computed statements."""

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import sweep_throughput
from experiments import batch_size, common, sign_flips, table1
from experiments import convex_floors, markov_chain
from experiments import train as train_command
from qjax import grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = (table1, sign_flips, batch_size)
THEORY = (convex_floors, markov_chain)
# A --set per module: a key in its (smoke) config and a new value for it.
KEY = {table1: "seeds=[3]", sign_flips: "epochs=3", batch_size: "seeds=[3]",
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
  assert [r["label"] for r in exp["rows"]] == [
      "ADAM", "BC-ADAM", "Big SR-ADAM", "SR-ADAM", "R-ADAM"]
  big, small = exp["rows"][2], exp["rows"][3]
  assert big["batch_size"] > small["batch_size"]
  assert big["steps"] < small["steps"]
  assert all(len(r["test_error"]) == 2 for r in exp["rows"])
  assert exp["ordering"]["text"].startswith(("holds", "does not hold"))
  assert "digits/mlp" in results["table_md"]
  pngs = table1.plot(results, str(tmp_path))
  _check_outputs(tmp_path, results, pngs,
                 ["results.json", "table.md", "table.csv"])


def test_sign_flips_smoke(tmp_path):
  results = sign_flips.run(sign_flips.config("smoke"), out_dir=str(tmp_path))
  (exp,) = results["experiments"]
  assert set(exp["final"]) == {"R-ADAM", "SR-ADAM", "BC-ADAM"}
  curve = exp["curves"]["SR-ADAM"]["Dense_0/kernel"]["mean"]
  assert len(curve) == 2 and all(0 <= v <= 100 for v in curve)
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
  assert [(r["method"], r["batch_size"]) for r in rows] == [
      ("SR-ADAM", 32), ("SR-ADAM", 128), ("BC-ADAM", 32), ("BC-ADAM", 128)]
  assert rows[0]["steps"] > rows[1]["steps"]
  _check_outputs(tmp_path, results,
                 [str(tmp_path / "batch_size_digits_mlp.png")],
                 ["results.json", "table.md", "table.csv"])


def test_table1_paper_config():
  cfg = table1.config("paper")
  exps = {e["name"]: e for e in cfg["experiments"]}
  assert set(exps) == {"cifar10/vgg9", "cifar10/vgg_bc", "cifar10/wrn56_2",
                       "cifar10/resnet56", "cifar100/resnet56",
                       "imagenet2012/resnet18"}
  for name, e in exps.items():
    assert e["mask"] == "conv" and e["optimizer"] == "adam"
    assert e["lr"] == 0.01
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
                                 "big_batch": True}
  assert not rows["SR-ADAM"]["big_batch"]


@pytest.mark.parametrize("module", [sign_flips, batch_size])
def test_other_paper_configs(module):
  (e,) = module.config("paper")["experiments"]
  assert e["dataset"] == "cifar10" and e["mask"] == "conv"
  assert (e["lr"], e["lr_decay_epochs"], e["epochs"]) == (0.01, [82, 122], 160)
  if module is batch_size:
    assert e["batch_sizes"][0] == 128 and e["batch_sizes"][-1] == 2048


def test_cpu_configs():
  cfg = table1.config("cpu")
  names = [e["name"] for e in cfg["experiments"]]
  assert names == ["mnist/mlp", "fashion_mnist/mlp", "mnist/cnn"]
  for e in cfg["experiments"]:
    assert e["lr"] == 0.001
    assert len(e["seeds"]) >= (2 if e["model"] == "mlp" else 1)
  assert "0.01" in table1.__doc__ and "thrash" in table1.__doc__
  for module in MODULES + THEORY:
    for scale in common.SCALES:
      assert module.config(scale)["scale"] == scale
    with pytest.raises(ValueError, match="scale must be one of"):
      module.config("huge")
  for module in MODULES:
    for scale in common.SCALES:
      assert all(e["grid"] == "glorot"
                 for e in module.config(scale)["experiments"])
  for module in THEORY:  # numerical experiments: paper scale = cpu scale
    assert module.config("paper") == {**module.config("cpu"),
                                      "scale": "paper"}
    assert module.config("smoke")["name"] == module.NAME


def _summ(**means):
  return {k.replace("_", "-").replace("Big-", "Big "): {"mean": v, "std": 0.1}
          for k, v in means.items()}


def test_ordering_holds():
  out = table1.ordering(_summ(ADAM=1.0, BC_ADAM=2.0, Big_SR_ADAM=3.0,
                              SR_ADAM=4.0, R_ADAM=30.0))
  assert out["holds"] and out["r_worst"]
  assert out["text"].startswith("holds")


def test_ordering_broken_pairs_and_worst():
  out = table1.ordering(_summ(ADAM=1.0, BC_ADAM=2.0, Big_SR_ADAM=5.0,
                              SR_ADAM=4.0, R_ADAM=4.5))
  assert not out["holds"] and not out["r_worst"]
  assert [p["holds"] for p in out["pairs"]] == [True, True, False]
  assert "Big SR-ADAM (5.00) >= SR-ADAM (4.00)" in out["text"]
  assert "R-ADAM (4.50) is not worse than Big SR-ADAM (5.00)" in out["text"]


def test_ordering_flags_differences_within_noise():
  summaries = _summ(ADAM=1.0, BC_ADAM=1.05, Big_SR_ADAM=3.0, SR_ADAM=4.0,
                    R_ADAM=30.0)
  out = table1.ordering(summaries)
  assert out["holds"]
  assert [p["within_noise"] for p in out["pairs"]] == [True, False, False]
  assert "within one std: ADAM/BC-ADAM" in out["text"]


def test_batch_size_statement():
  holds = batch_size.statement({"SR-ADAM": {128: 9.0, 1024: 5.0},
                                "BC-ADAM": {128: 3.0, 1024: 2.9}})
  assert holds["holds"] and holds["sr"] == {"best_batch": 1024, "gain": 4.0}
  fails = batch_size.statement({"SR-ADAM": {128: 5.0, 1024: 6.0},
                                "BC-ADAM": {128: 3.0, 1024: 3.5}})
  assert not fails["holds"] and fails["sr"]["gain"] == 0.0


def test_sign_flips_statement():
  out = sign_flips.statement({"SR-ADAM": {"a": 40.0, "b": 5.0},
                              "BC-ADAM": {"a": 20.0, "b": 6.0},
                              "R-ADAM": {"a": 0.0, "b": 0.0}})
  assert not out["sr_more_than_bc"] and out["r_almost_none"]
  assert "layer(s) b" in out["text"]


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
                                  "convex_floors", "markov_chain"])
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
  assert "digits/mlp" in capsys.readouterr().out
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
  assert "--set epochs=1.5: expected a value like 1" in (
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
  assert config.grid == str(grids.parse(grid or "glorot"))


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
    (table1, "lr=-0.01", "distinct positive numbers"),
    (table1, "lr=0", "distinct positive numbers"),
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
