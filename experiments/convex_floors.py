"""Convex error floors of R, SR and BC (Li et al. 2017, Sec. 4).

Claim reproduced: on a strongly convex problem with stochastic gradients,
SR's excess loss has a floor that (a) does not shrink as the learning rate α
shrinks, (b) grows roughly linearly with the grid spacing Δ (bound
``√d Δ G / 2``) and (c) shrinks with a larger batch (smaller G); BC's float
latent approaches the optimum as α shrinks (quadratic: no floor with an
unbiased view); R stops moving once ``α |g| < Δ/2``.

Expected result: SR floor-vs-Δ log-log slope near 1 and floor-vs-α slope near
0; BC (stochastic view) excess-vs-α slope near 1; every R window with
``α ‖g‖_∞ < Δ/2`` has no move; measured floors under the bounds.

Scales (``config(scale)``):

* ``cpu``: Δ in {0.01, 0.02, 0.05, 0.1, 0.2}, SGD α in {0.01, 0.02, 0.05,
  0.1}, Adam α in {0.001, 0.003, 0.01, 0.03}, seeds 0 and 1, 10000 steps,
  every variant, logistic regression too; ~2.5 min on 2 shared CPU cores.
* ``paper``: the ``cpu`` settings (this numerical experiment is the paper's
  scale already; ``scale`` is recorded as ``"paper"``).
* ``smoke``: 2 Δ x 2 α, 1 seed, 1000 steps, SR, R and BC (Q_s) on least
  squares only (seconds).

Config keys (override with ``--set KEY=VALUE``): ``deltas``, ``lrs`` (SGD),
``adam_lrs``, ``seeds``, ``num_steps``, ``record_every``, ``big_batch``,
``variants`` (labels of ``VARIANTS``; SR, R and BC (Q_s view) are needed),
``logistic`` (also run logistic regression), ``theorem_steps``,
``theorem_t0``.

Command: ``python -m experiments.convex_floors --scale cpu --out
results/convex_floors`` (``--scale smoke`` in seconds). Outputs:
results.json and the convex_*.png figures in ``--out``.

Runs are :func:`qjax.theory.convex.sweep` (one jitted vmap over Δ × α × seed
per method), on ridge least squares (d = 16) and on logistic regression on
two digits classes (d = 65). The floor of a run is its mean excess loss over
the last quarter of its steps, averaged over seeds.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from experiments import common
from qjax import results as results_lib
from qjax.theory import convex

NAME = "convex_floors"

VARIANTS = {  # label -> RunConfig overrides
    "SR": dict(method="sr", optimizer="sgd"),
    "R": dict(method="r", optimizer="sgd"),
    "BC (Q_s view)": dict(method="bc", optimizer="sgd", bc_view="stochastic"),
    "BC (Q_d view)": dict(method="bc", optimizer="sgd", bc_view="nearest"),
    "FP": dict(method="fp", optimizer="sgd"),
    "SR-Adam": dict(method="sr", optimizer="adam"),
    "R-Adam": dict(method="r", optimizer="adam"),
    "BC-Adam": dict(method="bc", optimizer="adam", bc_view="nearest"),
}


def config(scale: str = "cpu") -> dict:
  """The settings at ``scale`` ("smoke", "cpu" or "paper" = "cpu")."""
  common.check_scale(scale)
  if scale == "smoke":
    settings = dict(deltas=[0.02, 0.1], lrs=[0.02, 0.1],
                    adam_lrs=[0.003, 0.01], seeds=[0], num_steps=1000,
                    record_every=50, big_batch=16,
                    variants=["SR", "R", "BC (Q_s view)"], logistic=False,
                    theorem_steps=1000, theorem_t0=50.0)
  else:  # "cpu"; "paper" uses it: the paper's numerical scale already.
    settings = dict(deltas=[0.01, 0.02, 0.05, 0.1, 0.2],
                    lrs=[0.01, 0.02, 0.05, 0.1],
                    adam_lrs=[0.001, 0.003, 0.01, 0.03], seeds=[0, 1],
                    num_steps=10000, record_every=100, big_batch=16,
                    variants=list(VARIANTS), logistic=True,
                    theorem_steps=20000, theorem_t0=50.0)
  return {"name": NAME, "scale": scale, **settings}


def _floor(excess):
  """Mean over the last quarter of records, then over seeds: ``[Δ, α]``."""
  q = max(1, excess.shape[-1] // 4)
  return excess[..., -q:].mean(-1).mean(-1)


def _slope(x, y):
  ok = (np.asarray(y) > 0)
  return float(np.polyfit(np.log(np.asarray(x)[ok]), np.log(np.asarray(y)[ok]),
                          1)[0])


def _sweep_problem(problem, cfg, labels, batch_size=1, progress=False):
  out = {}
  for label in labels:
    over = VARIANTS[label]
    lrs = cfg["adam_lrs"] if over["optimizer"] == "adam" else cfg["lrs"]
    rc = convex.RunConfig(num_steps=cfg["num_steps"],
                          record_every=cfg["record_every"],
                          batch_size=batch_size, **over)
    t0 = time.time()
    res = convex.sweep(problem, rc, cfg["deltas"], lrs, cfg["seeds"])
    G = np.sqrt(res["sq_grad"].max(axis=(-1, -2)))  # [Δ, α]
    out[label] = {
        "lrs": list(map(float, lrs)),
        "floor": _floor(res["excess"]),
        "floor_quantized": _floor(res["excess_quantized"]),
        "G": G,
        "curve": res["excess"].mean(2),  # [Δ, α, records]
        "moved_late": res["moved"][..., res["moved"].shape[-1] // 2:].mean(
            (-1, -2)),
        "moved": res["moved"], "max_step_inf": res["max_step_inf"],
        "seconds": time.time() - t0,
    }
    if progress:
      print(f"{NAME}: {problem.name}, {label}, batch {batch_size}: "
            f"{out[label]['seconds']:.0f} s", flush=True)
  return out


def _r_frozen_check(r, deltas):
  """R never moves in a window where ``α_t ‖g_t‖_∞ < Δ/2`` at every step."""
  d = np.asarray(deltas)[:, None, None, None]
  small = r["max_step_inf"] < d / 2
  return {"windows_small_step": int(small.sum()),
          "violations": int((r["moved"][small] > 0).sum()),
          "frozen_late_fraction": float((r["moved_late"] == 0).mean())}


def run(cfg: dict, out_dir: str | None = None, progress: bool = False
        ) -> dict:
  """Runs every sweep; results and key numbers (``results["summary"]``).

  Writes ``results.json`` in ``out_dir`` when given. ``progress`` prints a
  line per finished sweep.
  """
  t_start = time.time()
  ls = convex.least_squares()
  mu, L = convex.curvature(ls)
  d, deltas = ls.dim, np.asarray(cfg["deltas"])
  D0 = float(np.linalg.norm(ls.w_star))
  res = {"name": NAME, "scale": cfg["scale"], "problem": ls.name, "d": d,
         "mu": mu, "L": L, "L2": 0.0, "D0": D0, "config": cfg}
  sweeps = _sweep_problem(ls, cfg, cfg["variants"], progress=progress)
  big = _sweep_problem(ls, cfg, ["SR"], batch_size=cfg["big_batch"],
                       progress=progress)["SR"]
  steps = np.arange(1, cfg["num_steps"] // cfg["record_every"] + 1) * cfg[
      "record_every"]
  lrs = np.asarray(cfg["lrs"])
  sr, bc = sweeps["SR"], sweeps["BC (Q_s view)"]
  numbers = {
      "sr_floor_vs_delta_slope_per_alpha": [
          _slope(deltas, sr["floor"][:, j]) for j in range(len(lrs))],
      "sr_floor_vs_alpha_slope_per_delta": [
          _slope(lrs, sr["floor"][i]) for i in range(len(deltas))],
      "bc_qs_excess_vs_alpha_slope_per_delta": [
          _slope(lrs, bc["floor"][i]) for i in range(len(deltas))],
      "sr_floor_big_over_small_batch": (big["floor"] / sr["floor"]).tolist(),
      "sr_floor_over_bound": (sr["floor"] / convex.sr_floor(
          d, deltas[:, None], sr["G"])).tolist(),
      "r_frozen": _r_frozen_check(sweeps["R"], deltas),
  }
  if "BC (Q_d view)" in sweeps:
    numbers["bc_qd_excess_vs_alpha_slope_per_delta"] = [
        _slope(lrs, sweeps["BC (Q_d view)"]["floor"][i])
        for i in range(len(deltas))]
  # Theorem check: SR with α_t = 1/(μ(t+t0)), averaged iterate, vs the bound.
  th_cfg = convex.RunConfig(method="sr", num_steps=cfg["theorem_steps"],
                            record_every=cfg["theorem_steps"] // 50,
                            schedule="inv_t", t0=cfg["theorem_t0"])
  th = convex.sweep(ls, th_cfg, deltas, [1.0 / mu], cfg["seeds"])
  th_G = np.sqrt(th["sq_grad"].max(axis=(1, 2, 3)))
  th_steps = np.asarray(th["step"][0, 0, 0])
  th_excess = th["excess_mean"].mean(2)[:, 0]  # [Δ, records]
  th_bound = np.stack([convex.sr_strongly_convex_bound(
      th_steps, mu, G, d, dl, t0=cfg["theorem_t0"], D0=D0)
      for G, dl in zip(th_G, deltas)])
  numbers["theorem_sr_strongly_convex"] = {
      "final_excess": th_excess[:, -1].tolist(),
      "final_bound": th_bound[:, -1].tolist(), "G": th_G.tolist(),
      "holds": bool(np.all(th_excess <= th_bound))}
  res.update(steps=steps, sweeps=sweeps, big_batch=big, summary=numbers,
             theorem={"steps": th_steps, "excess": th_excess,
                      "bound": th_bound, "G": th_G})
  if cfg["logistic"]:
    lg = convex.logistic_digits()
    lsw = _sweep_problem(lg, cfg, ["SR", "BC (Q_s view)", "FP"],
                         progress=progress)
    res["logistic"] = {"name": lg.name, "d": lg.dim,
                       "L2": convex.hessian_lipschitz(lg),
                       "mu_L": convex.curvature(lg), "sweeps": lsw}
    numbers["logistic_sr_floor_vs_delta_slope_per_alpha"] = [
        _slope(deltas, lsw["SR"]["floor"][:, j]) for j in range(len(lrs))]
    numbers["logistic_bc_excess_vs_alpha_slope_per_delta"] = [
        _slope(lrs, lsw["BC (Q_s view)"]["floor"][i])
        for i in range(len(deltas))]
  res["seconds"] = time.time() - t_start
  if out_dir:
    results_lib.write_json(os.path.join(out_dir, "results.json"), res)
  return res


def plot(results: dict, out_dir: str) -> list[str]:
  """Writes the figures; returns their paths."""
  from qjax import plotting
  cfg, sw = results["config"], results["sweeps"]
  deltas, lrs, d = np.asarray(cfg["deltas"]), np.asarray(cfg["lrs"]), results[
      "d"]
  i_d, j_a = min(2, len(deltas) - 1), min(1, len(lrs) - 1)
  paths = []
  fig, axes = plotting.figure(1, 2, figsize=(11, 4))
  # A method's colour; its several lines on one axes differ by linestyle.
  sgd = [label for label in sw if "Adam" not in label]
  adam = [label for label in sw if "Adam" in label]
  styles = {**plotting.method_styles(sgd, marker=False),
            **plotting.method_styles(adam, marker=False)}
  for label, r in sw.items():
    ax = axes[1 if "Adam" in label else 0]
    j = j_a if "Adam" not in label else min(1, len(r["lrs"]) - 1)
    ax.semilogy(results["steps"], np.maximum(r["curve"][i_d, j], 1e-8),
                label=f"{label} (α={r['lrs'][j]:g})", **styles[label])
  for ax in axes:
    ax.axhline(convex.sr_floor(d, deltas[i_d], sw["SR"]["G"][i_d, j_a]),
               color="k", ls="--", label="SR floor bound √dΔG/2")
    ax.set_xlabel("iteration")
    ax.set_ylabel("F(w) - F*")
    ax.legend(fontsize=7)
  axes[0].set_title(f"SGD-based, least squares, Δ={deltas[i_d]:g}")
  axes[1].set_title(f"Adam-based, Δ={deltas[i_d]:g}")
  paths.append(common.save_figure(
      fig, out_dir, "convex_excess_vs_iterations.png", dpi=90))

  fig, axes = plotting.figure(1, 2, figsize=(11, 4))
  marked = plotting.method_styles(sgd)
  ax = axes[0]
  for label in ("SR", "R", "BC (Q_s view)", "BC (Q_d view)"):
    if label in sw:
      ax.loglog(deltas, sw[label]["floor"][:, j_a], label=label,
                **marked[label])
  ax.loglog(deltas, results["big_batch"]["floor"][:, j_a], "s-",
            color=plotting.method_color("big sr"),
            label=f"SR, batch {cfg['big_batch']}")
  ax.loglog(deltas, convex.sr_floor(d, deltas, sw["SR"]["G"][:, j_a]), "k--",
            label="bound √dΔG/2 (SR)")
  ax.set_xlabel("Δ")
  ax.set_ylabel("floor (mean F - F*, last quarter)")
  ax.set_title(f"floor vs Δ (α={lrs[j_a]:g})")
  ax.legend(fontsize=7)
  ax = axes[1]
  for label in ("SR", "R", "BC (Q_s view)", "BC (Q_d view)", "FP"):
    if label in sw:
      ax.loglog(lrs, sw[label]["floor"][i_d], label=label, **marked[label])
  ax.loglog(lrs, convex.sr_constant_step_bound(
      cfg["num_steps"] * 0.75, lrs, 0.0, sw["SR"]["G"][i_d], d, deltas[i_d]),
      "k--", label="SR bound αG²/2 + √dΔG/2")
  ax.set_xlabel("α")
  ax.set_title(f"floor vs α (Δ={deltas[i_d]:g})")
  ax.legend(fontsize=7)
  paths.append(common.save_figure(
      fig, out_dir, "convex_floor_vs_delta_alpha.png", dpi=90))

  th = results["theorem"]
  fig, ax = plotting.figure(figsize=(5.5, 4))
  # One method (SR) per Δ: the SR colour, lighter for smaller Δ.
  for i, (dl, color) in enumerate(zip(deltas, plotting.shades(
      plotting.method_color("sr"), len(deltas)))):
    ax.loglog(th["steps"], th["excess"][i], color=color,
              label=f"SR w̄_T, Δ={dl:g}")
    ax.loglog(th["steps"], th["bound"][i], "--", color=color)
  ax.set_xlabel("T")
  ax.set_ylabel("F(w̄_T) - F*")
  ax.set_title("SR, α_t = 1/(μ(t+t0)): measured (solid) vs bound (dashed)",
               fontsize=9)
  ax.legend(fontsize=7)
  paths.append(common.save_figure(
      fig, out_dir, "convex_sr_theorem.png", dpi=90))

  if "logistic" in results:
    lw = results["logistic"]["sweeps"]
    fig, axes = plotting.figure(1, 2, figsize=(11, 4))
    sr_color = plotting.method_color("sr")
    for j, a in enumerate(lrs):
      axes[0].loglog(deltas, lw["SR"]["floor"][:, j], color=sr_color,
                     label=f"SR α={a:g}", **plotting.variant(j))
    axes[0].loglog(deltas, convex.sr_floor(
        results["logistic"]["d"], deltas, lw["SR"]["G"][:, j_a]), "k--",
        label="bound √dΔG/2")
    axes[0].set_xlabel("Δ")
    axes[0].set_title(f"logistic {results['logistic']['name']}: SR floor")
    for label in ("SR", "BC (Q_s view)", "FP"):
      axes[1].loglog(lrs, lw[label]["floor"][i_d], label=label,
                     color=plotting.method_color(label), marker="o")
    axes[1].set_xlabel("α")
    axes[1].set_title(f"floor vs α (Δ={deltas[i_d]:g})")
    for ax in axes:
      ax.legend(fontsize=7)
    paths.append(common.save_figure(
        fig, out_dir, "convex_logistic.png", dpi=90))
  return paths


def summary(results: dict) -> str:
  """Markdown: each check, what the theory expects, what was measured."""
  s, cfg = results["summary"], results["config"]
  fmt = lambda xs: ", ".join(f"{x:.3g}" for x in xs)
  th, r = s["theorem_sr_strongly_convex"], s["r_frozen"]
  rows = [
      (f"SR floor vs Δ slope, per α = {fmt(cfg['lrs'])}", "≈ 1 at small α",
       fmt(s["sr_floor_vs_delta_slope_per_alpha"])),
      (f"SR floor vs α slope, per Δ = {fmt(cfg['deltas'])}",
       "≈ 0 at large Δ", fmt(s["sr_floor_vs_alpha_slope_per_delta"])),
      ("BC (Q_s view) excess vs α slope, per Δ", "≈ 1",
       fmt(s["bc_qs_excess_vs_alpha_slope_per_delta"])),
  ]
  if "bc_qd_excess_vs_alpha_slope_per_delta" in s:
    rows.append(("BC (Q_d view) excess vs α slope, per Δ",
                 "≈ 1 up to a bias ≤ `‖H‖√dΔ/2`",
                 fmt(s["bc_qd_excess_vs_alpha_slope_per_delta"])))
  rows += [
      (f"SR floor, batch {cfg['big_batch']} / batch 1 (max)", "< 1",
       f"{max(map(max, s['sr_floor_big_over_small_batch'])):.2f}"),
      ("SR floor / `√dΔG/2` (max)", "≲ 1 where `√dΔG/2 ≳ αG²/2`",
       f"{max(map(max, s['sr_floor_over_bound'])):.2f}"),
      ("R moves while `α‖g‖∞ < Δ/2`", "0",
       f"{r['violations']} of {r['windows_small_step']} windows"),
      ("SR strongly convex bound holds", "yes",
       f"{th['holds']} (final excess {fmt(th['final_excess'])} vs bound "
       f"{fmt(th['final_bound'])})"),
  ]
  if "logistic" in results:
    name = results["logistic"]["name"]
    rows += [
        (f"logistic {name}: SR floor vs Δ slope, per α", "≈ 1 at small α",
         fmt(s["logistic_sr_floor_vs_delta_slope_per_alpha"])),
        (f"logistic {name}: BC (Q_s view) excess vs α slope, per Δ",
         "≈ 1, like FP (its `L2 D dΔ²/8` floor is small)",
         fmt(s["logistic_bc_excess_vs_alpha_slope_per_delta"])),
    ]
  lines = ["| check | expected | measured |", "|---|---|---|"]
  lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  lines += ["", f"{results['problem']}, scale "
            f"{results['scale']}: {results['seconds']:.0f} s."]
  return "\n".join(lines)


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
