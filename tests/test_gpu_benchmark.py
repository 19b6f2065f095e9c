"""benchmarks.gpu_models: a tiny CPU run and its refusals."""

import json

import jax
import pytest

from benchmarks import gpu_models

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_tiny_vgg9_run_writes_consistent_figures(tmp_path, capsys):
  path = tmp_path / "out" / "gpu.json"
  assert gpu_models.main(["--models", "vgg9", "--configs", "1", "--steps",
                          "2", "--batch", "2", "--json", str(path)]) == 0
  out = capsys.readouterr().out
  assert "images/s" in out and "vgg9" in out
  with open(path) as f:
    payload = json.load(f)
  (row,) = payload["rows"]
  assert (row["model"], row["configs"], row["steps"], row["batch"]) == (
      "vgg9", 1, 2, 2)
  # images/s from the row's own fields, computed here.
  assert row["images_per_s"] == pytest.approx(
      row["configs"] * row["batch"] * row["steps"] / row["epoch_s"])
  assert row["steps_per_s"] == pytest.approx(row["steps"] / row["epoch_s"])
  assert 0 < row["epoch_s"] < row["compile_and_first_epoch_s"]
  assert row["device"].startswith(jax.devices()[0].platform)
  if jax.default_backend() == "cpu":
    assert row["peak_memory_bytes"] is None and " n/a" in out
    assert row["strategy"] == "loop/loop"


def test_synthetic_data_is_cifar_shaped():
  x, y = gpu_models.synthetic_cifar(5)
  assert x.shape == (5, 32, 32, 3) and x.dtype.name == "float32"
  assert y.dtype.name == "int32" and 0 <= y.min() and y.max() < 10


@pytest.mark.parametrize("argv, bad", [
    (["--models", "vgg10"], "vgg10"),
    (["--method", "nope"], "nope"),
    (["--configs", "0"], "'0'"),
    (["--configs", "1,1"], "1,1"),
    (["--steps", "0"], "0"),
    (["--batch", "-4"], "-4"),
    (["--repeats", "x"], "x"),
])
def test_bad_inputs_are_refused_naming_the_value(argv, bad, capsys):
  with pytest.raises(SystemExit) as info:
    gpu_models.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert bad in err and "Traceback" not in err
