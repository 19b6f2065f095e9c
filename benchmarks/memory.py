"""Memory of a training state: FP, BC, SR and R with SGD and with Adam.

Claim checked: storing SR and R weights as grid codes (1 bit per binary
weight) makes their parameters 32x smaller than float ones, and their whole
SGD state (diagnostics aside) more than 20x smaller than FP-SGD's; with Adam
the two float moments (8 bytes per weight) dominate every method alike.

For each model (the MNIST MLP 784-512-512-10 with BatchNorm, VGG-9 on
CIFAR-10 shapes) and each of the 8 methods, the state of
:func:`qjax.train.init_state` is counted by :func:`qjax.memory.memory_report`
(exact ``nbytes`` of the stored arrays; every kernel quantized, mask
``all``, binary Glorot grids): params (codes + floats), optimizer state,
BatchNorm statistics, diagnostics (packed initial signs + counters and
key), total, bits per quantized weight, and the ratios to FP with the same
optimizer. The MLP's states are built for real; VGG-9's with
``jax.eval_shape`` (shapes only, the same bytes; no compute). For the MLP the
table also gives the compiled training step's memory
(:func:`qjax.memory.compiled_peak_bytes` of :func:`qjax.train.train_step`,
batch ``--batch``): XLA's temporary buffers and the estimated peak
``arguments + outputs - aliased + temp``.

The state sizes do not depend on the machine; the compiled figures depend on
the backend (XLA:CPU here).

Runtime on 2 shared CPU cores: about 40 s (8 MLP step compilations; VGG-9
costs no compute); ``--no-step`` about 15 s.

Command: ``python -m benchmarks.memory [--models mlp,vgg9] [--batch 128]
[--no-step] [--out results/benchmarks/memory.json]``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from experiments import common
from qjax import memory
from qjax import methods as methods_lib
from qjax import models as models_lib
from qjax import results as results_lib
from qjax import train as train_lib

MODELS = {
    "mlp": (("mlp", {"features": (512, 512)}), (28, 28, 1)),
    "vgg9": (("vgg9", {}), (32, 32, 3)),
}
METHODS = ("fp", "bc", "sbc", "sr", "r", "bop")
OPTIMIZERS = ("sgd", "adam")
HP = {"lr": jnp.float32(1e-3)}


def _label(method: str) -> str:
  return methods_lib.get(method).label or "FP"


def _state(model, config, sample_x, real: bool):
  init = functools.partial(train_lib.init_state, model, config,
                           sample_x=sample_x, hparams=HP)
  key = jax.random.PRNGKey(0)
  return init(key) if real else jax.eval_shape(init, key)


def bench_model(name: str, args) -> list[dict]:
  """One row per (method, optimizer) for model ``name``."""
  (registry_name, kwargs), image = MODELS[name]
  model = models_lib.get(registry_name, 10, **kwargs)
  real = name == "mlp"
  sample = jnp.zeros((1,) + image, jnp.float32)
  rows = []
  for optimizer in OPTIMIZERS:
    for method in METHODS:
      config = train_lib.TrainConfig(method=method, optimizer=optimizer)
      state = _state(model, config, sample, real)
      report = memory.memory_report(state)
      row = {
          "model": name, "method": f"{_label(method)}-{optimizer.upper()}",
          "params": report["params"],
          "optimizer_state": report["optimizer_state"],
          "batch_stats": report["batch_stats"],
          "diagnostics": report["diagnostics"], "total": report["total"],
          "total_without_diagnostics": report["total_without_diagnostics"],
          "quantized_weights": report["quantized_weights"],
          "bits_per_quantized_weight": report["bits_per_quantized_weight"],
          "state_from": "init_state" if real else "jax.eval_shape(init_state)",
      }
      if real and args.step:
        batch = (jnp.zeros((args.batch,) + image, jnp.float32),
                 jnp.zeros((args.batch,), jnp.int32))
        step = memory.compiled_peak_bytes(
            lambda s, b, h, c=config: train_lib.train_step(model, c, s, b, h),
            state, batch, HP)
        row["step_temp"] = step["temp_bytes"]
        row["step_peak"] = step["peak_bytes"]
      rows.append(row)
      print(f"  {name} {row['method']}: total {row['total']:,} B", flush=True)
  for row in rows:
    fp = next(r for r in rows if r["method"] == "FP-" +
              row["method"].split("-")[1])
    row["params_ratio_to_fp"] = row["params"] / fp["params"]
    row["total_ratio_to_fp"] = row["total"] / fp["total"]
    row["total_without_diagnostics_ratio_to_fp"] = (
        row["total_without_diagnostics"] / fp["total_without_diagnostics"])
  return rows


def _num(n) -> str:
  return "-" if n is None else f"{n:,}"


def format_table(rows: list[dict]) -> str:
  """The rows as a markdown table (one line per model and method)."""
  step = any("step_temp" in r for r in rows)
  head = ["model", "method", "params B", "optimizer B", "batch stats B",
          "diagnostics B", "total B", "bits/quantized w", "params / FP",
          "total / FP", "total w/o diag. / FP"]
  if step:
    head += ["step temp B", "step peak B"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if i < 2 else "---:"
                          for i in range(len(head))) + "|"]
  for r in rows:
    bits = r["bits_per_quantized_weight"]
    cells = [r["model"], r["method"], _num(r["params"]),
             _num(r["optimizer_state"]), _num(r["batch_stats"]),
             _num(r["diagnostics"]), _num(r["total"]),
             "-" if bits is None else f"{bits:.3f}",
             f"{r['params_ratio_to_fp']:.4f}",
             f"{r['total_ratio_to_fp']:.4f}",
             f"{r['total_without_diagnostics_ratio_to_fp']:.4f}"]
    if step:
      cells += [_num(r.get("step_temp")), _num(r.get("step_peak"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


NOTES = (
    "Bytes per config, exact nbytes of the stored arrays "
    "(qjax.memory.memory_report). params: codes + float leaves (biases, BN, "
    "BC latents, FP weights); optimizer: every opt_state array (Adam's two "
    "float32 moments per parameter, counts, SR's key); diagnostics: packed "
    "initial signs (1 bit per quantized weight) + step, key and non-finite "
    "counters. Ratios against FP with the same optimizer. step temp / peak: "
    "XLA's temporary buffers of the compiled train_step and arguments + "
    "outputs - aliased + temp (qjax.memory.compiled_peak_bytes).")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,vgg9",
                      help=f"comma-separated, among {sorted(MODELS)}")
  parser.add_argument("--batch", type=common.positive_int, default=128,
                      help="batch size of the compiled MLP step")
  parser.add_argument("--no-step", dest="step", action="store_false",
                      help="skip compiling the MLP step (its memory columns)")
  parser.add_argument("--out", default="results/benchmarks/memory.json")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(MODELS))
  if unknown or not models:
    raise ValueError(f"--models must be among {sorted(MODELS)}; got "
                     f"{args.models!r}.")
  rows = []
  for name in models:
    rows += bench_model(name, args)
  table = format_table(rows)
  print(table)
  print()
  print(NOTES)
  result = {"rows": rows, "table": table, "notes": NOTES,
            "backend": jax.default_backend(), "jax": jax.__version__,
            "batch": args.batch}
  if args.out:
    results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
