"""The float-format negative control (experiments.float_formats)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from experiments import common
from experiments import float_formats as ff


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(autouse=True)
def no_persistent_cache(monkeypatch):
  monkeypatch.setattr(common, "enable_compilation_cache", lambda: None)


def _kernel_count(features, inputs=64, classes=10):
  widths = [inputs, *features, classes]
  return sum(a * b for a, b in zip(widths, widths[1:]))


def test_smoke_through_main(tmp_path, capsys):
  out = tmp_path / "ff"
  # lr 1e-7: far below half a bf16 ulp of every initial weight but the
  # few nearest zero, so R must (almost) never move a weight; SR must.
  rc = ff.main(["--scale", "smoke", "--out", str(out), "--no-progress",
                "--set", "lrs=[0.01,0.0000001]"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "R-ADAM [bf16]" in printed and "SR-ADAM [fp8_e4m3]" in printed
  for name in ("results.json", "table.md", "runs.csv",
               "float_formats_digits_mlp.png"):
    assert os.path.getsize(out / name) > 0
  (e,) = json.loads((out / "results.json").read_text())["experiments"]
  arms = {a["arm"]: a for a in e["arms"]}
  assert list(arms) == list(ff.ARMS)
  # Bytes, computed independently: a float32 kernel weight takes 4 bytes, a
  # bf16 one 2 and an fp8 one 1; nothing else in the parameters changes.
  kernels = _kernel_count(e["config"]["model_kwargs"]["features"])
  fp_bytes = arms["fp"]["param_bytes"]
  for arm, saved in (("r:bf16", 2), ("sr:bf16", 2), ("r:fp8_e4m3", 3),
                     ("sr:fp8_e4m3", 3)):
    assert arms[arm]["param_bytes"] == fp_bytes - saved * kernels, arm
  assert arms["fp"]["regime"] is None
  for arm in ("r:bf16", "sr:bf16"):
    tiny = arms[arm]["per_lr"][1]
    assert tiny["lr"] == 1e-7 and len(tiny["test_error"]) == 2
    frozen = arms[arm]["regime"]["per_lr"][1]["predicted_frozen"]
    assert frozen > 0.95
  # R moves no weight predicted frozen; SR moves a fraction of them.
  r_moved = arms["r:bf16"]["per_lr"][1]["moved"]["mean"]
  sr_moved = arms["sr:bf16"]["per_lr"][1]["moved"]["mean"]
  assert r_moved <= 1 - arms["r:bf16"]["regime"]["per_lr"][1][
      "predicted_frozen"] + 1e-9
  assert sr_moved > 2 * r_moved and sr_moved > 0.001
  assert e["statement"]["r_frozen_as_predicted_bf16"] is True


def test_regime_against_hand_computed_gaps():
  # bf16 around 1.0: the next value up is 1 + 2**-7, the next down
  # 1 - 2**-8, so Δ(1.0) = 2**-8 and R freezes it for any α < 2**-9.
  leaf = np.array([1.0, -1.0], ml_dtypes.bfloat16)
  out = ff.regime([leaf], "bf16", [2.0**-10, 2.0**-9])
  assert out["median_delta"] == 2.0**-8
  assert [r["predicted_frozen"] for r in out["per_lr"]] == [1.0, 0.0]
  assert out["per_lr"][0]["alpha_over_delta"] == 0.25
  # fp8 e4m3 at 0.5 (= 2**-1): mantissa 3 bits, gaps 2**-4 up, 2**-5 down.
  leaf = np.array([0.5, 0.75], ml_dtypes.float8_e4m3fn)
  delta = ff.smaller_gap(leaf, "fp8_e4m3")
  assert delta.tolist() == [2.0**-5, 2.0**-4]


@pytest.mark.parametrize("arm, match", [
    ("sr", "name the format"),
    ("sr:kbit:2", "not a floating-point format"),
    ("fp:bf16", "takes no grid"),
    ("nope:bf16", "unknown method"),
])
def test_bad_arms_are_refused(arm, match):
  with pytest.raises(ValueError, match=match):
    ff.parse_arm(arm)


@pytest.mark.parametrize("setting, match", [
    ("lrs=[-0.01]", "distinct positive numbers"),
    ("lrs=[0.01,0.01]", "repeated values"),
    ("seeds=[]", "empty"),
    ("epochs=0", "epochs must be an int >= 1"),
    ('arms=["sr:bf16","sr:bf16"]', "repeat an arm"),
    ('mask="nope"', "mask must be one of"),
])
def test_bad_values_fail_cleanly_before_training(tmp_path, capsys, setting,
                                                 match):
  rc = ff.main(["--scale", "smoke", "--out", str(tmp_path / "o"),
                "--no-progress", "--set", setting])
  err = capsys.readouterr().err
  assert rc == 2 and match in err and "Traceback" not in err
  assert not (tmp_path / "o").exists()


def test_bad_arm_through_main_fails_before_training(tmp_path, capsys):
  rc = ff.main(["--scale", "smoke", "--out", str(tmp_path), "--no-progress",
                "--set", 'arms=["fp","sr:glorot"]'])
  assert rc == 2
  assert "not a floating-point format" in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def _arm(method, grid, errors, moved=0.0, frozen=0.0):
  """A fake arm: errors[lr] = per-seed test errors (fractions)."""
  return {"method": method, "grid": grid,
          "per_lr": [{"lr": lr, "seeds": list(range(len(e))),
                      "test_error": e,
                      "error": common.error_summary(e),
                      "moved": {"mean": moved}} for lr, e in errors.items()],
          "regime": None if method == "fp" else {"per_lr": [
              {"lr": lr, "predicted_frozen": frozen} for lr in errors]}}


def test_statement_detects_r_falling_behind_and_sr_close():
  fp = _arm("fp", "float32", {1e-3: [0.02, 0.021, 0.022],
                              1e-5: [0.10, 0.11, 0.12]})
  sr = _arm("sr", "bf16", {1e-3: [0.021, 0.022, 0.023],
                           1e-5: [0.11, 0.12, 0.13]}, moved=0.9)
  r = _arm("r", "bf16", {1e-3: [0.022, 0.023, 0.024],
                         1e-5: [0.80, 0.82, 0.85]}, moved=0.01, frozen=0.99)
  out = ff.statement([fp, r, sr])
  assert out["r_behind_sr_bf16"]["holds"] is True
  assert out["sr_close_to_fp_bf16"]["holds"] is True
  assert out["r_frozen_as_predicted_bf16"] is True
  # The same R errors as SR: R is not behind; R moving weights predicted
  # frozen contradicts the prediction.
  r_same = _arm("r", "bf16", {1e-3: [0.021, 0.022, 0.023],
                              1e-5: [0.11, 0.12, 0.13]}, moved=0.5,
                frozen=0.99)
  out = ff.statement([fp, r_same, sr])
  assert out["r_behind_sr_bf16"]["holds"] is False
  assert out["r_frozen_as_predicted_bf16"] is False
  assert "does NOT fall clearly behind" in out["text"]
