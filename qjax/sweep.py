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

Reproducibility: config i of a sweep draws exactly the random numbers of the
single run with config i (same keys, same shuffles, same SR noise), and is
tested to end with the same SR grid weights bit for bit (for every strategy,
on 1 and 4 devices, on a small MLP). That holds only while the float
arithmetic agrees: a vmapped matmul may round differently from an unbatched
one, and SR then draws a different side for the rare weight whose
probability sits within an ulp of its variate. Measured on the MNIST MLP
784-256-256-10 (8 configs, 60 steps): config 0 differed from its single run
in 5 of 65,536 entries of one binary kernel, and its float parameters by
about 1e-7; config 5 had every binary kernel equal. The ``"loop"`` config
strategy runs each config through the single-run program itself.

Devices: the config axis is sharded over the local devices (a ``"loop"``
config strategy keeps each config on its device, and configs on different
devices run concurrently). On a CPU host, :func:`cpu_devices` exposes the
cores as devices; the experiment commands call it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qjax import methods as methods_lib
from qjax import network as network_lib
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


def choose_strategy(params_or_name, backend: str | None = None) -> Strategy:
  """The measured-fastest strategy for a model on ``backend``.

  On CPU a convnet runs as a Python loop of unbatched jitted steps, config
  after config (a scanned or vmapped conv step measured several times slower
  there: ``benchmarks/sweep_throughput.py``); MLPs, and every model on
  GPU/TPU, use a scanned epoch with vmapped configs.

  Args:
    params_or_name: the model's parameter tree (arrays or shape structs): a
      convnet is one with a rank-4 kernel
      (:func:`qjax.network.has_conv_kernels`); or a name from
      :data:`CONV_MODELS`.
    backend: default: JAX's default backend.
  """
  backend = backend or jax.default_backend()
  conv = (params_or_name in CONV_MODELS if isinstance(params_or_name, str)
          else network_lib.has_conv_kernels(params_or_name))
  if backend == "cpu" and conv:
    return Strategy(steps="loop", configs="loop")
  return Strategy(steps="scan", configs="vmap")


def cpu_devices(count: int | None = None) -> int:
  """Exposes the host CPU as ``count`` JAX devices (default: one per core).

  A sweep shards its configs over all local devices; on a CPU host that is
  one device unless the cores are exposed as several, and then the configs
  of each device run concurrently on its share of the cores. Measured here
  (2 cores, 16 configs; ``benchmarks/sweep_throughput.py``): the vmapped MLP
  sweep and the looped CNN sweep both run faster on 2 devices than on 1.
  Single runs are unaffected (a one-config run uses one device).

  It must run before JAX creates its first array; afterwards, or when the
  user chose a count (``JAX_NUM_CPU_DEVICES`` or ``XLA_FLAGS=
  --xla_force_host_platform_device_count``), it changes nothing. GPU and TPU
  runs are unaffected: only the CPU platform is split.

  Returns:
    The number of CPU devices this process has.
  """
  if count is None:
    count = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"count must be an int >= 1; got {count!r}.")
  chosen = ("xla_force_host_platform_device_count"
            in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1)
  if not chosen:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: keep what they have
      pass
  return len(jax.devices("cpu"))


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """The cartesian product of seeds and any named hyperparameters.

  ``lrs`` are the base learning rates; ``grid_scales`` multiply every
  quantized layer's grid (its spacing Δ); ``None`` adds no axis.
  ``hparams`` maps any other hyperparameter name (``"weight_decay"``, a
  method's own such as Bop's ``"threshold"`` and ``"gamma"``) to its values;
  the names are checked against the method when the sweep runs (a typo is
  an error). Every swept value is an array in the compiled program, so the
  whole product compiles once.
  """
  seeds: tuple[int, ...] = (0,)
  lrs: tuple[float, ...] = (1e-2,)
  grid_scales: tuple[float, ...] | None = None
  hparams: Any = ()

  def __post_init__(self):
    _check_values("seeds", self.seeds, _is_seed, "distinct ints in "
                  "[0, 2**32)")
    _check_values("lrs", self.lrs, _is_positive_float32,
                  "distinct positive numbers, finite in float32")
    if self.grid_scales is not None:
      _check_values("grid_scales", self.grid_scales, _is_positive_float32,
                    "distinct positive numbers, finite in float32")
    items = (tuple(self.hparams.items()) if isinstance(self.hparams, dict)
             else tuple(self.hparams))
    names = [k for k, _ in items]
    for name, values in items:
      if not isinstance(name, str) or name in ("seed", "lr", "grid_scale"):
        raise ValueError(
            f"SweepSpec.hparams: {name!r} is not a name to sweep there "
            "(seeds, lrs and grid_scales have their own fields).")
      _check_values(f"hparams[{name!r}]", tuple(values), _is_finite_float32,
                    "distinct numbers, finite in float32")
    if len(set(names)) != len(names):
      raise ValueError(f"SweepSpec.hparams repeats a name: {names}.")
    object.__setattr__(self, "hparams", tuple(
        (name, tuple(float(v) for v in values)) for name, values in items))

  @property
  def names(self) -> tuple[str, ...]:
    """The swept hyperparameter names (not the seed), in config order."""
    return (("lr",) + (("grid_scale",) if self.grid_scales else ())
            + tuple(k for k, _ in self.hparams))

  def configs(self) -> list[dict]:
    axes = [("seed", tuple(int(s) for s in self.seeds)),
            ("lr", tuple(float(v) for v in self.lrs))]
    if self.grid_scales:
      axes.append(("grid_scale", tuple(float(v) for v in self.grid_scales)))
    axes += list(self.hparams)
    return [dict(zip([k for k, _ in axes], values))
            for values in itertools.product(*[v for _, v in axes])]


def _is_seed(v) -> bool:
  return (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
          and 0 <= v < 2**32)


def _is_finite_float32(v) -> bool:
  if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
    return False
  with np.errstate(over="ignore"):
    return bool(np.isfinite(np.float32(v)))


def _is_positive_float32(v) -> bool:
  if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
    return False
  with np.errstate(over="ignore"):
    return bool(np.isfinite(np.float32(v)) and np.float32(v) > 0)


def _check_values(name: str, values, ok: Callable, allowed: str) -> None:
  """Raises unless ``values`` is a non-empty sequence of ``allowed`` values."""
  if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
    raise ValueError(f"SweepSpec.{name} must be a sequence of {allowed}; got "
                     f"{name}={values!r}.")
  bad = [v for v in values if not ok(v)]
  if not values or bad or len(set(values)) != len(values):
    why = (f"invalid {bad}" if bad else "empty" if not values
           else "repeated values")
    raise ValueError(f"SweepSpec.{name} must be a non-empty sequence of "
                     f"{allowed}; got {name}={tuple(values)!r} ({why}).")


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
    lanes = [_lanes(a) for a in batched]
    outs = []
    for i in range(len(lanes[0])):
      it = iter(lane[i] for lane in lanes)
      device = _device_of(lanes[0][i])
      outs.append(single(*[next(it) if ax == 0 else _on_device(a, device)
                           for a, ax in zip(args, in_axes)]))
    return _stack_lanes(outs)
  looped.single = single
  return looped


# ----------------------------------------------------------------------------
# Per-config lanes for the "loop" config strategy. A lane lives on the device
# that holds its row of the sharded config axis, so that calls for configs on
# different devices run concurrently (dispatch is asynchronous).
# ----------------------------------------------------------------------------


def _on_several_devices(v) -> bool:
  return isinstance(v, jax.Array) and len(v.sharding.device_set) > 1


def _rows(v: jax.Array) -> list:
  """``[v[0], v[1], ...]``, each row on the device that holds it."""
  if not _on_several_devices(v):
    return list(v)
  rows = [None] * v.shape[0]
  for shard in v.addressable_shards:
    start = shard.index[0].start or 0
    for j in range(shard.data.shape[0]):
      rows[start + j] = shard.data[j]
  return rows


def _lanes(tree) -> list:
  """Splits a pytree with a leading config axis into per-config pytrees."""
  leaves, treedef = jax.tree.flatten(tree)
  rows = [_rows(v) for v in leaves]
  return [treedef.unflatten([r[i] for r in rows])
          for i in range(len(rows[0]))]


def _device_of(tree):
  leaf = jax.tree.leaves(tree)[0]
  return next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else None


def _on_device(tree, device):
  """``tree`` with replicated leaves replaced by their copy on ``device``."""
  if device is None:
    return tree

  def local(v):
    if _on_several_devices(v):
      for shard in v.addressable_shards:
        if shard.device == device:
          return shard.data
    return v
  return jax.tree.map(local, tree)


def _stack_lanes(lanes: list):
  """Inverse of :func:`_lanes`: stacks per-config pytrees along axis 0.

  Lanes on several devices (grouped by device in config order, as
  :func:`_lanes` returns them) are stacked on their devices and assembled
  into one array sharded over the config axis, without copies between
  devices.
  """
  devices = [_device_of(lane) for lane in lanes]
  order = list(dict.fromkeys(devices))
  if len(order) <= 1:
    return jax.tree.map(lambda *v: jnp.stack(v), *lanes)
  per = len(lanes) // len(order)
  if devices != [d for d in order for _ in range(per)]:
    raise ValueError("configs must be grouped by device in equal blocks; got "
                     f"devices {devices}.")
  spec = NamedSharding(Mesh(np.array(order), ("config",)),
                       PartitionSpec("config"))
  leaves = [jax.tree.leaves(lane) for lane in lanes]
  out = []
  for j in range(len(leaves[0])):
    column = [lane[j] for lane in leaves]
    blocks = [jnp.stack(column[k * per:(k + 1) * per]) for k in
              range(len(order))]
    out.append(jax.make_array_from_single_device_arrays(
        (len(lanes),) + column[0].shape, spec, blocks))
  return jax.tree.structure(lanes[0]).unflatten(out)


class Programs:
  """The jitted per-chunk programs of one (model, config, strategy, task).

  Public seams for benchmarks and custom loops: ``init(keys, sample_x,
  hps)``, ``step(states, x, y, idx, hps)``, ``epoch(...)``, ``eval(states,
  x, y, hps)``, each over a leading config axis as ``strategy.configs``
  says. The method is built from each config's (traced) ``hps`` inside the
  traced program: with its key at ``init``, without one in the step (its
  randomness lives in the optimizer state) and in evaluation.
  """

  def __init__(self, model, config, strategy: Strategy,
               task: train_lib.Task = train_lib.CLASSIFICATION):
    how = strategy.configs
    network = network_lib.as_network(model)

    def init_one(key, sample_x, hp):
      return train_lib.init_state(network, config, key, sample_x, hp)

    def step_one(state, x_all, y_all, idx, hp):
      return train_lib.train_step(network, config, state,
                                  (x_all[idx], y_all[idx]), hp, task=task)

    def shared_step_one(state, x, y, hp):  # one streamed batch for all configs
      return train_lib.train_step(network, config, state, (x, y), hp,
                                  task=task)

    def epoch_one(state, x_all, y_all, idx, hp):
      def body(s, i):
        return step_one(s, x_all, y_all, i, hp)
      state, metrics = jax.lax.scan(body, state, idx)
      return state, jax.tree.map(jnp.mean, metrics)

    def eval_one(state, x, y, hp):
      out = train_lib.evaluate(network, config, state, x, y, hparams=hp,
                               task=task)
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
    if self.strategy.configs == "loop":
      return self._run_epoch_lanes(states, x, y, idx, hps)
    totals = None
    for t in range(idx.shape[1]):
      states, metrics = self.step(states, x, y, idx[:, t], hps)
      totals = metrics if totals is None else jax.tree.map(jnp.add, totals,
                                                           metrics)
    return states, jax.tree.map(lambda v: v / idx.shape[1], totals)

  def _run_epoch_lanes(self, states, x, y, idx, hps):
    """Step after step, config after config, with the states kept apart.

    Splitting and restacking the configs once per epoch rather than once per
    step saves a slice and a stack of every state leaf per step; configs on
    different devices run concurrently.
    """
    lanes, hp_lanes, idx_lanes = _lanes(states), _lanes(hps), _lanes(idx)
    devices = [_device_of(lane) for lane in lanes]
    data = [_on_device((x, y), d) for d in devices]
    step = self.step.single
    sums = [None] * len(lanes)
    for t in range(idx.shape[1]):
      for i, lane in enumerate(lanes):
        lanes[i], metrics = step(lane, *data[i], idx_lanes[i][t], hp_lanes[i])
        sums[i] = metrics if sums[i] is None else jax.tree.map(
            jnp.add, sums[i], metrics)
    means = [jax.tree.map(lambda v: v / idx.shape[1], m) for m in sums]
    return _stack_lanes(lanes), _stack_lanes(means)


@functools.lru_cache(maxsize=32)
def programs(model, config, strategy: Strategy,
             task: train_lib.Task = train_lib.CLASSIFICATION) -> Programs:
  """Compiled programs, shared by every sweep of the same model and config.

  Flax modules, NNX constructors and the frozen configs are hashable, so a
  second sweep (another seed set, another batch of learning rates, a later
  chunk) reuses the jitted functions and XLA's compiled executables instead
  of recompiling.
  """
  return Programs(model, config, strategy, task)


def _config_sharding(num_configs: int, pad: bool | None = None):
  """Shards ``num_configs`` configs over local devices (None: one device).

  With ``pad`` (the default on accelerators) the configs use up to
  ``num_configs`` devices and are padded to a multiple of the count: the
  devices work in parallel, so padding only costs memory. Without it (the
  default on CPU, whose devices share the host's cores, so a padded config
  costs as much time as a real one) the count is the largest that divides
  ``num_configs``: 16 configs on 2 CPU devices use both, 3 configs use one.
  A single run is never sharded.
  """
  devices = jax.local_devices()
  if pad is None:
    pad = devices[0].platform != "cpu"
  usable = min(len(devices), num_configs)
  count = usable if pad else max(d for d in range(1, usable + 1)
                                 if num_configs % d == 0)
  if count == 1:
    return None
  mesh = Mesh(np.array(devices[:count]), ("config",))
  return NamedSharding(mesh, PartitionSpec("config"))


def _replicated(sharding, tree):
  """``tree`` copied to every device of ``sharding``'s mesh (once per run)."""
  if sharding is None:  # device_put copies about 1.6x faster than asarray
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _shuffles(keys: jax.Array, num_examples: int, batch_size: int):
  """One epoch of batch indices per config, ``[C, steps, batch]``.

  Jitted once at module level, so that it compiles once per dataset size and
  batch size rather than once per run (a fresh ``jax.jit`` per run recompiled
  the shuffle every time: 0.5 s of each single MNIST run).
  """
  return jax.vmap(lambda k: batching.shuffle_batches(
      k, num_examples, batch_size))(keys)


def _pad_configs(configs: list[dict], multiple: int) -> list[dict]:
  extra = (-len(configs)) % multiple
  return configs + [configs[-1]] * extra


def fingerprint(model, dataset, config: train_lib.TrainConfig,
                configs: list[dict], strategy: Strategy,
                task: train_lib.Task = train_lib.CLASSIFICATION,
                validation: tuple | None = None) -> dict:
  """Everything that determines a chunk's run, as JSON-able values.

  A checkpoint records it; resuming with another fingerprint is refused
  (:class:`qjax.checkpoint.FingerprintMismatchError`), so a changed flag, seed,
  dataset or model never continues another run's training.
  """
  import jax as _jax
  import jaxlib
  import qjax
  train_config = dataclasses.asdict(config)
  # Not the epoch count: a run may be extended (checkpoint.check_epochs).
  del train_config["epochs"]
  return {
      "train_config": train_config,
      "configs": [dict(c) for c in configs],
      "strategy": dataclasses.asdict(strategy),
      "dataset": describe_dataset(dataset),
      "model": model_definition(model),
      "task": task.name,
      "validation": (None if validation is None else
                     _hash_arrays(tuple(_Hashable(a) for a in validation))),
      "versions": {"qjax": qjax.__version__, "jax": _jax.__version__,
                   "jaxlib": jaxlib.__version__},
  }


def model_definition(model) -> str:
  """The model's definition without memory addresses (stable across
  processes): ``repr`` of a Linen module, the graph of an NNX model."""
  if isinstance(model, str):
    return re.sub(r" at 0x[0-9a-fA-F]+", "", model)
  return network_lib.as_network(model).definition


class _Hashable:
  """An array keyed by identity, so its content hash is computed once."""

  def __init__(self, array):
    self.array = array

  def __hash__(self):
    return id(self.array)

  def __eq__(self, other):
    return self.array is other.array


def describe_dataset(dataset) -> dict:
  """Name, sizes and (in memory) a content hash of ``dataset``."""
  if is_streaming(dataset):
    return {"name": dataset.name, "train": int(dataset.num_train),
            "streamed": True}
  arrays = (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y)
  content = _hash_arrays(tuple(_Hashable(a) for a in arrays))
  return {"name": dataset.name, "train": int(dataset.train_x.shape[0]),
          "test": int(dataset.test_x.shape[0]),
          "input_shape": list(dataset.train_x.shape[1:]),
          "num_classes": int(dataset.num_classes), "content": content}


@functools.lru_cache(maxsize=8)
def _hash_arrays(arrays: tuple) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for wrapped in arrays:
    a = np.ascontiguousarray(np.asarray(wrapped.array))
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(memoryview(a).cast("B"))
  return digest.hexdigest()


def run_chunk(model, dataset, config: train_lib.TrainConfig,
              configs: list[dict], strategy: Strategy, *,
              checkpoint_dir: str | None = None, fresh: bool = False,
              progress: bool = True,
              on_epoch: Callable | None = None,
              task: train_lib.Task = train_lib.CLASSIFICATION,
              validation: tuple | None = None) -> dict:
  """Trains ``configs`` (one chunk) together; returns per-epoch metrics.

  With ``checkpoint_dir`` every epoch is checkpointed there (the last two
  kept, each verified on restore) and a rerun resumes from the newest valid
  one, provided it was written by the same run (same :func:`fingerprint`);
  ``fresh`` discards existing checkpoints instead.

  Raises:
    qjax.train.NonFiniteError: a config's last ``config.max_nonfinite_streak``
      steps were all skipped for non-finite values.
    qjax.checkpoint.CheckpointError: the checkpoints belong to another run or
      none of them verifies.
  """
  from qjax import checkpoint as ckpt_lib  # orbax is imported lazily

  checkpoints = None
  if checkpoint_dir:
    checkpoints = ckpt_lib.RunCheckpoints(
        checkpoint_dir, fingerprint(model, dataset, config, configs, strategy,
                                    task, validation), fresh=fresh)
    ckpt_lib.check_epochs(checkpoint_dir, config.epochs)
  num_real = len(configs)
  sharding = _config_sharding(num_real)
  if sharding is not None:
    configs = _pad_configs(configs, len(sharding.device_set))
  keys = jnp.stack([jax.random.PRNGKey(c["seed"]) for c in configs])
  hps = {name: jnp.asarray([c[name] for c in configs], jnp.float32)
         for name in configs[0] if name != "seed"}
  streaming = is_streaming(dataset)
  if streaming:
    sample_x = jnp.asarray(next(iter(dataset.train_batches(
        0, config.batch_size)))[0])
  else:
    x_train, y_train, x_test, y_test = _replicated(sharding, (
        dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y))
    sample_x = x_train[:config.batch_size]
  if validation is not None:
    x_val, y_val = _replicated(sharding, validation)
  if sharding is not None:
    keys, hps = jax.device_put((keys, hps), sharding)

  compiled = programs(model, config, strategy, task)
  states = compiled.init(keys, sample_x, hps)
  history, start_epoch = [], 0
  if checkpoints is not None:
    restored = checkpoints.restore(states)
    if restored is not None:
      states, history, start_epoch = restored
  # Initial and restored states carry the sharding every epoch returns, so
  # the epoch program compiles once (replicated inputs compiled it twice).
  states = (jax.device_put(states, sharding) if sharding is not None
            else jax.device_put(states))

  bar = _progress(range(start_epoch, config.epochs), progress,
                  desc=f"{config.method}-{config.optimizer} x{num_real}",
                  initial=start_epoch, total=config.epochs)
  try:
    for epoch in bar:
      t0 = time.perf_counter()
      if streaming:
        states, train_metrics = compiled.run_stream_epoch(
            states, dataset.train_batches(epoch, config.batch_size), hps)
        evals = compiled.stream_eval(states, dataset.test_batches(1000), hps)
      else:
        epoch_keys = jax.vmap(lambda k: jax.random.fold_in(k, epoch))(
            states.key)
        idx = _shuffles(epoch_keys, x_train.shape[0], config.batch_size)
        states, train_metrics = compiled.run_epoch(states, x_train, y_train,
                                                   idx, hps)
        evals = compiled.eval(states, x_test, y_test, hps)
      if validation is not None:
        val = compiled.eval(states, x_val, y_val, hps)
        val.pop("sign_flips")
        evals.update({"val_" + k[len("test_"):]: v for k, v in val.items()})
      # JAX dispatches asynchronously: time the epoch once its results exist.
      jax.block_until_ready((states, train_metrics, evals))
      record = _epoch_record(epoch, train_metrics, evals, states, num_real,
                             time.perf_counter() - t0)
      _check_finite(states, configs[:num_real], config, epoch)
      history.append(record)
      if hasattr(bar, "set_postfix"):
        shown = {"loss": f"{np.nanmean(record['train_loss']):.3f}"}
        for key in ("val_error", "test_error"):
          if key in record:
            shown[key] = f"{np.nanmean(record[key]):.4f}"
        bar.set_postfix(**shown)
      if checkpoints is not None:
        checkpoints.save(states, history, epoch + 1)
      if on_epoch is not None:
        on_epoch(record)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  shards = len({s.device for s in jax.tree.leaves(states)[0]
                 .addressable_shards})
  final = jax.tree.map(lambda v: np.asarray(v)[:num_real], states)
  return {"history": history, "final_state": final, "devices": shards}


def _check_finite(states, configs: list[dict], config, epoch: int) -> None:
  """Stops the sweep when a config keeps producing non-finite values."""
  streak = np.asarray(states.streak)[:len(configs)]
  bad = np.flatnonzero(streak >= config.max_nonfinite_streak)
  if not bad.size:
    return
  i = int(bad[0])
  step = int(np.asarray(states.step)[i])
  first = int(np.asarray(states.first_skipped)[i])
  raise train_lib.NonFiniteError(
      f"config {configs[i]} (and {bad.size - 1} more) produced non-finite "
      f"loss, gradients or updates in its last {int(streak[i])} steps (up to "
      f"step {step}, epoch {epoch + 1}; first skipped step {first}); those "
      "steps were skipped and the run stops. Lower the learning rate, or "
      "check the data and the model for NaN/inf.")


def _epoch_record(epoch, train_metrics, evals, states, num_real,
                  seconds) -> dict:
  """One epoch: ``train_<metric>`` (means over the epoch's steps),
  ``test_<metric>`` and ``val_<metric>`` per config, sign changes, skips."""
  as_list = lambda v: np.asarray(v, np.float64)[:num_real].tolist()
  record = {"epoch": epoch + 1}
  record.update({f"train_{k}": as_list(v) for k, v in train_metrics.items()
                 if k != "skipped"})
  record.update({k: as_list(v) for k, v in evals.items()
                 if k != "sign_flips"})
  record.update({
      "sign_flips": {k: as_list(v) for k, v in evals["sign_flips"].items()},
      "skipped_steps": np.asarray(states.skipped)[:num_real].tolist(),
      "seconds": seconds,
  })
  return record


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


def split_validation(dataset, validation):
  """``(train dataset, (val_x, val_y))``: the last examples held out.

  ``validation`` is a count (int) or a fraction of the training set in
  (0, 1); ``None`` or 0 holds out nothing (``(dataset, None)``). The held-out
  examples are the last ones of the training set, never seen in training;
  the test set is not touched.
  """
  if validation is None or validation == 0:
    return dataset, None
  if is_streaming(dataset):
    raise ValueError("validation= needs an in-memory dataset; hold out a "
                     "split of a streamed dataset in its loader instead.")
  n = dataset.train_x.shape[0]
  if isinstance(validation, float) and 0 < validation < 1:
    count = int(round(validation * n))
  elif isinstance(validation, (int, np.integer)) and not isinstance(
      validation, bool):
    count = int(validation)
  else:
    raise ValueError("validation must be a count (int) or a fraction in "
                     f"(0, 1); got {validation!r}.")
  if not 0 < count < n:
    raise ValueError(f"validation={validation!r} holds out {count} of the "
                     f"{n} training examples; it must leave some for both.")
  train = dataset._replace(train_x=dataset.train_x[:n - count],
                           train_y=dataset.train_y[:n - count])
  return train, (dataset.train_x[n - count:], dataset.train_y[n - count:])


def _check_hparams(config: train_lib.TrainConfig, configs: list[dict]):
  """Every swept name is one of the method's, every value builds it.

  The method is built once per config with concrete values (no tracing), so
  that a value the method refuses (a negative threshold) is an error here,
  before any compilation.
  """
  names = [k for k in configs[0] if k != "seed"]
  methods_lib.check_hparams(config.method, names)
  for name in names:
    if (name in methods_lib.get(config.method).hparams
        and not methods_lib.sweepable(config.method, name)):
      raise ValueError(f"hparam {name!r} of method {config.method!r} is a "
                       "static option (a bool); it cannot be swept.")
  for c in configs:
    train_lib.build_method(config, {k: v for k, v in c.items()
                                    if k != "seed"})


def _plan(dataset, config: train_lib.TrainConfig, spec: SweepSpec,
          model_name: str, strategy: Strategy | None,
          max_configs_per_chunk: int | None, model=None):
  """The completed config, strategy and config chunks of a sweep."""
  n = dataset.num_train if is_streaming(dataset) else dataset.train_x.shape[0]
  if config.batch_size > n:
    raise ValueError(f"batch_size={config.batch_size} exceeds the "
                     f"{n} training examples of {dataset.name!r}.")
  if max_configs_per_chunk is not None and (
      not isinstance(max_configs_per_chunk, (int, np.integer))
      or max_configs_per_chunk < 1):
    raise ValueError("max_configs_per_chunk must be an int >= 1 or None; got "
                     f"{max_configs_per_chunk!r}.")
  config = dataclasses.replace(config, steps_per_epoch=n // config.batch_size)
  if strategy is None:
    strategy = (choose_strategy(model_name) if model_name in CONV_MODELS
                or model is None else choose_strategy(
                    _abstract_params(model, dataset, config.batch_size)))
  configs = spec.configs()
  _check_hparams(config, configs)
  size = max_configs_per_chunk or len(configs)
  chunks = [configs[i:i + size] for i in range(0, len(configs), size)]
  return config, strategy, configs, chunks


def _abstract_params(model, dataset, batch_size: int):
  """The model's parameter shapes (no computation), to choose a strategy."""
  if is_streaming(dataset):
    x = next(iter(dataset.train_batches(0, batch_size)))[0]
  else:
    x = dataset.train_x[:batch_size]
  network = network_lib.as_network(model)
  sample = jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return jax.eval_shape(network.init, jax.random.PRNGKey(0), sample)[0]


def _chunk_dir(checkpoint_dir: str | None, i: int) -> str | None:
  return os.path.join(checkpoint_dir, f"chunk{i}") if checkpoint_dir else None


def check_resumable(model, dataset, config: train_lib.TrainConfig,
                    spec: SweepSpec, checkpoint_dir: str, *,
                    model_name: str = "", strategy: Strategy | None = None,
                    max_configs_per_chunk: int | None = None,
                    task: train_lib.Task = train_lib.CLASSIFICATION,
                    validation=None) -> None:
  """Raises before any training if ``checkpoint_dir`` holds another run's.

  The same checks :func:`sweep` makes chunk by chunk, done up front, so that
  a command training several methods refuses before its first step.
  """
  from qjax import checkpoint as ckpt_lib
  dataset, held_out = split_validation(dataset, validation)
  config, strategy, _, chunks = _plan(dataset, config, spec, model_name,
                                      strategy, max_configs_per_chunk, model)
  for i, chunk in enumerate(chunks):
    directory = _chunk_dir(checkpoint_dir, i)
    ckpt_lib.check_fingerprint(
        directory, fingerprint(model, dataset, config, chunk, strategy, task,
                               held_out))
    ckpt_lib.check_epochs(directory, config.epochs)


def sweep(model, dataset, config: train_lib.TrainConfig, spec: SweepSpec, *,
          model_name: str = "", strategy: Strategy | None = None,
          max_configs_per_chunk: int | None = None,
          checkpoint_dir: str | None = None, fresh: bool = False,
          progress: bool = True, on_epoch: Callable | None = None,
          task: train_lib.Task = train_lib.CLASSIFICATION,
          validation=None) -> dict:
  """Trains every config of ``spec`` for one method in one program.

  Args:
    model: a Flax Linen module (with or without a ``train`` argument, with
      or without dropout and BatchNorm), an NNX model constructor
      (:func:`qjax.network.from_nnx`), or a :class:`qjax.network.Network`.
    dataset: a :class:`qjax.data.Dataset` (on the device, one shuffle per
      seed) or a :class:`qjax.data.StreamingDataset` (streamed from the host,
      one shuffle per epoch shared by the configs; e.g. ImageNet).
    config: static settings; ``steps_per_epoch`` is filled in here.
    spec: seeds x any named hyperparameters (:class:`SweepSpec`).
    model_name: optional; the strategy is chosen from the parameter tree
      (:func:`choose_strategy`).
    strategy: override the engine's choice.
    max_configs_per_chunk: split the product into chunks of this size (to
      fit memory); chunks reuse the same compiled program when equal-sized.
    checkpoint_dir: checkpoint every epoch there and resume from it (only a
      checkpoint of this very run: see :func:`fingerprint`).
    fresh: discard existing checkpoints in ``checkpoint_dir`` first.
    progress: show a progress bar per epoch.
    on_epoch: called after every epoch with its record (a dict of
      ``train_*``, ``val_*``, ``test_*`` lists over the chunk's configs,
      ``sign_flips``, ``epoch``, ``seconds``) and the chunk's configs, e.g.
      to log to TensorBoard (:func:`qjax.results.tensorboard_logger`).
    task: the loss and metrics (:class:`qjax.train.Task`; default
      classification with cross-entropy and error).
    validation: hold out this many (int) or this fraction (float) of the
      last training examples and evaluate on them every epoch
      (``val_*``); choose hyperparameters on those, touch the test set once.

  Returns:
    ``{"configs": [...], "history": [epoch records with [config] lists],
    "strategy": {...}, "final_state": stacked TrainState}``.
  """
  dataset, held_out = split_validation(dataset, validation)
  config, strategy, configs, chunks = _plan(
      dataset, config, spec, model_name, strategy, max_configs_per_chunk,
      model)
  results = []
  for i, chunk in enumerate(chunks):
    callback = None if on_epoch is None else functools.partial(
        _call_on_epoch, on_epoch, chunk)
    results.append(run_chunk(model, dataset, config, chunk, strategy,
                             checkpoint_dir=_chunk_dir(checkpoint_dir, i),
                             fresh=fresh, progress=progress,
                             on_epoch=callback, task=task,
                             validation=held_out))
  return {
      "configs": configs,
      "strategy": dataclasses.asdict(strategy),
      "train_config": dataclasses.asdict(config),
      "history": _merge_histories([r["history"] for r in results]),
      "devices": max(r["devices"] for r in results),
      "final_state": jax.tree.map(lambda *v: np.concatenate(v),
                                  *[r["final_state"] for r in results]),
  }


def _call_on_epoch(on_epoch, chunk, record):
  on_epoch(record, chunk)


def _merge_histories(histories: Sequence[list]) -> list:
  merged = []
  for records in zip(*histories):
    out = {"epoch": records[0]["epoch"],
           "seconds": sum(r["seconds"] for r in records)}
    for key, value in records[0].items():
      if isinstance(value, list):
        out[key] = sum((r[key] for r in records), [])
    out["sign_flips"] = {k: sum((r["sign_flips"][k] for r in records), [])
                         for k in records[0]["sign_flips"]}
    merged.append(out)
  return merged


def train(model, dataset, config: train_lib.TrainConfig, seed: int = 0,
          lr: float = 1e-2, **kwargs) -> dict:
  """A single run: the sweep of one config."""
  return sweep(model, dataset, config, SweepSpec((seed,), (lr,)), **kwargs)
