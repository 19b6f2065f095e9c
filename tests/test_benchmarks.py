"""The throughput benchmark runs end to end and reports what it measured.

It makes no timing claim (timings belong to the benchmark's own output); it
checks that the benchmark still runs against the engine's current API.
"""

import argparse
import json
import os

import numpy as np
import pytest

from benchmarks import sweep_throughput


def test_sweep_throughput_benchmark_writes_its_rows(tmp_path):
  out = tmp_path / "bench.json"
  result = sweep_throughput.main([
      "--models", "mlp", "--configs", "2", "--steps", "2", "--repeats", "1",
      "--runs-examples", "256", "--runs-repeats", "1", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == result["rows"]
  kinds = [(r["scope"], r["kind"], r["strategy"], r["chosen"])
           for r in saved["rows"]]
  chosen = "scan/loop"  # the engine's choice for an MLP on CPU
  assert kinds == [("steps", "sequential", chosen, True),
                   ("steps", "sweep", chosen, True),
                   ("runs", "sequential", chosen, True),
                   ("runs", "sweep", chosen, True)]
  for sweep_row in saved["rows"][1::2]:
    assert sweep_row["target"] == 1.5 and isinstance(sweep_row["pass"], bool)
  assert all(r["seconds"] > 0 and r["examples_per_s"] > 0
             and r["cores_busy"] > 0 for r in saved["rows"])
  # Whole runs train every example of the (cut) training set: 256 // 128.
  assert [r["steps"] for r in saved["rows"][2:]] == [2, 2]
  assert saved["cpu_devices"] >= 1


def test_end_to_end_rows_can_be_switched_off(tmp_path):
  result = sweep_throughput.main([
      "--models", "mlp", "--configs", "2", "--steps", "1", "--repeats", "1",
      "--end-to-end", "", "--out", str(tmp_path / "b.json")])
  assert {r["scope"] for r in result["rows"]} == {"steps"}


@pytest.mark.parametrize("flag", ["--configs", "--steps", "--repeats",
                                  "--runs-epochs", "--runs-examples",
                                  "--runs-repeats"])
def test_counts_below_one_are_refused_before_any_work(flag, capsys):
  with pytest.raises(SystemExit) as exit_info:
    sweep_throughput.main([flag, "0"])
  assert exit_info.value.code == 2
  assert f"{flag}: expected an int >= 1, got '0'" in capsys.readouterr().err


def test_memory_benchmark_prints_the_twelve_rows_of_the_mlp(tmp_path,
                                                           capsys):
  from benchmarks import memory as memory_bench
  out = tmp_path / "memory.json"
  result = memory_bench.main(["--models", "mlp", "--batch", "8",
                              "--out", str(out)])
  table = capsys.readouterr().out
  rows = [line for line in table.splitlines() if line.startswith("| mlp |")]
  assert [line.split(" | ")[1] for line in rows] == [
      "FP-SGD", "BC-SGD", "SBC-SGD", "SR-SGD", "R-SGD", "Bop-SGD",
      "FP-ADAM", "BC-ADAM", "SBC-ADAM", "SR-ADAM", "R-ADAM", "Bop-ADAM"]
  assert json.loads(out.read_text())["rows"] == result["rows"]
  by_method = {r["method"]: r for r in result["rows"]}
  assert by_method["SR-SGD"]["params_ratio_to_fp"] < 1 / 20
  assert by_method["SR-ADAM"]["bits_per_quantized_weight"] == 1.0
  assert by_method["Bop-ADAM"]["bits_per_quantized_weight"] == 1.0
  # Bop's state: the codes, one float32 EMA per binary weight, Adam's
  # moments for the float leaves only: less than SR-ADAM's two moments.
  assert by_method["Bop-ADAM"]["total"] < by_method["SR-ADAM"]["total"]
  assert by_method["SBC-ADAM"]["total"] == by_method["BC-ADAM"]["total"]
  assert all(r["step_temp"] > 0 for r in result["rows"])


def test_codes_step_benchmark_runs_and_compares(tmp_path, capsys):
  from benchmarks import codes_step
  result = codes_step.main(["--steps", "2", "--repeats", "1", "--methods",
                            "sr-adam", "--batch", "16",
                            "--out", str(tmp_path / "codes_step.json")])
  (row,) = result["rows"]
  assert row["method"] == "sr-adam" and row["codes_s"] > 0
  assert row["float_s"] > 0 and row["ratio"] > 0
  assert row["identical"] is True and row["matches_train_step"] is True
  assert "identical: True" in capsys.readouterr().out


def test_step_throughput_benchmark_runs_and_reports_ratios(tmp_path, capsys):
  from benchmarks import step_throughput
  result = step_throughput.main(["--methods", "sr,fp", "--steps", "3",
                                 "--repeats", "1", "--batch", "16",
                                 "--features", "16", "--random-bits", "hash",
                                 "--out", str(tmp_path / "s.json")])
  assert result["args"]["random_bits"] == "hash"
  ratios = result["overheads"]["ratio"]
  assert set(ratios) == {"bc", "sr", "sr_hash", "r"}
  best = {k: min(v) for k, v in result["overheads"]["round_s"].items()}
  assert ratios["sr_hash"] == pytest.approx(best["sr_hash"] / best["fp"])
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"sr", "fp"}
  for r in rows.values():
    assert r["qjax_steps_per_s"] > 0
    try:
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError:
      assert r["torch_steps_per_s"] is None and r["ratio"] is None
    else:
      assert r["ratio"] == pytest.approx(
          r["qjax_steps_per_s"] / r["torch_steps_per_s"])
  out = capsys.readouterr().out
  assert "| mlp | sr-adam |" in out and "% of sgemm" in out
  assert "| sr-adam, random_bits=hash |" in out
  sgemm = result["sgemm"]
  assert sgemm["flops"] > 1e8 and "numpy" in sgemm["by_backend"]
  assert "1024x1024x1024" in sgemm["by_backend"]["numpy"]
  assert rows["fp"]["qjax_flops_per_s"] == pytest.approx(
      rows["fp"]["qjax_steps_per_s"] * rows["fp"]["step_flops"])


def test_mlp_step_flops_by_hand():
  from benchmarks import step_throughput
  # 784-512-512-10, batch 128: forward 2*128*(401408 + 262144 + 5120) =
  # 171,180,032; weight gradients as much; input gradients of the last two
  # layers 2*128*(262144 + 5120) = 68,419,584.
  assert step_throughput.mlp_step_flops((512, 512), 128) == 410_779_648
  # One layer 4 -> 3 (features=()), batch 2: forward 2*2*4*3 = 48, weight
  # gradient 48, no input gradient.
  assert step_throughput.mlp_step_flops((), 2, inputs=4, classes=3) == 96


def test_allconv_step_flops_by_hand():
  from benchmarks import step_throughput
  # conv 1 -> 4 at 4x4, pool, conv 4 -> 8 at 2x2, dense 8 -> 3, batch 2:
  # first conv 2*2*16*9*1*4 = 2304, twice (no input gradient); second conv
  # 2*2*4*9*4*8 = 4608, three times; dense 2*2*8*3 = 96, three times.
  assert step_throughput.allconv_step_flops(
      (4, "M", 8), 2, size=4, channels=1, classes=3) == (
          2 * 2304 + 3 * 4608 + 3 * 96)


def test_step_throughput_runs_the_allconv_net(tmp_path, capsys):
  from benchmarks import step_throughput
  result = step_throughput.main(["--model", "allconv", "--methods", "sr",
                                 "--steps", "2", "--repeats", "1",
                                 "--batch", "8", "--no-overheads", "--out",
                                 str(tmp_path / "s.json")])
  assert result["overheads"] is None
  (row,) = result["rows"]
  assert row["model"] == "allconv" and row["qjax_steps_per_s"] > 0
  assert row["step_flops"] == step_throughput.allconv_step_flops(
      step_throughput.CONV_SPEC, 8)
  assert "| allconv | sr-adam |" in capsys.readouterr().out


def test_format_step_benchmark_compares_sr_with_r(tmp_path, capsys):
  from benchmarks import format_step
  result = format_step.main(["--formats", "fp8_e4m3", "--steps", "3",
                             "--repeats", "1", "--batch", "16",
                             "--features", "16", "--out",
                             str(tmp_path / "f.json")])
  rows = {r["random_bits"]: r for r in result["rows"]}
  assert set(rows) == {"threefry", "hash"}
  for row in rows.values():
    assert row["format"] == "fp8_e4m3"
    assert row["sr_over_r_time"] == pytest.approx(
        row["r_steps_per_s"] / row["sr_steps_per_s"])
  assert rows["hash"]["r_steps_per_s"] == rows["threefry"]["r_steps_per_s"]
  assert rows["hash"]["sr_round_s"] != rows["threefry"]["sr_round_s"]
  assert result["fp_steps_per_s"] > 0
  out = capsys.readouterr().out
  assert "| fp8_e4m3 | threefry |" in out and "| fp8_e4m3 | hash |" in out


@pytest.mark.parametrize("method", ["fp", "bc", "sr", "r"])
def test_torch_reference_is_the_method_it_claims(method):
  """The PyTorch reference trains, and stores what the method stores."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_reference
  ref = torch_reference.ReferenceStep(method, features=(32,), num_inputs=20,
                                      lr=3e-3 if method != "r" else 0.5)
  g = torch.Generator().manual_seed(0)
  w = torch.randn((20, 10), generator=g)
  x = torch.randn((64, 64, 20), generator=g)
  y = (x @ w).argmax(-1)
  losses = [float(ref.step(x[t % 64], y[t % 64])) for t in range(192)]
  assert np.mean(losses[-16:]) < 0.8 * np.mean(losses[:16]), losses[::16]
  for m, h in zip(ref.quantized, ref.scales):
    h = float(torch.tensor(h, dtype=torch.float32))  # the stored points
    values = torch.unique(m.weight.detach())
    if method in ("sr", "r"):
      assert set(values.tolist()) <= {-h, h}
    elif method == "bc":
      assert float(values.abs().max()) <= h + 1e-7 and values.numel() > 2


@pytest.mark.parametrize("method", ["fp", "bc", "sr", "r"])
def test_torch_allconv_reference_quantizes_the_conv_kernels(method):
  """The all-conv reference: conv kernels on ±1 (SR, R) or clipped latents
  (BC), the classifier float, and it trains."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_reference
  ref = torch_reference.ReferenceStep(method, model="allconv",
                                      conv_spec=(8, "M", 8), lr=3e-3)
  assert [type(m).__name__ for m in ref.quantized] == ["Conv2d", "Conv2d"]
  assert ref.scales == [1.0, 1.0]
  g = torch.Generator().manual_seed(0)
  x = torch.rand((8, 32, 1, 14, 14), generator=g)
  y = (x.mean((2, 3, 4)) * 10).long().clamp(0, 9)  # any fixed labels
  losses = [float(ref.step(x[t % 8], y[t % 8])) for t in range(40)]
  assert np.isfinite(losses).all()
  for m in ref.quantized:
    values = torch.unique(m.weight.detach())
    if method in ("sr", "r"):
      assert set(values.tolist()) <= {-1.0, 1.0}
    elif method == "bc":
      assert float(values.abs().max()) <= 1.0 and values.numel() > 2
  head = ref.model[-1]
  assert torch.unique(head.weight.detach()).numel() > 2  # float classifier


def _write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  path.write_bytes(header + array.tobytes())


def test_torch_reference_command_trains_configs_on_cached_mnist(
    tmp_path, monkeypatch, capsys):
  pytest.importorskip("torch")
  from benchmarks import torch_reference
  rng = np.random.default_rng(0)
  root = tmp_path / "mnist"
  root.mkdir()
  for split, n in (("train", 256), ("t10k", 64)):
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):  # a bright row per class: learnable
      images[i, 2 * c + 4] = 255
    _write_idx(root / f"{split}-images-idx3-ubyte", images)
    _write_idx(root / f"{split}-labels-idx1-ubyte", labels)
  monkeypatch.setenv("QJAX_DATA", str(tmp_path))
  rows = torch_reference.main(["--method", "fp", "--lrs", "0.01,0.003",
                               "--seeds", "0,1", "--epochs", "3",
                               "--batch", "32"])
  assert [(r["lr"], r["seed"]) for r in rows] == [
      (0.01, 0), (0.01, 1), (0.003, 0), (0.003, 1)]
  assert rows[0]["test_error"] < 0.5  # chance is 0.9
  assert "fp lr 0.01 seed 0: test error" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    torch_reference.main(["--lrs", "-0.1"])
  monkeypatch.setenv("QJAX_DATA", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="qjax.data fetch mnist"):
    torch_reference.main([])


def test_sweep_vs_torch_commands_are_the_requested_sweep():
  """Both commands parse, and ask for the same 16 configs of the same net."""
  from benchmarks import sweep_vs_torch
  from experiments import train as train_cli
  args = argparse.Namespace(method="bc", lrs=(0.0003, 0.001, 0.003, 0.01),
                            seeds=(0, 1, 2, 3), epochs=1, batch=128)
  q = train_cli.parser().parse_args(
      sweep_vs_torch.qjax_command(args, "/tmp/o")[3:])
  assert (tuple(q.methods), tuple(q.lrs), tuple(q.seeds)) == (
      ("bc",), args.lrs, args.seeds)
  assert (tuple(q.mlp_features), q.epochs, q.batch_size) == ((512, 512), 1,
                                                             128)
  assert q.no_checkpoint
  cmd = sweep_vs_torch.torch_command(args, "/tmp/t.json")
  assert cmd[1:3] == ["-m", "benchmarks.torch_reference"]
  assert cmd[cmd.index("--lrs") + 1] == "0.0003,0.001,0.003,0.01"
  assert cmd[cmd.index("--seeds") + 1] == "0,1,2,3"


def test_sweep_vs_torch_ratios_and_verdicts(monkeypatch, tmp_path, capsys):
  """The table's ratio is the fastest times' ratio; verdict against the 0.5
  target; the test errors each process wrote are shown."""
  from benchmarks import sweep_vs_torch
  fake = {"qjax": [30.0, 20.0], "torch": [50.0, 44.0]}
  calls = []

  def timed(cmd, env):
    kind = ["qjax", "torch"][len(calls) % 2]
    assert ("benchmarks.torch_reference" in cmd) == (kind == "torch")
    calls.append(kind)
    out = cmd[cmd.index("--out") + 1]
    if kind == "torch":
      with open(out, "w") as f:
        json.dump({"rows": [{"test_error": 0.03}, {"test_error": 0.05}]}, f)
    else:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": [{"history": [{"test_error": [0.02, 0.04]}]}]}, f)
    return fake[kind][(len(calls) - 1) // 2]

  monkeypatch.setattr(sweep_vs_torch, "_timed", timed)
  monkeypatch.setattr(sweep_vs_torch.importlib.util, "find_spec",
                      lambda name: object())
  result = sweep_vs_torch.main(["--repeats", "2", "--lrs", "0.001,0.01",
                                "--seeds", "0", "--out",
                                str(tmp_path / "r.json")])
  assert result["best_s"] == {"qjax": 20.0, "torch": 44.0}
  assert result["ratio"]["qjax"] == pytest.approx(20 / 44)
  out = capsys.readouterr().out
  assert "| 20.0 | 0.45 | met | 3.00 % mean, 2.00-4.00 |" in out
  assert "| 44.0 | - | - | 4.00 % mean, 3.00-5.00 |" in out
  with open(tmp_path / "r.json") as f:
    assert json.load(f)["configs"] == 2


def test_step_breakdown_times_the_five_programs(tmp_path, capsys):
  from benchmarks import step_breakdown
  out = tmp_path / "breakdown.json"
  result = step_breakdown.main(["--steps", "2", "--repeats", "1", "--batch",
                                "8", "--features", "16,16", "--out",
                                str(out)])
  saved = json.loads(out.read_text())
  assert set(saved["steps_per_s"]) == set(step_breakdown.PROGRAMS)
  assert all(v > 0 for v in result["steps_per_s"].values())
  printed = capsys.readouterr().out
  for name in step_breakdown.PROGRAMS:
    assert f"| {name} |" in printed


def test_step_breakdown_table_adds_milliseconds_to_each_rows_base():
  from benchmarks import step_breakdown
  rates = dict(zip(step_breakdown.PROGRAMS,
                   (500.0, 250.0, 400.0, 200.0, 100.0)))
  lines = step_breakdown.format_table(rates).splitlines()[2:]
  # 2 ms; 4 ms and 2.5 ms, each against the minimal 2 ms; 5 ms against
  # bounded_step's 2.5; 10 ms against the unbatched engine's 5.
  assert lines[0].endswith("| 2.00 | - | - |")
  assert lines[1].endswith("| 4.00 | +2.00 | minimal |")
  assert lines[2].endswith("| 2.50 | +0.50 | minimal |")
  assert lines[3].endswith("| 5.00 | +2.50 | + bounded_step |")
  assert lines[4].endswith("| 10.00 | +5.00 | engine, unbatched |")


def test_minimal_step_loss_is_the_mlp_cross_entropy_by_hand():
  """The breakdown's floor trains the network it claims: its loss at
  given parameters equals BatchNorm + ReLU + softmax cross-entropy written
  out in numpy."""
  import jax
  from benchmarks import step_breakdown
  params = step_breakdown.init_mlp(jax.random.PRNGKey(1), (6,), inputs=5,
                                   classes=3)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 5)).astype(np.float32)
  y = rng.integers(0, 3, 8)
  h = x @ np.asarray(params["kernel0"], np.float64)
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
  h = np.maximum(h, 0)
  logits = h @ np.asarray(params["kernel1"], np.float64)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = -logp[np.arange(8), y].mean()
  got = float(step_breakdown.mlp_loss(params, x, y, 1))
  assert abs(got - expected) < 1e-5


def test_step_throughput_refuses_a_bad_learning_rate_or_strategy(capsys):
  from benchmarks import step_throughput
  for argv in (["--lr", "-0.001"], ["--strategy", "scan-vamp"]):
    with pytest.raises(SystemExit) as exit_info:
      step_throughput.main(argv)
    assert exit_info.value.code == 2
  assert "expected a number > 0" in capsys.readouterr().err


def test_interleaved_times_alternates_the_runs_once_per_round():
  # The step benchmarks compare runs timed in the same rounds: every round
  # times each run exactly once, in order, so drift hits all of them alike.
  from benchmarks import step_throughput
  calls = []
  runs = {"a": lambda: calls.append("a"),
          ("r", "bf16"): lambda: calls.append("b")}
  times = step_throughput.interleaved_times(runs, 3)
  assert calls == ["a", "b"] * 3
  assert list(times) == ["a", ("r", "bf16")]
  assert all(len(t) == 3 and min(t) >= 0 for t in times.values())
  assert step_throughput.interleaved_times(runs, 0) == {"a": [],
                                                        ("r", "bf16"): []}


def test_torch_reference_bc_test_error_is_of_the_binary_weights():
  """BC's test error is that of H sign(w_r), computed here independently on
  a copy of the model; the latents are unchanged by evaluating."""
  torch = pytest.importorskip("torch")
  import copy  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_reference
  ref = torch_reference.ReferenceStep("bc", features=(32,), num_inputs=20,
                                      lr=3e-2)
  g = torch.Generator().manual_seed(1)
  w = torch.randn((20, 10), generator=g)
  x = torch.randn((16, 64, 20), generator=g)
  y = (x @ w).argmax(-1)
  for t in range(64):
    ref.step(x[t % 16], y[t % 16])
  latents = [m.weight.detach().clone() for m in ref.quantized]
  x_test, y_test = x.reshape(-1, 20), y.reshape(-1)
  got = ref.test_error(x_test, y_test, batch=100)
  binary = copy.deepcopy(ref.model).eval()
  latent = copy.deepcopy(ref.model).eval()
  with torch.no_grad():
    for i, h in zip([i for i, m in enumerate(ref.model)
                     if m in ref.quantized], ref.scales):
      binary[i].weight.copy_(torch.where(binary[i].weight >= 0, h, -h))
    want = float((binary(x_test).argmax(1) != y_test).float().mean())
    on_latents = float((latent(x_test).argmax(1) != y_test).float().mean())
  assert got == pytest.approx(want, abs=1e-9)
  assert on_latents != pytest.approx(want, abs=1e-9)  # the test can fail
  for m, w0 in zip(ref.quantized, latents):
    assert torch.equal(m.weight.detach(), w0)
  assert ref.model.training
