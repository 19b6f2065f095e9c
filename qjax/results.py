"""Results on disk: JSON (config, versions, device, wall time), CSV, PNG."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Callable

import numpy as np


def environment() -> dict:
  """Library versions, the code's git commit, the time, the devices and
  the XLA flags the process runs with (``XLA_FLAGS``)."""
  import flax
  import jax
  import jaxlib
  import optax
  import qjax
  devices = jax.devices()
  return {
      "python": sys.version.split()[0], "platform": platform.platform(),
      "qjax": qjax.__version__, "git_commit": git_commit(),
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__,
      "numpy": np.__version__, "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def git_commit() -> str | None:
  """The commit of the qjax checkout in use (``+dirty`` if modified), or None.

  None when qjax is not run from a git checkout (an installed wheel) or git
  is missing.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"],
                          capture_output=True, text=True, timeout=10)
    if head.returncode:
      return None
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty else "")


def summarize(values) -> dict:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def jsonable(value, drop: tuple[str, ...] = ()):
  """``value`` with numpy scalars/arrays as Python ones, keys as strings.

  Non-finite floats become ``None`` (JSON ``null``), so the output is strict
  JSON. Dict entries whose key is in ``drop`` are left out, at any depth
  (e.g. objects that only the plotting code needs).
  """
  if isinstance(value, dict):
    return {str(k): jsonable(v, drop) for k, v in value.items()
            if k not in drop}
  if isinstance(value, (list, tuple)):
    return [jsonable(v, drop) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, payload: dict, drop: tuple[str, ...] = ()) -> None:
  """Writes ``jsonable(payload, drop)`` to ``path`` atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(payload, drop), f, indent=1, allow_nan=False)
  os.replace(tmp, path)


def write_csv(path: str, runs: list[dict]) -> None:
  """One row per (run label, config, epoch): its hyperparameters, metrics.

  Every swept hyperparameter has a column; a non-finite metric is written
  as an empty cell.
  """
  rows, names = [], swept_names(runs)
  for run in runs:
    for record in run["history"]:
      for i, cfg in enumerate(run["configs"]):
        row = {"run": run["label"], "method": run.get("method", ""),
               "grid": run.get("grid", ""), "seed": cfg["seed"],
               **{k: cfg.get(k, "") for k in names},
               "epoch": record["epoch"]}
        for key in metric_names(runs):
          row[key] = record.get(key, [""] * len(run["configs"]))[i]
        flips = [v[i] for v in record["sign_flips"].values()]
        row["mean_sign_flip"] = float(np.mean(flips)) if flips else 0.0
        rows.append({k: "" if isinstance(v, float) and not math.isfinite(v)
                     or v is None else v for k, v in row.items()})
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def metric_names(runs: list[dict]) -> list[str]:
  """Every per-config metric the histories record (``train_loss``,
  ``val_error``, ``test_mse``, ``skipped_steps``, ...), in first-seen order."""
  names = []
  for run in runs:
    n = len(run["configs"])
    for record in run["history"]:
      names += [k for k, v in record.items() if isinstance(v, list)
                and len(v) == n and k not in names]
  return names


def headline_metric(runs: list[dict]) -> str:
  """``test_error`` when recorded, else the first other ``test_`` metric."""
  names = metric_names(runs)
  tests = [k for k in names if k.startswith("test_") and k != "test_loss"]
  return "test_error" if "test_error" in names else (
      tests[0] if tests else "test_loss")


def swept_names(runs: list[dict]) -> list[str]:
  """The hyperparameters other than the seed that the runs' configs carry."""
  names = []
  for run in runs:
    for cfg in run["configs"]:
      names += [k for k in cfg if k != "seed" and k not in names]
  return names


def groups(run: dict, names: list[str]) -> list[tuple[dict, list[int]]]:
  """``run``'s configs grouped by every swept hyperparameter but the seed.

  Returns ``[(hyperparameters, config indices)]`` in first-seen order; a
  table or plot reduces over the indices of one group (the seeds) only.
  """
  out: dict[tuple, tuple[dict, list[int]]] = {}
  for i, cfg in enumerate(run["configs"]):
    hp = {k: cfg.get(k) for k in names}
    out.setdefault(tuple(hp.values()), (hp, []))[1].append(i)
  return list(out.values())


def group_label(run: dict, hp: dict) -> str:
  """``"SR-ADAM lr=0.01 grid_scale=2"``, or just the run's label."""
  parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
           for k, v in hp.items() if v is not None]
  return " ".join([run["label"]] + parts)


def _varying(runs: list[dict]) -> list[str]:
  """Swept names that take more than one value (others go in the title)."""
  names = swept_names(runs)
  return [k for k in names
          if len({c.get(k) for r in runs for c in r["configs"]}) > 1]


def plot_curves(path: str, runs: list[dict]) -> None:
  """Test error, train loss and sign changes per epoch, one line a group.

  A group is a run's configs with equal hyperparameters (all but the seed):
  lines show the mean over seeds, bands the std over seeds. A run's lines
  have its method's colour (``qjax.plotting.method_color``); its groups
  differ by linestyle and marker. Draws on a bare ``Figure``: pyplot and
  the process' matplotlib backend are left alone.
  """
  from qjax import plotting
  fig, axes = plotting.figure(1, 3, figsize=(13, 3.6))
  names = _varying(runs)
  metric = headline_metric(runs)
  for run in runs:
    epochs = [r["epoch"] for r in run["history"]]
    color = plotting.method_color(run.get("method", run["label"]))
    for g, (hp, idx) in enumerate(groups(run, names)):
      label = group_label(run, hp)
      style = dict(color=color, label=label, **plotting.variant(g))
      for ax, key in zip(axes[:2], (metric, "train_loss")):
        values = np.array([[_num(r[key][i]) for i in idx]
                           for r in run["history"]])
        mean, std = values.mean(1), values.std(1)
        ax.plot(epochs, mean, **style)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                        color=color)
      flips = [np.mean([np.mean([v[i] for i in idx])
                        for v in r["sign_flips"].values()])
               if r["sign_flips"] else 0.0 for r in run["history"]]
      axes[2].plot(epochs, 100 * np.asarray(flips), **style)
  for ax, title in zip(axes, (metric.replace("_", " "), "train loss",
                              "% weights with sign changed since init")):
    ax.set_title(title)
    ax.set_xlabel("epoch")
  axes[0].legend(fontsize="small")
  fig.tight_layout()
  plotting.save(fig, path, dpi=110)


def _num(v) -> float:
  return float("nan") if v is None else float(v)


def error_table(runs: list[dict]) -> str:
  """Markdown table of the final test metric, mean ± std over seeds only.

  One row per method and value of every swept hyperparameter (learning
  rate, grid scale, Bop's threshold, ...): configs that differ in anything
  but the seed are never averaged together. The metric is the test error
  (%) when recorded, else the task's first test metric (e.g. ``test_mse``);
  with a validation split the validation value gets its own column. Runs
  that record ``alpha_over_delta`` (per config, per quantized layer: lr
  over the grid's spacing, as ``experiments.train`` writes) get an α/Δ
  column, the range over the layers.
  """
  names = swept_names(runs)
  metric = headline_metric(runs)
  val = "val_" + metric[len("test_"):]
  has_val = val in metric_names(runs)
  percent = metric.endswith("error")
  title = metric[len("test_"):].replace("_", " ") + (" (%)" if percent
                                                     else "")
  has_ratio = any(run.get("alpha_over_delta") for run in runs)
  columns = ["method"] + names + [f"test {title}"] + (
      [f"val {title}"] if has_val else []) + ["seeds"] + (
          ["α/Δ"] if has_ratio else [])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  scale = 100 if percent else 1
  for run in runs:
    last = run["history"][-1]
    for hp, idx in groups(run, names):
      cells = [run["label"]] + [_cell(hp[k]) for k in names]
      for key in [metric] + ([val] if has_val else []):
        s = summarize([_num(last.get(key, [None] * len(run["configs"]))[i])
                       * scale for i in idx])
        cells.append(f"{s['mean']:.2f} ± {s['std']:.2f}" if percent
                     else f"{s['mean']:.4g} ± {s['std']:.2g}")
      cells.append(str(len(idx)))
      if has_ratio:
        cells.append(_ratio_cell(run.get("alpha_over_delta"), idx))
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _ratio_cell(per_config, idx) -> str:
  """α/Δ over the quantized layers of configs ``idx``: ``lo-hi`` (3
  significant digits), or ``-`` where nothing is quantized."""
  per_config = per_config or []
  values = [v for i in idx if i < len(per_config) and per_config[i]
            for v in per_config[i].values()]
  if not values:
    return "-"
  lo, hi = min(values), max(values)
  return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}"


def _cell(v) -> str:
  return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def config_name(config: dict) -> str:
  """``"seed=0,lr=0.001"``: a config as a folder or tag name."""
  return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in config.items())


def tensorboard_logger(logdir: str, prefix: str = "") -> Callable:
  """An ``on_epoch`` callback for :func:`qjax.sweep.sweep` that writes
  TensorBoard event files, one run folder per config.

  Every per-config scalar of the epoch record (``train_loss``,
  ``test_error``, ``val_error``, ...) and each layer's sign-change fraction
  is written at ``step = epoch`` under ``logdir/<prefix><config_name>``.
  Needs ``tensorboardX`` (``pip install qjax[tensorboard]``).

  Example:
    >>> log = qjax.results.tensorboard_logger("runs/sr", prefix="sr/")
    >>> qjax.sweep.sweep(model, ds, config, spec, on_epoch=log)
    >>> log.close()
  """
  try:
    from tensorboardX import SummaryWriter
  except ImportError as err:
    raise ImportError("tensorboard_logger needs tensorboardX: pip install "
                      "'qjax[tensorboard]'") from err
  writers: dict[str, Any] = {}

  def on_epoch(record: dict, configs: list[dict]) -> None:
    for i, config in enumerate(configs):
      name = prefix + config_name(config)
      if name not in writers:
        writers[name] = SummaryWriter(os.path.join(logdir, name))
      writer = writers[name]
      for key, values in record.items():
        if isinstance(values, list) and len(values) == len(configs):
          writer.add_scalar(key, float(values[i]), record["epoch"])
      for layer, values in record.get("sign_flips", {}).items():
        writer.add_scalar(f"sign_flips/{layer}", float(values[i]),
                          record["epoch"])
      writer.flush()

  def close() -> None:
    for writer in writers.values():
      writer.close()

  on_epoch.close = close
  on_epoch.writers = writers
  return on_epoch
