"""Single-run step throughput: qjax's compiled step against plain PyTorch.

Claim checked (the speed issue): qjax's single-run MLP step is at least
1.3x the steps per second of a straightforward PyTorch CPU loop of the same
network and method (``benchmarks/torch_reference.py``), and the convnet of
the CPU-scale experiments (``--model allconv``: ``qjax.models.AllConv``,
conv ``16, M, 32, M, 64`` on 14x14x1 inputs, conv kernels on ``±1``) at
least at parity. This benchmark only measures; it prints both and their
ratio, one row per method.

What is timed:

* qjax: the engine's own compiled epoch program for one config
  (``qjax.sweep.programs(...).run_epoch`` with the strategy the engine
  picks, :func:`qjax.sweep.choose_strategy`: the scanned steps of a
  ``qjax.sweep.train`` epoch for the MLP, a Python loop of jitted steps for
  the convnet on CPU), ``--steps`` batches, after a warm-up epoch that
  compiles, until ``jax.block_until_ready``.
* PyTorch: ``--steps`` calls of ``ReferenceStep.step`` after ``--warmup``
  steps, with ``torch.set_num_threads`` left at its default (one per core).

Both on MNIST-shaped synthetic data (28x28x1 inputs for the MLP, 14x14x1
for the all-conv net, 10 classes, batch ``--batch``): step time does not
depend on the pixel values. Rounds are interleaved and the fastest counts
(the machine's load drifts). Without torch installed (``pip install
torch``, the CPU wheel) the PyTorch columns are empty and the command says
so.

Achieved FLOP/s: the step's matrix-multiply work (:func:`mlp_step_flops`,
:func:`allconv_step_flops`: forward, weight gradients and input gradients
of every dense or conv layer but the first; elementwise work not counted)
times qjax's steps per second, next to the machine's measured float32 GEMM
rate (:func:`measured_sgemm`: the best of numpy's BLAS and, when
installed, PyTorch's, over the MLP step's own matmul shapes and 1024^3),
the practical limit, as a percentage.

``--strategy STEPS-CONFIGS`` times another strategy than the engine's
(e.g. ``scan-vmap``, the MLP's CPU default before 2026-12-07).

Command: ``python -m benchmarks.step_throughput [--model mlp|allconv]
[--methods fp,bc,sr,r] [--steps 100] [--repeats 3] [--batch 128]
[--strategy auto|scan-vmap|scan-loop|loop-vmap|loop-loop]
[--random-bits threefry|hash]
[--features 512,512] [--out results/benchmarks/step_throughput.json]``.
After the table, every method's step time over FP-ADAM's, timed
interleaved in one set of rounds (SR with both sources of random bits),
against the targets BC <= 1.10, SR <= 1.15, R <= 1.10 (``--no-overheads``
skips it). ``--random-bits hash`` times SR with qjax's cheaper random bits
(:func:`qjax.quantizers.hash_bits`); the PyTorch reference is unchanged.
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
from qjax import quantizers
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

METHODS = ("fp", "bc", "sr", "r")
# qjax / PyTorch steps per second (the speed issue): 1.3x on the MLP,
# parity on the convnet.
TARGETS = {"mlp": 1.3, "allconv": 1.0}
# Step time relative to FP-ADAM's (the speed issue), at most.
OVERHEAD_TARGETS = {"bc": 1.10, "sr": 1.15, "r": 1.10}


INPUTS, CLASSES = 784, 10
MODELS = ("mlp", "allconv")
STRATEGIES = ("auto", "scan-vmap", "scan-loop", "loop-vmap", "loop-loop")
CONV_SPEC = (16, "M", 32, "M", 64)  # experiments.common.allconv_net("cpu")
CONV_SIZE = 14  # MNIST downsampled 2x2, as the CPU-scale experiments


def mlp_step_flops(features, batch: int, inputs: int = INPUTS,
                   classes: int = CLASSES) -> int:
  """Multiply-add FLOPs (2 per multiply-add) of one MLP training step.

  Per dense layer ``a -> b``: ``2 B a b`` forward, as much for the weight
  gradient, and as much for the input gradient except in the first layer
  (the data needs none).
  """
  widths = [inputs, *features, classes]
  layers = list(zip(widths, widths[1:]))
  return sum(2 * batch * a * b * (2 if i == 0 else 3)
             for i, (a, b) in enumerate(layers))


def allconv_step_flops(conv_spec, batch: int, size: int = CONV_SIZE,
                       channels: int = 1, classes: int = CLASSES) -> int:
  """Multiply-add FLOPs of one all-conv training step (2 per multiply-add).

  Per 3x3 conv (padding 1) ``c -> d`` at ``s x s``: ``2 B s^2 9 c d``
  forward, as much for the kernel gradient and for the input gradient
  (none for the first layer); ``'M'`` halves ``s`` (floor); the classifier
  ``d -> classes`` after global pooling as a dense layer.
  """
  total, first = 0, True
  for item in conv_spec:
    if item == "M":
      size //= 2
      continue
    total += 2 * batch * size * size * 9 * channels * int(item) * (
        2 if first else 3)
    channels, first = int(item), False
  return total + 2 * batch * channels * classes * (2 if first else 3)


def step_flops(model: str, features, batch: int) -> int:
  if model == "mlp":
    return mlp_step_flops(features, batch)
  return allconv_step_flops(CONV_SPEC, batch)


def _step_shapes(features, batch: int) -> list[tuple[int, int, int]]:
  """(m, k, n) of the step's matmuls: forward, weight and input grads."""
  widths = [INPUTS, *features, CLASSES]
  shapes = []
  for i, (a, b) in enumerate(zip(widths, widths[1:])):
    shapes += [(batch, a, b), (a, batch, b)] + ([(batch, b, a)] if i else [])
  return shapes


def _gemm_rate(matmul, m: int, k: int, n: int, repeats: int) -> float:
  """Best FLOP/s of ``matmul(a, b)`` for float32 ``[m,k] x [k,n]``."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((m, k), dtype=np.float32)
  b = rng.standard_normal((k, n), dtype=np.float32)
  a, b, call = matmul(a, b)
  call()  # warm up
  reps = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP a round
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(reps):
      call()
    best = min(best, (time.perf_counter() - t0) / reps)
  return 2 * m * k * n / best


def _numpy_matmul(a, b):
  return a, b, lambda: np.matmul(a, b)


def _torch_matmul(a, b):
  import torch  # pylint: disable=import-outside-toplevel
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  return ta, tb, lambda: torch.mm(ta, tb)


def measured_sgemm(features, batch: int, repeats: int = 3) -> dict:
  """The machine's float32 GEMM rate: best over BLAS backends and shapes.

  Returns ``{"flops": best FLOP/s, "backend": its name, "by_backend":
  {name: {"m x k x n": FLOP/s}}}``.
  """
  backends = {"numpy": _numpy_matmul}
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    backends["torch"] = _torch_matmul
  except ImportError:
    pass
  shapes = sorted(set(_step_shapes(features, batch)) | {(1024, 1024, 1024)})
  by_backend = {name: {f"{m}x{k}x{n}": _gemm_rate(fn, m, k, n, repeats)
                       for m, k, n in shapes}
                for name, fn in backends.items()}
  backend, rates = max(by_backend.items(), key=lambda kv: max(kv[1].values()))
  return {"flops": max(rates.values()), "backend": backend,
          "by_backend": by_backend}


def _qjax_epoch(method: str, features, batch: int, steps: int, lr: float,
                grid: str = "glorot", model: str = "mlp", strategy=None,
                random_bits: str = "threefry"):
  """A callable running one compiled epoch of ``steps`` for one config.

  ``strategy``: default the one the engine picks for ``model``;
  ``random_bits``: SR's source of random bits (``TrainConfig``)."""
  if model == "mlp":
    net = models.get("mlp", 10, features=features)
    shape, quantized = (28, 28, 1), {"grid": grid}
  else:  # the CPU-scale experiments' net: conv kernels on ±1
    net = models.get("allconv", 10, conv_spec=CONV_SPEC)
    shape, quantized = (CONV_SIZE, CONV_SIZE, 1), {"grid": "binary",
                                                   "mask": "conv"}
  config = train_lib.TrainConfig(method=method, batch_size=batch, epochs=1,
                                 steps_per_epoch=steps,
                                 random_bits=random_bits, **quantized)
  # The strategy the engine itself picks (a scanned epoch for the MLP; on
  # CPU a Python loop of jitted steps for the convnet).
  programs = sweep_lib.programs(
      net, config, strategy or sweep_lib.choose_strategy(model))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((steps * batch, *shape), np.float32))
  y = jnp.asarray(rng.integers(0, 10, steps * batch), jnp.int32)
  hps = {"lr": jnp.full((1,), lr, jnp.float32)}
  states = programs.init(jax.random.PRNGKey(0)[None], x[:batch], hps)
  idx = jnp.arange(steps * batch, dtype=jnp.int32).reshape(1, steps, batch)

  def run():
    nonlocal states
    states, metrics = programs.run_epoch(states, x, y, idx, hps)
    jax.block_until_ready((states, metrics))
  return run


def _torch_steps(method: str, features, batch: int, steps: int, lr: float,
                 model: str = "mlp"):
  try:
    import torch
  except ImportError:
    return None
  from benchmarks import torch_reference
  ref = torch_reference.ReferenceStep(method, features, lr=lr, model=model,
                                      conv_spec=CONV_SPEC)
  g = torch.Generator().manual_seed(0)
  shape = (784,) if model == "mlp" else (1, CONV_SIZE, CONV_SIZE)
  x = torch.rand((steps, batch, *shape), generator=g)
  y = torch.randint(0, 10, (steps, batch), generator=g)

  def run():
    for t in range(steps):
      loss = ref.step(x[t], y[t])
    float(loss)  # waits for the last step
  return run


def interleaved_times(runs: dict, repeats: int) -> dict:
  """``{name: [seconds of each round]}``: ``repeats`` rounds, each timing
  every run once in turn (the machine's load drifts; take the fastest).

  Each run must block until its results are ready (``jax.block_until_ready``
  or a synchronous PyTorch loop); it should be compiled and warm already.
  """
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return times


def bench(method: str, args) -> dict:
  strategy = parsed_strategy(args.strategy)
  qjax_run = _qjax_epoch(method, args.features, args.batch, args.steps,
                         args.lr, model=args.model, strategy=strategy,
                         random_bits=args.random_bits)
  qjax_run()  # compile and warm up
  torch_run = _torch_steps(method, args.features, args.batch, args.steps,
                           args.lr, model=args.model)
  if torch_run is not None:
    torch_run()  # warm up (allocator, threads)
  runs = {"qjax": qjax_run}
  if torch_run is not None:
    runs["torch"] = torch_run
  times = interleaved_times(runs, args.repeats)
  q_times, t_times = times["qjax"], times.get("torch", [])
  q = args.steps / min(q_times)
  t = args.steps / min(t_times) if t_times else None
  flops = step_flops(args.model, args.features, args.batch)
  row = {"model": args.model, "method": method, "qjax_steps_per_s": q,
         "torch_steps_per_s": t,
         "ratio": None if t is None else q / t,
         "step_flops": flops, "qjax_flops_per_s": q * flops,
         "qjax_round_s": q_times, "torch_round_s": t_times}
  print(f"  {method}: qjax {q:.1f} steps/s, torch "
        f"{'-' if t is None else f'{t:.1f}'} steps/s, ratio "
        f"{'-' if t is None else f'{q / t:.2f}'}", flush=True)
  return row


def warm_epochs(configs: dict, args, model: str = "mlp") -> dict:
  """``{name: run}`` for ``configs`` (``name: (method, grid,
  random_bits)``), each an :func:`_qjax_epoch` of ``args``' shape and
  ``--strategy``, compiled and run once (warm) before it is returned."""
  strategy = parsed_strategy(args.strategy)
  runs = {}
  for name, (method, grid, bits) in configs.items():
    runs[name] = _qjax_epoch(method, args.features, args.batch, args.steps,
                             args.lr, grid, model=model, strategy=strategy,
                             random_bits=bits)
    runs[name]()  # compile and warm up
  return runs


def overheads(args) -> dict:
  """Each quantized method's step time over FP-ADAM's, timed interleaved.

  The rows of :func:`bench` are timed one method after another, so the
  machine's drift enters their ratios; here every method (SR with both
  sources of random bits) runs in every round, and the fastest round of
  each counts. Returns ``{name: ratio}`` and the rounds.
  """
  runs = warm_epochs({"fp": ("fp", "glorot", "threefry"),
                      "bc": ("bc", "glorot", "threefry"),
                      "sr": ("sr", "glorot", "threefry"),
                      "sr_hash": ("sr", "glorot", "hash"),
                      "r": ("r", "glorot", "threefry")}, args,
                     model=args.model)
  times = interleaved_times(runs, args.repeats)
  best = {name: min(t) for name, t in times.items()}
  return {"ratio": {name: best[name] / best["fp"] for name in runs
                    if name != "fp"}, "round_s": times}


def format_overheads(result: dict) -> str:
  lines = ["| method | step time / FP-ADAM's | target |", "|---|---:|---|"]
  for name, ratio in result["ratio"].items():
    target = OVERHEAD_TARGETS[name.split("_")[0]]
    label = ("sr-adam, random_bits=hash" if name == "sr_hash"
             else f"{name}-adam")
    lines.append(f"| {label} | {ratio:.3f} | <= {target}: "
                 f"{'met' if ratio <= target else 'not met'} |")
  return "\n".join(lines)


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict], sgemm: dict | None = None) -> str:
  """The per-method table; with ``sgemm``, achieved GFLOP/s and its share."""
  lines = ["| model | method | qjax steps/s | PyTorch steps/s | "
           "qjax / PyTorch | target | qjax GFLOP/s | % of sgemm |",
           "|---|---|---:|---:|---:|---|---:|---:|"]
  for r in rows:
    ratio, target = r["ratio"], TARGETS[r["model"]]
    verdict = (f">= {target}: " +
               ("-" if ratio is None else
                "met" if ratio >= target else "not met"))
    share = (None if sgemm is None
             else 100 * r["qjax_flops_per_s"] / sgemm["flops"])
    lines.append(f"| {r['model']} | {r['method']}-adam | "
                 f"{r['qjax_steps_per_s']:.1f} | "
                 f"{_cell(r['torch_steps_per_s'], '.1f')} | "
                 f"{_cell(ratio, '.2f')} | {verdict} | "
                 f"{r['qjax_flops_per_s'] / 1e9:.1f} | "
                 f"{_cell(share, '.0f')} |")
  if sgemm is not None:
    lines.append(f"\nsgemm: {sgemm['flops'] / 1e9:.1f} GFLOP/s "
                 f"({sgemm['backend']}, best of the step's matmul shapes "
                 "and 1024^3); a step is "
                 f"{rows[0]['step_flops'] / 1e6:.1f} MFLOP of matmuls."
                 if rows else "")
  return "\n".join(lines)


def add_step_args(parser: argparse.ArgumentParser, repeats: int,
                  strategy: bool = True) -> None:
  """The MLP step benchmarks' shared flags: ``--steps --repeats --batch
  --features --lr`` and, with ``strategy``, ``--strategy``."""
  parser.add_argument("--steps", type=common.positive_int, default=100)
  parser.add_argument("--repeats", type=common.positive_int, default=repeats)
  parser.add_argument("--batch", type=common.positive_int, default=128)
  parser.add_argument("--features", type=common.int_list(1, distinct=False),
                      default="512,512")
  parser.add_argument("--lr", type=common.positive_float, default=1e-3)
  if strategy:
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES,
                        help="qjax's program: auto (the engine's choice, "
                        "qjax.sweep.choose_strategy) or STEPS-CONFIGS")


def parsed_strategy(text: str):
  """``--strategy``'s value as a Strategy; None for ``auto``."""
  return None if text == "auto" else sweep_lib.Strategy(*text.split("-"))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=MODELS, default="mlp",
                      help="mlp (784-FEATURES-10) or allconv (the CPU-scale "
                      "experiments' convnet; --features is ignored)")
  parser.add_argument("--methods", type=common.name_list(METHODS),
                      default=",".join(METHODS))
  parser.add_argument("--random-bits", default="threefry",
                      choices=quantizers.RANDOM_BITS,
                      help="SR's random bits (TrainConfig.random_bits)")
  parser.add_argument("--no-overheads", action="store_true",
                      help="skip the interleaved overhead table")
  add_step_args(parser, repeats=3)
  parser.add_argument("--out",
                      default="results/benchmarks/step_throughput.json")
  args = parser.parse_args(argv)
  rows = [bench(m, args) for m in args.methods]
  sgemm = measured_sgemm(args.features, args.batch, args.repeats)
  table = format_table(rows, sgemm)
  overhead = None if args.no_overheads else overheads(args)
  if overhead is not None:
    table += ("\n\nQuantization overhead (qjax only, every method in "
              "every round):\n\n" + format_overheads(overhead))
  print(table)
  if all(r["ratio"] is None for r in rows):
    print("torch is not installed: PyTorch columns empty (pip install torch)",
          file=sys.stderr)
  result = {"args": vars(args),
            "environment": results_lib.environment(), "rows": rows,
            "sgemm": sgemm, "overheads": overhead,
            "table": table}
  results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  sweep_lib.cpu_flags()  # before JAX creates an array
  main()
