"""Helpers shared by the paper's experiments (table1, sign_flips, batch_size).

Every experiment module follows one contract:

* ``config(scale) -> dict`` with ``scale`` in ``("smoke", "cpu", "paper")``;
* ``run(cfg, out_dir=None, progress=False) -> dict`` (JSON-able results);
* ``plot(results, out_dir) -> list[str]`` (PNG paths);
* ``main(argv=None) -> int`` (``--scale``, ``--out``, ``--no-progress``).

A config is a plain dict of *experiments*; each experiment names a dataset, a
model and training settings, and is trained one method at a time with
:func:`qjax.sweep.sweep` (seeds and other configs as the engine's
strategy says: one after another on CPU, vmapped on accelerators).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import sys
import time
from typing import Callable

import numpy as np

from qjax import data as data_lib
from qjax import methods as methods_lib
from qjax import memory as memory_lib
from qjax import models
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib
from qjax.train import TrainConfig

SCALES = ("smoke", "cpu", "paper")

# Datasets too large for memory: streamed from a prepared TFDS dataset
# (qjax.data.tfds_stream), (train split, test split).
STREAMING = {"imagenet2012": ("train", "validation")}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def allconv_net(size: str) -> dict:
  """The all-conv net shared by the CPU-scale experiments, as config keys.

  ``"cpu"``: conv ``16, M, 32, M, 64`` on MNIST-shaped images downsampled
  2x2 to 14x14 (conv kernels 96 % of the parameters); ``"smoke"``: conv
  ``8, M, 16`` on the 8x8 digits. Conv kernels quantized (``mask="conv"``),
  BatchNorm after each conv. A fresh dict per call, so a config's override
  never changes another's.
  """
  nets = {
      "cpu": {"model": "allconv",
              "model_kwargs": {"conv_spec": [16, "M", 32, "M", 64]},
              "downsample": 2, "mask": "conv"},
      "smoke": {"model": "allconv", "model_kwargs": {"conv_spec": [8, "M", 16]},
                "mask": "conv"},
  }
  if size not in nets:
    raise ValueError(f"allconv_net size {size!r}: expected one of "
                     f"{sorted(nets)}")
  return copy.deepcopy(nets[size])


class UnsupportedExperimentError(RuntimeError):
  """An experiment's config exists but this engine cannot run it."""


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache unless one is configured.

  XLA:CPU compiles of these sweeps take 5-25 s each on 2 shared cores, more
  than a smoke run's training; reruns (tests, notebooks, other experiments
  with the same shapes) then load them from disk. The directory is
  ``$QJAX_COMPILATION_CACHE`` or ``~/.cache/qjax/jax_compilation``.
  """
  import jax
  if jax.config.jax_compilation_cache_dir:
    return
  path = os.environ.get("QJAX_COMPILATION_CACHE", os.path.join(
      os.path.expanduser("~"), ".cache", "qjax", "jax_compilation"))
  jax.config.update("jax_compilation_cache_dir", path)


def check_scale(scale: str) -> None:
  if scale not in SCALES:
    raise ValueError(f"scale must be one of {SCALES}; got scale={scale!r}.")


def check_supported(experiments: list[dict]) -> None:
  """Raises before any training if a streamed dataset is not available."""
  for e in experiments:
    if e["dataset"] not in STREAMING:
      continue
    problem = _streaming_problem(e["dataset"])
    if problem:
      raise UnsupportedExperimentError(
          f"cannot run {e['name']}: {problem}. ImageNet is streamed from a "
          "prepared TFDS dataset (qjax.data.tfds_stream): `pip install "
          "qjax[tfds]`, download ILSVRC2012 by hand and run `tfds build "
          f"{e['dataset']}` (ArrayRecord format), or point TFDS_DATA_DIR at a "
          "prepared copy. Run the other experiments with --only, e.g. "
          "--only cifar10/vgg9,cifar100/resnet56.")


def _streaming_problem(name: str) -> str | None:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return "tensorflow-datasets is not installed"
  try:
    prepared = tfds.builder(name).is_prepared()
  except Exception as err:  # pylint: disable=broad-except
    return f"TFDS cannot build {name!r} here ({type(err).__name__}: {err})"
  return None if prepared else f"the TFDS dataset {name!r} is not prepared"


def imagenet_preprocess(example: dict) -> tuple[np.ndarray, int]:
  """Resize the shorter side to 256, center-crop 224, normalize per channel."""
  from PIL import Image
  image = Image.fromarray(np.asarray(example["image"]))
  scale = 256 / min(image.size)
  image = image.resize((max(224, round(image.size[0] * scale)),
                        max(224, round(image.size[1] * scale))),
                       Image.BILINEAR)
  left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
  image = image.crop((left, top, left + 224, top + 224))
  x = np.asarray(image, np.float32) / 255.0
  if x.ndim == 2:
    x = np.repeat(x[..., None], 3, axis=-1)
  return (x - IMAGENET_MEAN) / IMAGENET_STD, int(example["label"])


def select(cfg: dict, names) -> dict:
  """``cfg`` keeping only the experiments whose name is in ``names``."""
  names = list(names)
  if "experiments" not in cfg:
    raise ValueError(f"{cfg.get('name', 'this experiment')} has no separate "
                     "experiments to choose from; drop --only.")
  known = [e["name"] for e in cfg["experiments"]]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown experiment(s) {unknown}; known: {known}.")
  return {**cfg, "experiments": [e for e in cfg["experiments"]
                                 if e["name"] in names]}


@functools.lru_cache(maxsize=4)
def _load(name: str) -> data_lib.Dataset:
  return data_lib.load(name)


def load_dataset(name: str, train_subset: int | None = None,
                 test_subset: int | None = None,
                 normalize: bool = False,
                 downsample: int = 1) -> data_lib.Dataset:
  """Loads ``name`` (read once per process), optionally subset, normalized.

  ``train_subset`` / ``test_subset`` keep the first N examples of a split.
  ``downsample`` averages ``k x k`` pixel blocks (28x28 MNIST at 2: 14x14),
  dropping trailing rows and columns that do not fill a block.
  ``normalize`` standardizes each channel with the training set's mean and
  std, as for CIFAR in the paper.
  """
  ds = _load(name)
  if train_subset:
    ds = ds._replace(train_x=ds.train_x[:train_subset],
                     train_y=ds.train_y[:train_subset])
  if test_subset:
    ds = ds._replace(test_x=ds.test_x[:test_subset],
                     test_y=ds.test_y[:test_subset])
  if downsample != 1:
    if not isinstance(downsample, int) or downsample < 1:
      raise ValueError(f"downsample must be an int >= 1; got {downsample!r}.")
    ds = ds._replace(train_x=_block_mean(ds.train_x, downsample),
                     test_x=_block_mean(ds.test_x, downsample))
  if normalize:
    mean, std = data_lib.channel_stats(ds.train_x)
    ds = ds._replace(train_x=data_lib.normalize(ds.train_x, mean, std),
                     test_x=data_lib.normalize(ds.test_x, mean, std))
  return ds


def _block_mean(x: np.ndarray, k: int) -> np.ndarray:
  n, h, w, c = x.shape
  if h < k or w < k:
    raise ValueError(f"downsample={k} is larger than the {h}x{w} images.")
  x = np.asarray(x[:, :h // k * k, :w // k * k], np.float32)
  return x.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))


def build_model(exp: dict, num_classes: int):
  return models.get(exp["model"], num_classes,
                    **{k: tuple(v) if isinstance(v, list) else v
                       for k, v in exp.get("model_kwargs", {}).items()})


def train_method(exp: dict, method: str, *, batch_size: int, label: str,
                 progress: bool = False) -> dict:
  """Trains every seed (and every lr of ``exp["lrs"]``) with ``method``.

  ``exp["lrs"]`` (a list) sweeps the learning rate in the same program as
  the seeds; otherwise ``exp["lr"]`` is the one lr. ``exp["validation"]``
  (a count or fraction) holds out the last training examples, evaluated
  every epoch (``val_error``), for choosing the lr without the test set.

  Returns:
    ``{"label", "method", "batch_size", "steps_per_epoch", "steps",
    "seeds", "lr", "lrs", "eval_mode", "test_error" (final, per seed, at
    the first lr), "history" (per epoch, per seed, at the first lr:
    test_error, train_loss, sign_flips per layer, val_error with
    validation), "by_lr" (per lr: the same as test_error/history), "grids"
    (each quantized layer's grid), "alpha_over_delta" (per lr: {layer: lr /
    spacing}), "state_bytes" and "param_bytes" (one config's train state
    and parameters, :func:`qjax.memory_report`), "seconds"}``.
  """
  ds = dataset_for(exp)
  model = build_model(exp, ds.num_classes)
  config = TrainConfig(method=method, optimizer=exp.get("optimizer", "adam"),
                       mask=exp["mask"], grid=exp.get("grid", "glorot"),
                       batch_size=batch_size,
                       epochs=exp["epochs"],
                       lr_decay_epochs=tuple(exp.get("lr_decay_epochs", ())),
                       augment=exp.get("augment", False))
  lrs = [float(v) for v in exp.get("lrs", [exp.get("lr")])]
  # The engine picks the execution (for a convnet on XLA:CPU: one unbatched
  # program per config, called config after config;
  # qjax.sweep.choose_strategy).
  t0 = time.time()
  out = sweep_lib.sweep(model, ds, config,
                        sweep_lib.SweepSpec(seeds=tuple(exp["seeds"]),
                                            lrs=tuple(lrs)),
                        model_name=exp["model"], progress=progress,
                        validation=exp.get("validation"))
  steps_per_epoch = out["train_config"]["steps_per_epoch"]
  by_lr = []
  for lr in lrs:
    rows = [i for i, c in enumerate(out["configs"]) if c["lr"] == lr]
    history = [_epoch_of(record, rows) for record in out["history"]]
    by_lr.append({"lr": lr, "test_error": history[-1]["test_error"],
                  "history": history})
  grids = _layer_grids(config, out)
  memory = memory_lib.memory_report(out["final_state"])
  return {
      "label": label, "method": method, "batch_size": batch_size,
      "steps_per_epoch": steps_per_epoch,
      "steps": steps_per_epoch * exp["epochs"],
      "seeds": list(exp["seeds"]), "lr": lrs[0], "lrs": lrs,
      "eval_mode": methods_lib.get(method).eval_mode,
      "strategy": out["strategy"],
      "test_error": by_lr[0]["test_error"], "history": by_lr[0]["history"],
      "by_lr": by_lr, "grids": grids,
      "alpha_over_delta": [train_lib.alpha_over_delta(grids, lr)
                           for lr in lrs],
      "state_bytes": int(memory["total"]),
      "param_bytes": int(memory["params"]),
      "seconds": time.time() - t0,
  }


def _summaries_by_lr(record: dict, key: str) -> list[dict]:
  return [error_summary(r["history"][-1][key]) for r in record["by_lr"]]


def choose_lr(record: dict) -> dict:
  """``record`` (from :func:`train_method`) with its lr chosen on validation.

  The lr with the lowest mean final validation error over the seeds (the
  test set is not looked at); with one lr, that lr. Adds ``best_lr``,
  ``best_index``, the chosen lr's ``test_error`` and ``history``,
  ``val_by_lr`` and ``test_by_lr`` (summaries per lr), ``val_curve`` (the
  chosen lr's mean validation error per epoch, %) and
  ``alpha_over_delta_best``.
  """
  if len(record["by_lr"]) == 1:
    best = 0
  else:
    val = [s["mean"] for s in _summaries_by_lr(record, "val_error")]
    best = int(np.argmin(val))
  chosen = record["by_lr"][best]
  val_curve = ([float(np.mean(h["val_error"])) * 100
                for h in chosen["history"]]
               if "val_error" in chosen["history"][0] else None)
  return {**record, "best_lr": chosen["lr"], "best_index": best,
          "test_error": chosen["test_error"], "history": chosen["history"],
          "val_by_lr": (_summaries_by_lr(record, "val_error")
                        if val_curve else None),
          "test_by_lr": _summaries_by_lr(record, "test_error"),
          "val_curve": val_curve,
          "alpha_over_delta_best": record["alpha_over_delta"][best]}


def _epoch_of(record: dict, rows: list[int]) -> dict:
  """One epoch record of the sweep restricted to configs ``rows``."""
  pick = lambda v: [v[i] for i in rows]
  out = {"epoch": record["epoch"], "test_error": pick(record["test_error"]),
         "train_loss": pick(record["train_loss"]),
         "sign_flips": {k: pick(v) for k, v in record["sign_flips"].items()}}
  if "val_error" in record:
    out["val_error"] = pick(record["val_error"])
  return out


def _layer_grids(config: TrainConfig, out: dict) -> dict:
  """Each quantized layer's grid, from the first config's final parameters
  (the grid spec does not depend on the seed or the lr)."""
  import jax
  hp = {k: v for k, v in out["configs"][0].items() if k != "seed"}
  params = jax.tree.map(lambda v: v[0], out["final_state"].params)
  return train_lib.layer_grids(config, params, hp)


def alpha_over_delta_text(record: dict, lr_index: int = 0) -> str:
  """α/Δ of ``record``'s quantized layers at one lr, as a short text:
  one value when all layers share it, else its range over the layers."""
  values = list(record["alpha_over_delta"][lr_index].values())
  if not values:
    return "-"
  lo, hi = min(values), max(values)
  return f"{lo:.2g}" if hi <= lo * 1.0001 else f"{lo:.2g}-{hi:.2g}"


def dataset_for(exp: dict):
  """The in-memory Dataset, or a StreamingDataset for ImageNet."""
  if exp["dataset"] in STREAMING:
    return data_lib.tfds_stream(exp["dataset"], split=STREAMING[exp["dataset"]],
                                preprocess=imagenet_preprocess)
  return load_dataset(exp["dataset"], exp.get("train_subset"),
                      exp.get("test_subset"), exp.get("normalize", False),
                      exp.get("downsample", 1))


def describe(exp: dict) -> dict:
  """The data actually used, for the output."""
  ds = dataset_for(exp)
  if sweep_lib.is_streaming(ds):
    return {"train_examples": int(ds.num_train), "test_examples": None,
            "num_classes": int(ds.num_classes), "streamed": True}
  held_out, _ = sweep_lib.split_validation(ds, exp.get("validation"))
  return {"train_examples": int(held_out.train_x.shape[0]),
          "validation_examples": int(ds.train_x.shape[0]
                                     - held_out.train_x.shape[0]),
          "test_examples": int(ds.test_x.shape[0]),
          "image_shape": list(ds.train_x.shape[1:]),
          "num_classes": int(ds.num_classes)}


def error_summary(values) -> dict:
  """Test error in %: mean, sample std, n."""
  return results_lib.summarize(np.asarray(values, np.float64) * 100)


def fmt(summary: dict) -> str:
  return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def final_flips(record: dict) -> dict:
  """Per layer, the mean over seeds of the final % of signs changed."""
  return {layer: 100 * float(np.mean(v))
          for layer, v in record["history"][-1]["sign_flips"].items()}


def at_same_steps(exp: dict, factor: float) -> dict:
  """``exp`` with its epochs and decay epochs scaled by ``factor``: a batch
  ``factor`` times larger then takes about the same number of steps."""
  return {**exp, "epochs": max(1, round(exp["epochs"] * factor)),
          "lr_decay_epochs": [round(e * factor)
                              for e in exp.get("lr_decay_epochs", [])]}


def run_each(name: str, cfg: dict, run_experiment: Callable,
             table: Callable, write: Callable,
             out_dir: str | None = None) -> dict:
  """``{"name", "scale", "config", "environment", "experiments",
  "wall_seconds", "table_md"}`` from ``run_experiment(exp)`` per experiment.

  With ``out_dir``, ``write(results, out_dir)`` runs after each experiment
  (a long run keeps what it has if it stops) and once more at the end with
  the table.
  """
  t0 = time.time()
  results = {"name": name, "scale": cfg["scale"], "config": cfg,
             "environment": results_lib.environment(), "experiments": []}
  for exp in cfg["experiments"]:
    results["experiments"].append(run_experiment(exp))
    results["wall_seconds"] = time.time() - t0
    if out_dir:
      write(results, out_dir)
  results["wall_seconds"] = time.time() - t0
  results["table_md"] = table(results)
  if out_dir:
    write(results, out_dir)
  return results


def write_json(out_dir: str, name: str, payload: dict) -> str:
  path = os.path.join(out_dir, name)
  results_lib.write_json(path, payload)
  return path


def write_text(out_dir: str, name: str, text: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w") as f:
    f.write(text)
  return path


def write_rows(out_dir: str, name: str, rows: list[dict]) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def save_figure(fig, out_dir: str, name: str, dpi: int = 110) -> str:
  """Lays out ``fig`` and writes it as ``out_dir/name`` (PNG); the path.

  ``fig`` is a bare ``Figure`` (``qjax.plotting.figure``): nothing to close.
  """
  from qjax import plotting
  fig.tight_layout()
  return plotting.save(fig, os.path.join(out_dir, name), dpi=dpi)


def parser(name: str, doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m experiments.{name}", description=doc.split("\n")[0])
  p.add_argument("--scale", default="cpu", choices=SCALES)
  p.add_argument("--out", default=os.path.join("results", name),
                 help="output folder (default: %(default)s)")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="override a config value (repeatable), e.g. --set "
                 "epochs=3 --set seeds=[0,1,2] --set lr=0.01 --set "
                 "grid=kbit:4; a key not at the top of the config applies "
                 "to every experiment that has it; VALUE is JSON (or a "
                 "plain string) of the same type as the default; an "
                 "unknown key is an error (see the config with --show)")
  p.add_argument("--show", action="store_true",
                 help="print the config (after --set) as JSON and exit")
  p.add_argument("--only", default="",
                 help="comma-separated experiment names to keep "
                 "(e.g. mnist/mlp)")
  p.add_argument("--no-progress", action="store_true")
  add_cpu_devices_flag(p)
  return p


class ConfigError(ValueError):
  """A bad config value: a --set naming no key or of another type, or a
  value the experiment itself refuses before training (e.g. a bad arm)."""


def check_values(cfg: dict) -> None:
  """Refuses bad training values of every experiment before any training.

  The keys the training experiments share, where present: ``seeds``,
  ``lr``/``lrs``, ``batch_size``/``batch_sizes``, ``epochs``, ``mask``,
  checked by the same constructors the run uses (``SweepSpec``,
  ``TrainConfig``), so the message is theirs.

  Raises:
    ConfigError: naming the experiment and the value.
  """
  for e in cfg.get("experiments", []):
    if "seeds" not in e:
      continue
    try:
      lrs = e["lrs"] if "lrs" in e else [e["lr"]] if "lr" in e else [0.1]
      sweep_lib.SweepSpec(seeds=tuple(e["seeds"]), lrs=tuple(lrs))
      for b in e.get("batch_sizes", [e.get("batch_size", 128)]):
        TrainConfig(batch_size=b, epochs=e.get("epochs", 1),
                    mask=e.get("mask", "all"))
    except (ValueError, TypeError) as err:
      raise ConfigError(f"{e.get('name', '?')}: {err}") from None


def _parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _same_type(old, new) -> bool:
  if isinstance(old, bool) or isinstance(new, bool):
    return isinstance(old, bool) and isinstance(new, bool)
  if isinstance(old, (int, float)) and isinstance(new, (int, float)):
    return not (isinstance(old, int) and isinstance(new, float))
  if isinstance(old, list) and isinstance(new, list):
    return all(_same_type(old[0], v) for v in new) if old and new else True
  if old is None:
    return True
  return type(old) is type(new)


def _assign(target: dict, path: list[str], value, full: str) -> bool:
  """Sets ``target[path]``; False when the path is not in ``target``."""
  node = target
  for part in path[:-1]:
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  if not isinstance(node, dict) or path[-1] not in node:
    return False
  old = node[path[-1]]
  if not _same_type(old, value):
    raise ConfigError(f"--set {full}: expected a value like {old!r} "
                      f"({type(old).__name__}), got {value!r}")
  node[path[-1]] = (float(value) if isinstance(old, float)
                    and isinstance(value, int) else value)
  return True


def override(cfg: dict, assignments) -> dict:
  """``cfg`` with every ``KEY=VALUE`` of ``assignments`` applied (a copy).

  ``KEY`` is a dotted path (``epochs``, ``model_kwargs.features``); when it
  is not a top-level key it is applied to every entry of
  ``cfg["experiments"]`` that has it. Values are JSON (``[0,1]``, ``0.01``,
  ``true``) or plain strings (``kbit:4``), and must have the type of the
  value they replace.

  Raises:
    ConfigError: malformed, unknown key, or a value of another type.
  """
  cfg = json.loads(json.dumps(cfg))
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--set {item}: expected KEY=VALUE")
    value, path = _parse_value(text), key.split(".")
    done = _assign(cfg, path, value, item)
    for exp in cfg.get("experiments", []) if not done else []:
      done = _assign(exp, path, value, item) or done
    if not done:
      keys = sorted(set(cfg) | {k for e in cfg.get("experiments", [])
                                for k in e})
      raise ConfigError(f"--set {item}: no config key {key!r}; keys: "
                        f"{', '.join(keys)}")
  return cfg


def notebook_setup(name: str, scales=SCALES) -> tuple[str, str]:
  """The shared first cell of every notebook: scale, output folder, devices.

  Reads ``QJAX_SCALE`` (default ``"cpu"``; one of ``scales``) and
  ``QJAX_NOTEBOOK_OUT`` (default ``results/notebooks/<name>``), exposes the
  CPU cores as JAX devices (before the first array), creates the folder.
  """
  sweep_lib.cpu_devices()
  scale = os.environ.get("QJAX_SCALE", "cpu")
  if scale not in scales:
    raise ValueError(f"QJAX_SCALE={scale!r}; expected one of {scales} "
                     "(unset it for the default, 'cpu').")
  out = os.environ.get("QJAX_NOTEBOOK_OUT",
                       os.path.join("results", "notebooks", name))
  os.makedirs(out, exist_ok=True)
  print(f"scale={scale}, figures and results in {out}")
  return scale, out


def positive_int(text: str) -> int:
  """argparse type for counts: an int >= 1, else a message saying so."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
  return value


def _items(text: str, what: str) -> list[str]:
  items = [v.strip() for v in text.split(",")]
  if not text.strip() or any(not v for v in items):
    raise argparse.ArgumentTypeError(
        f"expected a comma-separated list of {what}, got {text!r}")
  return items


def _distinct(values: tuple, text: str) -> tuple:
  if len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(f"values repeat in {text!r}")
  return values


def int_list(minimum: int = 0, maximum: int | None = None,
             distinct: bool = True) -> Callable:
  """argparse type: ``"0,1,2"`` -> ``(0, 1, 2)``, ints in range.

  With ``distinct`` (seeds, decay epochs) a repeated value is refused.
  """
  what = (f"ints >= {minimum}" if maximum is None
          else f"ints in [{minimum}, {maximum}]")

  def parse(text: str) -> tuple[int, ...]:
    out = []
    for item in _items(text, what):
      try:
        value = int(item)
      except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {what}, got {text!r} "
            f"({item!r} is not an int)") from None
      if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {what}, got {text!r}")
      out.append(value)
    return _distinct(tuple(out), text) if distinct else tuple(out)
  return parse


def _positive_float32(text: str) -> float | None:
  """``float(text)`` when it is > 0 and finite in float32, else None."""
  try:
    value = float(text)
  except ValueError:
    return None
  with np.errstate(over="ignore"):
    ok = np.isfinite(np.float32(value)) and np.float32(value) > 0
  return value if ok else None


def positive_float(text: str) -> float:
  """argparse type: one float > 0, finite in float32 (a learning rate)."""
  value = _positive_float32(text)
  if value is None:
    raise argparse.ArgumentTypeError(
        f"expected a number > 0 (finite in float32), got {text!r}")
  return value


def positive_float_list(text: str) -> tuple[float, ...]:
  """argparse type: ``"0.01,0.001"`` -> distinct floats > 0, finite in f32."""
  what = "numbers > 0 (finite in float32)"
  out = []
  for item in _items(text, what):
    value = _positive_float32(item)
    if value is None:
      raise argparse.ArgumentTypeError(
          f"expected a comma-separated list of {what}, got {text!r} "
          f"({item!r} is not allowed)")
    out.append(value)
  return _distinct(tuple(out), text)


def name_list(choices) -> Callable:
  """argparse type: ``"fp,sr"`` -> ``("fp", "sr")``, each one of ``choices``."""
  what = f"names from {{{','.join(choices)}}}"

  def parse(text: str) -> tuple[str, ...]:
    items = _items(text, what)
    unknown = [v for v in items if v not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(
          f"unknown {unknown} in {text!r}; choose from {', '.join(choices)}")
    return _distinct(tuple(items), text)
  return parse


def add_cpu_devices_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cpu-devices", type=positive_int, default=None,
                 help="expose the CPU as this many JAX devices, over which "
                 "a sweep's configs are sharded (default: one per core; 1: "
                 "one device; no effect on GPU/TPU); see "
                 "qjax.sweep.cpu_devices")


def main(name: str, doc: str, config: Callable, run: Callable,
         plot: Callable, summary: Callable, argv=None) -> int:
  """The shared entry point: parse, run, write, plot, print a summary."""
  args = parser(name, doc).parse_args(argv)
  sweep_lib.cpu_devices(args.cpu_devices)  # before JAX creates an array
  cfg = config(args.scale)
  try:
    cfg = override(cfg, args.overrides)
  except ConfigError as err:
    print(f"python -m experiments.{name}: error: {err}", file=sys.stderr)
    return 2
  if args.show:
    print(json.dumps(cfg, indent=1))
    return 0
  try:
    check_values(cfg)
  except ConfigError as err:
    print(f"python -m experiments.{name}: error: {err}", file=sys.stderr)
    return 2
  if args.only:
    try:
      cfg = select(cfg, [n for n in args.only.split(",") if n])
    except ValueError as err:
      print(f"python -m experiments.{name}: error: --only: {err}",
            file=sys.stderr)
      return 2
  t0 = time.time()
  try:
    results = run(cfg, out_dir=args.out, progress=not args.no_progress)
  except (UnsupportedExperimentError, data_lib.DatasetNotFoundError,
          data_lib.DatasetCorruptError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except ConfigError as err:  # a config value the run itself refuses
    print(f"python -m experiments.{name}: error: {err}", file=sys.stderr)
    return 2
  paths = plot(results, args.out)
  print(summary(results))
  print(f"\n{time.time() - t0:.0f} s; results in {os.path.abspath(args.out)}"
        f"; figures: {', '.join(paths)}")
  return 0
