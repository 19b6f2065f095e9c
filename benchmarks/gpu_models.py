"""Paper-scale models on an accelerator: VGG-9 and ResNet-56 steps per second.

What a GPU user runs before a paper-scale experiment (``experiments.table1
--scale paper``): how long one CIFAR-10 epoch of VGG-9 and ResNet-56 takes
with a qjax method, for one config and for ``C`` configs in one vmapped
program, on this device.

What is timed: the engine's own compiled epoch program
(:class:`qjax.sweep.Programs` ``run_epoch``, with the strategy the engine
chooses for the backend, :func:`qjax.sweep.choose_strategy`: a scanned epoch
with vmapped configs on GPU/TPU), ``--steps`` batches of ``--batch``
(default 390 x 128: one CIFAR-10 epoch), after a warm-up epoch that
compiles, until ``jax.block_until_ready``; the fastest of ``--repeats``.
The configs are seeds 0..C-1 at one lr (the work is the same for any lr).
The method defaults to SR-ADAM with the conv kernels on ``±1`` as in the
paper's Table 1 (``mask='conv'``, ``grid='binary'``).

Data: synthetic CIFAR-10-shaped arrays (32x32x3 float32 in [0, 1), labels in
0..9, numpy seed 0): a step's time does not depend on the pixel values.
Printed per (model, configs): the device, compile + first epoch seconds,
epoch seconds, steps/s, images/s (configs x batch x steps / epoch seconds)
and the device's peak memory (``memory_stats()['peak_bytes_in_use']``,
since the process started; "n/a" where the backend has none, as on CPU).

Runtime: not measured on a GPU yet (none was lent to the session that wrote
it); on 2 CPU cores a ``--steps 1 --batch 2`` VGG-9 run takes about 20 s,
mostly compilation. The defaults (both models, 1 and 16 configs, one epoch
each) are meant to fit in a few minutes on one H100/H200; ``--steps 100``
gives a quarter epoch.

Command: ``python -m benchmarks.gpu_models [--models vgg9,resnet56]
[--configs 1,16] [--steps 390] [--batch 128] [--method sr] [--repeats 1]
[--json results/benchmarks/gpu_models.json]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from benchmarks.sweep_throughput import Runner
from experiments import common
from qjax import methods as methods_lib
from qjax import models as models_lib
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

MODELS = ("vgg9", "resnet56")
IMAGE = (32, 32, 3)
CLASSES = 10


def synthetic_cifar(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.random((num, *IMAGE), np.float32),
          rng.integers(0, CLASSES, num, dtype=np.int32))


def peak_memory_bytes() -> int | None:
  """The default device's peak bytes in use, or None without the stat."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def bench(model_name: str, configs: int, args, x, y) -> dict:
  """One (model, configs) row: compile and epoch seconds, images/s, memory."""
  model = models_lib.get(model_name, CLASSES)
  config = train_lib.TrainConfig(method=args.method, optimizer="adam",
                                 mask="conv", grid="binary",
                                 batch_size=args.batch, epochs=1,
                                 steps_per_epoch=args.steps)
  strategy = sweep_lib.choose_strategy(model_name)
  runner = Runner(model, config, strategy, x, y)
  seeds = list(range(configs))
  t0 = time.perf_counter()
  runner.warm_up(seeds)
  compile_s = time.perf_counter() - t0
  epoch_s = min(runner.epoch_seconds(*runner.prepare(seeds))
                for _ in range(args.repeats))
  device = jax.devices()[0]
  return {"model": model_name, "configs": configs, "method": args.method,
          "steps": args.steps, "batch": args.batch,
          "strategy": f"{strategy.steps}/{strategy.configs}",
          "device": f"{device.platform}: {device.device_kind}",
          "compile_and_first_epoch_s": compile_s, "epoch_s": epoch_s,
          "steps_per_s": args.steps / epoch_s,
          "images_per_s": configs * args.batch * args.steps / epoch_s,
          "peak_memory_bytes": peak_memory_bytes()}


def format_table(rows: list[dict]) -> str:
  head = (f"{'model':9} {'configs':>7} {'compile+1st s':>13} {'epoch s':>8} "
          f"{'steps/s':>8} {'images/s':>9} {'peak GiB':>8}")
  lines = [f"device: {rows[0]['device']}; method {rows[0]['method']}, "
           f"{rows[0]['steps']} steps of batch {rows[0]['batch']}, strategy "
           f"{rows[0]['strategy']}", head, "-" * len(head)]
  for r in rows:
    peak = ("n/a" if r["peak_memory_bytes"] is None
            else f"{r['peak_memory_bytes'] / 2**30:.2f}")
    lines.append(f"{r['model']:9} {r['configs']:>7} "
                 f"{r['compile_and_first_epoch_s']:>13.1f} "
                 f"{r['epoch_s']:>8.2f} {r['steps_per_s']:>8.1f} "
                 f"{r['images_per_s']:>9.0f} {peak:>8}")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.gpu_models",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=common.name_list(MODELS),
                 default=MODELS, help=f"of {', '.join(MODELS)}")
  p.add_argument("--configs", type=common.int_list(1), default=(1, 16),
                 help="config counts to time, e.g. 1,16")
  p.add_argument("--steps", type=common.positive_int, default=390)
  p.add_argument("--batch", type=common.positive_int, default=128)
  p.add_argument("--repeats", type=common.positive_int, default=1)
  p.add_argument("--method", default="sr",
                 choices=sorted(methods_lib.names()))
  p.add_argument("--json", default=None, help="write the rows here")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  x, y = synthetic_cifar(args.steps * args.batch)
  rows = []
  for model_name in args.models:
    for configs in args.configs:
      rows.append(bench(model_name, configs, args, x, y))
      print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  print(format_table(rows))
  if args.json:
    results_lib.write_json(args.json, {
        "benchmark": "gpu_models", "environment": results_lib.environment(),
        "args": {k: list(v) if isinstance(v, tuple) else v
                 for k, v in vars(args).items()}, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
