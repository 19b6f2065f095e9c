"""Train one or more methods as sweeps and write the results.

Claim: on a binary-weight net, ADAM < BC-ADAM < SR-ADAM in test error and
R-ADAM (whose Adam steps are smaller than half a grid step) barely trains
(Li et al. 2017, Table 1 ordering). Expected on full MNIST with the
binary MLP: FP about 2 %, BC-ADAM and SR-ADAM a few %, R-ADAM far worse.

Command (the README's main job; a few minutes on 2 CPU cores):

    python -m experiments.train --dataset mnist --model mlp \
        --methods fp,bc,sr,r --seeds 0,1,2 --epochs 3 --out results/mnist_mlp

Smoke (seconds): ``python -m experiments.train --smoke``.
Outputs in ``--out``: results.json (config, versions, git commit, device,
model, each quantized layer's grid, wall time, per-epoch metrics),
metrics.csv, curves.png, table.md; checkpoints under ``checkpoints/``.

Everything is checked before the first step: flags and ``--config`` files
(one parser for both), the dataset, the output folder (writable, and locked
against a second run writing into it), and existing checkpoints (rerunning
the same command resumes; a checkpoint of a different run is refused, see
``--fresh``). A user error is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import sys
import time

from experiments import common
from qjax import checkpoint as ckpt_lib
from qjax import data as data_lib
from qjax import grids as grids_lib
from qjax import memory as memory_lib
from qjax import methods as methods_lib
from qjax import models
from qjax import quantizers
from qjax import results as results_lib
from qjax import sweep as sweep_lib
from qjax import train as train_lib

PROG = "python -m experiments.train"
# --smoke changes these defaults; flags given explicitly still win.
SMOKE = {"dataset": "digits", "epochs": 1, "seeds": (0, 1),
         "mlp_features": (64,), "batch_size": 64, "out": "results/train_smoke"}
STRATEGIES = ("auto", "scan-vmap", "scan-map", "scan-loop", "loop-vmap",
              "loop-map", "loop-loop")


class UsageError(Exception):
  """A user error found before training: printed as one line, exit 2."""


def parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      exit_on_error=exit_on_error)
  p.add_argument("--config", default=None,
                 help="JSON object whose keys are these flags (e.g. "
                 '{"lrs": [0.01, 0.001], "epochs": 3}); parsed and checked '
                 "exactly like the flags, which override it")
  p.add_argument("--dataset", default="mnist", choices=data_lib.KNOWN_NAMES,
                 help="dataset (fetch first: python -m qjax.data fetch NAME)")
  p.add_argument("--model", default="mlp", choices=models.NAMES,
                 help="model from qjax.models")
  p.add_argument("--mlp-features", type=common.int_list(1, distinct=False),
                 default="256,256",
                 help="hidden sizes of the MLP, comma-separated")
  p.add_argument("--import", dest="imports", action="append", default=[],
                 metavar="MODULE",
                 help="import MODULE first (repeatable): a module that "
                 "registers methods with qjax.methods.register makes them "
                 "available to --methods")
  names = methods_lib.names()
  p.add_argument("--methods", type=common.name_list(names),
                 default="fp,bc,sr,r", help="comma-separated registered "
                 "methods: " + "; ".join(
                     f"{n} ({methods_lib.get(n).doc})" for n in names))
  p.add_argument("--grids", type=_grid_list, default="glorot",
                 help="comma-separated grids of the quantized layers, each "
                 "trained as its own program: glorot (BinaryConnect's "
                 "per-layer ±H), binary[:S] (±S; binary is the paper's ±1), "
                 "ternary[:S], kbit:B[:S] (2**B levels on [-S, S]), "
                 "uniform:D[:LO:HI] (spacing D through 0), each optionally "
                 "@glorot (times the layer's H); e.g. ternary,kbit:4")
  p.add_argument("--sweep", dest="sweeps", action="append", default=[],
                 type=_sweep_axis, metavar="NAME=V1,V2",
                 help="sweep another hyperparameter (repeatable), e.g. "
                 "--sweep threshold=1e-8,1e-6 --sweep gamma=1e-4 for bop, "
                 "or --sweep weight_decay=0,1e-4; names are checked against "
                 "each method (see qjax.methods.hparam_names)")
  p.add_argument("--validation", type=_validation, default=None,
                 help="hold out the last N (or this fraction of the) "
                 "training examples and report val_error each epoch")
  p.add_argument("--optimizer", default="adam",
                 choices=methods_lib.OPTIMIZERS,
                 help="base step: adam (the paper's -ADAM variants) or sgd")
  p.add_argument("--lrs", type=common.positive_float_list, default="0.001",
                 help="learning rates, comma-separated (0.001 suits the "
                 "binary MLP; see the README)")
  p.add_argument("--seeds", type=common.int_list(0, 2**32 - 1),
                 default="0,1,2", help="comma-separated")
  p.add_argument("--grid-scales", type=common.positive_float_list,
                 default=None,
                 help="multiples of each layer's binary scale H to sweep "
                 "(the grid spacing), e.g. 0.5,1,2; default: H itself")
  p.add_argument("--batch-size", type=common.positive_int, default=128,
                 help="minibatch size")
  p.add_argument("--epochs", type=common.positive_int, default=3,
                 help="epochs; rerunning with more extends a checkpointed run")
  p.add_argument("--lr-decay-epochs", type=common.int_list(1), default=(),
                 help="divide the lr by 10 at these epochs (each < --epochs),"
                 " e.g. 82,122")
  p.add_argument("--mask", default="auto", choices=("auto", "all", "conv"),
                 help="which kernels are binarized (auto: conv for convnets,"
                 " all for the MLP)")
  p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                 help="steps-configs execution (auto: measured best for the "
                 "model and backend, see qjax.sweep.choose_strategy)")
  p.add_argument("--random-bits", default="threefry",
                 choices=quantizers.RANDOM_BITS,
                 help="where SR draws each weight's 32 random bits: "
                 "threefry (jax.random.bits' stream) or hash (a keyed "
                 "integer hash, cheaper on CPU; other numbers than threefry)")
  p.add_argument("--max-configs-per-chunk", type=common.positive_int,
                 default=None, help="train at most this many configs at once")
  p.add_argument("--train-subset", type=common.positive_int, default=None,
                 help="use only the first N training examples")
  p.add_argument("--out", default="results/train",
                 help="output folder (locked while a run writes to it)")
  p.add_argument("--fresh", action="store_true",
                 help="discard existing checkpoints in --out and start over "
                 "(by default the same command resumes, and a different run "
                 "is refused)")
  p.add_argument("--no-checkpoint", action="store_true",
                 help="write no checkpoints (an interrupted run restarts)")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
  p.add_argument("--smoke", action="store_true",
                 help="defaults for a run of seconds: digits, 1 epoch, "
                 "seeds 0,1, MLP 64, batch 64 (explicit flags still win)")
  common.add_cpu_devices_flag(p)
  return p


def _grid_list(text: str) -> tuple[str, ...]:
  specs = []
  for item in text.split(","):
    try:
      specs.append(str(grids_lib.parse(item)))
    except ValueError as err:
      raise argparse.ArgumentTypeError(str(err)) from None
  if len(set(specs)) != len(specs):
    raise argparse.ArgumentTypeError(f"repeated grid in {text!r}")
  return tuple(specs)


def _sweep_axis(text: str) -> tuple[str, tuple[float, ...]]:
  name, sep, values = text.partition("=")
  if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise argparse.ArgumentTypeError(
        f"expected NAME=V1,V2 (e.g. threshold=1e-8,1e-6); got {text!r}")
  if name in ("lr", "lrs", "seed", "seeds", "grid_scale", "grid_scales"):
    raise argparse.ArgumentTypeError(
        f"{name} has its own flag (--lrs, --seeds, --grid-scales)")
  try:
    parsed = tuple(float(v) for v in values.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{name}: values must be numbers; got {values!r}") from None
  if len(set(parsed)) != len(parsed):
    raise argparse.ArgumentTypeError(f"{name}: repeated values in {values!r}")
  return name, parsed


def _validation(text: str):
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a count or a fraction; got "
                                     f"{text!r}") from None
  if 0 < value < 1:
    return value
  if value >= 1 and value == int(value):
    return int(value)
  raise argparse.ArgumentTypeError(
      f"expected a count >= 1 or a fraction in (0, 1); got {text!r}")


def import_plugins(argv: list[str]) -> None:
  """Imports every ``--import MODULE`` before the parser lists methods."""
  for i, token in enumerate(argv):
    module = (argv[i + 1] if token == "--import" and i + 1 < len(argv) else
              token.split("=", 1)[1] if token.startswith("--import=") else
              None)
    if module:
      try:
        importlib.import_module(module)
      except ImportError as err:
        raise UsageError(f"--import {module}: {err}") from None


def config_tokens(p: argparse.ArgumentParser, path: str) -> list[str]:
  """The flags a ``--config`` JSON file stands for, to parse like argv.

  Raises:
    UsageError: the file is missing or malformed, a key is not a flag, or
      a value has a type no flag takes.
  """
  try:
    with open(path) as f:
      values = json.load(f)
  except OSError as err:
    raise UsageError(f"--config {path}: cannot read it ({err.strerror})")
  except json.JSONDecodeError as err:
    raise UsageError(f"--config {path}: not valid JSON ({err})")
  if not isinstance(values, dict):
    raise UsageError(f"--config {path}: expected a JSON object of flags, got "
                     f"a {type(values).__name__}")
  actions = {a.dest: a for a in p._actions  # pylint: disable=protected-access
             if a.option_strings and a.dest not in ("help", "config")}
  tokens = []
  for key, value in values.items():
    dest = key.replace("-", "_")
    if dest not in actions:
      raise UsageError(
          f"--config {path}: unknown key {key!r}; known keys: "
          f"{', '.join(sorted(actions))}")
    tokens += _tokens(actions[dest], value, f"--config {path}: {key}")
  return tokens


def _tokens(action: argparse.Action, value, where: str) -> list[str]:
  flag = action.option_strings[0]
  if isinstance(action, argparse._AppendAction):  # pylint: disable=protected-access
    # Repeatable flags (--sweep, --import): one flag per list item.
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
      raise UsageError(f"{where}: expected a string or a list of strings "
                       f"like \"threshold=1e-8,1e-6\", got {value!r}")
    return [t for v in items for t in (flag, v)]
  if action.nargs == 0:  # a store_true switch
    if not isinstance(value, bool):
      raise UsageError(f"{where}: expected true or false, got {value!r}")
    return [flag] if value else []
  if isinstance(value, list):
    if not value or not all(_scalar(v) for v in value):
      raise UsageError(f"{where}: expected a non-empty list of numbers or "
                       f"names, got {value!r}")
    return [flag, ",".join(str(v) for v in value)]
  if not _scalar(value):
    raise UsageError(f"{where}: expected a number, a name or a list, got "
                     f"{value!r}")
  return [flag, str(value)]


def _scalar(value) -> bool:
  return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def parse_args(argv=None) -> argparse.Namespace:
  """Flags, with a ``--config`` file's keys parsed by the same parser."""
  argv = list(sys.argv[1:] if argv is None else argv)
  import_plugins(argv)
  p = parser()
  first = p.parse_args(argv)  # every flag checked once, as given
  tokens = config_tokens(p, first.config) if first.config else []
  if tokens:  # the file's values alone, so that errors name the file
    try:
      parser(exit_on_error=False).parse_args(tokens)
    except argparse.ArgumentError as err:
      raise UsageError(f"--config {first.config}: {err}") from None
  if "--smoke" in tokens or first.smoke:
    p.set_defaults(**SMOKE)
  return p.parse_args(tokens + argv)


class Plan:
  """Everything a run needs, built and checked before the first step."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.dataset = _load_dataset(args)
    self.model = _model(args, self.dataset.num_classes)
    self.strategy = (None if args.strategy == "auto" else sweep_lib.Strategy(
        *args.strategy.split("-")))
    names = [name for name, _ in args.sweeps]
    if len(set(names)) != len(names):
      raise UsageError(f"--sweep repeats a name: {names}")
    # A swept name applies to the methods that have it; a name that none of
    # them has is a typo, and an error rather than a silent no-op.
    unknown = [n for n in names if not any(
        n in methods_lib.hparam_names(m) for m in args.methods)]
    if unknown:
      raise UsageError(
          f"--sweep {', '.join(unknown)}: no method in --methods "
          f"{','.join(args.methods)} has such a hyperparameter; they accept "
          + "; ".join(f"{m}: {', '.join(methods_lib.hparam_names(m))}"
                      for m in args.methods))
    for n in names:
      without = [m for m in args.methods
                 if n not in methods_lib.hparam_names(m)]
      if without:
        print(f"note: --sweep {n} applies to "
              f"{','.join(m for m in args.methods if m not in without)} "
              f"only, not to {','.join(without)}", file=sys.stderr)
    if args.random_bits != "threefry":
      print(f"note: --random-bits {args.random_bits}: SR draws its random "
            "bits from qjax's keyed hash (qjax.quantizers.hash_bits), not "
            "jax.random.bits' stream; methods that draw none are unchanged",
            file=sys.stderr)
    self.specs = {m: sweep_lib.SweepSpec(
        seeds=args.seeds, lrs=args.lrs, grid_scales=args.grid_scales,
        hparams={n: v for n, v in args.sweeps
                 if n in methods_lib.hparam_names(m)})
        for m in args.methods}
    mask = args.mask if args.mask != "auto" else (
        "conv" if args.model in sweep_lib.CONV_MODELS else "all")
    # One program per (method, grid); the key names the run's checkpoints.
    self.configs = {}
    try:
      for m in args.methods:
        spec = methods_lib.get(m)
        for g in (args.grids if spec.quantized else args.grids[:1]):
          key = m if g == "glorot" else f"{m}_{_safe(g)}"
          self.configs[key] = train_lib.TrainConfig(
              method=m, optimizer=args.optimizer, mask=mask, grid=g,
              batch_size=args.batch_size, epochs=args.epochs,
              lr_decay_epochs=args.lr_decay_epochs,
              random_bits=args.random_bits)
    except ValueError as err:
      raise UsageError(str(err).replace("lr_decay_epochs", "--lr-decay-epochs")
                       ) from None
    n = self.dataset.train_x.shape[0]
    if args.batch_size <= n:
      # Every check the engine makes (hparams, validation split, the method
      # on this model and grid), now, before any training.
      for key, config in self.configs.items():
        try:
          sweep_lib.check(self.model, self.dataset, config, self.spec(key),
                          validation=args.validation)
        except ValueError as err:
          raise UsageError(f"{self.label(key)}: {err}") from None
    if args.batch_size > n:
      raise UsageError(f"--batch-size {args.batch_size} exceeds the {n} "
                       f"training examples of {args.dataset}; choose at most "
                       f"{n}")

  def spec(self, key: str) -> sweep_lib.SweepSpec:
    """The sweep of run ``key``: the swept names its method has."""
    return self.specs[self.configs[key].method]

  def label(self, key: str) -> str:
    """``"SR-ADAM"``, with the grid when it is not the default one."""
    config = self.configs[key]
    label = config.label
    quantized = methods_lib.get(config.method).quantized
    if quantized and (len(self.args.grids) > 1 or config.grid != "glorot"):
      label += f" [{config.grid}]"
    return label

  def checkpoint_dir(self, method: str) -> str | None:
    if self.args.no_checkpoint:
      return None
    return os.path.join(self.args.out, "checkpoints", method)

  def check_checkpoints(self) -> None:
    """Refuses, before any training, checkpoints of another run."""
    if self.args.fresh:
      return
    for method, config in self.configs.items():
      directory = self.checkpoint_dir(method)
      if directory:
        sweep_lib.check_resumable(
            self.model, self.dataset, config, self.spec(method), directory,
            model_name=self.args.model, strategy=self.strategy,
            max_configs_per_chunk=self.args.max_configs_per_chunk,
            validation=self.args.validation)


def _safe(grid: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "_", grid)


def _load_dataset(args) -> data_lib.Dataset:
  try:
    dataset = data_lib.load(args.dataset)
  except (data_lib.DatasetNotFoundError, data_lib.DatasetCorruptError,
          ImportError) as err:
    raise UsageError(" ".join(str(err).split())) from None
  n = dataset.train_x.shape[0]
  if args.train_subset is not None:
    if args.train_subset > n:
      raise UsageError(f"--train-subset {args.train_subset} exceeds the {n} "
                       f"training examples of {args.dataset}; choose at most "
                       f"{n}, or leave it out to use them all")
    dataset = dataset._replace(train_x=dataset.train_x[:args.train_subset],
                               train_y=dataset.train_y[:args.train_subset])
  return dataset


def _model(args, num_classes: int):
  if args.model == "mlp":
    return models.get("mlp", num_classes, features=args.mlp_features)
  return models.get(args.model, num_classes)


def run(args: argparse.Namespace, plan: Plan | None = None) -> dict:
  """Runs every method's sweep; writes results; returns the payload.

  The output folder is checked and locked first, and existing checkpoints
  are checked against this run, before any training.
  """
  plan = plan or Plan(args)
  ckpt_lib.check_writable(args.out)
  command = " ".join([PROG] + [shlex.quote(a) for a in sys.argv[1:]])
  with ckpt_lib.lock_directory(args.out, command):
    plan.check_checkpoints()
    payload = _train(plan)
    write(args.out, payload)
  return payload


def _train(plan: Plan) -> dict:
  args, runs, start = plan.args, [], time.time()
  for method, config in plan.configs.items():
    t0 = time.time()
    out = sweep_lib.sweep(
        plan.model, plan.dataset, config, plan.spec(method),
        model_name=args.model,
        strategy=plan.strategy,
        max_configs_per_chunk=args.max_configs_per_chunk,
        checkpoint_dir=plan.checkpoint_dir(method), fresh=args.fresh,
        progress=not args.no_progress, validation=args.validation)
    grids = _grids(config, out)
    runs.append({"label": plan.label(method), "method": config.method,
                 "grid": config.grid, "configs": out["configs"],
                 "strategy": out["strategy"],
                 "train_config": out["train_config"],
                 "eval_mode": methods_lib.get(config.method).eval_mode,
                 "grids": grids,
                 "alpha_over_delta": [
                     train_lib.alpha_over_delta(g, c["lr"])
                     for g, c in zip(grids, out["configs"])],
                 "memory": _memory(plan, config, out),
                 "history": out["history"], "seconds": time.time() - t0})
  ds = plan.dataset
  return {"args": vars(args), "environment": results_lib.environment(),
          "dataset": sweep_lib.describe_dataset(ds),
          "model": sweep_lib.model_definition(plan.model),
          "wall_seconds": time.time() - start, "runs": runs}


def _grids(config, out: dict) -> list[dict]:
  """Per config, each quantized layer's grid (``qjax.train.layer_grids``)."""
  import jax
  params = out["final_state"].params
  grids = []
  for i, cfg in enumerate(out["configs"]):
    hp = {k: v for k, v in cfg.items() if k != "seed"}
    grids.append(train_lib.layer_grids(
        config, jax.tree.map(lambda v, i=i: v[i], params), hp))
  return grids


def _memory(plan: Plan, config, out: dict) -> dict:
  """The trained state's bytes per config, and one step's compiled memory.

  ``state``: :func:`qjax.memory.memory_report` of the final state (per
  config; codes, float parameters, optimizer state, BatchNorm statistics,
  diagnostics). ``step``: XLA's memory analysis of one config's training
  step (:func:`qjax.memory.compiled_peak_bytes`, compiled for shapes only).
  """
  import jax
  import jax.numpy as jnp
  state = out["final_state"]
  report = memory_lib.memory_report(state)
  one = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype),
                     state)
  x = plan.dataset.train_x
  batch = (jax.ShapeDtypeStruct((config.batch_size,) + x.shape[1:], x.dtype),
           jax.ShapeDtypeStruct((config.batch_size,), jnp.int32))
  hp = {k: jax.ShapeDtypeStruct((), jnp.float32)
        for k in out["configs"][0] if k != "seed"}
  step = memory_lib.compiled_peak_bytes(
      lambda s, b, h: train_lib.train_step(plan.model, config, s, b, h),
      one, batch, hp)
  return {"state": report, "step": step}


def alpha_over_delta_summary(runs: list[dict]) -> str:
  """One line per quantized method: α/Δ (lr over grid spacing) per lr,
  the range over its quantized layers."""
  lines = []
  for run in runs:
    by_lr = {}
    for c, a in zip(run["configs"], run["alpha_over_delta"]):
      if a:
        by_lr.setdefault(c["lr"], []).extend(a.values())
    if by_lr:
      lines.append(f"  {run['label']:10} " + ", ".join(
          f"lr {lr:g}: {min(v):.3g}" + ("" if max(v) == min(v) else
                                        f"-{max(v):.3g}")
          for lr, v in by_lr.items()))
  if not lines:
    return ""
  return "\n".join(["α/Δ per quantized layer (lr / grid spacing; the "
                    "paper's ±1 at lr 0.01 is 0.005):", *lines])


def memory_summary(runs: list[dict]) -> str:
  """One line per method: its train state's bytes and its quantized bits."""
  lines = ["memory per config (qjax.memory_report of the final state):"]
  for run in runs:
    m, step = run["memory"]["state"], run["memory"]["step"]
    bits = ("" if not m["quantized_weights"] else
            f", {m['quantized_weights']:,} weights stored as codes at "
            f"{m['bits_per_quantized_weight']:.3f} bits")
    temp = ("" if step["temp_bytes"] is None else
            f"; step temp {step['temp_bytes'] / 2**20:.2f} MiB")
    lines.append(
        f"  {run['label']:10} total {m['total'] / 2**20:7.3f} MiB: params "
        f"{(m['codes'] + m['code_scales'] + m['float_params']) / 2**20:.3f}, "
        f"optimizer {m['optimizer_state'] / 2**20:.3f}, diagnostics "
        f"{m['diagnostics'] / 2**20:.3f}{bits}{temp}")
  return "\n".join(lines)


def write(out_dir: str, payload: dict) -> None:
  runs = payload["runs"]
  results_lib.write_json(os.path.join(out_dir, "results.json"), payload)
  results_lib.write_csv(os.path.join(out_dir, "metrics.csv"), runs)
  results_lib.plot_curves(os.path.join(out_dir, "curves.png"), runs)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(results_lib.error_table(runs) + "\n")


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
    sweep_lib.cpu_devices(args.cpu_devices)  # before JAX creates an array
    try:
      plan = Plan(args)
    except ValueError as err:  # a check of qjax's own (SweepSpec, models)
      raise UsageError(str(err)) from None
    payload = run(args, plan)
  except (UsageError, ckpt_lib.CheckpointError) as err:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 2
  except train_lib.NonFiniteError as err:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 1
  print(f"\n{payload['dataset']['name']}: final test error after "
        f"{args.epochs} epoch(s), {payload['wall_seconds']:.0f} s in all "
        f"({payload['environment']['backend']})")
  print(results_lib.error_table(payload["runs"]))
  print(memory_summary(payload["runs"]))
  ratios = alpha_over_delta_summary(payload["runs"])
  if ratios:
    print(ratios)
  print(f"results: {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
