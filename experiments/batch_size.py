"""Batch size: SR needs large batches, BC does not (Li et al. 2017).

Claim reproduced: SR-ADAM's test error falls markedly as the batch grows
(the gradient noise it rounds shrinks, so fewer random sign flips), while
BC-ADAM's error depends little on the batch size; the paper's "Big
SR-ADAM" row (batch 1024) is this effect. Reported with the matching flip
rates (% of weights whose sign changed since init).

How the number of steps is handled: a fixed number of epochs for every
batch size, as in the paper (budget ``epochs``), so a batch B takes
``epochs * (N // B)`` steps: big batches take fewer steps. With
``same_steps`` every larger batch also trains for ``epochs * B / B0``
epochs (B0 the smallest batch; decay epochs scaled alike), about B0's
steps (budget ``steps``): that row compares the noise per step alone.
The paper's statement is about the same epochs, after 160 of them, when
every batch has had steps enough; at a few epochs the same-epochs rows
mostly measure the step count. Each row reports its epochs and steps.

Scales (``config(scale)``):

* ``cpu``: MNIST downsampled to 14x14 (the first 15,000 training images,
  as Table 1's CPU scale), Table 1's all-conv net (``16, M, 32, M, 64``),
  conv kernels on ``±1``, Adam lr 0.01 (α/Δ 0.005, the paper's regime;
  see ``experiments.table1``) divided by 10 at epochs 3 and 5 (the
  paper's fractions), batches 128, 512, 1024, 6 epochs and the same
  steps, seeds 0, 1, 2. A first run with no lr decay, batches 128-1024
  and 2 seeds was too noisy to read (final-epoch test errors with seed
  std up to 16 pp at a constant lr). Measured (768 s): at the same 6
  epochs larger batches lose for both methods (SR-ADAM 5.49 % at 128,
  9.41 at 512, 18.33 at 1024; 84 steps are too few); at the same steps
  SR-ADAM gains (4.19 % at 512, 4.01 at 1024: +1.30 ± 0.10 and +1.48 ±
  0.24 pp per seed) while BC-ADAM does not (3.34 % at 128, 4.97 and 6.23
  at 512 and 1024).
* ``paper``: CIFAR-10, VGG-9, conv kernels binary, Adam lr 0.01 divided by
  10 at epochs 82 and 122 of 160, batches 128, 256, 512, 1024, 2048, the
  same epochs only (``--set same_steps=true`` adds the same-steps rows, up
  to 2560 epochs at batch 2048); needs a GPU and the CIFAR files; not
  measured here (estimate ~1-2 h per method and batch size on one GPU).
* ``smoke``: digits, a tiny all-conv net (``8, M, 16``), conv kernels on
  ``±1``, lr 0.01, batches 32 and 128, 1 epoch and the same steps
  (seconds).

Command: ``python -m experiments.batch_size --scale cpu --out
results/batch_size``. Outputs: results.json, table.md, table.csv and
batch_size_<experiment>.png in ``--out``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from experiments import common
from experiments import table1
from qjax import methods as methods_lib

NAME = "batch_size"
METHODS = ("sr", "bc")


def config(scale: str = "cpu") -> dict:
  """The batch-size config at ``scale`` ("smoke", "cpu" or "paper").

  Each experiment's ``grid``: the quantized layers' grid, qjax.grids spec.
  """
  common.check_scale(scale)
  base = {"optimizer": "adam", "grid": "binary", "lr_decay_epochs": [],
          "methods": list(METHODS), "same_steps": False}
  if scale == "smoke":
    exp = {**base, "name": "digits/allconv", "dataset": "digits",
           **common.allconv_net("smoke"), "lr": 0.01, "epochs": 1,
           "batch_sizes": [32, 128], "same_steps": True,
           "seeds": [0, 1], "runtime": "seconds",
           "command": "python -m experiments.batch_size --scale smoke"}
  elif scale == "cpu":
    exp = {**base, "name": "mnist/allconv", "dataset": "mnist",
           **common.allconv_net("cpu"), "train_subset": 15000, "lr": 0.01,
           "epochs": 6, "lr_decay_epochs": table1.scaled_decays(6),
           "batch_sizes": [128, 512, 1024], "same_steps": True,
           "seeds": [0, 1, 2],
           "runtime": "about 13 min on 2 CPU cores (768 s measured)",
           "command": "python -m experiments.batch_size --scale cpu"}
  else:
    exp = {**base, "name": "cifar10/vgg9", "dataset": "cifar10",
           "model": "vgg9", "model_kwargs": {}, "mask": "conv",
           "normalize": True, "augment": True, "lr": 0.01,
           "lr_decay_epochs": [82, 122], "epochs": 160,
           "batch_sizes": [128, 256, 512, 1024, 2048], "seeds": [0],
           "runtime": ("not measured here (no GPU, no CIFAR); estimate "
                       "~1-2 h per method and batch size on one GPU"),
           "command": ("python -m experiments.batch_size --scale paper "
                       "--out results/batch_size_paper")}
  return {"name": NAME, "scale": scale, "experiments": [exp]}


def gain(errors: dict) -> dict:
  """How much a method gains from batches larger than the smallest.

  Args:
    errors: batch size -> test error (%) per seed, the seeds in the same
      order for every batch.

  Returns:
    ``{"best_batch", "gain", "pairs"}``: the batch with the lowest mean
    error, the smallest batch's mean error minus that lowest one (>= 0),
    and per larger batch the paired per-seed gain (smallest batch's error
    minus this batch's: mean, standard error, verdict; ``table1.paired``).
  """
  batches = sorted(errors)
  means = {b: float(np.mean(errors[b])) for b in batches}
  best = min(batches, key=lambda b: means[b])
  pairs = {b: table1.paired(errors[b], errors[batches[0]])
           for b in batches[1:]}
  return {"best_batch": best, "gain": means[batches[0]] - means[best],
          "pairs": pairs}


def statement(per_method: dict) -> dict:
  """Whether SR gains from larger batches, and more than BC does.

  Holds when SR-ADAM's gain at its best batch is resolved (beyond
  ``table1.RESOLVED_SE`` standard errors of the paired per-seed
  differences) and larger than BC-ADAM's gain at its best batch.

  Args:
    per_method: label -> batch size -> test error (%) per seed.
  """
  sr, bc = gain(per_method["SR-ADAM"]), gain(per_method["BC-ADAM"])
  best = sr["pairs"].get(sr["best_batch"])
  holds = bool(best and best["verdict"] == "holds"
               and sr["gain"] > bc["gain"])
  smallest = min(per_method["SR-ADAM"])

  def pairs_text(g):
    return ", ".join(
        f"{b}: {p['mean']:+.2f}" + ("" if p["se"] is None else
                                     f" ± {p['se']:.2f}")
        + f" ({p['verdict']})" for b, p in g["pairs"].items())
  text = (f"{'holds' if holds else 'does not hold'}: SR-ADAM's best batch "
          f"is {sr['best_batch']} ({sr['gain']:.2f} points below batch "
          f"{smallest}); BC-ADAM's best batch is {bc['best_batch']} "
          f"({bc['gain']:.2f} points below batch {smallest}); gain over "
          f"batch {smallest} per seed, pp: SR-ADAM {pairs_text(sr)}; "
          f"BC-ADAM {pairs_text(bc)}")
  return {"holds": holds, "sr": sr, "bc": bc, "text": text}


def same_steps_exp(exp: dict, batch: int) -> dict:
  """``exp`` with its epochs (and decay epochs) scaled by ``batch`` over the
  smallest batch, so ``batch`` takes about the smallest batch's steps."""
  return common.at_same_steps(exp, batch / min(exp["batch_sizes"]))


def _runs(exp: dict) -> list[tuple[str, int, dict]]:
  """``(budget, batch, exp)`` per trained row: every batch at the config's
  epochs, then (``same_steps``) every larger batch at the smallest batch's
  steps."""
  out = [("epochs", b, exp) for b in exp["batch_sizes"]]
  if exp.get("same_steps"):
    smallest = min(exp["batch_sizes"])
    out += [("steps", b, same_steps_exp(exp, b))
            for b in exp["batch_sizes"] if b != smallest]
  return out


def run_experiment(exp: dict, progress: bool = False) -> dict:
  """SR and BC at every batch size of one experiment: its runs, rows and
  statements."""
  t0 = time.time()
  rows, records = [], []
  for m in exp["methods"]:
    for budget, b, run_exp in _runs(exp):
      r = common.train_method(run_exp, m, batch_size=b,
                              label=methods_lib.label(m), progress=progress)
      records.append(r)
      rows.append({"method": r["label"], "batch_size": b, "budget": budget,
                   "epochs": run_exp["epochs"], "steps": r["steps"],
                   "test_error": common.error_summary(r["test_error"]),
                   "errors": [100 * float(v) for v in r["test_error"]],
                   "flips": common.final_flips(r), "seconds": r["seconds"],
                   "alpha_over_delta": common.alpha_over_delta_text(r)})
  smallest = min(exp["batch_sizes"])
  per_budget = {}
  for row in rows:
    # The smallest batch is the reference of both comparisons.
    for budget in ({"epochs", "steps"} if row["batch_size"] == smallest
                   else {row["budget"]}):
      per_budget.setdefault(budget, {}).setdefault(
          row["method"], {})[row["batch_size"]] = row["errors"]
  found = statement(per_budget["epochs"])
  if exp.get("same_steps"):
    found["same_steps"] = statement(per_budget["steps"])
  return {"name": exp["name"], "config": exp, "data": common.describe(exp),
          "runs": records, "rows": rows, "statement": found,
          "seconds": time.time() - t0}


def check(cfg: dict) -> None:
  """Refuses, before any training, a sweep that compares nothing.

  Raises:
    common.ConfigError: fewer than two distinct batch sizes.
  """
  for e in cfg["experiments"]:
    sizes = e.get("batch_sizes", [])
    if len(set(sizes)) < 2:
      raise common.ConfigError(
          f"{e['name']}: batch_sizes={sizes!r}: the batch-size experiment "
          "compares at least two distinct batch sizes "
          "(--set batch_sizes=[128,512]).")


def run(cfg: dict, out_dir: str | None = None, progress: bool = False) -> dict:
  """Trains SR and BC at every batch size of each experiment: at the same
  epochs (the paper) and, with ``same_steps``, at the same steps.

  Raises:
    common.ConfigError: fewer than two distinct batch sizes.
  """
  check(cfg)
  common.check_supported(cfg["experiments"])
  common.enable_compilation_cache()
  return common.run_each(NAME, cfg,
                         lambda exp: run_experiment(exp, progress),
                         table, write, out_dir)


def table(results: dict) -> str:
  lines = []
  for e in results["experiments"]:
    layers = list(e["rows"][0]["flips"])
    lines += [f"{e['name']}: test error and % of signs changed since init "
              f"at every batch size, at {e['config']['epochs']} epoch(s) "
              "(budget: epochs, the paper's)"
              + (" and at the smallest batch's steps (budget: steps)"
                 if e["config"].get("same_steps") else "")
              + f", mean over {len(e['config']['seeds'])} seed(s).", "",
              "| method | batch | budget | epochs | steps | α/Δ | "
              "test error (%) | " + " | ".join(
                  f"% changed {layer}" for layer in layers) + " |",
              "|---" * (len(layers) + 7) + "|"]
    for row in e["rows"]:
      lines.append(
          f"| {row['method']} | {row['batch_size']} | {row['budget']} | "
          f"{row['epochs']} | {row['steps']} | "
          f"{row['alpha_over_delta']} | "
          f"{common.fmt(row['test_error'])} | " + " | ".join(
              f"{row['flips'][layer]:.2f}" for layer in layers) + " |")
    found = e["statement"]
    lines += ["", f"- {e['name']}, same epochs: paper's finding (SR gains "
              f"from larger batches, more than BC) {found['text']}"]
    if "same_steps" in found:
      lines += [f"- {e['name']}, same steps: SR gains from larger batches, "
                f"more than BC: {found['same_steps']['text']}"]
    lines += [""]
  return "\n".join(lines).rstrip()


def write(results: dict, out_dir: str) -> None:
  common.write_json(out_dir, "results.json", results)
  if not results["experiments"]:
    return
  common.write_text(out_dir, "table.md", table(results) + "\n")
  common.write_rows(out_dir, "table.csv", [
      {"experiment": e["name"], "method": r["label"],
       "batch_size": r["batch_size"], "budget": row["budget"],
       "epochs": row["epochs"], "steps": r["steps"], "seed": seed,
       "test_error": err,
       "mean_percent_changed": sum(100 * v[i] for v in
                                   r["history"][-1]["sign_flips"].values())
       / max(len(r["history"][-1]["sign_flips"]), 1)}
      for e in results["experiments"]
      for r, row in zip(e["runs"], e["rows"])
      for i, (seed, err) in enumerate(zip(r["seeds"], r["test_error"]))])


def plot(results: dict, out_dir: str) -> list[str]:
  """Per experiment: test error and mean % changed vs batch size."""
  from qjax import plotting
  paths = []
  for e in results["experiments"]:
    fig, (ax_err, ax_flip) = plotting.figure(1, 2, figsize=(9, 3.6))
    smallest = min(r["batch_size"] for r in e["rows"])
    for method in dict.fromkeys(r["method"] for r in e["rows"]):
      color = plotting.method_color(method)
      for budget, style in (("epochs", "-"), ("steps", "--")):
        rows = [r for r in e["rows"] if r["method"] == method and (
            r["budget"] == budget or r["batch_size"] == smallest)]
        if budget == "steps" and len(rows) < 2:
          continue
        batches = [r["batch_size"] for r in rows]
        label = f"{method}, same {budget}"
        ax_err.errorbar(batches, [r["test_error"]["mean"] for r in rows],
                        yerr=[r["test_error"]["std"] for r in rows],
                        marker="o", capsize=3, color=color, ls=style,
                        label=label)
        ax_flip.plot(batches, [sum(r["flips"].values()) / len(r["flips"])
                               for r in rows], marker="o", color=color,
                     ls=style, label=label)
    batches = sorted({r["batch_size"] for r in e["rows"]})
    for ax, title in ((ax_err, "top-1 test error (%)"),
                      (ax_flip, "% signs changed since init (layer mean)")):
      ax.set_xscale("log", base=2)
      ax.set_xticks(batches, [str(b) for b in batches])
      ax.minorticks_off()
      ax.set_xlabel("batch size")
      ax.set_title(title)
    ax_err.legend()
    fig.suptitle(f"{e['name']} ({results['scale']})")
    safe = e["name"].replace("/", "_")
    paths.append(common.save_figure(fig, out_dir, f"batch_size_{safe}.png"))
  return paths


def summary(results: dict) -> str:
  return results["table_md"]


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
