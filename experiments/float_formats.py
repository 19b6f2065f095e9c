"""Negative control: float32, bf16 and fp8 weights, round-to-nearest vs SR.

Claim tested (issue 14; the paper's R-vs-SR analysis on a floating-point
grid): with weights *stored* in a low-precision format and no float32
master copy, round-to-nearest (the paper's R) loses every update below half
the gap to the next representable value, so it falls behind stochastic
rounding (SR) as the learning rate shrinks, and stalls once the Adam step
is below half the local gap for (nearly) every weight; SR onto bf16 stays
close to float32 training.

Arms (``arms``: ``"METHOD:GRID"`` or ``"fp"``): float32 weights and Adam
(``fp``), R and SR onto bf16 (``r:bf16``, ``sr:bf16``), R and SR onto fp8
e4m3 (``r:fp8_e4m3``, ``sr:fp8_e4m3``); every arm uses Adam (float32
moments) at each learning rate of ``lrs``, for each seed of ``seeds``,
all of one arm's configs in one sweep (:func:`qjax.sweep.sweep`, with the
engine's strategy). Every *kernel* (``mask``
"all": dense and conv kernels, 99 % of the MLP's parameters) is stored in
the format; biases and BatchNorm parameters stay float32.

How this relates to the paper's convex analysis. On a uniform grid of
spacing Δ, R never moves a weight once ``α |g| < Δ/2`` and SR's error floor
grows like Δ (``√d Δ G / 2``; ``experiments.convex_floors``). On a float
format the spacing is relative: a weight ``w`` sits between neighbours at
distance about ``2**-m |w|`` (``m`` mantissa bits: 7 for bf16, 3 for fp8
e4m3), so Δ is the *relative ulp* times the weight's size. An Adam step is
about α whatever the gradient's scale, so R freezes a weight when
``α < Δ(w) / 2`` with ``Δ(w)`` the smaller of its two gaps. For each
learning rate the experiment reports, from the initial stored weights,

* ``predicted_frozen``: the fraction of quantized weights with
  ``α < Δ(w)/2`` (those an update of size α cannot move in either
  direction under R; Adam's steps are at most about α, so R should move at
  most the other ones);
* ``alpha_over_delta``: ``α / median Δ(w)``, the paper's α/Δ regime
  (α/Δ < 1/2 at the median: most of R's updates are lost);

and, measured at the end of training, ``moved``: the fraction of quantized
weights whose stored value differs from its initial value (never 100 %,
even for float32: the first layer's weights from MNIST's always-blank
border pixels get no gradient, about 6 % of the MLP's kernels). SR's floor on
the format scales with the relative ulp: 16 times larger on fp8 e4m3
(2**-3) than on bf16 (2**-7).

Scales (``config(scale)``):

* ``cpu``: full MNIST, MLP 784-256-256-10 (2 epochs) and SmallCNN with
  16 and 32 channels, hidden 64, on the first 6400 training and 2000 test
  images (2 epochs); Adam lr in {1e-2, 1e-3, 1e-4, 1e-5}, seeds 0, 1, 2;
  batch 128. 621 s measured on 2 shared CPU cores (10 arms x 12 configs;
  compilation cache cold).
* ``paper``: full MNIST, the default MLP and SmallCNN, 10 epochs, lr in
  {1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5}, 3 seeds; not measured here.
* ``smoke``: digits, a tiny MLP, 1 epoch, 2 lrs, 2 seeds (seconds).

Command: ``python -m experiments.float_formats --scale cpu --out
results/float_formats``. Outputs: results.json, table.md, runs.csv and
float_formats_<experiment>.png in ``--out``.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from qjax import formats
from qjax import grids as grids_lib
from qjax import memory as memory_lib
from qjax import methods as methods_lib
from qjax import quantizers
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

NAME = "float_formats"
ARMS = ("fp", "r:bf16", "sr:bf16", "r:fp8_e4m3", "sr:fp8_e4m3")
# The SR-vs-float32 gap (percentage points of test error) under which SR
# onto a format is called "close to float32" in the statement.
CLOSE_PP = 0.5


def config(scale: str = "cpu") -> dict:
  """The float-format config at ``scale`` ("smoke", "cpu" or "paper")."""
  common.check_scale(scale)
  base = {"optimizer": "adam", "mask": "all", "lr_decay_epochs": [],
          "batch_size": 128, "arms": list(ARMS)}
  if scale == "smoke":
    exps = [{**base, "name": "digits/mlp", "dataset": "digits",
             "model": "mlp", "model_kwargs": {"features": [32]},
             "lrs": [0.01, 0.0001], "seeds": [0, 1], "epochs": 1,
             "batch_size": 64, "runtime": "seconds"}]
  elif scale == "cpu":
    lrs = [0.01, 0.001, 0.0001, 0.00001]
    exps = [{**base, "name": "mnist/mlp", "dataset": "mnist", "model": "mlp",
             "model_kwargs": {"features": [256, 256]}, "lrs": lrs,
             "seeds": [0, 1, 2], "epochs": 2,
             "runtime": "about 4.5 min on 2 shared CPU cores (274 s "
                        "measured)"},
            {**base, "name": "mnist/cnn", "dataset": "mnist", "model": "cnn",
             "model_kwargs": {"features": [16, 32], "hidden": 64},
             "train_subset": 6400, "test_subset": 2000, "lrs": lrs,
             "seeds": [0, 1, 2], "epochs": 2,
             "runtime": "about 5.5 min on 2 shared CPU cores (318 s "
                        "measured)"}]
  else:
    lrs = [0.01, 0.003, 0.001, 0.0003, 0.0001, 0.00003, 0.00001]
    exps = [{**base, "name": f"mnist/{m}", "dataset": "mnist", "model": m,
             "model_kwargs": {}, "lrs": lrs, "seeds": [0, 1, 2],
             "epochs": 10, "runtime": "not measured here"}
            for m in ("mlp", "cnn")]
  for e in exps:
    e["command"] = (f"python -m experiments.float_formats --scale {scale} "
                    f"--only {e['name']}")
  return {"name": NAME, "scale": scale, "experiments": exps}


def parse_arm(text: str) -> tuple[str, str]:
  """``"sr:bf16"`` -> ``("sr", "bf16")``; ``"fp"`` -> ``("fp", "glorot")``.

  Raises:
    ValueError: an unknown method, a grid that is not a float format, or a
      quantizing method without a format.
  """
  method, _, grid = text.partition(":")
  if method not in methods_lib.names():
    raise ValueError(f"arm {text!r}: unknown method {method!r}; known: "
                     f"{', '.join(methods_lib.names())}.")
  quantized = methods_lib.get(method).quantized
  if not quantized:
    if grid:
      raise ValueError(f"arm {text!r}: {method} stores float32 weights and "
                       f"takes no grid; write it as {method!r}.")
    return method, "glorot"
  if not grid:
    raise ValueError(f"arm {text!r}: name the format, e.g. {method}:bf16.")
  if grids_lib.parse(grid).kind not in formats.FORMATS:
    raise ValueError(f"arm {text!r}: {grid!r} is not a floating-point "
                     "format (bf16, f16, fp8_e4m3, fp8_e5m2).")
  return method, grids_lib.parse(grid).kind


def arm_label(method: str, grid: str, optimizer: str = "adam") -> str:
  base = methods_lib.label(method, optimizer)
  if not methods_lib.get(method).quantized:
    return f"{base} [fp32]"
  return f"{base} [{grid}]"


def _train_config(exp: dict, method: str, grid: str) -> train_lib.TrainConfig:
  return train_lib.TrainConfig(
      method=method, optimizer=exp["optimizer"], mask=exp["mask"], grid=grid,
      batch_size=exp["batch_size"], epochs=exp["epochs"],
      lr_decay_epochs=tuple(exp["lr_decay_epochs"]))


def _quantized_leaves(params, mask: str) -> list:
  """The kernels ``mask`` selects, as a flat list (the same order always)."""
  selected = quantizers.resolve_mask(train_lib.MASKS[mask], params)
  return [p for p, m in zip(jax.tree.leaves(params),
                            jax.tree.leaves(selected)) if m]


def smaller_gap(leaf: np.ndarray, grid: str) -> np.ndarray:
  """Per weight of ``leaf`` (stored in the format), Δ(w): its smaller gap."""
  points = formats.FormatPoints(grids_lib.parse(grid).grid())
  k = points.index(jnp.asarray(leaf))
  up, down, _, _ = points.gaps(k)
  return np.asarray(jnp.minimum(up, down), np.float64)


def regime(init_leaves: list, grid: str, lrs) -> dict:
  """From initial stored kernels: predicted R-frozen fraction and α/Δ per lr.

  Returns ``{"median_delta", "median_relative_delta", "per_lr": [{"lr",
  "predicted_frozen", "alpha_over_delta"}]}``.
  """
  delta = np.concatenate([smaller_gap(np.asarray(p), grid).ravel()
                          for p in init_leaves])
  mags = np.concatenate([np.abs(np.asarray(p, np.float64)).ravel()
                         for p in init_leaves])
  med = float(np.median(delta))
  nonzero = mags > 0
  return {"median_delta": med,
          "median_relative_delta": float(np.median(delta[nonzero]
                                                   / mags[nonzero])),
          "per_lr": [{"lr": lr,
                      "predicted_frozen": float(np.mean(lr < delta / 2)),
                      "alpha_over_delta": lr / med} for lr in lrs]}


def _init_leaves(model, ds, config, seed: int, lr: float, mask: str) -> list:
  state = train_lib.init_state(model, config, jax.random.PRNGKey(seed),
                               jnp.asarray(ds.train_x[:config.batch_size]),
                               {"lr": jnp.float32(lr)})
  return [np.asarray(p) for p in _quantized_leaves(state.params, mask)]


def run_arm(exp: dict, arm: str, progress: bool = False) -> dict:
  """Trains every (seed, lr) of ``exp`` with ``arm``; a JSON-able record."""
  method, grid = parse_arm(arm)
  ds = common.dataset_for(exp)
  model = common.build_model(exp, ds.num_classes)
  config = _train_config(exp, method, grid)
  t0 = time.time()
  out = sweep_lib.sweep(model, ds, config, sweep_lib.SweepSpec(
      seeds=tuple(exp["seeds"]), lrs=tuple(exp["lrs"])),
      model_name=exp["model"], progress=progress)
  seconds = time.time() - t0
  final = out["final_state"]
  mem = memory_lib.memory_report(final)
  configs = out["configs"]
  final_leaves = _quantized_leaves(final.params, exp["mask"])
  inits = {s: _init_leaves(model, ds, config, s, exp["lrs"][0], exp["mask"])
           for s in exp["seeds"]}
  errors = np.asarray(out["history"][-1]["test_error"], np.float64)
  per_lr = []
  for lr in exp["lrs"]:
    rows = [i for i, c in enumerate(configs) if np.isclose(c["lr"], lr)]
    moved = []
    for i in rows:
      init = inits[configs[i]["seed"]]
      changed = sum(int(np.sum(np.asarray(f[i]) != p))
                    for f, p in zip(final_leaves, init))
      moved.append(changed / sum(p.size for p in init))
    per_lr.append({
        "lr": lr, "seeds": [configs[i]["seed"] for i in rows],
        "test_error": [float(errors[i]) for i in rows],
        "error": common.error_summary(errors[rows]),
        "moved": results_lib.summarize(moved)})
  quantized = methods_lib.get(method).quantized
  return {
      "arm": arm, "label": arm_label(method, grid, exp["optimizer"]),
      "method": method, "grid": grid if quantized else "float32",
      "per_lr": per_lr,
      "regime": regime(inits[exp["seeds"][0]], grid, exp["lrs"])
      if quantized else None,
      "state_bytes": int(mem["total"]),
      "param_bytes": int(mem["params"]),
      "memory": {k: mem[k] for k in memory_lib.CATEGORIES + ("total",)},
      "strategy": out["strategy"], "seconds": seconds,
      "steps": out["train_config"]["steps_per_epoch"] * exp["epochs"]}


def _paired(a: dict, b: dict, lr: float) -> dict:
  """err(a) - err(b) at ``lr``, per seed (percentage points): mean, std, se."""
  ra = next(r for r in a["per_lr"] if r["lr"] == lr)
  rb = next(r for r in b["per_lr"] if r["lr"] == lr)
  eb = dict(zip(rb["seeds"], rb["test_error"]))
  diffs = [100 * (e - eb[s]) for s, e in zip(ra["seeds"], ra["test_error"])
           if s in eb]
  out = results_lib.summarize(diffs)
  out["se"] = out["std"] / np.sqrt(out["n"]) if out["n"] > 1 else 0.0
  return out


def _best(arm: dict) -> dict:
  return min(arm["per_lr"], key=lambda r: r["error"]["mean"])


def statement(arms: list[dict]) -> dict:
  """R vs SR per format as the lr shrinks, and SR vs float32 at best lr."""
  by = {(a["method"], a["grid"]): a for a in arms}
  out, text = {}, []
  for fmt in sorted({a["grid"] for a in arms if a["grid"] != "float32"}):
    r, sr = by.get(("r", fmt)), by.get(("sr", fmt))
    if r is None or sr is None:
      continue
    lrs = sorted(x["lr"] for x in r["per_lr"])
    gaps = {lr: _paired(r, sr, lr) for lr in lrs}
    small, large = gaps[lrs[0]], gaps[lrs[-1]]
    behind = bool(small["mean"] > large["mean"]
                  and small["mean"] > 2 * small["se"])
    out[f"r_behind_sr_{fmt}"] = {"holds": behind, "gaps_pp": {
        str(lr): g for lr, g in gaps.items()}}
    text.append(
        f"{fmt}: R minus SR is {small['mean']:+.2f} ± {small['se']:.2f} pp "
        f"(mean ± s.e. over seeds) at lr {lrs[0]:g} against "
        f"{large['mean']:+.2f} ± {large['se']:.2f} at lr {lrs[-1]:g}: R "
        + ("falls behind SR as the lr shrinks" if behind else
           "does NOT fall clearly behind SR as the lr shrinks"))
    fp = by.get(("fp", "float32"))
    if fp is not None:
      b_sr, b_fp = _best(sr), _best(fp)
      diff = b_sr["error"]["mean"] - b_fp["error"]["mean"]
      close = bool(abs(diff) <= CLOSE_PP)
      out[f"sr_close_to_fp_{fmt}"] = {"holds": close, "diff_pp": diff,
                                      "sr_lr": b_sr["lr"], "fp_lr": b_fp["lr"]}
      text.append(
          f"{fmt}: SR at its best lr ({b_sr['lr']:g}) is {diff:+.2f} pp from "
          f"float32 at its best ({b_fp['lr']:g}): "
          + (f"close (within {CLOSE_PP} pp)" if close else
             f"NOT within {CLOSE_PP} pp"))
    frozen = [(x["lr"], x["predicted_frozen"], m["moved"]["mean"])
              for x, m in zip(r["regime"]["per_lr"], r["per_lr"])]
    consistent = all(moved <= 1 - pf + 0.01 for _, pf, moved in frozen)
    out[f"r_frozen_as_predicted_{fmt}"] = consistent
    text.append(f"{fmt}: R moved at most the weights not predicted frozen "
                f"(within 1 %): {consistent}")
  out["text"] = "; ".join(text)
  return out


def run(cfg: dict, out_dir: str | None = None, progress: bool = False) -> dict:
  """Every arm of every experiment; tables, statement, written to out_dir."""
  for e in cfg["experiments"]:  # fail on a bad value before any training
    try:
      if len(set(e["arms"])) != len(e["arms"]):
        raise ValueError(f"arms {e['arms']} repeat an arm.")
      for arm in e["arms"]:
        _train_config(e, *parse_arm(arm))
    except (ValueError, TypeError) as err:
      raise common.ConfigError(f"{e['name']}: {err}") from None
  common.check_values(cfg)
  common.check_supported(cfg["experiments"])
  common.enable_compilation_cache()
  t0 = time.time()
  results = {"name": NAME, "scale": cfg["scale"],
             "environment": results_lib.environment(), "experiments": []}
  for exp in cfg["experiments"]:
    t1 = time.time()
    arms = []
    for arm in exp["arms"]:
      arms.append(run_arm(exp, arm, progress=progress))
      if progress:
        print(f"{exp['name']} {arms[-1]['label']}: "
              f"{arms[-1]['seconds']:.0f} s", file=sys.stderr)
    results["experiments"].append({
        "name": exp["name"], "config": exp, "data": common.describe(exp),
        "arms": arms, "statement": statement(arms),
        "seconds": time.time() - t1})
  results["wall_seconds"] = time.time() - t0
  results["table_md"] = table(results)
  if out_dir:
    write(results, out_dir)
  return results


def table(results: dict) -> str:
  lines = []
  for e in results["experiments"]:
    lrs = e["config"]["lrs"]
    c = e["config"]
    lines += [f"{e['name']}: test error (%), mean ± std over "
              f"{len(c['seeds'])} seeds, after {c['epochs']} epoch(s), Adam "
              "at each lr; train state per config (qjax.memory_report).", "",
              "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs)
              + " | state (MiB) | params (MiB) |",
              "|---" * (len(lrs) + 3) + "|"]
    for a in e["arms"]:
      lines.append(f"| {a['label']} | " + " | ".join(
          common.fmt(r["error"]) for r in a["per_lr"])
          + f" | {a['state_bytes'] / 2**20:.3f} | "
          f"{a['param_bytes'] / 2**20:.3f} |")
    lines += ["", "Quantized kernels: predicted frozen under R (α < Δ(w)/2 "
              "at init) / measured moved at the end, % of weights; α/Δ at "
              "the median weight.", "",
              "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
              "|---" * (len(lrs) + 1) + "|"]
    for a in e["arms"]:
      if a["regime"] is None:
        continue
      cells = [f"{100 * g['predicted_frozen']:.1f} / "
               f"{100 * r['moved']['mean']:.1f} "
               f"(α/Δ {g['alpha_over_delta']:.2g})"
               for g, r in zip(a["regime"]["per_lr"], a["per_lr"])]
      lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"- {e['name']}: {e['statement']['text']}", ""]
  return "\n".join(lines).rstrip()


def write(results: dict, out_dir: str) -> None:
  common.write_json(out_dir, "results.json", results)
  common.write_text(out_dir, "table.md", results["table_md"] + "\n")
  common.write_rows(out_dir, "runs.csv", [
      {"experiment": e["name"], "arm": a["label"], "lr": r["lr"],
       "seed": s, "test_error": err, "moved_mean": r["moved"]["mean"],
       "state_bytes": a["state_bytes"]}
      for e in results["experiments"] for a in e["arms"]
      for r in a["per_lr"] for s, err in zip(r["seeds"], r["test_error"])])


def plot(results: dict, out_dir: str) -> list[str]:
  """Per experiment: test error vs lr, and % of kernels moved vs lr."""
  from qjax import plotting
  paths = []
  for e in results["experiments"]:
    fig, (ax_err, ax_mov) = plotting.figure(1, 2, figsize=(10, 3.8))
    for a in e["arms"]:
      lrs = [r["lr"] for r in a["per_lr"]]
      mean = np.array([r["error"]["mean"] for r in a["per_lr"]])
      std = np.array([r["error"]["std"] for r in a["per_lr"]])
      fp = a["regime"] is None
      color = "black" if fp else plotting.method_color(
          a["label"].split(" [")[0])
      style = "--" if "fp8" in a["grid"] else "-"
      # float32 drawn on top, thin: SR's curves lie on it.
      ax_err.errorbar(lrs, mean, yerr=std, marker="s" if fp else "o",
                      linestyle=style, color=color, label=a["label"],
                      capsize=3, zorder=3 if fp else 2,
                      linewidth=1 if fp else 1.8, markersize=4 if fp else 6)
      if a["regime"] is not None:
        moved = [100 * r["moved"]["mean"] for r in a["per_lr"]]
        ax_mov.plot(lrs, moved, marker="o", linestyle=style, color=color,
                    label=f"{a['label']} moved")
        if a["method"] == "r":
          free = [100 * (1 - g["predicted_frozen"])
                  for g in a["regime"]["per_lr"]]
          ax_mov.plot(lrs, free, linestyle=":" if style == "-" else "-.",
                      color="gray", marker="x",
                      label=f"not frozen at init, predicted ({a['grid']})")
    for ax in (ax_err, ax_mov):
      ax.set_xscale("log")
      ax.set_xlabel("Adam learning rate α")
    ax_err.set_yscale("log")
    ax_err.set_ylabel("test error (%)")
    ax_mov.set_ylabel("% of kernel weights moved from init")
    ax_err.legend(fontsize=7)
    ax_mov.legend(fontsize=7)
    fig.suptitle(f"{e['name']} ({results['scale']}): weights stored in the "
                 "format, no float32 copy")
    safe = e["name"].replace("/", "_")
    paths.append(common.save_figure(fig, out_dir, f"float_formats_{safe}.png"))
  return paths


def summary(results: dict) -> str:
  seconds = results["wall_seconds"]
  return results["table_md"] + f"\n\n{seconds:.0f} s of training"


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
