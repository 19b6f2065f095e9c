"""Sweep throughput: C configs in one program against C sequential runs.

Claim checked: training C configs (seeds 0..C-1, one learning rate) of one
method as a single sweep (:mod:`qjax.sweep`) is faster than training them one
after another in the same process, with the strategy the engine chooses
(:func:`qjax.sweep.choose_strategy`).

Expected result (2 CPU cores): the MLP sweep at least 1.5x the examples/s of
the sequential runs; the small CNN sweep never slower (at least 1.0x).
``--strategies all`` also times every (steps x configs) strategy, so that the
engine's choice is justified by numbers.

Two scopes are timed:

* ``steps``: training steps only (``Programs.run_epoch`` up to
  ``jax.block_until_ready``), after a warm-up epoch that compiles.
  Initialisation, shuffling and evaluation are excluded. An epoch is
  ``--steps`` batches of 128: the training set is cut to ``steps * 128``
  examples (MNIST from the cache, else synthetic arrays of the same shape;
  throughput does not depend on the pixel values).
* ``runs`` (``--end-to-end``, default the MLP): whole runs as a researcher
  makes them, ``C`` calls of :func:`qjax.sweep.train` against one
  :func:`qjax.sweep.sweep`, ``--runs-epochs`` epochs of all of MNIST with
  the test set evaluated after each epoch, after a warm-up call of each so
  that neither pays compilation.

In both, the sequential runs reuse their compiled single-config programs, and
inputs are placed as the engine places them: by default the CPU is exposed as
one device per core (:func:`qjax.sweep.cpu_devices`, as ``experiments.train``
does), so the sweep's configs are sharded over the cores while a single run
uses one device and XLA's threads; ``--cpu-devices 1`` measures the
unsharded engine. Every measurement runs once per round, rounds interleaved,
and the fastest round counts: the machine's load drifts, and interleaving
exposes sweeps and sequential runs to the same drift. The ``cores`` column is
the process's CPU time over the wall time of that round.

What limits the MLP's ratio on 2 cores (measured here, SR-ADAM, 16 configs):
on one core (``taskset -c 0``) the vmapped sweep trains only 1.04x as fast as
the sequential runs, because every config does the same work (its own
batches, its own matmuls and SR noise) with or without vmap. On 2 cores the
sweep keeps both busy (cores 1.98) while a single run's small ops split over
two threads keep them 1.66 busy and spend part of that waiting. The steps
ratio is therefore the sequential runs' idle time, about 1.4x to 1.6x from
round to round here, and the whole-runs ratio adds the per-run costs a sweep
pays once.

Runtime on 2 shared CPU cores with the defaults (MLP 50 steps x 5 rounds
plus 2 rounds of 16 one-epoch MNIST runs; CNN 5 steps x 3 rounds): about
4 min for the MLP and 1 min for the CNN (a CNN step is about 0.15 s, an MLP
step 3 ms). With ``--strategies all`` the MLP takes about 9 min more
(``lax.map`` is slow) and the CNN well over 30 min: a scanned CNN epoch of
16 x 5 steps took 105 s against 11.8 s looped, so use ``--steps 1 --repeats
1`` there. The JSON is rewritten after each model, so an interrupted run
keeps the models it finished.

Command: ``python -m benchmarks.sweep_throughput [--configs 16] [--steps N]
[--models mlp,cnn] [--strategies auto|all] [--repeats R] [--cpu-devices N]
[--end-to-end mlp] [--runs-epochs 1] [--runs-repeats 2]
[--out results/benchmarks/sweep_throughput.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from experiments import common
from qjax import data as data_lib
from qjax import models as models_lib
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

BATCH = 128
LR = 1e-3
MODEL_KWARGS = {"mlp": {"features": (256, 256)}, "cnn": {}}
TARGETS = {"mlp": 1.5, "cnn": 1.0}  # sweep / sequential examples per second
# A CNN step takes about 0.15 s on 2 shared CPU cores, an MLP step 3 ms.
DEFAULT_STEPS = {"mlp": 50, "cnn": 5}
# Rounds per measurement (the fastest counts): on this shared CPU the same
# 16 sequential MLP epochs measured anywhere from 2.9 to 4.2 s.
DEFAULT_REPEATS = {"mlp": 5, "cnn": 3}
ALL_STRATEGIES = tuple(sweep_lib.Strategy(steps, configs)
                       for steps in ("scan", "loop")
                       for configs in ("vmap", "map", "loop"))


def load_dataset(num_train: int | None = None):
  """MNIST from the cache (the first ``num_train`` training examples, and as
  many test examples at most), or synthetic arrays of MNIST's shapes when it
  is not fetched: throughput does not depend on the pixel values."""
  try:
    ds = data_lib.load("mnist")
    source = "mnist (cache)"
  except (data_lib.DatasetNotFoundError, data_lib.DatasetCorruptError):
    rng = np.random.default_rng(0)
    n_train, n_test = num_train or 60000, min(num_train or 10000, 10000)
    ds = data_lib.Dataset(
        "synthetic", rng.random((n_train, 28, 28, 1), np.float32),
        rng.integers(0, 10, n_train, dtype=np.int32),
        rng.random((n_test, 28, 28, 1), np.float32),
        rng.integers(0, 10, n_test, dtype=np.int32), 10)
    source = "synthetic (mnist not in cache)"
  if num_train is not None:
    ds = ds._replace(train_x=ds.train_x[:num_train],
                     train_y=ds.train_y[:num_train],
                     test_x=ds.test_x[:num_train], test_y=ds.test_y[:num_train])
  return ds, source


def load_data(num_examples: int) -> tuple[np.ndarray, np.ndarray, str]:
  """The first ``num_examples`` MNIST training examples, or synthetic ones."""
  ds, source = load_dataset(num_examples)
  if ds.train_x.shape[0] < num_examples:
    raise ValueError(f"--steps needs {num_examples} training examples; "
                     f"{ds.name!r} has {ds.train_x.shape[0]}. Lower --steps.")
  return ds.train_x[:num_examples], ds.train_y[:num_examples], source


def _label(strategy: sweep_lib.Strategy) -> str:
  return f"{strategy.steps}/{strategy.configs}"


class Runner:
  """One compiled ``Programs`` and the inputs to time its epochs on (also
  used by ``benchmarks.gpu_models``)."""

  def __init__(self, model, config, strategy, x, y):
    self.programs = sweep_lib.Programs(model, config, strategy)
    self.data, self.config = (x, y), config
    self.placed = {}  # device count -> (x, y) on those devices, made once

  def prepare(self, seeds) -> tuple:
    """Initial states, hparams, data and one epoch of batch indices for
    ``seeds``, placed as :func:`qjax.sweep.run_chunk` places them (configs
    sharded over up to ``len(seeds)`` devices, data on each of them)."""
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    hps = {"lr": jnp.full((len(seeds),), LR, jnp.float32)}
    sharding = sweep_lib.config_sharding(len(seeds))
    if sharding is not None:
      if len(seeds) % len(sharding.device_set):
        raise ValueError(f"--configs {len(seeds)} must be a multiple of the "
                         f"{len(sharding.device_set)} devices.")
      keys, hps = jax.device_put((keys, hps), sharding)
    count = 1 if sharding is None else len(sharding.device_set)
    if count not in self.placed:
      self.placed[count] = sweep_lib.replicated(sharding, self.data)
    x, y = self.placed[count]
    states = self.programs.init(keys, x[:self.config.batch_size], hps)
    idx = sweep_lib.shuffles(
        states.key, x.shape[0], self.config.batch_size)
    return jax.block_until_ready((states, hps, x, y, idx))

  def epoch_seconds(self, states, hps, x, y, idx) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.programs.run_epoch(states, x, y, idx, hps))
    return time.perf_counter() - t0

  def warm_up(self, seeds) -> None:
    self.epoch_seconds(*self.prepare(seeds))


class _Fastest:
  """The fastest round so far: wall seconds and the CPU seconds it used."""

  best, best_cpu = float("inf"), None

  def _keep(self, seconds: float, cpu_start: float) -> float:
    if seconds < self.best:
      self.best, self.best_cpu = seconds, time.process_time() - cpu_start
    return seconds


class _Timing(_Fastest):
  """One measured program: a sweep of all configs, or one config at a time.

  ``once()`` times one epoch of every config; the fastest of the rounds
  counts. Sequential runs reuse one compiled single-config program and pay
  no compilation.
  """

  def __init__(self, runner: Runner, kind: str, num_configs: int):
    self.runner = runner
    if kind == "sweep":
      runner.warm_up(list(range(num_configs)))
      self.inputs = [runner.prepare(list(range(num_configs)))]
    else:
      runner.warm_up([0])
      self.inputs = [runner.prepare([s]) for s in range(num_configs)]

  def once(self) -> float:
    cpu = time.process_time()
    return self._keep(sum(self.runner.epoch_seconds(*i) for i in self.inputs),
                      cpu)


class _RunTiming(_Fastest):
  """Whole runs through the public API: ``C`` calls of
  :func:`qjax.sweep.train` (one seed each) against one
  :func:`qjax.sweep.sweep` of the ``C`` seeds, on the whole dataset.

  This is what a researcher waits for: every run initialises its state,
  places the data, shuffles and evaluates the test set after each epoch, and
  copies its results to the host. A warm-up call of each compiles first, so
  neither side pays compilation (single runs reuse their compiled programs,
  as 16 runs in one process do).
  """

  def __init__(self, model, model_name, dataset, config, kind: str,
               num_configs: int):
    seeds = tuple(range(num_configs))
    options = {"model_name": model_name, "progress": False}
    if kind == "sweep":
      self.call = lambda: sweep_lib.sweep(
          model, dataset, config, sweep_lib.SweepSpec(seeds, (LR,)),
          **options)
    else:
      self.call = lambda: [sweep_lib.train(model, dataset, config, seed=s,
                                           lr=LR, **options) for s in seeds]
    self.call()

  def once(self) -> float:
    cpu, t0 = time.process_time(), time.perf_counter()
    self.call()
    return self._keep(time.perf_counter() - t0, cpu)


def _row(model_name, scope, kind, strategy, num_configs, steps, timing,
         chosen) -> dict:
  """``steps``: training steps per config in the timed work."""
  return {"model": model_name, "scope": scope, "kind": kind,
          "strategy": _label(strategy), "chosen": chosen,
          "configs": num_configs, "steps": steps, "seconds": timing.best,
          "examples_per_s": num_configs * steps * BATCH / timing.best,
          "cpu_seconds": timing.best_cpu,
          "cores_busy": timing.best_cpu / timing.best}


def _add_ratios(rows: list[dict], model_name: str, source: str,
                repeats: int) -> None:
  """Ratios against the scope's first (engine-strategy) sequential row."""
  baseline = rows[0]["examples_per_s"]
  best_sequential = max(r["examples_per_s"] for r in rows
                        if r["kind"] == "sequential")
  for row in rows:
    row["data"] = source
    row["repeats"] = repeats
    row["ratio"] = row["examples_per_s"] / baseline
    row["ratio_vs_best_sequential"] = row["examples_per_s"] / best_sequential
    if row["kind"] == "sweep":
      row["target"] = TARGETS[model_name]
      row["pass"] = bool(row["ratio"] >= row["target"])


def bench_model(model_name: str, args) -> list[dict]:
  """Sequential and sweep rows for one model; ratios against sequential."""
  steps = args.steps or DEFAULT_STEPS[model_name]
  repeats = args.repeats or DEFAULT_REPEATS[model_name]
  x, y, source = load_data(steps * BATCH)
  model = models_lib.get(model_name, 10, **MODEL_KWARGS[model_name])
  config = train_lib.TrainConfig(method=args.method, optimizer="adam",
                                 batch_size=BATCH, epochs=1,
                                 steps_per_epoch=steps)
  chosen = sweep_lib.choose_strategy(model_name)
  strategies = ALL_STRATEGIES if args.strategies == "all" else (chosen,)
  # A single run (qjax.sweep.train) uses the engine's strategy; "all" also
  # times the other steps mode so the baseline is the fastest single run.
  seq_strategies = [chosen] + [
      dataclasses.replace(chosen, steps=s) for s in ("scan", "loop")
      if args.strategies == "all" and s != chosen.steps]
  measured = ([("sequential", st) for st in seq_strategies]
              + [("sweep", st) for st in strategies])
  timings = [_Timing(Runner(model, config, st, x, y), kind, args.configs)
             for kind, st in measured]
  # Rounds interleave every measurement, so that a change in the machine's
  # load during the benchmark hits sweeps and sequential runs alike.
  for r in range(repeats):
    for timing, (kind, strategy) in zip(timings, measured):
      seconds = timing.once()
      print(f"  round {r + 1}/{repeats}: {model_name} {kind} "
            f"{_label(strategy)}: {seconds:.2f} s", flush=True)
  rows = [_row(model_name, "steps", kind, st, args.configs, steps, t,
               st == chosen) for t, (kind, st) in zip(timings, measured)]
  _add_ratios(rows, model_name, source, repeats)
  if model_name in args.end_to_end.split(","):
    rows += bench_runs(model_name, model, chosen, args)
  return rows


def bench_runs(model_name: str, model, chosen, args) -> list[dict]:
  """End-to-end rows: C single runs against one sweep (see _RunTiming)."""
  dataset, source = load_dataset(args.runs_examples)
  config = train_lib.TrainConfig(method=args.method, optimizer="adam",
                                 batch_size=BATCH, epochs=args.runs_epochs)
  steps = args.runs_epochs * (dataset.train_x.shape[0] // BATCH)
  kinds = ("sequential", "sweep")
  timings = [_RunTiming(model, model_name, dataset, config, kind,
                        args.configs) for kind in kinds]
  for r in range(args.runs_repeats):
    for timing, kind in zip(timings, kinds):
      seconds = timing.once()
      print(f"  round {r + 1}/{args.runs_repeats}: {model_name} {kind} "
            f"runs: {seconds:.2f} s", flush=True)
  rows = [_row(model_name, "runs", kind, chosen, args.configs, steps, t, True)
          for t, kind in zip(timings, kinds)]
  _add_ratios(rows, model_name, source, args.runs_repeats)
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f"{'model':5} {'scope':5} {'kind':10} {'strategy':11} "
          f"{'configs':>7} {'steps':>5} {'seconds':>8} {'examples/s':>11} "
          f"{'cores':>5} {'ratio':>6} {'vs best seq':>11} {'target':>7} result")
  lines = [head, "-" * len(head)]
  for r in rows:
    strategy = r["strategy"] + ("*" if r["chosen"] else "")
    target = f">={r['target']:.1f}x" if "target" in r else "-"
    result = ("PASS" if r["pass"] else "FAIL") if "pass" in r else "-"
    lines.append(
        f"{r['model']:5} {r['scope']:5} {r['kind']:10} {strategy:11} "
        f"{r['configs']:>7} {r['steps']:>5} {r['seconds']:>8.2f} "
        f"{r['examples_per_s']:>11.0f} {r['cores_busy']:>5.2f} "
        f"{r['ratio']:>5.2f}x {r['ratio_vs_best_sequential']:>10.2f}x "
        f"{target:>7} {result}")
  lines.append("* the engine's choice (qjax.sweep.choose_strategy); ratio is "
               "against the sequential runs of the same scope.")
  lines.append("scope steps: training steps only, per config; runs: whole "
               "qjax.sweep.train runs against one qjax.sweep.sweep. cores: "
               "process CPU time / wall time.")
  return "\n".join(lines)


def fastest_notes(rows: list[dict]) -> list[str]:
  """One line per model whose fastest measured sweep is not the engine's."""
  notes = []
  for model in dict.fromkeys(r["model"] for r in rows):
    sweeps = [r for r in rows if r["model"] == model and r["kind"] == "sweep"
              and r["scope"] == "steps"]
    best = max(sweeps, key=lambda r: r["examples_per_s"])
    chosen = next(r for r in sweeps if r["chosen"])
    if best is not chosen:
      notes.append(
          f"{model}: the engine chose {chosen['strategy']} "
          f"({chosen['examples_per_s']:.0f} examples/s) but {best['strategy']}"
          f" measured fastest ({best['examples_per_s']:.0f} examples/s, "
          f"{best['examples_per_s'] / chosen['examples_per_s']:.2f}x).")
  return notes


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", type=common.positive_int, default=16)
  parser.add_argument("--steps", type=common.positive_int, default=None,
                      help="training steps (batches of 128) per epoch; "
                      f"default per model {DEFAULT_STEPS}")
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--strategies", choices=("auto", "all"), default="auto")
  parser.add_argument("--method", choices=("sr", "bc"), default="sr")
  parser.add_argument("--repeats", type=common.positive_int, default=None,
                      help="timed epochs per measurement, the fastest counts; "
                      f"default per model {DEFAULT_REPEATS}")
  parser.add_argument("--end-to-end", default="mlp",
                      help="models (comma-separated, '' for none) also timed "
                      "as whole runs: C x qjax.sweep.train against one "
                      "qjax.sweep.sweep (default: mlp; a CNN epoch of 16 "
                      "runs takes many minutes here)")
  parser.add_argument("--runs-epochs", type=common.positive_int, default=1,
                      help="epochs per run in the end-to-end rows")
  parser.add_argument("--runs-examples", type=common.positive_int, default=None,
                      help="training (and at most as many test) examples in "
                      "the end-to-end rows; default: all of MNIST")
  parser.add_argument("--runs-repeats", type=common.positive_int, default=2,
                      help="rounds of the end-to-end rows; the fastest counts")
  parser.add_argument("--out",
                      default="results/benchmarks/sweep_throughput.json")
  common.add_cpu_devices_flag(parser)  # as the experiment commands have it
  args = parser.parse_args(argv)
  cpu_devices = sweep_lib.cpu_devices(args.cpu_devices)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted((set(models) | set(filter(None,
                                              args.end_to_end.split(","))))
                   - set(TARGETS))
  if unknown:
    raise ValueError(f"--models and --end-to-end must be among "
                     f"{sorted(TARGETS)}; got {unknown}.")
  rows = []
  for model_name in models:
    rows += bench_model(model_name, args)
    result = _write(args, rows, cpu_devices)  # after each model: a long
    print(format_table(rows))                 # run keeps what it measured
  for note in result["notes"]:
    print("NOTE:", note)
  return result


def _write(args, rows: list[dict], cpu_devices: int) -> dict:
  result = {
      "rows": rows, "notes": fastest_notes(rows), "batch_size": BATCH,
      "lr": LR, "method": f"{args.method}-adam",
      "backend": jax.default_backend(), "devices": len(jax.devices()),
      "cpu_devices": cpu_devices,
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "qjax": getattr(qjax, "__version__", None),
      "python": platform.python_version(),
  }
  results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
