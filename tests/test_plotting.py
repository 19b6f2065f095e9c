"""qjax's figures: no pyplot, no backend switch, one colour per method."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from matplotlib import colors  # noqa: E402

from experiments import common  # noqa: E402
from qjax import plotting  # noqa: E402
from qjax import results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = ("fp", "bc", "sr", "r", "bop", "sbc", "big-sr")
UNKNOWN = ("my-new-method", "SR, batch 16", "xnor")


def _runs() -> list[dict]:
  """Two methods, two learning rates (one seeded twice), two epochs."""
  configs = [{"seed": 0, "lr": 0.01}, {"seed": 1, "lr": 0.01},
             {"seed": 0, "lr": 0.1}]

  def history(flips):
    return [{"epoch": e, "test_error": [0.5 / e, 0.4 / e, 0.3 / e],
             "train_loss": [1.0 / e, 0.9 / e, 0.8 / e],
             "sign_flips": {"Dense_0": [0.1 * e] * 3} if flips else {}}
            for e in (1, 2)]

  return [{"label": "SR-ADAM", "method": "sr", "configs": configs,
           "history": history(True)},
          {"label": "ADAM", "method": "fp", "configs": configs,
           "history": history(False)}]


# Runs in a fresh interpreter: ``sys.argv[1]`` the PNG path, ``[2]`` the
# runs as JSON, ``[3]`` "jupyter" to first use pyplot on an inline backend
# as a notebook does. Prints what the test checks, as JSON.
_SCRIPT = """
import json, sys
import matplotlib
try:
  import matplotlib_inline  # noqa: F401
  sentinel = "module://matplotlib_inline.backend_inline"
except ImportError:
  sentinel = "svg"
matplotlib.use(sentinel)
user_figures = []
if sys.argv[3] == "jupyter":
  import matplotlib.pyplot as plt
  plt.plot([1, 2, 3])  # the user's own figure, before qjax plots
  user_figures = plt.get_fignums()
from qjax import plotting, results
results.plot_curves(sys.argv[1], json.loads(sys.argv[2]))
out = {"pyplot_imported": "matplotlib.pyplot" in sys.modules,
       "sentinel": sentinel, "backend": matplotlib.get_backend(),
       "unknown": [plotting.method_color(n) for n in %r]}
if sys.argv[3] == "jupyter":
  out["figures_before"], out["figures_after"] = user_figures, plt.get_fignums()
print(json.dumps(out))
""" % (UNKNOWN,)


def _plot_in_subprocess(path, mode: str, hash_seed: str) -> dict:
  env = dict(os.environ, PYTHONHASHSEED=hash_seed, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(path), json.dumps(_runs()), mode],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_png(path):
  assert os.path.isfile(path) and os.path.getsize(path) > 0
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_neither_imports_pyplot_nor_switches_backend(tmp_path):
  """Before: plot_curves called matplotlib.use("Agg") and pyplot."""
  path = tmp_path / "fresh" / "curves.png"
  out = _plot_in_subprocess(path, "fresh", hash_seed="1")
  assert not out["pyplot_imported"]
  assert out["backend"] == out["sentinel"]
  _assert_png(path)
  assert out["unknown"] == [plotting.method_color(n) for n in UNKNOWN]


def test_plot_curves_leaves_a_notebooks_pyplot_alone(tmp_path):
  """A Jupyter user's inline backend and open figures survive a qjax plot."""
  path = tmp_path / "curves.png"
  out = _plot_in_subprocess(path, "jupyter", hash_seed="2")
  assert out["backend"] == out["sentinel"]
  assert out["figures_after"] == out["figures_before"] == [1]
  _assert_png(path)
  # Another hash seed than the test above: the same fallback colours.
  assert out["unknown"] == [plotting.method_color(n) for n in UNKNOWN]


def test_plot_curves_colours_lines_by_method(tmp_path, monkeypatch):
  figures = []
  save = plotting.save
  monkeypatch.setattr(plotting, "save",
                      lambda fig, path, dpi=110: figures.append(fig) or
                      save(fig, path, dpi))
  path = str(tmp_path / "curves.png")
  results.plot_curves(path, _runs())
  _assert_png(path)
  (fig,) = figures
  for ax in fig.axes:
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"SR-ADAM lr=0.01", "SR-ADAM lr=0.1",
                          "ADAM lr=0.01", "ADAM lr=0.1"}
    for label, line in lines.items():
      assert colors.to_hex(line.get_color()) == plotting.method_color(label)
    # One method's learning rates: its colour, different linestyles.
    assert (lines["SR-ADAM lr=0.01"].get_linestyle()
            != lines["SR-ADAM lr=0.1"].get_linestyle())


@pytest.mark.parametrize("method,spellings", [
    ("sr", ["sr", "sr-adam", "SR-ADAM", "SR", "SR-Adam", "sr_sgd"]),
    ("fp", ["fp", "ADAM", "adam", "SGD", "fp-adam", "FP", ""]),
    ("bc", ["bc", "BC-ADAM", "bc-sgd", "BC (Q_s view)", "BC (Q_d view)"]),
    ("r", ["r", "R-ADAM", "R"]),
    ("big-sr", ["big-sr", "Big SR-ADAM", "big_sr", "BIG SR"]),
    ("sbc", ["sbc", "bc_stochastic", "SBC-ADAM", "BC-S", "bc-s-adam"]),
    ("bop", ["bop", "BOP"]),
])
def test_method_color_ignores_case_and_optimizer(method, spellings):
  for name in spellings:
    assert plotting.method_key(name) == method, name
    assert plotting.method_color(name) == plotting.method_color(method), name


def test_known_methods_have_distinct_fixed_colours():
  palette = [plotting.method_color(m) for m in KNOWN]
  assert len(set(palette)) == len(KNOWN)
  assert set(KNOWN) == set(plotting.METHODS)
  assert all(colors.is_color_like(c) for c in palette)


def test_unknown_methods_get_stable_distinct_colours():
  a, b = (plotting.method_color(n) for n in ("xnor", "XNOR-adam"))
  assert a == b and colors.is_color_like(a)
  assert a not in {plotting.method_color(m) for m in KNOWN}
  assert len({plotting.method_color(n) for n in UNKNOWN}) == len(UNKNOWN)


def test_figure_is_subplots_without_pyplot(tmp_path):
  fig, ax = plotting.figure(figsize=(2, 1))
  assert ax.figure is fig and tuple(fig.get_size_inches()) == (2, 1)
  fig, axes = plotting.figure(1, 2, squeeze=False, sharey=True)
  assert axes.shape == (1, 2)
  axes[0, 0].plot([0, 1], [1, 0], color=plotting.method_color("sr"))
  _assert_png(plotting.save(fig, str(tmp_path / "a" / "b.png"), dpi=30))
  _assert_png(common.save_figure(fig, str(tmp_path / "c"), "d.png", dpi=30))


def test_variants_and_shades():
  assert plotting.variant(0) == {"linestyle": "-", "marker": "o"}
  assert plotting.variant(1) != plotting.variant(0)
  assert "marker" not in plotting.variant(2, marker=False)
  styles = plotting.method_styles(["SR", "BC (Q_s view)", "BC (Q_d view)"])
  assert styles["BC (Q_s view)"]["color"] == styles["BC (Q_d view)"]["color"]
  assert (styles["BC (Q_s view)"]["linestyle"]
          != styles["BC (Q_d view)"]["linestyle"])
  tints = plotting.shades("#ff7f0e", 3)
  assert tints[-1] == "#ff7f0e" and len(set(tints)) == 3
  assert plotting.shades("#ff7f0e", 1) == ["#ff7f0e"]
