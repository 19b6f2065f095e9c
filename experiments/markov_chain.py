"""SR as a Markov chain: exact vs simulated, the α → 0 limit, mixing times.

Claims reproduced (Li et al. 2017, Sec. 5, Fig. 1 and the 2-D toy):

1. Fig. 1: as α shrinks, the chance that SR leaves a grid point falls in
   proportion to α while the odds of each direction stay fixed.
2. The exact transition matrix of SR (1-D double well, Gaussian gradient
   noise) and the chain simulated with ``qjax.round_stochastic`` agree: the
   distribution after T steps matches within a TV tolerance derived from the
   number of chains.
3. Limit theorem: ``π_α`` converges as α → 0, to ``π_0`` (the generator's
   null vector) which has full support; the ε-mixing time grows like 1/α.
4. 2-D toy: histograms of SR iterates do not sharpen as α → 0, while BC's
   (float latent, gradient at ``Q_s`` of it) concentrate on minimizers.

Expected result: TV(π_α, π_0) → 0; min π_0 > 0; log-log slope of mixing time
vs α near -1; exact-vs-simulated TV under tolerance; SR 2-D histogram entropy
roughly constant in α, BC's falling.

Scales (``config(scale)``):

* ``cpu``: 1-D chain at seven α from 1 to 0.001, 40000 simulated chains of
  400 steps; 2-D toy at α = 0.1, 0.03, 0.01 with 4000 chains; ~1.5 min on 2
  shared CPU cores.
* ``paper``: the ``cpu`` settings (this numerical experiment is the paper's
  scale already; ``scale`` is recorded as ``"paper"``).
* ``smoke``: three α, 4000 chains of 100 steps, a 2-D toy at two α
  (seconds).

Config keys (override with ``--set KEY=VALUE``): ``delta``, ``lo``, ``hi``,
``sigma`` (the 1-D chain: grid spacing, range, gradient-noise std),
``alphas``, ``sim_alpha``, ``num_chains``, ``sim_steps`` (exact vs
simulated), ``toy_alphas``, ``toy_chains``, ``toy_steps_alpha`` (steps x α
per run), ``toy_delta``, ``toy_sigma`` (the 2-D toy).

Command: ``python -m experiments.markov_chain --scale cpu --out
results/markov_chain`` (``--scale smoke`` in seconds). Outputs: results.json
and the markov_*.png figures in ``--out``.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from qjax import results as results_lib
from qjax import quantizers
from qjax.theory import markov

NAME = "markov_chain"


def double_well_grad(x):
  """``f(x) = x⁴/4 - x²/2 + 0.2 x``: minima near -1.09 and 0.88."""
  return x ** 3 - x + 0.2


def toy2d_grad(w):
  """``f(w) = Σ (w_i² - 1)²/4 + 0.3 w_0 w_1``: minima near ±(1, -1) (deeper)
  and ±(1, 1)-ish saddles/shallow wells."""
  xp = jnp if isinstance(w, jax.Array) else np
  x, y = w[..., 0], w[..., 1]
  return xp.stack([x ** 3 - x + 0.3 * y, y ** 3 - y + 0.3 * x], axis=-1)


def config(scale: str = "cpu") -> dict:
  """The settings at ``scale`` ("smoke", "cpu" or "paper" = "cpu")."""
  common.check_scale(scale)
  if scale == "smoke":
    settings = dict(delta=0.1, lo=-1.5, hi=1.5, sigma=2.0,
                    alphas=[0.3, 0.1, 0.03], sim_alpha=0.1, num_chains=4000,
                    sim_steps=100, toy_alphas=[0.1, 0.01], toy_chains=1000,
                    toy_steps_alpha=20.0, toy_delta=0.25, toy_sigma=1.0)
  else:  # "cpu"; "paper" uses it: the paper's numerical scale already.
    settings = dict(delta=0.1, lo=-1.5, hi=1.5, sigma=2.0,
                    alphas=[1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001],
                    sim_alpha=0.1, num_chains=40000, sim_steps=400,
                    toy_alphas=[0.1, 0.03, 0.01], toy_chains=4000,
                    toy_steps_alpha=60.0, toy_delta=0.25, toy_sigma=1.0)
  return {"name": NAME, "scale": scale, **settings}


def figure1(chain, alphas, x=0.5):
  """Exact one-step law from ``x``: P(move), P(up | move) for each α."""
  s = int(np.argmin(np.abs(chain.axis - x)))
  rows = []
  for a in alphas:
    p = markov.transition_matrix(chain, a)[s]
    up, down = p[s + 1:].sum(), p[:s].sum()
    rows.append(dict(alpha=a, p_move=1 - p[s],
                     p_up_given_move=up / (up + down)))
  return dict(x=float(chain.axis[s]), rows=rows)


def limit_and_mixing(chain, alphas, eps=0.25):
  pi0 = markov.limit_stationary(chain)
  out = []
  for a in alphas:
    P = markov.transition_matrix(chain, a)
    pi = markov.stationary_distribution(P)
    out.append(dict(alpha=a, tv_to_limit=float(markov.tv_distance(pi, pi0)),
                    mixing_time=markov.mixing_time(P, eps, pi),
                    min_pi=float(pi.min())))
  ts = np.array([r["mixing_time"] for r in out], float)
  al = np.array(alphas, float)
  small = al <= 0.1
  slope = float(np.polyfit(np.log(al[small]), np.log(ts[small]), 1)[0])
  return dict(pi0=pi0, rows=out, mixing_slope_small_alpha=slope,
              min_pi0=float(pi0.min()))


def exact_vs_simulated(chain, alpha, num_chains, num_steps, seed=0):
  """Distribution after T steps from the middle state: exact vs simulated."""
  n = len(chain.axis)
  P = markov.transition_matrix(chain, alpha)
  start = np.zeros(n)
  start[n // 2] = 1
  exact_T = start @ np.linalg.matrix_power(P, num_steps)
  final = markov.simulate(chain, alpha, jax.random.key(seed),
                          np.full(num_chains, n // 2), num_steps)
  emp = markov.empirical_distribution(final, n)
  # One step from every state: empirical rows vs exact rows.
  per = max(200, num_chains // n)
  init = np.repeat(np.arange(n), per)
  nxt = markov.simulate(chain, alpha, jax.random.key(seed + 1), init, 1)
  rows = np.stack([markov.empirical_distribution(nxt[init == i], n)
                   for i in range(n)])
  row_tv = markov.tv_distance(rows, P)
  row_tol = np.array([markov.tv_tolerance(P[i], per, 1e-3 / n)
                      for i in range(n)])
  return dict(alpha=alpha, steps=num_steps, chains=num_chains,
              exact_T=exact_T, simulated_T=emp,
              tv=float(markov.tv_distance(emp, exact_T)),
              tol=markov.tv_tolerance(exact_T, num_chains),
              tv_T_to_pi=float(markov.tv_distance(
                  exact_T, markov.stationary_distribution(P))),
              row_tv_max=float(row_tv.max()),
              row_tv_over_tol_max=float((row_tv / row_tol).max()))


def toy2d(cfg, seed=0):
  """Final 2-D positions of SR and BC chains for each α (vmapped chains)."""
  chain = markov.make_chain(toy2d_grad, cfg["toy_delta"], -2.0, 2.0, dim=2,
                            sigma=cfg["toy_sigma"])
  grid = chain.grid
  N, out = cfg["toy_chains"], {}
  key = jax.random.key(seed)
  w0 = jax.random.uniform(key, (N, 2), minval=-2.0, maxval=2.0)
  for a in cfg["toy_alphas"]:
    T = int(cfg["toy_steps_alpha"] / a)
    S = len(chain.states)
    init = np.asarray(quantizers.round_nearest(w0, grid))
    idx = np.round((init - chain.lo) / chain.delta).astype(int)
    sr = markov.simulate(chain, a, jax.random.fold_in(key, 1),
                         idx[:, 0] * len(chain.axis) + idx[:, 1], T)
    sr_hist = markov.empirical_distribution(sr, S)
    bc_final = _bc_run(chain, a, jax.random.fold_in(key, 2), w0, T)
    bq = np.asarray(quantizers.round_nearest(bc_final, grid))
    bidx = np.round((bq - chain.lo) / chain.delta).astype(int)
    bc_hist = markov.empirical_distribution(
        bidx[:, 0] * len(chain.axis) + bidx[:, 1], S)
    out[a] = dict(steps=T, sr=sr_hist, bc=bc_hist,
                  sr_entropy=_entropy(sr_hist), bc_entropy=_entropy(bc_hist))
  P = markov.transition_matrix(chain, min(cfg["toy_alphas"]))
  return dict(chain=chain, runs=out,
              exact_pi_small_alpha=markov.stationary_distribution(P))


def _entropy(p):
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _bc_run(chain, alpha, key, w0, num_steps):
  """BC on the float latent: ``w_r ← clip(w_r - α(∇f(Q_s(w_r)) + σξ))``."""
  grid = chain.grid

  @jax.jit
  def go(key, w):
    def body(t, w):
      k1, k2 = jax.random.split(jax.random.fold_in(key, t))
      wb = quantizers.quantize(w, quantizers.round_stochastic, grid=grid,
                               key=k1)
      g = toy2d_grad(wb) + chain.sigma * jax.random.normal(k2, w.shape)
      return jnp.clip(w - alpha * g, chain.lo, chain.hi)
    return jax.lax.fori_loop(0, num_steps, body, w)
  return go(key, w0)


def run(cfg: dict, out_dir: str | None = None, progress: bool = False
        ) -> dict:
  """Every part; results (the 2-D toy's ``chain`` object included).

  Writes ``results.json`` in ``out_dir`` when given, without the ``chain``
  object. ``progress`` prints a line per finished part.
  """
  t0 = time.time()

  def done(part):
    if progress:
      print(f"{NAME}: {part} ({time.time() - t0:.0f} s)", flush=True)

  chain = markov.make_chain(double_well_grad, cfg["delta"], cfg["lo"],
                            cfg["hi"], sigma=cfg["sigma"])
  res = dict(name=NAME, scale=cfg["scale"], config=cfg, axis=chain.axis,
             figure1=figure1(chain, cfg["alphas"]),
             limit=limit_and_mixing(chain, cfg["alphas"]))
  done("figure 1, limit and mixing times")
  res["exact_vs_simulated"] = exact_vs_simulated(
      chain, cfg["sim_alpha"], cfg["num_chains"], cfg["sim_steps"])
  done("exact vs simulated")
  res["stationary"] = {a: markov.stationary_distribution(
      markov.transition_matrix(chain, a)) for a in cfg["alphas"]}
  res["toy2d"] = toy2d(cfg)
  done("2-D toy")
  res["seconds"] = time.time() - t0
  if out_dir:
    results_lib.write_json(os.path.join(out_dir, "results.json"), res,
                           drop=("chain",))
  return res


def plot(results: dict, out_dir: str) -> list[str]:
  from qjax import plotting
  sr = plotting.method_color("sr")  # every chain here is SR's
  paths = []
  f1 = results["figure1"]
  al = np.array([r["alpha"] for r in f1["rows"]])
  fig, axes = plotting.figure(1, 2, figsize=(10, 3.8))
  axes[0].loglog(al, [r["p_move"] for r in f1["rows"]], "o-", color=sr,
                 label="P(move)")
  axes[0].loglog(al, al * f1["rows"][-1]["p_move"] / al[-1], "k--",
                 label="∝ α")
  axes[0].set_xlabel("α")
  axes[0].legend()
  axes[0].set_title(f"SR from x={f1['x']:.1f}: chance to move")
  axes[1].semilogx(al, [r["p_up_given_move"] for r in f1["rows"]], "o-",
                   color=sr)
  axes[1].set_ylim(0, 1)
  axes[1].set_xlabel("α")
  axes[1].set_title("P(up | move): direction odds")
  paths.append(common.save_figure(
      fig, out_dir, "markov_figure1.png", dpi=80))

  lim = results["limit"]
  fig, axes = plotting.figure(1, 3, figsize=(14, 3.8))
  x = results["axis"]
  stationary = results["stationary"]
  for i, ((a, pi), color) in enumerate(zip(
      stationary.items(), plotting.shades(sr, len(stationary)))):
    axes[0].plot(x, pi, color=color, label=f"π_α, α={a:g}",
                 **plotting.variant(i, marker=False))
  axes[0].plot(x, lim["pi0"], "k--", label="π_0 (limit)")
  axes[0].set_xlabel("x")
  axes[0].legend(fontsize=7)
  axes[0].set_title("stationary distributions, f'(x)=x³-x+0.2")
  ra = np.array([r["alpha"] for r in lim["rows"]])
  axes[1].loglog(ra, [max(r["tv_to_limit"], 1e-16) for r in lim["rows"]],
                 "o-", color=sr)
  axes[1].set_xlabel("α")
  axes[1].set_title("TV(π_α, π_0)")
  axes[2].loglog(ra, [r["mixing_time"] for r in lim["rows"]], "o-", color=sr,
                 label=f"slope {lim['mixing_slope_small_alpha']:.2f} (α<=0.1)")
  axes[2].set_xlabel("α")
  axes[2].set_title("0.25-mixing time")
  axes[2].legend()
  paths.append(common.save_figure(
      fig, out_dir, "markov_limit_mixing.png", dpi=80))

  ev = results["exact_vs_simulated"]
  fig, ax = plotting.figure(figsize=(5.5, 3.8))
  ax.bar(x, ev["simulated_T"], width=0.08, alpha=0.5, color=sr,
         label="simulated")
  ax.plot(x, ev["exact_T"], "k.-", label="exact P^T")
  ax.set_title(f"α={ev['alpha']:g}, T={ev['steps']}: TV={ev['tv']:.4f} "
               f"(tol {ev['tol']:.4f})", fontsize=9)
  ax.legend()
  paths.append(common.save_figure(
      fig, out_dir, "markov_exact_vs_simulated.png", dpi=80))

  toy = results["toy2d"]
  runs, n = toy["runs"], len(toy["chain"].axis)
  fig, axes = plotting.figure(2, len(runs), figsize=(3.3 * len(runs), 6.4),
                              squeeze=False)
  ext = (toy["chain"].lo, toy["chain"].hi) * 2
  for j, (a, r) in enumerate(runs.items()):
    for i, m in enumerate(("sr", "bc")):
      axes[i, j].imshow(r[m].reshape(n, n).T, origin="lower", extent=ext,
                        cmap="viridis")
      axes[i, j].set_title(f"{m.upper()}, α={a:g}, H={r[m + '_entropy']:.2f}",
                           fontsize=9)
  paths.append(common.save_figure(
      fig, out_dir, "markov_toy2d.png", dpi=80))
  return paths


def numbers(results: dict) -> dict:
  """The key numbers (JSON-able once through ``qjax.results.jsonable``)."""
  lim, ev, toy = (results["limit"], results["exact_vs_simulated"],
                  results["toy2d"])
  return {
      "figure1": results["figure1"],
      "limit_rows": lim["rows"], "min_pi0": lim["min_pi0"],
      "mixing_slope_small_alpha": lim["mixing_slope_small_alpha"],
      "exact_vs_sim": {k: ev[k] for k in ("alpha", "steps", "chains", "tv",
                                          "tol", "tv_T_to_pi", "row_tv_max",
                                          "row_tv_over_tol_max")},
      "toy2d_entropy": {str(a): {"sr": r["sr_entropy"], "bc": r["bc_entropy"],
                                 "steps": r["steps"]}
                        for a, r in toy["runs"].items()},
      "seconds": results["seconds"],
  }


def summary(results: dict) -> str:
  """Markdown: Fig. 1, limit and mixing, exact vs simulated, 2-D toy."""
  s = numbers(results)
  ev, toy = s["exact_vs_sim"], s["toy2d_entropy"]

  def rows(records, keys):
    return ["| " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |"
            for r in records]

  lines = [
      f"**Fig. 1**, one step from x = {s['figure1']['x']:.1f}: P(move) ∝ α, "
      "P(up | move) constant.", "",
      "| α | P(move) | P(up given move) |", "|---|---|---|",
      *rows(s["figure1"]["rows"], ("alpha", "p_move", "p_up_given_move")),
      "",
      f"**Limit and mixing**: min π_0 = {s['min_pi0']:.2g} (> 0), "
      "mixing-time slope for α ≤ 0.1: "
      f"{s['mixing_slope_small_alpha']:.2f} (≈ −1; α = 0.1, 0.03 are "
      "pre-asymptotic and steepen it).", "",
      "| α | TV(π_α, π_0) | 0.25-mixing time | min π_α |", "|---|---|---|---|",
      *rows(s["limit_rows"], ("alpha", "tv_to_limit", "mixing_time",
                              "min_pi")),
      "",
      f"**Exact vs simulated** ({ev['chains']} chains, α = {ev['alpha']:g}, "
      f"T = {ev['steps']}): TV = {ev['tv']:.4f} against tolerance "
      f"{ev['tol']:.4f}; one-step rows, max TV / tolerance "
      f"{ev['row_tv_over_tol_max']:.2f} (< 1).", "",
      "**2-D toy**, histogram entropy (lower = more concentrated):", "",
      "| α | steps | SR | BC |", "|---|---|---|---|",
      *(f"| {a} | {r['steps']} | {r['sr']:.2f} | {r['bc']:.2f} |"
        for a, r in toy.items()),
      "",
      f"Scale {results['scale']}: {results['seconds']:.0f} s.",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  return common.main(NAME, __doc__, config, run, plot, summary, argv)


if __name__ == "__main__":
  sys.exit(main())
