"""Step cost of SR and R with weights stored in a floating-point format.

Claim checked (the float-format issue): on the CPU MLP benchmark, the SR
step onto a format costs at most 1.15x the round-to-nearest (R) step onto
the same format. SR is timed twice: with its default random bits
(Threefry, ``jax.random.bits``' stream) and with ``random_bits="hash"``
(:func:`qjax.quantizers.hash_bits`, a keyed integer hash). Also printed:
the float32 ADAM step (no rounding at all), so that the cost of storing
the weights in the format is visible too.

What is timed: the engine's own compiled epoch program for one config (as
in :mod:`benchmarks.step_throughput`: ``--steps`` scanned steps of the
784-``--features``-10 MLP with BatchNorm, batch ``--batch``, Adam), after
a warm-up epoch that compiles, until ``jax.block_until_ready``. Rounds are
interleaved across the configs and the fastest round of each counts (the
machine's load drifts).

Command: ``python -m benchmarks.format_step [--formats bf16,fp8_e4m3]
[--steps 100] [--repeats 5] [--batch 128] [--features 512,512]
[--strategy auto|scan-vmap|...]
[--out results/benchmarks/format_step.json]``.
"""

from __future__ import annotations

import argparse

from benchmarks import step_throughput
from experiments import common
from qjax import formats
from qjax import results as results_lib
from qjax import sweep as sweep_lib

TARGET = 1.15  # SR step time / R step time, same format


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--formats", type=common.name_list(
      tuple(formats.FORMATS)), default="bf16,fp8_e4m3")
  step_throughput.add_step_args(parser, repeats=5)
  parser.add_argument("--out", default="results/benchmarks/format_step.json")
  args = parser.parse_args(argv)
  # Run name (method or "sr_hash", format) -> (method, grid, SR's bits).
  configs = {("fp", "glorot"): ("fp", "glorot", "threefry")}
  for f in args.formats:
    configs.update({("r", f): ("r", f, "threefry"),
                    ("sr", f): ("sr", f, "threefry"),
                    ("sr_hash", f): ("sr", f, "hash")})
  runs = step_throughput.warm_epochs(configs, args)
  times = step_throughput.interleaved_times(runs, args.repeats)
  rate = {c: args.steps / min(t) for c, t in times.items()}
  rows = []
  lines = ["| format | random bits | R steps/s | SR steps/s | SR / R time | "
           f"target <= {TARGET} |", "|---|---|---:|---:|---:|---|"]
  for f in args.formats:
    r = rate[("r", f)]
    for name, bits in (("sr", "threefry"), ("sr_hash", "hash")):
      sr = rate[(name, f)]
      ratio = r / sr
      rows.append({"format": f, "random_bits": bits, "r_steps_per_s": r,
                   "sr_steps_per_s": sr, "sr_over_r_time": ratio,
                   "r_round_s": times[("r", f)],
                   "sr_round_s": times[(name, f)]})
      lines.append(f"| {f} | {bits} | {r:.1f} | {sr:.1f} | {ratio:.3f} | "
                   f"{'met' if ratio <= TARGET else 'not met'} |")
  fp = rate[("fp", "glorot")]
  lines.append(f"\nfloat32 ADAM (no rounding): {fp:.1f} steps/s")
  table = "\n".join(lines)
  print(table)
  result = {"args": vars(args), "environment": results_lib.environment(),
            "rows": rows, "fp_steps_per_s": fp,
            "fp_round_s": times[("fp", "glorot")], "table": table}
  results_lib.write_json(args.out, result)
  return result


if __name__ == "__main__":
  sweep_lib.cpu_flags()  # before JAX creates an array
  main()
