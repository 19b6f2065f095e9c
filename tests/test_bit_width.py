"""The bit-width experiment: its grids, statements, front and a smoke run."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from experiments import bit_width, common
from qjax import grids

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(autouse=True)
def no_persistent_cache(monkeypatch):
  monkeypatch.setattr(common, "enable_compilation_cache", lambda: None)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_grid_is_2_to_the_bits_levels_on_minus_one_one(bits):
  g = grids.parse(bit_width.grid_for(bits)).grid()
  # Exactly the levels the user asked for: -1 + k * 2 / (2**B - 1).
  n = 2 ** bits
  points = [g.offset + k * g.step for k in range(g.levels)]
  assert points == [Fraction(-1) + Fraction(2 * k, n - 1) for k in range(n)]
  assert bit_width.delta(bits) == pytest.approx(float(g.step), rel=1e-15)
  if bits == 1:
    assert points == [-1, 1]  # the paper's ±1, Δ = 2


def test_arms_train_bop_at_one_bit_only():
  exp = {"methods": ["sr", "bop", "bc"], "bits": [2, 1]}
  labels = [a["label"] for a in bit_width.arms(exp)]
  assert labels == ["ADAM", "SR-ADAM 2b", "SR-ADAM 1b", "Bop 1b",
                    "BC-ADAM 2b", "BC-ADAM 1b"]


def _rows(fp, per_method):
  rows = [{"label": "ADAM", "method": "fp", "bits": None, "delta": None,
           "errors": fp}]
  for method, by_bits in per_method.items():
    for bits, errors in by_bits.items():
      rows.append({"label": f"{method} {bits}b", "method": method,
                   "bits": bits, "delta": bit_width.delta(bits),
                   "errors": errors})
  return rows


def test_statements_find_a_linear_gap_by_hand():
  fp = [2.0, 2.2, 1.8]
  # SR's gap exactly 3 * Δ per seed (plus a seed-dependent jitter of 0):
  sr = {b: [f + 3 * bit_width.delta(b) + j for f, j in
            zip(fp, (0.01, -0.01, 0.0))] for b in (1, 2, 3, 4)}
  bc = {b: [f + 1.0 for f in fp] for b in (1, 2, 3, 4)}
  out = bit_width.statements(_rows(fp, {"sr": sr, "bc": bc}))
  assert out["sr_slope"] == pytest.approx(1.0, abs=0.01)
  assert out["sr_shrinks"] is True
  gaps = out["gaps"]["sr"]
  assert [g["bits"] for g in gaps] == [1, 2, 3, 4]  # from Δ = 2 down
  assert gaps[0]["mean"] == pytest.approx(6.0)
  assert all(g["verdict"] == "holds" for g in gaps)
  assert out["spread"]["bc"] == pytest.approx(0.0, abs=1e-12)
  assert out["spread"]["sr"] == pytest.approx(3 * (2 - 2 / 15))
  assert "BC depends on Δ less" in out["text"]
  assert "1.00 (1 = linear" in out["text"]


def test_statements_say_when_the_gap_does_not_shrink():
  fp = [2.0, 2.0]
  sr = {1: [4.0, 4.2], 2: [5.0, 5.1], 4: [2.0, 2.1]}
  bc = {1: [9.0, 9.0], 2: [3.0, 3.0], 4: [3.0, 3.0]}
  out = bit_width.statements(_rows(fp, {"sr": sr, "bc": bc}))
  assert out["sr_shrinks"] is False
  assert "does not shrink" in out["text"]
  assert "BC does not depend on Δ less" in out["text"]
  # Only resolved positive gaps enter the slope: here 1b and 2b.
  expected = (math.log(3.05) - math.log(2.1)) / (
      math.log(2 / 3) - math.log(2))
  assert out["sr_slope"] == pytest.approx(expected)


def test_pareto_front_by_hand():
  points = [(100, 5.0), (50, 6.0), (50, 7.0), (200, 5.0), (10, 20.0),
            (100, 4.0)]
  assert bit_width.pareto(points) == [False, True, False, False, True, True]
  assert bit_width.pareto(points, same_bytes=0) == [
      False, True, False, False, True, True]


def test_pareto_front_treats_near_equal_bytes_as_equal():
  # The measured case: R's state is SR's less an 8-byte key, with a higher
  # error; it must not join the front for those 8 bytes.
  sr, r = (224330, 2.69), (224322, 3.04)
  bop, fp = (111300, 14.30), (293874, 2.62)
  assert bit_width.pareto([sr, r, bop, fp]) == [True, False, True, True]
  assert bit_width.pareto([sr, r, bop, fp], same_bytes=0) == [
      True, True, True, True]
  # Beyond 1 % fewer bytes is fewer: 2 % smaller and worse stays on it.
  assert bit_width.pareto([(100, 1.0), (98, 2.0)]) == [True, True]
  assert bit_width.pareto([(100, 1.0), (99.5, 2.0)]) == [True, False]


@pytest.mark.parametrize("setting, match", [
    ('methods=["sr","nope"]', "methods must be"),
    ("methods=[]", "methods must be"),
    ("bits=[0]", "bits must be distinct ints in 1..16"),
    ("bits=[2,2]", "bits must be distinct"),
    ("bits=[17]", "bits must be distinct ints in 1..16"),
    ("bits=[2,4]", "Bop flips signs and runs at 1 bit only"),
    ("lrs=[0.01,0.001]", None),  # fine: smoke has a validation split
])
def test_bad_arms_are_refused_before_training(setting, match, tmp_path,
                                              monkeypatch, capsys):
  trained = []
  monkeypatch.setattr(common, "train_method",
                      lambda *a, **k: trained.append(1) or 1 / 0)
  argv = ["--scale", "smoke", "--set", setting, "--out", str(tmp_path / "o"),
          "--no-progress"]
  if match is None:
    with pytest.raises(ZeroDivisionError):  # reached training
      bit_width.main(argv)
    return
  assert bit_width.main(argv) == 2
  err = capsys.readouterr().err
  assert match in err and "Traceback" not in err
  assert not trained and not (tmp_path / "o").exists()


def test_smoke_through_main(tmp_path, capsys):
  assert bit_width.main(["--scale", "smoke", "--set", 'methods=["sr","bop"]',
                         "--out", str(tmp_path), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "SR-ADAM's gap to ADAM" in out and "| front |" in out
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  (exp,) = results["experiments"]
  rows = {r["label"]: r for r in exp["rows"]}
  assert list(rows) == ["ADAM", "SR-ADAM 1b", "SR-ADAM 2b", "Bop 1b"]
  for r in exp["rows"]:
    assert len(r["errors"]) == 2 and r["best_lr"] in (0.03, 0.003)
    if r["bits"] is None:
      assert r["grid"] is None and r["alpha_over_delta"] == [{}, {}]
      continue
    assert r["grid"] == f"kbit:{r['bits']}"
    # α/Δ per conv kernel, by hand: lr * (2**B - 1) / 2.
    for lr, a in zip(r["lrs"], r["alpha_over_delta"]):
      assert set(a) == {"Conv_0/kernel", "Conv_1/kernel"}
      assert all(v == pytest.approx(lr * (2 ** r["bits"] - 1) / 2)
                 for v in a.values())
  # What each stores: 1-bit codes < 2-bit codes < float32 parameters.
  assert (rows["SR-ADAM 1b"]["param_bytes"] < rows["SR-ADAM 2b"]["param_bytes"]
          < rows["ADAM"]["param_bytes"])
  assert rows["Bop 1b"]["param_bytes"] == rows["SR-ADAM 1b"]["param_bytes"]
  points = [(r["state_bytes"], r["summary"]["mean"]) for r in exp["rows"]]
  assert [r["pareto"] for r in exp["rows"]] == bit_width.pareto(points)
  smallest = min(exp["rows"], key=lambda r: r["state_bytes"])
  assert smallest["pareto"]
  assert np.isclose(rows["SR-ADAM 1b"]["summary"]["mean"],
                    np.mean(rows["SR-ADAM 1b"]["errors"]))
  for name in ("table.md", "table.csv", "bit_width_error_vs_delta.png",
               "bit_width_pareto.png"):
    assert (tmp_path / name).is_file(), name
