"""Single-run step throughput: qjax's compiled step against plain PyTorch.

Claim checked (the speed issue): qjax's single-run MLP step is at least
1.3x the steps per second of a straightforward PyTorch CPU loop of the same
network and method (``benchmarks/torch_reference.py``). This benchmark only
measures; it prints both and their ratio, one row per method.

What is timed:

* qjax: the engine's own compiled epoch program for one config
  (``qjax.sweep.programs(...).run_epoch``, the scanned steps a
  ``qjax.sweep.train`` epoch runs), ``--steps`` batches, after a warm-up
  epoch that compiles, until ``jax.block_until_ready``.
* PyTorch: ``--steps`` calls of ``ReferenceStep.step`` after ``--warmup``
  steps, with ``torch.set_num_threads`` left at its default (one per core).

Both on MNIST-shaped synthetic data (28x28x1 inputs, 10 classes, batch
``--batch``): step time does not depend on the pixel values. Rounds are
interleaved and the fastest counts (the machine's load drifts). Without
torch installed (``pip install torch``, the CPU wheel) the PyTorch columns
are empty and the command says so.

Command: ``python -m benchmarks.step_throughput [--methods fp,bc,sr,r]
[--steps 100] [--repeats 3] [--batch 128] [--features 512,512]
[--out results/benchmarks/step_throughput.json]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from qjax import models
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

METHODS = ("fp", "bc", "sr", "r")
TARGET = 1.3  # qjax / PyTorch steps per second (the speed issue)


def _qjax_epoch(method: str, features, batch: int, steps: int, lr: float,
                grid: str = "glorot"):
  """A callable running one compiled epoch of ``steps`` for one config."""
  model = models.get("mlp", 10, features=features)
  config = train_lib.TrainConfig(method=method, batch_size=batch, epochs=1,
                                 steps_per_epoch=steps, grid=grid)
  programs = sweep_lib.programs(model, config, sweep_lib.Strategy())
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((steps * batch, 28, 28, 1), np.float32))
  y = jnp.asarray(rng.integers(0, 10, steps * batch), jnp.int32)
  hps = {"lr": jnp.full((1,), lr, jnp.float32)}
  states = programs.init(jax.random.PRNGKey(0)[None], x[:batch], hps)
  idx = jnp.arange(steps * batch, dtype=jnp.int32).reshape(1, steps, batch)

  def run():
    nonlocal states
    states, metrics = programs.run_epoch(states, x, y, idx, hps)
    jax.block_until_ready((states, metrics))
  return run


def _torch_steps(method: str, features, batch: int, steps: int, lr: float):
  try:
    import torch
  except ImportError:
    return None
  from benchmarks import torch_reference
  ref = torch_reference.ReferenceStep(method, features, lr=lr)
  g = torch.Generator().manual_seed(0)
  x = torch.rand((steps, batch, 784), generator=g)
  y = torch.randint(0, 10, (steps, batch), generator=g)

  def run():
    for t in range(steps):
      loss = ref.step(x[t], y[t])
    float(loss)  # waits for the last step
  return run


def _fastest(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def bench(method: str, args) -> dict:
  qjax_run = _qjax_epoch(method, args.features, args.batch, args.steps,
                         args.lr)
  qjax_run()  # compile and warm up
  torch_run = _torch_steps(method, args.features, args.batch, args.steps,
                           args.lr)
  if torch_run is not None:
    torch_run()  # warm up (allocator, threads)
  q_times, t_times = [], []
  for _ in range(args.repeats):  # interleaved rounds
    q_times += _fastest(qjax_run, 1)
    if torch_run is not None:
      t_times += _fastest(torch_run, 1)
  q = args.steps / min(q_times)
  t = args.steps / min(t_times) if t_times else None
  row = {"method": method, "qjax_steps_per_s": q, "torch_steps_per_s": t,
         "ratio": None if t is None else q / t,
         "qjax_round_s": q_times, "torch_round_s": t_times}
  print(f"  {method}: qjax {q:.1f} steps/s, torch "
        f"{'-' if t is None else f'{t:.1f}'} steps/s, ratio "
        f"{'-' if t is None else f'{q / t:.2f}'}", flush=True)
  return row


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
  lines = ["| method | qjax steps/s | PyTorch steps/s | qjax / PyTorch | "
           f"target >= {TARGET} |", "|---|---:|---:|---:|---|"]
  for r in rows:
    ratio = r["ratio"]
    verdict = "-" if ratio is None else ("met" if ratio >= TARGET
                                         else "not met")
    lines.append(f"| {r['method']}-adam | {r['qjax_steps_per_s']:.1f} | "
                 f"{_cell(r['torch_steps_per_s'], '.1f')} | "
                 f"{_cell(ratio, '.2f')} | {verdict} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", type=common.name_list(METHODS),
                      default=",".join(METHODS))
  parser.add_argument("--steps", type=common.positive_int, default=100)
  parser.add_argument("--repeats", type=common.positive_int, default=3)
  parser.add_argument("--batch", type=common.positive_int, default=128)
  parser.add_argument("--features", type=common.int_list(1, distinct=False),
                      default="512,512")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--out",
                      default="results/benchmarks/step_throughput.json")
  args = parser.parse_args(argv)
  rows = [bench(m, args) for m in args.methods]
  table = format_table(rows)
  print(table)
  if all(r["ratio"] is None for r in rows):
    print("torch is not installed: PyTorch columns empty (pip install torch)",
          file=sys.stderr)
  result = {"args": vars(args),
            "environment": results_lib.environment(), "rows": rows,
            "table": table}
  results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
