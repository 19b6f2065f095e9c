"""Cost of a training step on codes against the same step on float storage.

Claim checked: storing SR and R weights as grid codes
(:class:`qjax.codes.Codes`, 1 bit per binary weight) costs at most 10 % more
time per training step than keeping them as float32 values on the same grid
points (target: codes / float time <= 1.10), and both give the same weights.

Setup: the MNIST MLP 784-512-512-10 with BatchNorm, every kernel on its
binary Glorot grid, batch 128 of random MNIST-shaped data, on the CPU. For
each method (SR-ADAM, R-ADAM, SR-SGD, R-SGD, the engine's
:func:`qjax.train.build_method`):

* ``codes``: the method as the engine runs it, parameters stored as codes;
* ``float``: the same :class:`qjax.Method` (same ``view``, same optax chain)
  but ``project`` rounds the float kernels onto the same stored points
  (:func:`qjax.round_nearest`) and keeps them as float32 arrays, so the
  update rules take their float path (:mod:`qjax.transforms`: the same
  decisions from the same random bits, written back as exact float deltas).

The step is :func:`qjax.train.train_step`'s body with the method passed in
(``decode_tree -> value_and_grad -> tx.update -> apply_updates``, non-finite
guard included; ``train_step`` itself builds its method from a config, so it
cannot take the float one); ``matches train_step`` checks that for codes it
gives ``train_step``'s state bit for bit. ``--steps`` steps run in one jitted
``lax.scan``; the first call (compilation) is excluded, then ``--repeats``
calls of each variant, interleaved, each from the same initial state and
timed to ``block_until_ready``; the median counts. ``identical`` is whether
both variants end with the same decoded weights, optimizer state and
BatchNorm statistics, bit for bit, after the same steps from the same keys.

Runtime on 2 shared CPU cores: about 50 s with ``--steps 30 --repeats 3``,
70 s with the defaults (three compilations per method dominate). Measured
there: codes 0.56x to 0.78x the float-storage time (the float path decides
the code of a float weight before rounding and writes an exact float delta
back, more work than the integer update of the codes); absolute ms/step
drift with the machine's load, the interleaved ratio much less.

Command: ``python -m benchmarks.codes_step [--steps 50] [--repeats 5]
[--methods sr-adam,r-adam,sr-sgd,r-sgd] [--batch 128]
[--out results/benchmarks/codes_step.json]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from qjax import codes as codes_lib
from qjax import methods as methods_lib
from qjax import models as models_lib
from qjax import quantizers
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

FEATURES = (512, 512)
LR = 1e-3
TARGET = 1.10  # codes / float seconds per step
METHODS = ("sr-adam", "r-adam", "sr-sgd", "r-sgd")


def float_storage(method: methods_lib.Method, mask, grid
                  ) -> methods_lib.Method:
  """``method`` with its quantized leaves kept as floats on ``grid``."""

  def project(params):
    masked = quantizers.resolve_mask(mask, params)
    grids = quantizers.resolve_grids(grid, params, masked)
    return quantizers.map_masked(
        lambda _, w, g: quantizers.round_nearest(w, g), params, masked, grids,
        None)

  return methods_lib.Method(method.name + " (float storage)", method.view,
                            method.tx, project, method.eval_mode)


def make_step(model, method: methods_lib.Method):
  """:func:`qjax.train.step` with ``method`` given (the public seam)."""
  return functools.partial(train_lib.step, model, method)


def _scan(step):
  def run(state, xs, ys):
    def body(s, batch):
      s, metrics = step(s, batch)
      return s, metrics["loss"]
    return jax.lax.scan(body, state, (xs, ys))
  return jax.jit(run)


def _same_bits(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  def raw(x):
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
  return all(np.asarray(x).dtype == np.asarray(y).dtype
             and np.array_equal(raw(x), raw(y)) for x, y in zip(la, lb))


def _timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def bench_method(label: str, args, xs, ys) -> dict:
  name, optimizer = label.split("-")
  model = models_lib.get("mlp", 10, features=FEATURES)
  config = train_lib.TrainConfig(method=name, optimizer=optimizer,
                                 batch_size=args.batch)
  hp = {"lr": jnp.float32(LR)}
  state = train_lib.init_state(model, config, jax.random.PRNGKey(0),
                               xs[0], hp)
  method = train_lib.build_method(config, hp)
  floats = float_storage(method, train_lib.MASKS[config.mask],
                         quantizers.glorot_binary_grid)
  float_state = state.replace(
      params=floats.project(codes_lib.decode_tree(state.params)))
  start_identical = _same_bits(codes_lib.decode_tree(state.params),
                               float_state.params)
  runs = {"codes": (_scan(make_step(model, method)), state),
          "float": (_scan(make_step(model, floats)), float_state)}
  compile_s, outputs = {}, {}
  for kind, (fn, s0) in runs.items():
    t0 = time.perf_counter()
    outputs[kind] = jax.block_until_ready(fn(s0, xs, ys))
    compile_s[kind] = time.perf_counter() - t0
  times = {kind: [] for kind in runs}
  for _ in range(args.repeats):  # interleaved: both see the same drift
    for kind, (fn, s0) in runs.items():
      times[kind].append(_timed(fn, s0, xs, ys))
  codes_end, float_end = outputs["codes"][0], outputs["float"][0]
  identical = bool(
      start_identical
      and _same_bits(codes_lib.decode_tree(codes_end.params),
                     float_end.params)
      and _same_bits(codes_end.opt_state, float_end.opt_state)
      and _same_bits(codes_end.batch_stats, float_end.batch_stats))
  engine = _scan(lambda s, b: train_lib.train_step(model, config, s, b, hp))
  matches = _same_bits(jax.block_until_ready(engine(state, xs, ys))[0],
                       codes_end)
  median = {k: statistics.median(v) for k, v in times.items()}
  ratio = median["codes"] / median["float"]
  return {
      "method": label, "steps": args.steps, "batch": args.batch,
      "repeats": args.repeats,
      "codes_s": median["codes"], "float_s": median["float"],
      "codes_steps_per_s": args.steps / median["codes"],
      "float_steps_per_s": args.steps / median["float"],
      "codes_ms_per_step": 1e3 * median["codes"] / args.steps,
      "float_ms_per_step": 1e3 * median["float"] / args.steps,
      "ratio": ratio, "target": TARGET, "pass": bool(ratio <= TARGET),
      "identical": identical, "matches_train_step": matches,
      "first_call_s": compile_s, "all_seconds": times,
  }


def format_table(rows: list[dict]) -> str:
  head = (f"{'method':8} {'codes ms/step':>13} {'float ms/step':>13} "
          f"{'codes steps/s':>13} {'float steps/s':>13} {'codes/float':>11} "
          f"{'target':>7} {'result':6} {'identical':9} matches train_step")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['method']:8} {r['codes_ms_per_step']:>13.2f} "
        f"{r['float_ms_per_step']:>13.2f} {r['codes_steps_per_s']:>13.1f} "
        f"{r['float_steps_per_s']:>13.1f} {r['ratio']:>10.3f}x "
        f"{'<=' + format(r['target'], '.2f'):>7} "
        f"{'PASS' if r['pass'] else 'FAIL':6} {str(r['identical']):9} "
        f"{r['matches_train_step']}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=common.positive_int, default=50,
                      help="training steps per timed call (one lax.scan)")
  parser.add_argument("--repeats", type=common.positive_int, default=5,
                      help="timed calls per variant; the median counts")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, among {METHODS}")
  parser.add_argument("--batch", type=common.positive_int, default=128)
  parser.add_argument("--out", default="results/benchmarks/codes_step.json")
  args = parser.parse_args(argv)
  labels = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(labels) - set(METHODS))
  if unknown or not labels:
    raise ValueError(f"--methods must be among {METHODS}; got "
                     f"{args.methods!r}.")
  rng = np.random.default_rng(0)  # random MNIST-shaped batches
  xs = jnp.asarray(rng.random((args.steps, args.batch, 28, 28, 1),
                              np.float32))
  ys = jnp.asarray(rng.integers(0, 10, (args.steps, args.batch), np.int32))
  rows = []
  for label in labels:
    rows.append(bench_method(label, args, xs, ys))
    r = rows[-1]
    print(f"  {label}: codes {r['codes_ms_per_step']:.2f} ms/step, float "
          f"{r['float_ms_per_step']:.2f} ms/step, ratio {r['ratio']:.3f}, "
          f"identical: {r['identical']}", flush=True)
  print(format_table(rows))
  for r in rows:
    print(f"identical: {r['identical']} ({r['method']})")
  result = {"rows": rows, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "features": FEATURES, "lr": LR}
  if args.out:
    results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  sweep_lib.cpu_flags()  # before JAX creates an array
  main()
