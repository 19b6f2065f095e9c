"""Where the single-run MLP step's time goes: the floor and each layer above it.

Claim checked (the speed issue's "profile the compiled step"): how much of
qjax's FP-ADAM MLP step (784-``--features``-10 with BatchNorm, batch
``--batch``) is the network itself and how much the engine adds. Five
programs, each a scanned epoch of ``--steps`` steps after a warm-up epoch
that compiles, timed until ``jax.block_until_ready``, rounds interleaved and
the fastest counting:

* ``minimal``: a hand-written JAX step of the same network (dense without
  bias, BatchNorm on batch statistics, ReLU; a dense output layer with bias;
  softmax cross-entropy; ``optax.adam``), no Flax, no checks: the floor for
  this network on this XLA.
* ``+ output checks``: the same step with the optimizer wrapped in
  :func:`qjax.skip_nonfinite` (a step with a NaN or inf in its gradients,
  updates, new parameters or new optimizer state changes nothing): every
  output is checked, then selected.
* ``+ bounded_step``: the same wrapper with
  :func:`qjax.transforms.bounded_step`, as the registered methods' built-in
  Adam and SGD steps have it: the skip is decided from the inputs (the
  gradients, parameters, moments and learning rate within proven bounds).
* ``engine, unbatched``: the engine's own epoch program
  (:func:`qjax.sweep.programs`, ``Strategy("scan", "loop")``): Flax,
  BatchNorm's running statistics, the forward-pass check, metrics, the step
  counter and the run key, with the FP method's ``bounded_step``.
* ``engine, vmapped``: the same with ``Strategy("scan", "vmap")``: one
  config batched on a config axis of size 1.

Each row prints steps/s and the milliseconds it adds to the row it
builds on (:data:`BASE`).
``--profile`` also prints the slowest XLA ops of each program (from a
``jax.profiler`` trace: per-op times overlap, so they do not add up to the
step time).

Command: ``python -m benchmarks.step_breakdown [--steps 100] [--repeats 5]
[--batch 128] [--features 512,512] [--profile]
[--out results/benchmarks/step_breakdown.json]``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import step_throughput
from qjax import execution
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import transforms

PROGRAMS = ("minimal", "+ output checks", "+ bounded_step",
            "engine, unbatched", "engine, vmapped")
# The row each program adds to.
BASE = {"+ output checks": "minimal", "+ bounded_step": "minimal",
        "engine, unbatched": "+ bounded_step",
        "engine, vmapped": "engine, unbatched"}


def _data(steps: int, batch: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((steps * batch, 784), np.float32))
  y = jnp.asarray(rng.integers(0, 10, steps * batch), jnp.int32)
  return x, y


def init_mlp(key, features, inputs: int = 784, classes: int = 10) -> dict:
  """The minimal MLP's parameters (Glorot-normal-like kernels)."""
  widths = [inputs, *features, classes]
  keys = jax.random.split(key, len(widths) - 1)
  params = {}
  for i, (a, b) in enumerate(zip(widths, widths[1:])):
    params[f"kernel{i}"] = jax.random.normal(keys[i], (a, b)) / np.sqrt(a)
    if i < len(features):
      params[f"scale{i}"] = jnp.ones((b,))
      params[f"shift{i}"] = jnp.zeros((b,))
  params["bias"] = jnp.zeros((classes,))
  return params


def mlp_loss(params: dict, x, y, hidden: int) -> jax.Array:
  """Mean cross-entropy of the minimal MLP (BatchNorm on the batch)."""
  h = x
  for i in range(hidden):
    h = h @ params[f"kernel{i}"]
    mean, var = h.mean(0), h.var(0)
    h = ((h - mean) * jax.lax.rsqrt(var + 1e-5) * params[f"scale{i}"]
         + params[f"shift{i}"])
    h = jax.nn.relu(h)
  logits = h @ params[f"kernel{hidden}"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def minimal_epoch(features, batch: int, steps: int, lr: float,
                  skip: str | None = None):
  """A callable running one scanned epoch of the minimal step (``skip``:
  None, ``"outputs"`` or ``"bounded"``, see the module docstring)."""
  tx = optax.adam(lr)
  if skip is not None:
    tx = transforms.skip_nonfinite(
        tx, transforms.bounded_step("adam", lr) if skip == "bounded"
        else None)
  x, y = _data(steps, batch)
  hidden = len(features)

  @jax.jit
  def epoch(params, state):
    def body(carry, i):
      params, state = carry
      xb = jax.lax.dynamic_slice_in_dim(x, i * batch, batch)
      yb = jax.lax.dynamic_slice_in_dim(y, i * batch, batch)
      grads = jax.grad(mlp_loss)(params, xb, yb, hidden)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), jnp.arange(steps))[0]

  params = init_mlp(jax.random.PRNGKey(0), features)
  carry = (params, tx.init(params))

  def run():
    nonlocal carry
    carry = epoch(*carry)
    jax.block_until_ready(carry)
  return run


def programs(args) -> dict:
  """Name -> callable running one epoch, for every row of the table."""
  engine = lambda configs: step_throughput._qjax_epoch(  # pylint: disable=protected-access
      "fp", args.features, args.batch, args.steps, args.lr,
      strategy=execution.Strategy("scan", configs))
  return {
      "minimal": minimal_epoch(args.features, args.batch, args.steps,
                               args.lr),
      "+ output checks": minimal_epoch(args.features, args.batch,
                                       args.steps, args.lr, skip="outputs"),
      "+ bounded_step": minimal_epoch(args.features, args.batch, args.steps,
                                      args.lr, skip="bounded"),
      "engine, unbatched": engine("loop"),
      "engine, vmapped": engine("vmap"),
  }


def format_table(rates: dict) -> str:
  lines = ["| program | steps/s | ms/step | ms added | to |",
           "|---|---:|---:|---:|---|"]
  for name in PROGRAMS:
    ms = 1e3 / rates[name]
    base = BASE.get(name)
    added = "-" if base is None else f"{ms - 1e3 / rates[base]:+.2f}"
    lines.append(f"| {name} | {rates[name]:.1f} | {ms:.2f} | {added} | "
                 f"{base or '-'} |")
  return "\n".join(lines)


def slowest_ops(run, top: int = 15) -> list[tuple[str, float]]:
  """(XLA op name, microseconds per call summed over the trace), slowest
  first, from a ``jax.profiler`` trace of one call of ``run``."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      run()
    files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    if not files:
      return []
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  total = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if (e.get("ph") == "X" and not name.startswith("$")
        and not name.startswith(("ThunkExecutor", "Pjit", "Slinky"))):
      total[name] += e["dur"]
  return total.most_common(top)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  step_throughput.add_step_args(parser, repeats=5, strategy=False)
  parser.add_argument("--profile", action="store_true",
                      help="also print the slowest XLA ops of each program")
  parser.add_argument("--out",
                      default="results/benchmarks/step_breakdown.json")
  args = parser.parse_args(argv)
  runs = programs(args)
  for run in runs.values():
    run()  # compile and warm up
  times = step_throughput.interleaved_times(runs, args.repeats)
  rates = {name: args.steps / min(t) for name, t in times.items()}
  table = format_table(rates)
  print(table)
  ops = {}
  if args.profile:
    for name, run in runs.items():
      ops[name] = [(op, us / args.steps) for op, us in slowest_ops(run)]
      print(f"\n{name}: slowest ops, us per step (overlapping)")
      for op, us in ops[name]:
        print(f"  {us:8.1f}  {op}")
  result = {"args": vars(args), "environment": results_lib.environment(),
            "steps_per_s": rates, "round_s": times, "slowest_ops": ops,
            "table": table}
  results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  sweep_lib.cpu_flags()  # before JAX creates an array
  main()
