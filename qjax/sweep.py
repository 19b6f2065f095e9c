"""Sweeps: one compiled program trains seeds x learning rates of one method.

A sweep is a whole training run vmapped (or ``lax.map``-ped) over a leading
config axis. The config axis is sharded over all local devices, split into
chunks when it does not fit in memory, and never recompiled between epochs.

How the program runs is a :class:`Strategy`:

* ``steps``: ``"scan"`` runs an epoch as one ``lax.scan``; ``"loop"`` calls
  one jitted step from Python. On XLA:CPU a scanned convnet step measured
  several times slower than the same step jitted alone, while an MLP is fine
  either way (``benchmarks/sweep_throughput.py``).
* ``configs``: ``"vmap"`` batches the configs into one program; ``"map"``
  runs them one after another inside it (``lax.map``, a scan); ``"loop"``
  calls the unbatched compiled step once per config from Python. For the
  small CNN on XLA:CPU a vmapped step of 8 configs cost 3.2x the unbatched
  step per config, and ``lax.map`` pays the scan penalty, so ``loop`` wins.

:func:`choose_strategy` picks by backend and model; pass ``strategy=`` to
override.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qjax import train as train_lib
from qjax.data import batching

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
  steps: str = "scan"     # "scan" | "loop"
  configs: str = "vmap"   # "vmap" | "map" | "loop"

  def __post_init__(self):
    if self.steps not in ("scan", "loop"):
      raise ValueError(f"Strategy.steps must be 'scan' or 'loop'; got "
                       f"{self.steps!r}.")
    if self.configs not in ("vmap", "map", "loop"):
      raise ValueError(f"Strategy.configs must be 'vmap', 'map' or 'loop'; "
                       f"got {self.configs!r}.")


CONV_MODELS = ("cnn", "vgg9", "vgg_bc", "resnet56", "wrn56_2", "resnet18")


def choose_strategy(model_name: str, backend: str | None = None) -> Strategy:
  """The measured-fastest strategy for ``model_name`` on ``backend``.

  On CPU a convnet runs as a Python loop of unbatched jitted steps, config
  after config (a scanned or vmapped conv step measured several times slower
  there: ``benchmarks/sweep_throughput.py``); MLPs, and every model on
  GPU/TPU, use a scanned epoch with vmapped configs.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu" and model_name in CONV_MODELS:
    return Strategy(steps="loop", configs="loop")
  return Strategy(steps="scan", configs="vmap")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """The cartesian product of seeds, learning rates and grid scales.

  ``grid_scales`` multiply every quantized layer's binary scale H (the grid
  spacing Δ = 2 s H); ``None`` keeps BinaryConnect's H and adds no axis.
  """
  seeds: tuple[int, ...] = (0,)
  lrs: tuple[float, ...] = (1e-2,)
  grid_scales: tuple[float, ...] | None = None

  def configs(self) -> list[dict]:
    scales = self.grid_scales or (None,)
    out = []
    for s, lr, g in itertools.product(self.seeds, self.lrs, scales):
      out.append({"seed": int(s), "lr": float(lr)} if g is None else
                 {"seed": int(s), "lr": float(lr), "grid_scale": float(g)})
    return out


def _over_configs(fn: Callable, how: str, in_axes: tuple) -> Callable:
  """``fn`` compiled for a leading config axis on the args marked ``0``.

  ``vmap`` batches the configs into one program, ``map`` runs them one after
  another inside one program (``lax.map``, itself a scan), and ``loop`` calls
  the unbatched compiled ``fn`` once per config from Python.
  """
  if how == "vmap":
    return jax.jit(jax.vmap(fn, in_axes=in_axes))

  def call_with(args, batched_values):
    it = iter(batched_values)
    return fn(*[next(it) if ax == 0 else a for a, ax in zip(args, in_axes)])

  if how == "map":
    def mapped(*args):
      batched = [a for a, ax in zip(args, in_axes) if ax == 0]
      return jax.lax.map(lambda xs: call_with(args, xs), batched)
    return jax.jit(mapped)

  single = jax.jit(fn)

  def looped(*args):
    batched = [a for a, ax in zip(args, in_axes) if ax == 0]
    count = jax.tree.leaves(batched[0])[0].shape[0]
    outs = []
    for i in range(count):
      lane = [jax.tree.map(lambda v: v[i], a) for a in batched]
      it = iter(lane)
      outs.append(single(*[next(it) if ax == 0 else a
                           for a, ax in zip(args, in_axes)]))
    return jax.tree.map(lambda *v: jnp.stack(v), *outs)
  return looped


class _Programs:
  """The jitted per-chunk programs of one (model, config, strategy)."""

  def __init__(self, model, config, strategy: Strategy):
    how = strategy.configs

    def init_one(key, sample_x, hp):
      return train_lib.init_state(model, config, key, sample_x, hp)

    def step_one(state, x_all, y_all, idx, hp):
      return train_lib.train_step(model, config, state,
                                  (x_all[idx], y_all[idx]), hp)

    def shared_step_one(state, x, y, hp):  # one streamed batch for all configs
      return train_lib.train_step(model, config, state, (x, y), hp)

    def epoch_one(state, x_all, y_all, idx, hp):
      def body(s, i):
        return step_one(s, x_all, y_all, i, hp)
      state, metrics = jax.lax.scan(body, state, idx)
      return state, jax.tree.map(jnp.mean, metrics)

    def eval_one(state, x, y, hp):
      out = train_lib.evaluate(model, config, state, x, y, hparams=hp)
      out["sign_flips"] = train_lib.sign_flips(config, state)
      return out

    self.init = _over_configs(init_one, how, (0, None, 0))
    self.step = _over_configs(step_one, how, (0, None, None, 0, 0))
    self.shared_step = _over_configs(shared_step_one, how, (0, None, None, 0))
    self.epoch = _over_configs(epoch_one, how, (0, None, None, 0, 0))
    self.eval = _over_configs(eval_one, how, (0, None, None, 0))
    self.strategy = strategy

  def run_stream_epoch(self, states, batches, hps):
    """One epoch over streamed ``(x, y)`` batches shared by every config."""
    totals, steps = None, 0
    for x, y in batches:
      states, metrics = self.shared_step(states, jnp.asarray(x),
                                         jnp.asarray(y), hps)
      totals = metrics if totals is None else jax.tree.map(jnp.add, totals,
                                                           metrics)
      steps += 1
    if not steps:
      raise ValueError("the training stream yielded no batch this epoch.")
    return states, jax.tree.map(lambda v: v / steps, totals)

  def stream_eval(self, states, batches, hps):
    """Test metrics over streamed batches, weighted by batch size."""
    sums, count, flips = None, 0, None
    for x, y in batches:
      out = self.eval(states, jnp.asarray(x), jnp.asarray(y), hps)
      flips = out.pop("sign_flips")
      weighted = jax.tree.map(lambda v: v * len(y), out)
      sums = weighted if sums is None else jax.tree.map(jnp.add, sums,
                                                        weighted)
      count += len(y)
    if not count:
      raise ValueError("the test stream yielded no batch.")
    return dict(jax.tree.map(lambda v: v / count, sums), sign_flips=flips)

  def run_epoch(self, states, x, y, idx, hps):
    """``idx``: ``[C, steps, batch]``; returns states and mean metrics."""
    if self.strategy.steps == "scan":
      return self.epoch(states, x, y, idx, hps)
    totals = None
    for t in range(idx.shape[1]):
      states, metrics = self.step(states, x, y, idx[:, t], hps)
      totals = metrics if totals is None else jax.tree.map(jnp.add, totals,
                                                           metrics)
    return states, jax.tree.map(lambda v: v / idx.shape[1], totals)


@functools.lru_cache(maxsize=32)
def _programs(model, config, strategy: Strategy) -> _Programs:
  """Compiled programs, shared by every sweep of the same model and config.

  Flax modules and the frozen configs are hashable, so a second sweep (another
  seed set, another batch of learning rates, a later chunk) reuses the jitted
  functions and XLA's compiled executables instead of recompiling.
  """
  return _Programs(model, config, strategy)


def _config_sharding():
  """Shards the leading config axis over all local devices (None if one)."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  mesh = Mesh(np.array(devices), ("config",))
  return NamedSharding(mesh, PartitionSpec("config"))


def _pad_configs(configs: list[dict], multiple: int) -> list[dict]:
  extra = (-len(configs)) % multiple
  return configs + [configs[-1]] * extra


def run_chunk(model, dataset, config: train_lib.TrainConfig,
              configs: list[dict], strategy: Strategy, *,
              checkpoint_dir: str | None = None, progress: bool = True,
              on_epoch: Callable | None = None) -> dict:
  """Trains ``configs`` (one chunk) together; returns per-epoch metrics."""
  from qjax import checkpoint as ckpt_lib  # orbax is imported lazily

  num_real = len(configs)
  sharding = _config_sharding()
  if sharding is not None:
    configs = _pad_configs(configs, len(jax.local_devices()))
  keys = jnp.stack([jax.random.PRNGKey(c["seed"]) for c in configs])
  hps = {name: jnp.asarray([c[name] for c in configs], jnp.float32)
         for name in configs[0] if name != "seed"}
  streaming = is_streaming(dataset)
  if streaming:
    sample_x = jnp.asarray(next(iter(dataset.train_batches(
        0, config.batch_size)))[0])
  else:
    x_train = jnp.asarray(dataset.train_x)
    y_train = jnp.asarray(dataset.train_y)
    x_test, y_test = jnp.asarray(dataset.test_x), jnp.asarray(dataset.test_y)
    sample_x = x_train[:config.batch_size]
  if sharding is not None:
    keys, hps = jax.device_put((keys, hps), sharding)

  programs = _programs(model, config, strategy)
  states = programs.init(keys, sample_x, hps)
  history, start_epoch = [], 0
  if checkpoint_dir:
    restored = ckpt_lib.restore(checkpoint_dir, states)
    if restored is not None:
      states, history, start_epoch = restored
      if sharding is not None:
        states = jax.device_put(states, sharding)

  shuffle = None if streaming else jax.jit(jax.vmap(
      lambda k: batching.shuffle_batches(k, x_train.shape[0],
                                         config.batch_size)))
  bar = _progress(range(start_epoch, config.epochs), progress,
                  desc=f"{config.method}-{config.optimizer} x{num_real}",
                  initial=start_epoch, total=config.epochs)
  for epoch in bar:
    t0 = time.perf_counter()
    if streaming:
      states, train_metrics = programs.run_stream_epoch(
          states, dataset.train_batches(epoch, config.batch_size), hps)
      evals = programs.stream_eval(states, dataset.test_batches(1000), hps)
    else:
      epoch_keys = jax.vmap(lambda k: jax.random.fold_in(k, epoch))(
          states.key)
      idx = shuffle(epoch_keys)
      states, train_metrics = programs.run_epoch(states, x_train, y_train,
                                                 idx, hps)
      evals = programs.eval(states, x_test, y_test, hps)
    record = _epoch_record(epoch, train_metrics, evals, num_real,
                           time.perf_counter() - t0)
    history.append(record)
    if hasattr(bar, "set_postfix"):
      bar.set_postfix(loss=f"{np.mean(record['train_loss']):.3f}",
                      test_err=f"{np.mean(record['test_error']):.4f}")
    if checkpoint_dir:
      ckpt_lib.save(checkpoint_dir, states, history, epoch + 1)
    if on_epoch is not None:
      on_epoch(record)
  shards = len({s.device for s in jax.tree.leaves(states)[0]
                 .addressable_shards})
  final = jax.tree.map(lambda v: np.asarray(v)[:num_real], states)
  return {"history": history, "final_state": final, "devices": shards}


def _epoch_record(epoch, train_metrics, evals, num_real, seconds) -> dict:
  as_list = lambda v: np.asarray(v, np.float64)[:num_real].tolist()
  return {
      "epoch": epoch + 1,
      "train_loss": as_list(train_metrics["loss"]),
      "train_error": as_list(train_metrics["error"]),
      "test_loss": as_list(evals["test_loss"]),
      "test_error": as_list(evals["test_error"]),
      "sign_flips": {k: as_list(v) for k, v in evals["sign_flips"].items()},
      "seconds": seconds,
  }


def _progress(iterable, enabled: bool, **kwargs):
  if not enabled:
    return iterable
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is in the experiments extra
    return iterable
  return tqdm(iterable, leave=True, **kwargs)


def is_streaming(dataset) -> bool:
  """A :class:`qjax.data.StreamingDataset` rather than in-memory arrays."""
  return hasattr(dataset, "train_batches")


def sweep(model, dataset, config: train_lib.TrainConfig, spec: SweepSpec, *,
          model_name: str = "", strategy: Strategy | None = None,
          max_configs_per_chunk: int | None = None,
          checkpoint_dir: str | None = None, progress: bool = True) -> dict:
  """Trains every (seed, lr) of ``spec`` for one method in one program.

  Args:
    model: a Flax module.
    dataset: a :class:`qjax.data.Dataset` (on the device, one shuffle per
      seed) or a :class:`qjax.data.StreamingDataset` (streamed from the host,
      one shuffle per epoch shared by the configs; e.g. ImageNet).
    config: static settings; ``steps_per_epoch`` is filled in here.
    spec: seeds x learning rates.
    model_name: used by :func:`choose_strategy`.
    strategy: override the engine's choice.
    max_configs_per_chunk: split the product into chunks of this size (to
      fit memory); chunks reuse the same compiled program when equal-sized.
    checkpoint_dir: checkpoint every epoch there and resume from it.
    progress: show a progress bar per epoch.

  Returns:
    ``{"configs": [...], "history": [epoch records with [config] lists],
    "strategy": {...}, "final_state": stacked TrainState}``.
  """
  n = dataset.num_train if is_streaming(dataset) else dataset.train_x.shape[0]
  if config.batch_size > n:
    raise ValueError(f"batch_size={config.batch_size} exceeds the "
                     f"{n} training examples of {dataset.name!r}.")
  config = dataclasses.replace(config, steps_per_epoch=n // config.batch_size)
  strategy = strategy or choose_strategy(model_name)
  configs = spec.configs()
  size = max_configs_per_chunk or len(configs)
  chunks = [configs[i:i + size] for i in range(0, len(configs), size)]
  results = []
  for i, chunk in enumerate(chunks):
    sub = (os.path.join(checkpoint_dir, f"chunk{i}") if checkpoint_dir
           else None)
    results.append(run_chunk(model, dataset, config, chunk, strategy,
                             checkpoint_dir=sub, progress=progress))
  return {
      "configs": configs,
      "strategy": dataclasses.asdict(strategy),
      "train_config": dataclasses.asdict(config),
      "history": _merge_histories([r["history"] for r in results]),
      "devices": max(r["devices"] for r in results),
      "final_state": jax.tree.map(lambda *v: np.concatenate(v),
                                  *[r["final_state"] for r in results]),
  }


def _merge_histories(histories: Sequence[list]) -> list:
  merged = []
  for records in zip(*histories):
    out = {"epoch": records[0]["epoch"],
           "seconds": sum(r["seconds"] for r in records)}
    for key in ("train_loss", "train_error", "test_loss", "test_error"):
      out[key] = sum((r[key] for r in records), [])
    out["sign_flips"] = {k: sum((r["sign_flips"][k] for r in records), [])
                         for k in records[0]["sign_flips"]}
    merged.append(out)
  return merged


def train(model, dataset, config: train_lib.TrainConfig, seed: int = 0,
          lr: float = 1e-2, **kwargs) -> dict:
  """A single run: the sweep of one config."""
  return sweep(model, dataset, config, SweepSpec((seed,), (lr,)), **kwargs)
