"""Train one or more methods as vmapped sweeps and write the results.

Claim: on a binary-weight net, ADAM < BC-ADAM < SR-ADAM in test error and
R-ADAM (whose Adam steps are smaller than half a grid step) barely trains
(Li et al. 2017, Table 1 ordering). Expected on full MNIST with the
binary MLP: FP about 2 %, BC-ADAM and SR-ADAM a few %, R-ADAM far worse.

Command (the README's main job; a few minutes on 2 CPU cores):

    python -m experiments.train --dataset mnist --model mlp \
        --methods fp,bc,sr,r --seeds 0,1,2 --epochs 3 --out results/mnist_mlp

Smoke (seconds): ``python -m experiments.train --smoke``.
Outputs in ``--out``: results.json (config, versions, device, wall time,
per-epoch metrics), metrics.csv, curves.png, table.md; checkpoints under
``checkpoints/`` (an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments import common
from qjax import data as data_lib
from qjax import models
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax.train import TrainConfig

LABELS = {"fp": "ADAM", "bc": "BC-ADAM", "sr": "SR-ADAM", "r": "R-ADAM"}


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", help="JSON file whose keys are these flags "
                 "(command-line flags override it)")
  p.add_argument("--dataset", default="mnist",
                 choices=data_lib.KNOWN_NAMES)
  p.add_argument("--model", default="mlp")
  p.add_argument("--mlp-features", default="256,256",
                 help="hidden sizes of the MLP")
  p.add_argument("--methods", default="fp,bc,sr,r")
  p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
  p.add_argument("--lrs", default="0.01", help="comma-separated")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated")
  p.add_argument("--grid-scales", default="",
                 help="multiples of each layer's binary scale H to sweep "
                 "(the grid spacing), e.g. 0.5,1,2; default: H itself")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--lr-decay-epochs", default="",
                 help="divide the lr by 10 at these epochs, e.g. 82,122")
  p.add_argument("--mask", default="auto", choices=("auto", "all", "conv"),
                 help="which kernels are binarized (auto: conv for convnets,"
                 " all for the MLP)")
  p.add_argument("--strategy", default="auto",
                 choices=("auto", "scan-vmap", "scan-map", "scan-loop",
                          "loop-vmap", "loop-map", "loop-loop"),
                 help="steps-configs execution (auto: measured best for the "
                 "model and backend, see qjax.sweep.choose_strategy)")
  p.add_argument("--max-configs-per-chunk", type=int, default=None)
  p.add_argument("--train-subset", type=int, default=None,
                 help="use only the first N training examples")
  p.add_argument("--out", default="results/train")
  p.add_argument("--no-checkpoint", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--smoke", action="store_true",
                 help="digits, 1 epoch, 2 seeds: runs in seconds")
  common.add_cpu_devices_flag(p)
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = parser()
  args = p.parse_args(argv)
  if args.config:
    with open(args.config) as f:
      p.set_defaults(**{k.replace("-", "_"): v for k, v in json.load(f).items()})
    args = p.parse_args(argv)
  if args.smoke:
    args.dataset, args.epochs, args.seeds = "digits", 1, "0,1"
    args.mlp_features, args.batch_size = "64", 64
    if args.out == "results/train":
      args.out = "results/train_smoke"
  return args


def build_model(args, num_classes: int):
  if args.model == "mlp":
    return models.get("mlp", num_classes, features=_ints(args.mlp_features))
  return models.get(args.model, num_classes)


def run(args: argparse.Namespace) -> dict:
  """Runs every method's sweep; writes results; returns the payload."""
  dataset = data_lib.load(args.dataset)
  if args.train_subset:
    dataset = dataset._replace(train_x=dataset.train_x[:args.train_subset],
                               train_y=dataset.train_y[:args.train_subset])
  model = build_model(args, dataset.num_classes)
  mask = args.mask if args.mask != "auto" else (
      "conv" if args.model in sweep_lib.CONV_MODELS else "all")
  strategy = (None if args.strategy == "auto" else sweep_lib.Strategy(
      *args.strategy.split("-")))
  spec = sweep_lib.SweepSpec(seeds=_ints(args.seeds), lrs=_floats(args.lrs),
                             grid_scales=_floats(args.grid_scales) or None)
  runs, start = [], time.time()
  for method in args.methods.split(","):
    config = TrainConfig(method=method, optimizer=args.optimizer, mask=mask,
                         batch_size=args.batch_size, epochs=args.epochs,
                         lr_decay_epochs=_ints(args.lr_decay_epochs))
    t0 = time.time()
    out = sweep_lib.sweep(
        model, dataset, config, spec, model_name=args.model,
        strategy=strategy, max_configs_per_chunk=args.max_configs_per_chunk,
        checkpoint_dir=(None if args.no_checkpoint else os.path.join(
            args.out, "checkpoints", method)),
        progress=not args.no_progress)
    label = LABELS[method] if args.optimizer == "adam" else method.upper()
    runs.append({"label": label, "method": method, "configs": out["configs"],
                 "strategy": out["strategy"],
                 "train_config": out["train_config"],
                 "eval_mode": __import__("qjax").methods.EVAL_MODES[method],
                 "history": out["history"], "seconds": time.time() - t0})
  payload = {"args": vars(args), "environment": results_lib.environment(),
             "dataset": {"name": dataset.name,
                         "train": int(dataset.train_x.shape[0]),
                         "test": int(dataset.test_x.shape[0])},
             "wall_seconds": time.time() - start, "runs": runs}
  write(args.out, payload)
  return payload


def write(out_dir: str, payload: dict) -> None:
  runs = payload["runs"]
  results_lib.write_json(os.path.join(out_dir, "results.json"), payload)
  results_lib.write_csv(os.path.join(out_dir, "metrics.csv"), runs)
  results_lib.plot_curves(os.path.join(out_dir, "curves.png"), runs)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(results_lib.error_table(runs) + "\n")


def main(argv=None) -> int:
  args = parse_args(argv)
  sweep_lib.cpu_devices(args.cpu_devices)  # before JAX creates an array
  try:
    payload = run(args)
  except data_lib.DatasetNotFoundError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"\n{payload['dataset']['name']}: final test error after "
        f"{args.epochs} epoch(s), {payload['wall_seconds']:.0f} s in all "
        f"({payload['environment']['backend']})")
  print(results_lib.error_table(payload["runs"]))
  print(f"results: {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
