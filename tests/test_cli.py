"""`python -m experiments.train` as a user meets it: every input checked
before the first step, resume only of the same run, one line per user error.

Each test names the case of the integrity issue it covers; the expected
values (what the user asked for) are written out, not read from the code.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import qjax

from experiments import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A digits MLP run of about a second once compiled.
BASE = ["--dataset", "digits", "--mlp-features", "16", "--methods", "sr",
        "--seeds", "0", "--batch-size", "64", "--no-progress", "--lrs",
        "0.01", "--epochs", "2"]


def _run(out, *extra, base=BASE):
  return train_cli.main([*base, "--out", str(out), *extra])


def _history(out, method="sr"):
  payload = json.loads((out / "results.json").read_text())
  run = next(r for r in payload["runs"] if r["method"] == method)
  return [{k: v for k, v in e.items() if k != "seconds"}
          for e in run["history"]]


def _replace(flags, name, value):
  flags = list(flags)
  flags[flags.index(name) + 1] = value
  return flags


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """One finished 2-epoch run whose checkpoints the resume tests reuse."""
  out = tmp_path_factory.mktemp("first")
  assert _run(out) == 0
  return out


@pytest.mark.parametrize("flag,value", [
    ("--lrs", "0.5"), ("--seeds", "1"), ("--batch-size", "32"),
    ("--epochs", "1"), ("--mlp-features", "8")])
def test_resume_with_a_changed_flag_is_refused(first_run, flag, value,
                                               capsys):
  """Before: exit 0, results.json said lr 0.5, the history was the first
  run's byte for byte."""
  before = (first_run / "results.json").read_bytes()
  code = train_cli.main([*_replace(BASE, flag, value), "--out",
                         str(first_run)])
  err = capsys.readouterr().err
  assert code == 2
  assert "--fresh" in err and "--out" in err and "differ" in err
  assert (first_run / "results.json").read_bytes() == before  # untouched


@pytest.mark.parametrize("extra,key", [
    (["--train-subset", "500"], "dataset"),
    (["--grid-scales", "2"], "grid_scale"),
    (["--epochs", "3", "--lr-decay-epochs", "2"], "lr_decay_epochs")])
def test_resume_refusal_names_what_differs(first_run, extra, key, capsys):
  flags = [a for a in BASE]
  if "--epochs" in extra:
    flags = _replace(flags, "--epochs", "3")
    extra = extra[2:]
  assert train_cli.main([*flags, *extra, "--out", str(first_run)]) == 2
  assert key in capsys.readouterr().err


def test_same_command_resumes_and_fresh_starts_over(first_run, tmp_path,
                                                    capsys):
  history = _history(first_run)
  assert _run(first_run) == 0  # nothing left to train: same history
  assert _history(first_run) == history
  out = tmp_path / "copy"
  assert _run(out, "--lrs", "0.5") == 0
  lr_half = _history(out)
  assert _run(out, "--fresh") == 0  # lr 0.01 now, trained from scratch
  assert _history(out) == history != lr_half
  capsys.readouterr()


def _nested(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_nested(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _final_state(out):
  import orbax.checkpoint as ocp
  root = out / "checkpoints" / "sr" / "chunk0"
  step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as c:
    return _nested(c.restore(root / str(step) / "state"))


def test_kill_9_and_rerun_resumes_bit_for_bit(tmp_path):
  """A subprocess killed mid-run, rerun, ends with the uninterrupted run's
  history and final state, bit for bit."""
  flags = _replace(BASE, "--epochs", "6")
  cmd = [sys.executable, "-m", "experiments.train", *flags]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  whole = tmp_path / "whole"
  subprocess.run(cmd + ["--out", str(whole)], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  chunk = killed / "checkpoints" / "sr" / "chunk0"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if chunk.is_dir() and any(p.name.isdigit() and int(p.name) >= 2
                              for p in chunk.iterdir()):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "results.json").exists()
  subprocess.run(cmd + ["--out", str(killed)], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  assert _history(killed) == _history(whole)
  a, b = _final_state(killed), _final_state(whole)
  assert a.keys() == b.keys()
  # SR's kernels are checkpointed as their packed 1-bit codes, nothing else.
  assert a["params/Dense_0/kernel/data"].dtype == np.uint8
  assert not any(k.startswith("params/Dense_0/kernel") and
                 k != "params/Dense_0/kernel/data" for k in a)
  for name in a:
    assert np.array_equal(a[name], b[name]), name


def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
  """Before: two runs into one --out both exited 0 and one's results were
  lost."""
  out = tmp_path / "busy"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from qjax import checkpoint as c\n"
       "with c.lock_directory(sys.argv[1], 'the first run'):\n"
       "  print('locked', flush=True); time.sleep(60)", str(out)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert _run(out) == 2
    err = capsys.readouterr().err
    assert str(holder.pid) in err and "another --out" in err
    assert not (out / "results.json").exists()
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()


def test_unwritable_out_is_found_before_training(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  assert _run(blocker / "out") == 2
  err = capsys.readouterr().err
  assert "writable" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,says", [
    (["--lrs", "-0.01"], "--lrs"), (["--lrs", "0"], "--lrs"),
    (["--lrs", "nan"], "--lrs"), (["--lrs", "1e39"], "--lrs"),
    (["--lrs", ""], "--lrs"), (["--grid-scales", "0"], "--grid-scales"),
    (["--grid-scales", "-1"], "--grid-scales"),
    (["--train-subset", "0"], "--train-subset"),
    (["--train-subset", "-1000"], "--train-subset"),
    (["--max-configs-per-chunk", "0"], "--max-configs-per-chunk"),
    (["--max-configs-per-chunk", "-1"], "--max-configs-per-chunk"),
    (["--seeds", ""], "--seeds"), (["--seeds", "1.5"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"), (["--methods", "fp,bogus"], "--methods"),
    (["--mlp-features", "0"], "--mlp-features"),
    (["--lr-decay-epochs", "-1"], "--lr-decay-epochs"),
])
def test_bad_flags_are_refused_in_one_line(flags, says, tmp_path, capsys):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    _run(out, *flags)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err
  assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("flags,says", [
    (["--lr-decay-epochs", "2"], "--lr-decay-epochs"),  # = --epochs
    (["--lr-decay-epochs", "5"], "--lr-decay-epochs"),  # beyond --epochs
    (["--train-subset", "100000"], "--train-subset"),
    (["--batch-size", "100000"], "--batch-size"),
])
def test_flags_checked_against_each_other_before_training(flags, says,
                                                           tmp_path, capsys):
  out = tmp_path / "out"
  assert _run(out, *flags) == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err
  assert not out.exists()


def _write(tmp_path, text):
  path = tmp_path / "config.json"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text,says", [
    ('{"epoch": 2}', "unknown key 'epoch'"),
    ('{"lr": 0.01}', "unknown key 'lr'"),
    ('{"lrs": -1}', "--lrs"),
    ('{"dataset": "cifar11"}', "cifar11"),
    ('{"epochs": 1.5}', "--epochs"),
    ('{"no_progress": "yes"}', "true or false"),
    ('{"lrs": [[0.1]]}', "list"),
    ('{"lrs": 0.01,', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_config_file_is_checked_like_the_flags(text, says, tmp_path, capsys):
  """Before: unknown keys were ignored, values skipped the flags' checks,
  natural JSON crashed with AttributeError."""
  code = train_cli.main(["--config", _write(tmp_path, text), "--out",
                         str(tmp_path / "out")])
  assert code == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err
  if "unknown key" in says:
    assert "known keys:" in err and "epochs" in err


def test_missing_config_file_is_one_line(tmp_path, capsys):
  assert train_cli.main(["--config", str(tmp_path / "nope.json")]) == 2
  assert "cannot read it" in capsys.readouterr().err


def test_natural_json_config_equals_the_flags(tmp_path):
  config = _write(tmp_path, json.dumps({
      "dataset": "digits", "mlp_features": [16], "methods": ["sr"],
      "seeds": [0, 1], "batch-size": 64, "no_progress": True,
      "lrs": 0.01, "epochs": 2}))
  from_file = train_cli.parse_args(["--config", config])
  from_flags = train_cli.parse_args(_replace(BASE, "--seeds", "0,1"))
  assert vars(from_file) == dict(vars(from_flags), config=config)
  # command-line flags override the file
  assert train_cli.parse_args(["--config", config, "--epochs", "3"]).epochs == 3


def test_repeated_hidden_sizes_are_allowed():
  """--mlp-features 256,256 (the default) is two layers, not a repeat."""
  assert train_cli.parse_args(["--mlp-features", "32,32"]).mlp_features == (
      32, 32)
  assert train_cli.parse_args([]).mlp_features == (256, 256)


def test_smoke_keeps_explicit_flags():
  args = train_cli.parse_args(["--smoke", "--epochs", "3", "--seeds", "5"])
  assert (args.epochs, args.seeds, args.dataset) == (3, (5,), "digits")


def test_help_shows_prog_defaults_and_choices(capsys):
  with pytest.raises(SystemExit):
    train_cli.main(["--help"])
  text = capsys.readouterr().out
  assert text.startswith("usage: python -m experiments.train")
  flat = " ".join(text.split())
  assert "(default: 0.001)" in flat  # the README's learning rate
  assert "(default: fp,bc,sr,r)" in flat
  for name in qjax.methods.names():  # every registered method, documented
    assert f"{name} ({qjax.methods.get(name).doc})" in flat
  for flag in ("--dataset", "--epochs", "--batch-size", "--out", "--seeds"):
    help_text = text[text.index(f"  {flag}"):].split("\n  -")[0]
    assert "(default:" in help_text, flag


def test_table_and_results_keep_swept_values_apart(tmp_path):
  """Before: --lrs 0.1,0.001 gave one row 46.53 ± 29.27."""
  out = tmp_path / "two_lrs"
  flags = _replace(_replace(BASE, "--lrs", "0.5,0.001"), "--seeds", "0,1")
  assert train_cli.main([*flags, "--out", str(out)]) == 0
  table = (out / "table.md").read_text().splitlines()
  rows = [r for r in table if r.startswith("| SR-ADAM")]
  assert [r.split("|")[2].strip() for r in rows] == ["0.5", "0.001"]
  payload = json.loads((out / "results.json").read_text())
  final = payload["runs"][0]["history"][-1]["test_error"]
  configs = payload["runs"][0]["configs"]
  for row, lr in zip(rows, (0.5, 0.001)):
    errs = [100 * e for e, c in zip(final, configs) if c["lr"] == lr]
    assert len(errs) == 2
    assert f"{np.mean(errs):.2f} ± {np.std(errs, ddof=1):.2f}" in row


def test_results_record_commit_time_versions_model_and_grids(first_run):
  payload = json.loads((first_run / "results.json").read_text())
  env = payload["environment"]
  for key in ("git_commit", "timestamp", "jaxlib", "jax"):
    assert key in env
  assert "features = (16,)" in payload["model"]
  grids = payload["runs"][0]["grids"][0]
  # BinaryConnect's H = sqrt(1.5 / (fan_in + fan_out)); Δ = 2H. digits: 8x8.
  for layer, (fan_in, fan_out) in {"Dense_0/kernel": (64, 16),
                                   "Dense_1/kernel": (16, 10)}.items():
    h = np.sqrt(1.5 / (fan_in + fan_out))
    np.testing.assert_allclose(grids[layer]["hi"], h, rtol=1e-6)
    np.testing.assert_allclose(grids[layer]["step"], 2 * h, rtol=1e-6)


def test_results_record_and_print_alpha_over_delta(tmp_path, capsys):
  out = tmp_path / "a"
  assert _run(out, "--lrs", "0.01,0.1", "--grids", "binary",
              "--methods", "fp,sr") == 0
  printed = capsys.readouterr().out
  # ±1 (Δ = 2): lr 0.01 is the paper's 0.005, lr 0.1 is 0.05.
  assert "lr 0.01: 0.005, lr 0.1: 0.05" in printed
  # ... and in the table, one row per lr; full precision has none.
  rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]):
          line.strip("|").split("|")[-1].strip()
          for line in (out / "table.md").read_text().splitlines()[2:]}
  assert rows == {("ADAM", "0.01"): "-", ("ADAM", "0.1"): "-",
                  ("SR-ADAM [binary:1]", "0.01"): "0.005",
                  ("SR-ADAM [binary:1]", "0.1"): "0.05"}
  assert "| α/Δ |" in (out / "table.md").read_text()
  payload = json.loads((out / "results.json").read_text())
  run = payload["runs"][1]
  assert [c["lr"] for c in run["configs"]] == pytest.approx([0.01, 0.1])
  for c, ratios in zip(run["configs"], run["alpha_over_delta"]):
    assert ratios == pytest.approx({"Dense_0/kernel": c["lr"] / 2,
                                    "Dense_1/kernel": c["lr"] / 2})


def test_missing_dataset_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("QJAX_DATA", str(tmp_path / "empty_cache"))
  assert train_cli.main(["--dataset", "fashion_mnist", "--out",
                         str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "python -m qjax.data fetch fashion_mnist" in err
  assert len(err.strip().splitlines()) == 1


def test_truncated_dataset_file_is_one_line(tmp_path, monkeypatch, capsys):
  """Before: only a missing file was caught; a truncated one gave a
  traceback."""
  from qjax.data import registry
  folder = tmp_path / "cache" / "fashion_mnist"
  folder.mkdir(parents=True)
  for spec in registry.DATASETS["fashion_mnist"].files.values():
    (folder / spec.filename).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
  monkeypatch.setenv("QJAX_DATA", str(tmp_path / "cache"))
  assert train_cli.main(["--dataset", "fashion_mnist", "--out",
                         str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "corrupt" in err and len(err.strip().splitlines()) == 1


def test_paper_experiment_only_flag_refuses_unknown_names(capsys):
  """Before: `--only bogus` ended in a ValueError traceback."""
  from experiments import table1
  assert table1.main(["--scale", "smoke", "--only", "bogus/mlp"]) == 2
  err = capsys.readouterr().err
  assert "--only" in err and "bogus/mlp" in err and "known" in err


def test_results_record_the_memory_each_method_stores(tmp_path, capsys):
  """results.json has each method's memory report: SR and R keep 1-bit
  codes (bytes = ceil(n/8) per kernel, counted here from the shapes), FP
  and BC 4-byte floats, and the figures add up to the total."""
  flags = _replace(BASE, "--methods", "fp,bc,sr,r")
  assert _run(tmp_path, base=flags) == 0
  assert "stored as codes at 1.000 bits" in capsys.readouterr().out
  runs = {r["method"]: r["memory"] for r in
          json.loads((tmp_path / "results.json").read_text())["runs"]}
  kernels = [(64, 16), (16, 10)]  # digits MLP with --mlp-features 16
  weights = sum(a * b for a, b in kernels)
  for method, memory in runs.items():
    state = memory["state"]
    assert state["total"] == sum(state[k] for k in (
        "codes", "code_scales", "float_params", "optimizer_state",
        "batch_stats", "diagnostics"))
    assert memory["step"]["temp_bytes"] > 0
    if method in ("sr", "r"):
      assert state["codes"] == sum(-(-a * b // 8) for a, b in kernels)
      assert state["quantized_weights"] == weights
      assert state["bits_per_quantized_weight"] == pytest.approx(1.0)
    else:
      assert state["codes"] == 0 and state["quantized_weights"] == 0
      assert state["float_params"] >= 4 * weights
  assert runs["sr"]["state"]["float_params"] + runs["sr"]["state"]["codes"] < (
      runs["fp"]["state"]["float_params"] - 4 * weights + weights / 8 + 16)


def test_config_file_takes_repeatable_flags_as_lists(tmp_path):
  """``--sweep`` (and ``--import``) in a config file: one flag per item,
  giving the same configs as the flags themselves."""
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"methods": ["bop"], "epochs": 1, "sweeps": [
      "threshold=1e-8,1e-6", "gamma=1e-4"]}))
  base = ["--dataset", "digits", "--mlp-features", "16", "--seeds", "0",
          "--batch-size", "64", "--no-progress", "--lrs", "0.01"]
  assert _run(tmp_path / "a", "--config", str(cfg), "--no-checkpoint",
              base=base) == 0
  payload = json.loads((tmp_path / "a" / "results.json").read_text())
  configs = payload["runs"][0]["configs"]
  assert [(c["threshold"], c["gamma"]) for c in configs] == [
      (1e-8, 1e-4), (1e-6, 1e-4)]
  cfg.write_text(json.dumps({"sweeps": "gamma=0.5,x"}))
  assert _run(tmp_path / "b", "--config", str(cfg)) == 2
