"""The Δ question: test error against the grid's resolution, and its bytes.

Claim tested (Li et al. 2017, Sections 4-5, on real nets): the convex
theory bounds SR's error floor by a term linear in the grid spacing Δ, so
SR-ADAM's gap to full precision should shrink about linearly as Δ shrinks
(more bits), while BC-ADAM, whose float iterate needs no fine grid to
accumulate small steps, should depend on Δ much less.

Arms, on the same net and data: ADAM (full precision, ``fp``), then
SR-ADAM (``sr``), R-ADAM (``r``) and BC-ADAM (``bc``) at each of ``bits``
bits, and Bop (``bop``) at 1 bit only (it flips signs, so it needs a
binary grid). ``B`` bits is the grid ``kbit:B``: ``2**B`` evenly spaced
levels on ``[-1, 1]``, Δ = 2 / (2**B - 1) (1 bit is the paper's ``±1``,
Δ = 2; 8 bits Δ = 2/255). With BatchNorm after every quantized (conv)
layer the weights' scale does not change the function, so a fixed
``[-1, 1]`` range loses nothing.

Each arm at its own best learning rate: all of ``lrs`` for all seeds in
one sweep, the lr with the lowest mean validation error (the last
``validation`` training examples) at the last epoch, the test error there
(:func:`experiments.common.choose_lr`); α/Δ of the chosen lr is reported
(at a fixed lr α/Δ grows 2**B-fold from 1 to B bits: the grid, not the
optimizer, changes). Bop's lr is the base optimizer's, for the layers it
does not flip (the classifier, BatchNorm); its threshold and gamma are
qjax's defaults (1e-8, 1e-4), not swept.

Computed statements (:func:`statements`):

* SR-ADAM's gap to ADAM per Δ: paired differences per seed, mean ±
  standard error (``experiments.table1.paired``); the slope of log(gap)
  against log(Δ) over the widths whose gap is resolved above 0 (1 is
  linear, as the convex floor), and whether the gap shrinks with Δ;
* each method's spread across bit widths (max - min of its mean test
  error, pp): BC-ADAM's against SR-ADAM's.

The memory/accuracy figure: test error against the train state's bytes
per config (:func:`qjax.memory_report`: codes, float parameters,
optimizer state, BatchNorm statistics; diagnostics counted too), every
arm; the Pareto front (no other arm has fewer bytes and lower error) is
marked in the table and drawn; train states within 1 % of each other's
bytes count as the same size there (``SAME_BYTES``).

Scales (``config(scale)``):

* ``paper``: CIFAR-10 with VGG-9 (conv kernels quantized, ``mask='conv'``),
  160 epochs, lr / 10 at epochs 82 and 122, batch 128, augmented and
  normalized; lrs 0.03, 0.01, 0.003, 0.001 chosen on a 5,000-image
  validation split; 2 seeds. At 1 bit lr 0.01 is the paper's α/Δ = 0.005.
  Not run here (no GPU, no CIFAR files).
* ``cpu``: MNIST downsampled to 14x14, the all-conv net of Table 1's CPU
  scale (``16, M, 32, M, 64``, conv kernels 96 % of the parameters), the
  first 10,000 training images with the last 2,000 held out for
  validation, the full test set; lrs 0.3, 0.1, 0.03, 0.01 (α/Δ at 1 bit
  0.15 down to the paper's 0.005; a first run over 0.1 to 0.003 found
  0.003 the worst for every arm and 0.1, the top, best for SR-ADAM at 1
  to 4 bits); 4 epochs, lr / 10 at epochs 2 and 3 (the paper's
  fractions); 3 seeds. Measured (494 s): test error ADAM 2.62 %;
  SR-ADAM 6.02, 3.89, 3.09, 3.19, 2.69 % at 1, 2, 3, 4, 8 bits; R-ADAM
  14.31, 8.50, 5.42, 5.15, 3.04 %; BC-ADAM 4.51, 3.64, 2.75, 3.05,
  2.72 %; Bop 14.30 %. SR's gap to ADAM shrinks from 3.39 ± 0.44 pp at
  Δ = 2 to within noise at 3 and 8 bits, with a log-log slope of 0.65 over
  the resolved gaps (sublinear: Δ 15x smaller from 1 to 4 bits, the gap
  6x); BC's spread over bit widths (1.79 pp) is about half SR's (3.32).
* ``smoke``: scikit-learn's 8x8 digits, a tiny all-conv net, 1 and 2
  bits, 2 seeds, 2 lrs, 1 epoch (seconds).

Command: ``python -m experiments.bit_width --scale cpu --out
results/bit_width`` (``--set bits=[1,2,4]`` or ``--set methods=[\"sr\",\"bc\"]``
for fewer arms). Outputs: results.json, table.md, table.csv,
bit_width_error_vs_delta.png and bit_width_pareto.png in ``--out``.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from experiments import common
from experiments import table1

NAME = "bit_width"
# method -> the table's label; ADAM (fp) is always trained, once.
METHODS = {"sr": "SR-ADAM", "r": "R-ADAM", "bc": "BC-ADAM", "bop": "Bop"}
BINARY_ONLY = ("bop",)
MAX_BITS = 16  # qjax.grids' kbit limit


def grid_for(bits: int) -> str:
  """The qjax grid spec of ``bits`` bits: ``2**bits`` levels on [-1, 1]."""
  return f"kbit:{bits}"


def delta(bits: int) -> float:
  """The spacing of :func:`grid_for`'s grid: 2 / (2**bits - 1)."""
  return 2.0 / (2 ** bits - 1)


def arms(exp: dict) -> list[dict]:
  """ADAM, then each method at each bit width (Bop at 1 bit only)."""
  out = [{"label": "ADAM", "method": "fp", "bits": None}]
  for method in exp["methods"]:
    for bits in exp["bits"]:
      if method in BINARY_ONLY and bits != 1:
        continue
      out.append({"label": f"{METHODS[method]} {bits}b", "method": method,
                  "bits": bits})
  return out


def check(cfg: dict) -> None:
  """Refuses bad arms before any training.

  Raises:
    common.ConfigError: unknown methods, bit widths outside 1..16 or
      repeated, Bop without 1 bit, several lrs without validation.
  """
  table1.check(cfg)
  for e in cfg["experiments"]:
    name = e["name"]
    methods, bits = e["methods"], e["bits"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
      raise common.ConfigError(
          f"{name}: methods must be distinct, non-empty, from "
          f"{sorted(METHODS)}; got {methods}")
    if (not bits or len(set(bits)) != len(bits) or
        not all(isinstance(b, int) and not isinstance(b, bool)
                and 1 <= b <= MAX_BITS for b in bits)):
      raise common.ConfigError(
          f"{name}: bits must be distinct ints in 1..{MAX_BITS}; got {bits}")
    for m in methods:
      if m in BINARY_ONLY and 1 not in bits:
        raise common.ConfigError(
            f"{name}: {METHODS[m]} flips signs and runs at 1 bit only; "
            f"bits {bits} has no 1 (add 1 or drop {m!r} from methods)")


def _paper() -> list[dict]:
  return [{
      "name": "cifar10/vgg9", "dataset": "cifar10", "model": "vgg9",
      "model_kwargs": {}, "normalize": True, "augment": True, "mask": "conv",
      "optimizer": "adam", "lrs": [0.03, 0.01, 0.003, 0.001],
      "validation": 5000, "lr_decay_epochs": [82, 122], "epochs": 160,
      "batch_size": 128, "seeds": [0, 1], "bits": [1, 2, 3, 4, 8],
      "methods": ["sr", "r", "bc", "bop"],
      "runtime": ("not measured here (no GPU, no CIFAR files); estimate on "
                  "one modern GPU: ~1-2 h per arm, 17 arms"),
      "command": ("python -m qjax.data fetch cifar10 --source "
                  "<cifar-10-binary.tar.gz> && python -m experiments."
                  "bit_width --scale paper --out results/bit_width_paper"),
  }]


def _cpu() -> list[dict]:
  return [{
      "name": "mnist/allconv", "dataset": "mnist", **common.allconv_net("cpu"),
      "train_subset": 10000, "validation": 2000, "optimizer": "adam",
      "lrs": [0.3, 0.1, 0.03, 0.01],
      "epochs": 4, "lr_decay_epochs": table1.scaled_decays(4),
      "batch_size": 128, "seeds": [0, 1, 2], "bits": [1, 2, 3, 4, 8],
      "methods": ["sr", "r", "bc", "bop"],
      "runtime": "about 8-10 min on 2 CPU cores (494 s measured)",
      "command": "python -m experiments.bit_width --scale cpu",
  }]


def _smoke() -> list[dict]:
  return [{
      "name": "digits/allconv", "dataset": "digits",
      **common.allconv_net("smoke"), "validation": 297, "optimizer": "adam",
      "lrs": [0.03, 0.003],
      "epochs": 1, "lr_decay_epochs": [], "batch_size": 64, "seeds": [0, 1],
      "bits": [1, 2], "methods": ["sr", "r", "bc", "bop"],
      "runtime": "seconds",
      "command": "python -m experiments.bit_width --scale smoke",
  }]


def config(scale: str = "cpu") -> dict:
  """The bit-width config at ``scale`` ("smoke", "cpu" or "paper").

  Each experiment's ``bits``: the grids ``kbit:B`` trained; ``methods``:
  of ``sr``, ``r``, ``bc``, ``bop`` (1 bit only); ``lrs``: each arm's
  choices, on the ``validation`` split.
  """
  common.check_scale(scale)
  experiments = {"smoke": _smoke, "cpu": _cpu, "paper": _paper}[scale]()
  return {"name": NAME, "scale": scale, "experiments": experiments}


def _least_squares_slope(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x = x - x.mean()
  return float((x * (y - y.mean())).sum() / (x * x).sum())


def statements(rows: list[dict]) -> dict:
  """SR's gap to ADAM against Δ, and each method's spread over bit widths.

  Args:
    rows: per arm ``{"label", "method", "bits", "delta", "errors"}``, the
      errors (%) per seed in the same seed order for every arm; one row
      with method ``fp``.

  Returns:
    ``{"gaps": {method: [{bits, delta, mean, se, n, verdict}]},
    "sr_slope" (log gap / log Δ over the resolved positive gaps; None with
    fewer than 2), "sr_shrinks" (the gap's mean falls as Δ falls, every
    step), "spread": {method: pp}, "text"}``.
  """
  fp = next(r for r in rows if r["method"] == "fp")
  gaps, spread = {}, {}
  for method in dict.fromkeys(r["method"] for r in rows if r["bits"]):
    mine = sorted((r for r in rows if r["method"] == method),
                  key=lambda r: -r["delta"])
    gaps[method] = [{"bits": r["bits"], "delta": r["delta"],
                     **table1.paired(fp["errors"], r["errors"])}
                    for r in mine]
    means = [float(np.mean(r["errors"])) for r in mine]
    spread[method] = max(means) - min(means)
  sr = gaps.get("sr", [])
  resolved = [g for g in sr if g["verdict"] == "holds"]
  slope = (_least_squares_slope([math.log(g["delta"]) for g in resolved],
                                [math.log(g["mean"]) for g in resolved])
           if len({g["delta"] for g in resolved}) >= 2 else None)
  shrinks = (all(a["mean"] > b["mean"] for a, b in zip(sr, sr[1:]))
             if len(sr) >= 2 else None)

  def gap_text(g):
    se = "" if g["se"] is None else f" ± {g['se']:.2f}"
    return f"{g['bits']}b {g['mean']:+.2f}{se} pp ({g['verdict']})"
  parts = []
  if sr:
    parts.append("SR-ADAM's gap to ADAM, from Δ = 2 down: "
                 + ", ".join(gap_text(g) for g in sr))
    parts.append("it shrinks with Δ at every step" if shrinks else
                 "it does not shrink with Δ at every step")
    parts.append("log-log slope over the resolved gaps: "
                 + ("not computable (fewer than 2 resolved)" if slope is None
                    else f"{slope:.2f} (1 = linear, the convex floor)"))
  if "sr" in spread and "bc" in spread:
    parts.append(
        f"spread across bit widths: BC-ADAM {spread['bc']:.2f} pp, "
        f"SR-ADAM {spread['sr']:.2f} pp (BC "
        + ("depends on Δ less" if spread["bc"] < spread["sr"] else
           "does not depend on Δ less") + ")")
  return {"gaps": gaps, "sr_slope": slope, "sr_shrinks": shrinks,
          "spread": spread, "text": "; ".join(parts)}


# Train states within this fraction of each other's bytes count as the same
# size on the front: R's state is SR's less its 8-byte key, which alone
# should not put R on the front beside a more accurate SR.
SAME_BYTES = 0.01


def pareto(points: list[tuple[float, float]],
           same_bytes: float = SAME_BYTES) -> list[bool]:
  """Whether each (bytes, error) point is on the front: no other point has
  no more bytes and no more error, with fewer bytes or a lower error.

  Bytes within ``same_bytes`` (a fraction) of a point's count as the same
  (neither more nor fewer); ``same_bytes=0`` compares exactly.
  """
  def dominated(b, e):
    return any(b2 <= b * (1 + same_bytes) and e2 <= e
               and (b2 < b * (1 - same_bytes) or e2 < e)
               for b2, e2 in points)
  return [not dominated(b, e) for b, e in points]


def run_experiment(exp: dict, progress: bool = False) -> dict:
  """Trains every arm of one experiment; its rows, statements and front."""
  t0 = time.time()
  rows = []
  for arm in arms(exp):
    arm_exp = dict(exp)
    if arm["bits"] is not None:
      arm_exp["grid"] = grid_for(arm["bits"])
    record = common.choose_lr(common.train_method(
        arm_exp, arm["method"], batch_size=exp["batch_size"],
        label=arm["label"], progress=progress))
    errors = (np.asarray(record["test_error"]) * 100).tolist()
    rows.append({
        **arm, "delta": None if arm["bits"] is None else delta(arm["bits"]),
        "grid": arm_exp.get("grid"), "best_lr": record["best_lr"],
        "best_index": record["best_index"], "lrs": record["lrs"],
        "alpha_over_delta": record["alpha_over_delta"],
        "alpha_over_delta_best": record["alpha_over_delta_best"],
        "errors": errors, "summary": common.error_summary(
            record["test_error"]),
        "val_by_lr": record["val_by_lr"], "test_by_lr": record["test_by_lr"],
        "val_curve": record["val_curve"], "grids": record["grids"],
        "state_bytes": record["state_bytes"],
        "param_bytes": record["param_bytes"],
        "steps": record["steps"], "seconds": record["seconds"]})
  front = pareto([(r["state_bytes"], r["summary"]["mean"]) for r in rows])
  for r, on in zip(rows, front):
    r["pareto"] = on
  return {"name": exp["name"], "config": exp, "data": common.describe(exp),
          "rows": rows, "statements": statements(rows),
          "seconds": time.time() - t0}


def run(cfg: dict, out_dir: str | None = None, progress: bool = False) -> dict:
  """Runs every experiment of ``cfg``; writes results if ``out_dir``.

  Raises:
    ConfigError: bad methods or bits, several lrs without validation.
    UnsupportedExperimentError, DatasetNotFoundError: as the other
      experiments.
  """
  check(cfg)
  common.check_supported(cfg["experiments"])
  common.enable_compilation_cache()
  return common.run_each(NAME, cfg, lambda exp: run_experiment(exp, progress),
                         table, write, out_dir)


def _kib(n: int) -> str:
  return f"{n / 1024:.1f}"


def table(results: dict) -> str:
  """Markdown: error, lr, α/Δ and bytes per arm; the statements."""
  lines = []
  for e in results["experiments"]:
    d = e["data"]
    lines += [f"{e['name']}: top-1 test error (%) at each arm's lr chosen on "
              "validation, mean ± std over seeds; train state and parameters"
              " per config (KiB); * = on the Pareto front (bytes, error).",
              "", "| arm | grid | Δ | lr | α/Δ | test error | state KiB | "
              "params KiB | front |", "|---|---|---|---|---|---|---|---|---|"]
    for r in e["rows"]:
      dl = "-" if r["delta"] is None else f"{r['delta']:.3g}"
      aod = (common.alpha_over_delta_text(r, r["best_index"])
             if r["bits"] else "-")
      lines.append(
          f"| {r['label']} | {r['grid'] or 'float32'} | {dl} | "
          f"{r['best_lr']:g} | {aod} | {common.fmt(r['summary'])} | "
          f"{_kib(r['state_bytes'])} | {_kib(r['param_bytes'])} | "
          f"{'*' if r['pareto'] else ''} |")
    c = e["config"]
    lines += ["", f"{e['name']}: {d['train_examples']} train / "
              f"{d.get('validation_examples', 0)} validation / "
              f"{d['test_examples']} test examples, "
              f"{'x'.join(map(str, d.get('image_shape', [])))} images, "
              f"{c['epochs']} epochs, {len(c['seeds'])} seeds, lrs "
              f"{', '.join(f'{v:g}' for v in c['lrs'])}; {e['seconds']:.0f} s.",
              "", f"- {e['statements']['text']}", ""]
  return "\n".join(lines).rstrip() + "\n"


def write(results: dict, out_dir: str) -> None:
  common.write_json(out_dir, "results.json", results)
  if not results["experiments"]:
    return
  common.write_text(out_dir, "table.md", table(results))
  common.write_rows(out_dir, "table.csv", [
      {"experiment": e["name"], "arm": r["label"], "method": r["method"],
       "bits": r["bits"] or "", "delta": r["delta"] or "",
       "lr": r["best_lr"], "seed": s, "test_error": r["errors"][i],
       "state_bytes": r["state_bytes"], "param_bytes": r["param_bytes"],
       "pareto": r["pareto"]}
      for e in results["experiments"] for r in e["rows"]
      for i, s in enumerate(e["config"]["seeds"])])


def plot(results: dict, out_dir: str) -> list[str]:
  """Error against Δ per method; error against train-state bytes."""
  from qjax import plotting
  exps = results["experiments"]
  n = len(exps)
  fig, axes = plotting.figure(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
  for ax, e in zip(axes[0], exps):
    fp = next(r for r in e["rows"] if r["method"] == "fp")
    ax.axhline(fp["summary"]["mean"], color=plotting.method_color("ADAM"),
               ls="--", label="ADAM (float32)")
    for method in dict.fromkeys(r["method"] for r in e["rows"] if r["bits"]):
      mine = sorted((r for r in e["rows"] if r["method"] == method),
                    key=lambda r: r["delta"])
      label = METHODS[method]
      ax.errorbar([r["delta"] for r in mine],
                  [r["summary"]["mean"] for r in mine],
                  yerr=[r["summary"]["std"] for r in mine], marker="o",
                  capsize=3, color=plotting.method_color(label), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("grid spacing Δ (kbit:B on [-1, 1])")
    ax.set_ylabel("top-1 test error (%)")
    ax.set_title(f"{e['name']} ({results['scale']}): error vs Δ")
    ax.legend(fontsize=7)
  paths = [common.save_figure(fig, out_dir, "bit_width_error_vs_delta.png")]
  fig, axes = plotting.figure(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
  for ax, e in zip(axes[0], exps):
    for r in e["rows"]:
      label = "ADAM" if r["method"] == "fp" else METHODS[r["method"]]
      ax.scatter(r["state_bytes"] / 1024, r["summary"]["mean"],
                 color=plotting.method_color(label),
                 marker="o" if r["pareto"] else "x")
      ax.annotate(r["label"].replace("-ADAM", ""),
                  (r["state_bytes"] / 1024, r["summary"]["mean"]),
                  fontsize=6, xytext=(3, 2), textcoords="offset points")
    front = sorted((r["state_bytes"] / 1024, r["summary"]["mean"])
                   for r in e["rows"] if r["pareto"])
    ax.step([b for b, _ in front], [v for _, v in front], where="post",
            color="0.5", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("train state per config (KiB)")
    ax.set_ylabel("top-1 test error (%)")
    ax.set_title(f"{e['name']}: memory vs accuracy")
    ax.legend(fontsize=7)
  paths.append(common.save_figure(fig, out_dir, "bit_width_pareto.png"))
  return paths


def summary(results: dict) -> str:
  return results["table_md"]


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
