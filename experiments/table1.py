"""Table 1 of Li et al. 2017: top-1 test error of binary-weight nets by method.

Claim tested: with binary weights, the top-1 test error orders as
ADAM (full precision) < BC-ADAM < Big SR-ADAM (SR-ADAM, batch 1024) <
SR-ADAM (batch 128), and R-ADAM is the worst (Li et al. 2017, Table 1).

Rows: ADAM (``fp``), BC-ADAM (``bc``), Big SR-ADAM (``sr`` at the big
batch, the same epochs as the others: the paper's setting, so 8x fewer
steps), Big SR-ADAM (same steps) (the big batch for 8x the epochs, at Big
SR-ADAM's chosen lr, when the experiment's ``big_same_steps`` is true),
SR-ADAM (``sr``), R-ADAM (``r``); every method uses Adam.

The paper's regime. What SR, R and BC do depends on the step relative to
the grid spacing, α/Δ (an Adam step is about α whatever the gradient's
scale). We read the paper's binary weights as ``±1`` (Δ = 2) trained with
Adam at lr 0.01: α/Δ = 0.01 / 2 = 0.005 (our reading: the PDF's exact
weight scaling was not available to us). With BatchNorm after every
quantized layer the weights' scale does not change the network's function,
so ``±1`` loses nothing. Every config here uses ``grid="binary"`` (``±1``)
and records α/Δ per quantized layer in its results. (qjax's default
``glorot`` grid, H about 0.036 for a 64-to-64 3x3 conv, Δ = 2H = 0.072,
would put lr 0.01 at α/Δ 0.14, 28 times the paper's.)

Each method at its own best learning rate: every row trains all of
``lrs`` for all seeds in one sweep, chooses the lr with the lowest mean
validation error (the last ``validation`` training examples, never trained
on) at the last epoch, and reports the test error at that lr; the whole lr
curve (validation error per lr) is reported too. The ordering is computed
from paired differences per seed at the chosen lrs, mean ± standard error:
a pair "holds" when the difference exceeds 2 standard errors, is
"reversed" below -2, and is "not resolved" between.

Scales (``config(scale)``):

* ``paper``: CIFAR-10 with VGG-9, VGG-BC, WRN-56-2, ResNet-56; CIFAR-100
  with ResNet-56; ImageNet with ResNet-18. Conv kernels binarized
  (``mask='conv'``) onto ``±1``, Adam lr 0.01 (α/Δ = 0.005) divided by 10
  at epochs 82 and 122 of 160 on CIFAR (30 and 60 of 90 on ImageNet),
  batch 128, big batch 1024; CIFAR augmented (pad 4, crop, flip) and
  normalized per channel. One lr, the paper's (no validation split, as the
  paper); ``--set lrs=[0.03,0.01,0.003,0.001] --set validation=5000`` runs
  the lr sweep. The same-steps Big SR-ADAM row is off (1280 epochs at batch
  1024); ``--set big_same_steps=true`` adds it. Needs a GPU and the CIFAR
  files (``python -m qjax.data fetch cifar10 --source
  cifar-10-binary.tar.gz``); each experiment's ``runtime`` and ``command``
  are in its config. ImageNet is streamed from the prepared TFDS
  ``imagenet2012`` (resize 256, center crop 224, normalized); without it the
  run stops at once with :class:`experiments.common.UnsupportedExperimentError`
  saying what is missing. Tested on TFDS's offline mock data only.
* ``cpu``: MNIST and Fashion-MNIST, downsampled 2x2 to 14x14 (to fit the
  budget), with an all-conv net (:class:`qjax.models.AllConv`,
  ``16, M, 32, M, 64``, global average pooling, a Dense classifier): the
  conv kernels, all binary, are 96 % of its parameters (23,184 of 24,138).
  The first 18,000 training images, the last 3,000 of them held out for
  validation, the full 10,000-image test set; 3 seeds; lrs 0.3, 0.1, 0.03,
  0.01 (α/Δ 0.15, 0.05, 0.015, 0.005: from the paper's 0.005 up; a first
  run over 0.1 to 0.003 found lr 0.003 the worst for every method and Big
  SR-ADAM's best at the top of the range);
  6 epochs, lr divided by 10 at epochs 3 and 5 (the paper's 82/160 and
  122/160 of the epochs, rounded). Budget: at most 20 minutes on 2 cores
  (the step cost was measured first: 7.3 ms per batch-128 SR step of this
  net, one config, XLA:CPU). Measured (both datasets, 1077 s in all): the
  ordering holds beyond 2 standard errors except Big SR-ADAM < SR-ADAM,
  reversed on both (Big SR-ADAM at the same epochs takes 8x fewer steps
  and its validation error is still falling at the end); at the same
  steps Big SR-ADAM beats SR-ADAM on both, by 1.5 and 2.4 pp. On
  Fashion-MNIST Big SR-ADAM at the same epochs is also behind R-ADAM.
* ``smoke``: scikit-learn's 8x8 digits, a tiny all-conv net, 2 epochs, 2
  seeds, 2 lrs (seconds).

Command: ``python -m experiments.table1 --scale cpu --out results/table1``
(``--scale smoke`` in seconds; ``--scale paper --only cifar10/vgg9`` for one
paper experiment). Outputs: results.json, table.md, table.csv,
table1_errors.png and table1_curves.png in ``--out``.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from experiments import common

NAME = "table1"
# (label, method, uses the big batch, the big batch at the same steps); the
# paper's row order, with the same-steps Big SR-ADAM row after its own.
ROWS = (("ADAM", "fp", False, False), ("BC-ADAM", "bc", False, False),
        ("Big SR-ADAM", "sr", True, False),
        ("Big SR-ADAM (same steps)", "sr", True, True),
        ("SR-ADAM", "sr", False, False), ("R-ADAM", "r", False, False))
PAPER_ORDER = ("ADAM", "BC-ADAM", "Big SR-ADAM", "SR-ADAM")
WORST = "R-ADAM"
SAME_STEPS = "Big SR-ADAM (same steps)"
# The paper's CIFAR schedule: lr / 10 at epochs 82 and 122 of 160.
PAPER_DECAYS = (82 / 160, 122 / 160)
# A pair of mean errors is resolved when it differs by this many standard
# errors of the paired per-seed differences.
RESOLVED_SE = 2.0

CIFAR_RUNTIME = ("not measured here (no GPU, no CIFAR files); estimate on one"
                 " modern GPU: {} per method and seed, x5 rows")


def _paper_cifar(dataset: str, model: str, runtime: str) -> dict:
  name = f"{dataset}/{model}"
  return {
      "name": name, "dataset": dataset, "model": model, "model_kwargs": {},
      "normalize": True, "augment": True, "mask": "conv", "grid": "binary",
      "optimizer": "adam", "lrs": [0.01], "validation": None,
      "big_same_steps": False, "lr_decay_epochs": [82, 122],
      "epochs": 160, "batch_size": 128, "big_batch_size": 1024,
      "seeds": [0, 1], "runtime": CIFAR_RUNTIME.format(runtime),
      "command": (f"python -m qjax.data fetch {dataset} --source "
                  f"<{dataset.replace('cifar', 'cifar-')}-binary.tar.gz> && "
                  f"python -m experiments.table1 --scale paper --only {name}"
                  f" --out results/table1_paper"),
  }


def _paper() -> list[dict]:
  imagenet = {
      "name": "imagenet2012/resnet18", "dataset": "imagenet2012",
      "model": "resnet18", "model_kwargs": {}, "normalize": True,
      "augment": False, "mask": "conv", "grid": "binary", "optimizer": "adam",
      "lrs": [0.01], "validation": None, "big_same_steps": False,
      "lr_decay_epochs": [30, 60], "epochs": 90, "batch_size": 128,
      "big_batch_size": 1024, "seeds": [0],
      "runtime": ("not measured; days on one GPU (90 epochs of 1.28M "
                  "images streamed from TFDS through the host)"),
      "command": ("python -m experiments.table1 --scale paper --only "
                  "imagenet2012/resnet18  # needs the prepared TFDS "
                  "imagenet2012"),
  }
  return [_paper_cifar("cifar10", "vgg9", "~1-2 h"),
          _paper_cifar("cifar10", "vgg_bc", "~2-3 h"),
          _paper_cifar("cifar10", "wrn56_2", "~6-10 h"),
          _paper_cifar("cifar10", "resnet56", "~3-5 h"),
          _paper_cifar("cifar100", "resnet56", "~3-5 h"), imagenet]


def scaled_decays(epochs: int) -> list[int]:
  """The paper's decay epochs (82 and 122 of 160) scaled to ``epochs``."""
  return sorted({max(1, round(f * epochs)) for f in PAPER_DECAYS
                 if round(f * epochs) < epochs})


def _cpu() -> list[dict]:
  def allconv(dataset):
    return {
        "name": f"{dataset}/allconv", "dataset": dataset,
        **common.allconv_net("cpu"), "train_subset": 18000,
        "validation": 3000, "grid": "binary", "optimizer": "adam",
        "lrs": [0.3, 0.1, 0.03, 0.01], "epochs": 6,
        "lr_decay_epochs": scaled_decays(6), "batch_size": 128,
        "big_batch_size": 1024, "big_same_steps": True, "seeds": [0, 1, 2],
        "runtime": "about 9 min on 2 CPU cores",
        "command": (f"python -m experiments.table1 --scale cpu --only "
                    f"{dataset}/allconv"),
    }
  return [allconv("mnist"), allconv("fashion_mnist")]


def _smoke() -> list[dict]:
  return [{
      "name": "digits/allconv", "dataset": "digits",
      **common.allconv_net("smoke"), "validation": 297, "grid": "binary",
      "optimizer": "adam",
      "lrs": [0.03, 0.003], "lr_decay_epochs": [], "epochs": 2,
      "batch_size": 64, "big_batch_size": 256, "big_same_steps": True,
      "seeds": [0, 1], "runtime": "seconds",
      "command": "python -m experiments.table1 --scale smoke",
  }]


def config(scale: str = "cpu") -> dict:
  """The Table 1 config at ``scale`` ("smoke", "cpu" or "paper").

  Each experiment's ``grid``: the quantized layers' grid, qjax.grids spec;
  ``lrs``: the learning rates each method chooses from on the validation
  split (``validation``, required when there is more than one lr).
  """
  common.check_scale(scale)
  experiments = {"smoke": _smoke, "cpu": _cpu, "paper": _paper}[scale]()
  return {"name": NAME, "scale": scale,
          "rows": [{"label": label, "method": m, "big_batch": b,
                    "same_steps": same}
                   for label, m, b, same in ROWS],
          "experiments": experiments}


def check(cfg: dict) -> None:
  """Refuses, before any training, an lr choice that would need the test set.

  Raises:
    common.ConfigError: more than one lr and no validation split.
  """
  for e in cfg["experiments"]:
    if len(e.get("lrs", [])) > 1 and not e.get("validation"):
      raise common.ConfigError(
          f"{e['name']}: choosing among lrs {e['lrs']} needs a validation "
          "split (--set validation=5000); the test set is never used to "
          "choose.")


def paired(lower: list, higher: list) -> dict:
  """``higher - lower`` per seed (pp): mean, standard error and verdict."""
  d = np.asarray(higher, np.float64) - np.asarray(lower, np.float64)
  mean = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None
  if se is None:
    verdict = "holds (1 seed)" if mean > 0 else "reversed (1 seed)"
  elif mean > RESOLVED_SE * se:
    verdict = "holds"
  elif mean < -RESOLVED_SE * se:
    verdict = "reversed"
  else:
    verdict = "not resolved"
  return {"mean": mean, "se": se, "n": int(d.size), "verdict": verdict}


def ordering(errors: dict) -> dict:
  """Whether ADAM < BC-ADAM < Big SR-ADAM < SR-ADAM and R-ADAM is worst.

  Args:
    errors: label -> test error (%) per seed, the seeds in the same order
      for every label (differences are paired by seed).

  Returns:
    ``{"holds", "pairs", "r_worst", "same_steps", "text"}``: each pair is
    :func:`paired` of (lower, higher) with its labels; ``holds`` is true
    when every pair of the chain and every R-ADAM pair holds (beyond
    ``RESOLVED_SE`` standard errors).
  """
  def pair(a, b):
    return {"lower": a, "higher": b, **paired(errors[a], errors[b])}
  chain = [pair(a, b) for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:])]
  worst = [pair(k, WORST) for k in PAPER_ORDER]
  extra = ([pair(SAME_STEPS, "SR-ADAM")] if SAME_STEPS in errors else [])
  holds = all(p["verdict"] == "holds" for p in chain + worst)

  def line(p):
    se = "" if p["se"] is None else f" ± {p['se']:.2f}"
    return (f"{p['lower']} < {p['higher']}: {p['mean']:+.2f}{se} pp "
            f"({p['verdict']})")
  text = ("holds" if holds else "does not hold") + ": " + "; ".join(
      line(p) for p in chain + worst + extra)
  return {"holds": holds, "pairs": chain, "r_worst": worst,
          "same_steps": extra, "text": text}


def _row_experiment(exp: dict, row: dict, records: dict) -> dict | None:
  """The experiment as this row trains it (None: the row is off)."""
  if not row["same_steps"]:
    return exp
  if not exp.get("big_same_steps"):
    return None
  factor = exp["big_batch_size"] / exp["batch_size"]
  return {**common.at_same_steps(exp, factor),
          "lrs": [records["Big SR-ADAM"]["best_lr"]]}


def run_experiment(exp: dict, rows, progress: bool = False) -> dict:
  """Trains every row of one experiment; its records, table and ordering."""
  t0 = time.time()
  records = {}
  for row in rows:
    row_exp = _row_experiment(exp, row, records)
    if row_exp is None:
      continue
    batch = exp["big_batch_size"] if row["big_batch"] else exp["batch_size"]
    record = common.train_method(row_exp, row["method"], batch_size=batch,
                                 label=row["label"], progress=progress)
    records[row["label"]] = {**common.choose_lr(record),
                             "epochs": row_exp["epochs"]}
  summaries = {k: common.error_summary(r["test_error"])
               for k, r in records.items()}
  errors = {k: (np.asarray(r["test_error"]) * 100).tolist()
            for k, r in records.items()}
  return {"name": exp["name"], "config": exp, "data": common.describe(exp),
          "rows": list(records.values()), "summary": summaries,
          "ordering": ordering(errors), "seconds": time.time() - t0}


def run(cfg: dict, out_dir: str | None = None, progress: bool = False) -> dict:
  """Runs every experiment of ``cfg``; writes results if ``out_dir``.

  Raises:
    UnsupportedExperimentError: before any training, if ``cfg`` holds an
      experiment the engine cannot run (ImageNet).
    ConfigError: several lrs without a validation split.
    DatasetNotFoundError: a dataset is not in the cache.
  """
  check(cfg)
  common.check_supported(cfg["experiments"])
  common.enable_compilation_cache()
  return common.run_each(
      NAME, cfg, lambda exp: run_experiment(exp, cfg["rows"], progress),
      table, write, out_dir)


def _tail_change(curve: list | None) -> float | None:
  """Change of the validation error (pp) over the last quarter of epochs."""
  if not curve or len(curve) < 2:
    return None
  start = min(len(curve) - 2, int(math.floor(0.75 * len(curve))) - 1)
  return curve[-1] - curve[max(start, 0)]


def table(results: dict) -> str:
  """Markdown: error per method x experiment, lr curves, details, ordering."""
  exps = results["experiments"]
  labels = [r["label"] for r in exps[0]["rows"]]
  head = "| method | " + " | ".join(e["name"] for e in exps) + " |"
  lines = ["Top-1 test error (%) at each method's lr chosen on validation, "
           "mean ± std over seeds; (lr, α/Δ of the quantized layers).", "",
           head, "|---" * (len(exps) + 1) + "|"]
  for label in labels:
    cells = []
    for e in exps:
      r = {x["label"]: x for x in e["rows"]}.get(label)
      cells.append("-" if r is None else
                   f"{common.fmt(e['summary'][label])} (lr {r['best_lr']:g}, "
                   f"α/Δ {common.alpha_over_delta_text(r, r['best_index'])})")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  for e in exps:
    lrs = e["rows"][0]["lrs"]
    if len(lrs) < 2:
      continue
    lines += ["", f"{e['name']}: validation error (%) per lr, mean ± std "
              "(chosen lr in bold); last column: change of the chosen lr's "
              "validation error over the last quarter of epochs (pp).", "",
              "| method | " + " | ".join(f"lr {v:g}" for v in lrs)
              + " | tail change |", "|---" * (len(lrs) + 2) + "|"]
    for r in e["rows"]:
      if r["val_by_lr"] is None or r["lrs"] != lrs:
        continue
      cells = [("**" if i == r["best_index"] else "") + common.fmt(v)
               + ("**" if i == r["best_index"] else "")
               for i, v in enumerate(r["val_by_lr"])]
      tail = _tail_change(r["val_curve"])
      lines.append(f"| {r['label']} | " + " | ".join(cells) +
                   f" | {'-' if tail is None else f'{tail:+.2f}'} |")
  lines += ["", "| experiment | train / val / test examples | image | "
            "epochs | seeds | lrs | batch (steps) per row | seconds |",
            "|---|---|---|---|---|---|---|---|"]
  for e in exps:
    c, d = e["config"], e["data"]
    steps = ", ".join(f"{r['label']} {r['batch_size']} ({r['steps']})"
                      for r in e["rows"])
    lines.append(
        f"| {e['name']} | {d['train_examples']} / "
        f"{d.get('validation_examples', 0)} / {d['test_examples']} | "
        f"{'x'.join(map(str, d.get('image_shape', [])))} | {c['epochs']} | "
        f"{len(c['seeds'])} | {', '.join(f'{v:g}' for v in c['lrs'])} | "
        f"{steps} | {e['seconds']:.0f} |")
  lines += ["", "Paper's ordering (ADAM < BC-ADAM < Big SR-ADAM < SR-ADAM, "
            "R-ADAM worst), paired differences per seed at the chosen lrs, "
            f"mean ± standard error; holds beyond {RESOLVED_SE:g} s.e.:", ""]
  lines += [f"- {e['name']}: {e['ordering']['text']}" for e in exps]
  return "\n".join(lines)


def write(results: dict, out_dir: str) -> None:
  common.write_json(out_dir, "results.json", results)
  if not results["experiments"]:
    return
  common.write_text(out_dir, "table.md", table(results) + "\n")
  common.write_rows(out_dir, "table.csv", [
      {"experiment": e["name"], "method": r["label"],
       "batch_size": r["batch_size"], "steps": r["steps"], "lr": b["lr"],
       "chosen": b["lr"] == r["best_lr"], "seed": s,
       "val_error": (b["history"][-1]["val_error"][i]
                     if "val_error" in b["history"][-1] else ""),
       "test_error": b["test_error"][i]}
      for e in results["experiments"] for r in e["rows"]
      for b in r["by_lr"] for i, s in enumerate(r["seeds"])])


def plot(results: dict, out_dir: str) -> list[str]:
  """Test error per method at its chosen lr; validation curves and lr curves."""
  from matplotlib import ticker

  from qjax import plotting
  exps = results["experiments"]
  fig, axes = plotting.figure(1, len(exps), figsize=(4.6 * len(exps), 3.8),
                              squeeze=False)
  for ax, e in zip(axes[0], exps):
    labels = [r["label"] for r in e["rows"]]
    mean = [e["summary"][label]["mean"] for label in labels]
    std = [e["summary"][label]["std"] for label in labels]
    ax.bar(range(len(labels)), mean, yerr=std, capsize=3,
           color=[plotting.method_color(label.split(" (")[0])
                  for label in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("top-1 test error (%)")
    ax.set_title(f"{e['name']} ({results['scale']})")
    for i, m in enumerate(mean):
      ax.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8)
  paths = [common.save_figure(fig, out_dir, "table1_errors.png")]
  if any(r["val_curve"] for e in exps for r in e["rows"]):
    fig, axes = plotting.figure(2, len(exps), figsize=(4.6 * len(exps), 7.0),
                                squeeze=False)
    for j, e in enumerate(exps):
      top, bottom = axes[0][j], axes[1][j]
      for r in e["rows"]:
        color = plotting.method_color(r["label"].split(" (")[0])
        style = "--" if r["label"] == SAME_STEPS else "-"
        if r["val_by_lr"] and len(r["lrs"]) > 1:
          top.plot(r["lrs"], [v["mean"] for v in r["val_by_lr"]], style,
                   marker="o", color=color, label=r["label"])
        if r["val_curve"]:
          steps = np.arange(1, len(r["val_curve"]) + 1) * r["steps_per_epoch"]
          bottom.plot(steps, r["val_curve"], style, color=color,
                      label=r["label"])
      top.set_xscale("log")
      top.set_yscale("log")
      top.set_xlabel("learning rate")
      top.set_ylabel("validation error (%)")
      top.set_title(f"{e['name']}: lr curve")
      bottom.set_xscale("log")
      bottom.set_yscale("log")
      bottom.set_xlabel("steps")
      bottom.set_ylabel("validation error (%) at the chosen lr")
      bottom.set_title(f"{e['name']}: training curves")
      top.legend(fontsize=7)
    paths.append(common.save_figure(fig, out_dir, "table1_curves.png"))
  return paths


def summary(results: dict) -> str:
  return results["table_md"]


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
