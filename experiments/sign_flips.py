"""The paper's sign-change figure: % of weights whose sign left its init value.

Claim reproduced (Li et al. 2017, the sign-change figure): per layer, SR
changes the signs of far more binary weights than BC, i.e. SR keeps
exploring instead of settling, while R changes almost none (an Adam step
below half a grid step never moves a weight off its grid point).

Measured per epoch for R-ADAM, SR-ADAM and BC-ADAM from the engine's
``history[e]["sign_flips"][layer]`` (for BC: the sign of the latent weight,
which is the sign of its binarized weight).

Scales (``config(scale)``):

* ``cpu``: full MNIST downsampled to 14x14, Table 1's all-conv net
  (``16, M, 32, M, 64``), conv kernels on ``±1`` (``grid='binary'``), Adam
  lr 0.01: α/Δ = 0.01 / 2 = 0.005, the paper's regime (see
  ``experiments.table1``); batch 128, 6 epochs, seeds 0 and 1.
  Measured (101 s): after 6 epochs SR
  38.5, 47.6, 47.8 % of signs changed in Conv_0, 1, 2, BC 21.5, 43.1,
  46.2 %, R 0: SR > BC in every layer and still rising faster in the last
  epoch, but in Conv_1 and Conv_2 only narrowly (BC's latent starts at the
  He-normal init, small against its ±1 clip, and crosses zero early; after
  3 epochs BC was ahead there). docs/experiments.md has the per-epoch
  curves.
* ``paper``: CIFAR-10, VGG-9, conv kernels binary, Adam lr 0.01 divided by
  10 at epochs 82 and 122 of 160, batch 128, augmented and normalized; needs
  a GPU and the CIFAR files; not measured here (estimate: ~1-2 h per method
  and seed on one modern GPU).
* ``smoke``: digits, a tiny all-conv net (``8, M, 16``), conv kernels on
  ``±1``, lr 0.01, 2 epochs (seconds).

Expected result: final % changed per layer SR > BC in every layer, SR's
% still rising in the last epoch faster than BC's (it keeps exploring),
and R about 0.

Command: ``python -m experiments.sign_flips --scale cpu --out
results/sign_flips``. Outputs: results.json, table.md, flips.csv and
sign_flips_<experiment>.png in ``--out``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from experiments import common
from qjax import methods as methods_lib

NAME = "sign_flips"
METHODS = ("r", "sr", "bc")


def config(scale: str = "cpu") -> dict:
  """The sign-change config at ``scale`` ("smoke", "cpu" or "paper").

  Each experiment's ``grid``: the quantized layers' grid, qjax.grids spec.
  """
  common.check_scale(scale)
  base = {"optimizer": "adam", "grid": "binary", "batch_size": 128,
          "lr_decay_epochs": [], "methods": list(METHODS)}
  if scale == "smoke":
    exp = {**base, "name": "digits/allconv", "dataset": "digits",
           **common.allconv_net("smoke"), "lr": 0.01, "epochs": 2,
           "batch_size": 64,
           "seeds": [0, 1], "runtime": "seconds",
           "command": "python -m experiments.sign_flips --scale smoke"}
  elif scale == "cpu":
    exp = {**base, "name": "mnist/allconv", "dataset": "mnist",
           **common.allconv_net("cpu"), "lr": 0.01, "epochs": 6,
           "seeds": [0, 1],
           "runtime": "about 2 min on 2 CPU cores (101 s measured)",
           "command": "python -m experiments.sign_flips --scale cpu"}
  else:
    exp = {**base, "name": "cifar10/vgg9", "dataset": "cifar10",
           "model": "vgg9", "model_kwargs": {}, "mask": "conv",
           "normalize": True, "augment": True, "lr": 0.01,
           "lr_decay_epochs": [82, 122], "epochs": 160, "seeds": [0],
           "runtime": ("not measured here (no GPU, no CIFAR); estimate "
                       "~1-2 h per method on one modern GPU"),
           "command": ("python -m experiments.sign_flips --scale paper "
                       "--out results/sign_flips_paper")}
  return {"name": NAME, "scale": scale, "experiments": [exp]}


def curves(record: dict) -> dict:
  """layer -> {"mean", "std"} lists over epochs, in % of the layer's weights."""
  out = {}
  for layer in record["history"][0]["sign_flips"]:
    per_epoch = np.array([h["sign_flips"][layer] for h in record["history"]])
    out[layer] = {"mean": (100 * per_epoch.mean(1)).tolist(),
                  "std": (100 * per_epoch.std(1)).tolist()}
  return out


def statement(final: dict, curves: dict | None = None) -> dict:
  """Whether SR > BC in every layer, whether SR still changes more signs
  than BC in the last epoch, and whether R changes (almost) no sign.

  Args:
    final: label -> layer -> final mean % of signs changed.
    curves: label -> layer -> ``{"mean": [% per epoch]}``; with 2 or more
      epochs, the last epoch's net change of the % (pp) is compared too:
      the paper's "SR keeps exploring, BC settles".
  """
  out = {}
  text = []
  if "SR-ADAM" in final and "BC-ADAM" in final:
    sr, bc = final["SR-ADAM"], final["BC-ADAM"]
    more = {layer: bool(sr[layer] > bc[layer]) for layer in sr}
    out["sr_more_than_bc"] = all(more.values())
    text.append(("SR changes more signs than BC in every layer"
                 if out["sr_more_than_bc"] else
                 "SR does not change more signs than BC in layer(s) "
                 + ", ".join(layer for layer, m in more.items() if not m)))
    if curves and len(next(iter(curves["SR-ADAM"].values()))["mean"]) >= 2:
      last = {label: {layer: c["mean"][-1] - c["mean"][-2]
                      for layer, c in curves[label].items()}
              for label in ("SR-ADAM", "BC-ADAM")}
      out["last_epoch_pp"] = last
      still = {layer: bool(last["SR-ADAM"][layer] > last["BC-ADAM"][layer])
               for layer in last["SR-ADAM"]}
      out["sr_still_exploring"] = all(still.values())
      pairs = ", ".join(f"{layer} {last['SR-ADAM'][layer]:+.2f} vs "
                        f"{last['BC-ADAM'][layer]:+.2f}" for layer in still)
      text.append("in the last epoch SR's % changed moved more than BC's "
                  + ("in every layer" if out["sr_still_exploring"] else
                     "not in every layer") + f" (pp, SR vs BC: {pairs})")
  if "R-ADAM" in final:
    top = max(final["R-ADAM"].values())
    out["r_max_percent"] = top
    out["r_almost_none"] = bool(top < 1.0)
    text.append(f"R changes at most {top:.2f} % of a layer's signs")
  out["text"] = "; ".join(text)
  return out


def run_experiment(exp: dict, progress: bool = False) -> dict:
  """R, SR and BC on one experiment; per-epoch, per-layer % changed."""
  t0 = time.time()
  records = [common.train_method(exp, m, batch_size=exp["batch_size"],
                                 label=methods_lib.label(m),
                                 progress=progress)
             for m in exp["methods"]]
  final = {r["label"]: common.final_flips(r) for r in records}
  per_epoch = {r["label"]: curves(r) for r in records}
  return {"name": exp["name"], "config": exp, "data": common.describe(exp),
          "methods": records, "curves": per_epoch, "final": final,
          "test_error": {r["label"]: common.error_summary(r["test_error"])
                         for r in records},
          "statement": statement(final, per_epoch),
          "seconds": time.time() - t0}


def run(cfg: dict, out_dir: str | None = None, progress: bool = False) -> dict:
  """Trains R, SR and BC per experiment; per-epoch, per-layer % changed."""
  common.check_supported(cfg["experiments"])
  common.enable_compilation_cache()
  return common.run_each(NAME, cfg,
                         lambda exp: run_experiment(exp, progress),
                         table, write, out_dir)


def table(results: dict) -> str:
  lines = []
  for e in results["experiments"]:
    layers = list(next(iter(e["final"].values())))
    lines += [f"{e['name']}: % of weights whose sign changed since init, "
              f"after {e['config']['epochs']} epoch(s), mean over "
              f"{len(e['config']['seeds'])} seed(s).", "",
              "| method | " + " | ".join(layers) + " | test error (%) | α/Δ |",
              "|---" * (len(layers) + 3) + "|"]
    records = {r["label"]: r for r in e["methods"]}
    for label, per_layer in e["final"].items():
      lines.append(f"| {label} | " + " | ".join(
          f"{per_layer[layer]:.2f}" for layer in layers) + f" | "
          f"{common.fmt(e['test_error'][label])} | "
          f"{common.alpha_over_delta_text(records[label])} |")
    lines += ["", f"- {e['name']}: {e['statement']['text']}", ""]
  return "\n".join(lines).rstrip()


def write(results: dict, out_dir: str) -> None:
  common.write_json(out_dir, "results.json", results)
  if not results["experiments"]:
    return
  common.write_text(out_dir, "table.md", table(results) + "\n")
  common.write_rows(out_dir, "flips.csv", [
      {"experiment": e["name"], "method": r["label"], "epoch": h["epoch"],
       "layer": layer, "seed": seed, "percent_changed": 100 * v}
      for e in results["experiments"] for r in e["methods"]
      for h in r["history"] for layer, vals in h["sign_flips"].items()
      for seed, v in zip(r["seeds"], vals)])


def plot(results: dict, out_dir: str) -> list[str]:
  """Per experiment, a panel per layer: % changed vs epoch, a line a method."""
  from qjax import plotting
  paths = []
  for e in results["experiments"]:
    layers = list(next(iter(e["curves"].values())))
    fig, axes = plotting.figure(1, len(layers),
                                figsize=(3.8 * len(layers), 3.4),
                                squeeze=False)
    for ax, layer in zip(axes[0], layers):
      for label, per_layer in e["curves"].items():
        # Epoch 0 is the initialization, where no sign has changed yet.
        mean = np.array([0.0] + per_layer[layer]["mean"])
        std = np.array([0.0] + per_layer[layer]["std"])
        epochs = np.arange(len(mean))
        color = plotting.method_color(label)
        ax.plot(epochs, mean, marker="o", color=color, label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                        color=color)
      ax.set_title(layer)
      ax.set_xticks(epochs)
      ax.set_xlabel("epoch")
      ax.set_ylabel("% signs changed since init")
    axes[0][0].legend()
    fig.suptitle(f"{e['name']} ({results['scale']})")
    safe = e["name"].replace("/", "_")
    paths.append(common.save_figure(fig, out_dir, f"sign_flips_{safe}.png"))
  return paths


def summary(results: dict) -> str:
  return results["table_md"]


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
