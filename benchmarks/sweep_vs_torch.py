"""A whole sweep, whole process: qjax's command against PyTorch's loop.

Claim checked (the speed issue): a 16-config MLP sweep (4 learning rates x
4 seeds, BC-ADAM, 784-512-512-10 with BatchNorm, batch 128, one epoch of
full MNIST) takes qjax's ``python -m experiments.train`` at most half the
time that the same 16 configs take trained one after another by a plain
PyTorch loop (``python -m benchmarks.torch_reference``). This benchmark
only measures; it prints both times and their ratio.

What is timed: each command as a fresh subprocess, from start to exit
(interpreter and library start-up, data loading, compilation, training and
the test evaluation of every config), wall clock. qjax's command compiles
every time (``experiments.train`` does not use JAX's persistent
compilation cache) and runs with ``--no-checkpoint`` (the PyTorch loop
writes none). Rounds alternate; the fastest of ``--repeats`` counts for
each. Both report each config's test
error, printed as mean and range so a fast wrong run shows.

Needs MNIST in qjax's cache (``python -m qjax.data fetch mnist``) and torch
(``pip install torch``, the CPU wheel); without torch only qjax is timed.

Command: ``python -m benchmarks.sweep_vs_torch [--method bc]
[--lrs 0.0003,0.001,0.003,0.01] [--seeds 0,1,2,3] [--epochs 1]
[--repeats 1] [--out results/benchmarks/sweep_vs_torch.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from experiments import common
from qjax import results as results_lib

TARGET = 0.5  # qjax time / PyTorch time, at most
METHODS = ("fp", "bc", "sr", "r")
FEATURES = "512,512"


def _timed(cmd: list[str], env: dict) -> float:
  t0 = time.perf_counter()
  done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  seconds = time.perf_counter() - t0
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                       f"{done.stderr[-2000:]}")
  return seconds


def qjax_command(args, out_dir: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--dataset", "mnist",
          "--model", "mlp", "--mlp-features", FEATURES, "--methods",
          args.method, "--lrs", ",".join(map(str, args.lrs)), "--seeds",
          ",".join(map(str, args.seeds)), "--epochs", str(args.epochs),
          "--batch-size", str(args.batch), "--out", out_dir,
          "--no-checkpoint", "--no-progress"]


def torch_command(args, out_path: str) -> list[str]:
  return [sys.executable, "-m", "benchmarks.torch_reference", "--method",
          args.method, "--lrs", ",".join(map(str, args.lrs)), "--seeds",
          ",".join(map(str, args.seeds)), "--epochs", str(args.epochs),
          "--batch", str(args.batch), "--out", out_path]


def qjax_errors(out_dir: str) -> list[float]:
  with open(os.path.join(out_dir, "results.json")) as f:
    (run,) = json.load(f)["runs"]
  return [float(e) for e in run["history"][-1]["test_error"]]


def torch_errors(path: str) -> list[float]:
  with open(path) as f:
    return [r["test_error"] for r in json.load(f)["rows"]]


def _errors_text(errors: list[float]) -> str:
  return (f"{100 * sum(errors) / len(errors):.2f} % mean, "
          f"{100 * min(errors):.2f}-{100 * max(errors):.2f}")


def bench(args) -> dict:
  has_torch = importlib.util.find_spec("torch") is not None
  env = dict(os.environ)
  times = {"qjax": [], "torch": []}
  errors = {}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      out = os.path.join(tmp, f"qjax{r}")
      times["qjax"].append(_timed(qjax_command(args, out), env))
      errors["qjax"] = qjax_errors(out)
      print(f"  qjax: {times['qjax'][-1]:.1f} s; test error "
            f"{_errors_text(errors['qjax'])}", flush=True)
      if has_torch:
        path = os.path.join(tmp, f"torch{r}.json")
        times["torch"].append(_timed(torch_command(args, path), env))
        errors["torch"] = torch_errors(path)
        print(f"  torch: {times['torch'][-1]:.1f} s; test error "
              f"{_errors_text(errors['torch'])}", flush=True)
  best = {k: (min(v) if v else None) for k, v in times.items()}
  ratios = {"qjax": (None if best["torch"] is None
                     else best["qjax"] / best["torch"])}
  return {"configs": len(args.lrs) * len(args.seeds), "times": times,
          "best_s": best, "ratio": ratios, "errors": errors,
          "has_torch": has_torch}


def format_table(result: dict, args) -> str:
  n = result["configs"]
  lines = [f"{n} configs of {args.method}-adam (lrs {args.lrs}, seeds "
           f"{args.seeds}), MLP 784-{FEATURES.replace(',', '-')}-10, batch "
           f"{args.batch}, {args.epochs} epoch(s) of MNIST; whole process, "
           f"fastest of {args.repeats}.", "",
           "| process | seconds | / PyTorch | target <= "
           f"{TARGET} | test error |", "|---|---:|---:|---|---|"]
  names = {"qjax": "qjax, python -m experiments.train (one sweep)",
           "torch": "PyTorch, configs one after another"}
  for kind, name in names.items():
    secs = result["best_s"][kind]
    if secs is None:
      lines.append(f"| {name} | - | - | - | torch not installed |")
      continue
    ratio = result["ratio"].get(kind)
    verdict = ("-" if ratio is None else
               "met" if ratio <= TARGET else "not met")
    lines.append(f"| {name} | {secs:.1f} | "
                 f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                 f"{verdict if kind != 'torch' else '-'} | "
                 f"{_errors_text(result['errors'][kind])} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", choices=METHODS, default="bc")
  parser.add_argument("--lrs", type=common.positive_float_list,
                      default="0.0003,0.001,0.003,0.01")
  parser.add_argument("--seeds", type=common.int_list(0, 2**31 - 1),
                      default="0,1,2,3")
  parser.add_argument("--epochs", type=common.positive_int, default=1)
  parser.add_argument("--batch", type=common.positive_int, default=128)
  parser.add_argument("--repeats", type=common.positive_int, default=1)
  parser.add_argument("--out",
                      default="results/benchmarks/sweep_vs_torch.json")
  args = parser.parse_args(argv)
  result = bench(args)
  table = format_table(result, args)
  print(table)
  if not result["has_torch"]:
    print("torch is not installed: only qjax was timed (pip install torch)",
          file=sys.stderr)
  results_lib.write_json(args.out, {
      "args": vars(args), "environment": results_lib.environment(),
      **result, "table": table})
  return result


if __name__ == "__main__":
  main()
