"""Results on disk: JSON (config, versions, device, wall time), CSV, PNG."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys

import numpy as np


def environment() -> dict:
  """Library versions and the device the run used."""
  import flax
  import jax
  import optax
  import qjax
  devices = jax.devices()
  return {
      "python": sys.version.split()[0], "platform": platform.platform(),
      "qjax": qjax.__version__, "jax": jax.__version__,
      "flax": flax.__version__, "optax": optax.__version__,
      "numpy": np.__version__, "backend": jax.default_backend(),
      "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
  }


def summarize(values) -> dict:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def jsonable(value, drop: tuple[str, ...] = ()):
  """``value`` with numpy scalars/arrays as Python ones, keys as strings.

  Dict entries whose key is in ``drop`` are left out, at any depth (e.g.
  objects that only the plotting code needs).
  """
  if isinstance(value, dict):
    return {str(k): jsonable(v, drop) for k, v in value.items()
            if k not in drop}
  if isinstance(value, (list, tuple)):
    return [jsonable(v, drop) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value


def write_json(path: str, payload: dict, drop: tuple[str, ...] = ()) -> None:
  """Writes ``jsonable(payload, drop)`` to ``path`` atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(payload, drop), f, indent=1)
  os.replace(tmp, path)


def write_csv(path: str, runs: list[dict]) -> None:
  """One row per (run label, config, epoch) with every scalar metric."""
  rows = []
  for run in runs:
    for record in run["history"]:
      for i, cfg in enumerate(run["configs"]):
        row = {"run": run["label"], "seed": cfg["seed"], "lr": cfg["lr"],
               "grid_scale": cfg.get("grid_scale", 1.0),
               "epoch": record["epoch"]}
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
          row[key] = record[key][i]
        flips = [v[i] for v in record["sign_flips"].values()]
        row["mean_sign_flip"] = float(np.mean(flips)) if flips else 0.0
        rows.append(row)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot_curves(path: str, runs: list[dict]) -> None:
  """Test error and train loss per epoch, mean over configs, one line a run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for run in runs:
    epochs = [r["epoch"] for r in run["history"]]
    for ax, key in zip(axes[:2], ("test_error", "train_loss")):
      values = np.array([r[key] for r in run["history"]])
      mean, std = values.mean(1), values.std(1)
      ax.plot(epochs, mean, marker="o", label=run["label"])
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    flips = [np.mean([np.mean(v) for v in r["sign_flips"].values()])
             if r["sign_flips"] else 0.0 for r in run["history"]]
    axes[2].plot(epochs, 100 * np.asarray(flips), marker="o",
                 label=run["label"])
  for ax, title in zip(axes, ("test error", "train loss",
                              "% weights with sign changed since init")):
    ax.set_title(title)
    ax.set_xlabel("epoch")
  axes[0].legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def error_table(runs: list[dict]) -> str:
  """Markdown table of final test error (%), mean ± std over configs."""
  lines = ["| method | test error (%) | configs |", "|---|---|---|"]
  for run in runs:
    s = summarize(np.asarray(run["history"][-1]["test_error"]) * 100)
    lines.append(f"| {run['label']} | {s['mean']:.2f} ± {s['std']:.2f} | "
                 f"{s['n']} |")
  return "\n".join(lines)
