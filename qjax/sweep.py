"""Sweeps: one compiled program trains the product of seeds and hparams.

A sweep is a whole training run vmapped (or ``lax.map``-ped, or looped) over
a leading config axis: the product of seeds and any named hyperparameters
(:class:`SweepSpec`) of one method, grid and model. The config axis is
sharded over all local devices, split into chunks when it does not fit in
memory, and never recompiled between epochs. The parts live in their own
modules, re-exported here:

* :mod:`qjax.execution`: how it runs (:class:`Strategy`,
  :func:`choose_strategy`, the compiled :class:`Programs`);
* :mod:`qjax.devices`: where (CPU cores as devices, sharding, lanes);
* :mod:`qjax.provenance`: what identifies a run (:func:`fingerprint`).

This module plans a sweep (:func:`sweep`: configs, chunks, validation
split, hyperparameter checks), runs its chunks epoch by epoch
(:func:`run_chunk`: checkpoints, progress, ``on_epoch``), and records
per-epoch metrics.

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
import itertools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax import methods as methods_lib
from qjax import network as network_lib
from qjax import train as train_lib
# The sweep's parts, re-exported here (the public names a sweep user needs):
# how it runs (qjax.execution), where (qjax.devices), what identifies it
# (qjax.provenance).
from qjax.devices import config_sharding
from qjax.devices import cpu_devices
from qjax.devices import cpu_flags
from qjax.devices import pad_configs
from qjax.devices import replicated
from qjax.execution import CONV_MODELS
from qjax.execution import Programs
from qjax.execution import Strategy
from qjax.execution import choose_strategy
from qjax.execution import compiled_count
from qjax.execution import programs
from qjax.execution import shuffles
from qjax.provenance import describe_dataset
from qjax.provenance import fingerprint
from qjax.provenance import is_streaming
from qjax.provenance import model_definition

__all__ = ("CONV_MODELS", "Programs", "Strategy", "SweepSpec",
           "check", "check_resumable", "choose_strategy", "compiled_count",
           "cpu_devices", "cpu_flags",
           "describe_dataset", "fingerprint", "is_streaming",
           "model_definition", "programs", "run_chunk", "split_validation",
           "sweep", "train")

PyTree = Any






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
  sharding = config_sharding(num_real)
  if sharding is not None:
    configs = pad_configs(configs, len(sharding.device_set))
  keys = jnp.stack([jax.random.PRNGKey(c["seed"]) for c in configs])
  hps = {name: jnp.asarray([c[name] for c in configs], jnp.float32)
         for name in configs[0] if name != "seed"}
  streaming = is_streaming(dataset)
  if streaming:
    sample_x = jnp.asarray(next(iter(dataset.train_batches(
        0, config.batch_size)))[0])
  else:
    x_train, y_train, x_test, y_test = replicated(sharding, (
        dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y))
    sample_x = x_train[:config.batch_size]
  if validation is not None:
    x_val, y_val = replicated(sharding, validation)
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
        idx = shuffles(epoch_keys, x_train.shape[0], config.batch_size)
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
      f"step {step}, epoch {epoch + 1}; first skipped step {first}), or, "
      "with the built-in Adam or SGD, values beyond the bounds of "
      "qjax.transforms.bounded_step (|gradient| > 2**50, |lr| > 2**20, "
      "|weight| > 2**120); those steps were skipped and the run stops. "
      "Lower the learning rate, or check the data and the model for "
      "NaN/inf.")


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
  if model is not None:
    _check_init(model, dataset, config, configs[0])
  size = max_configs_per_chunk or len(configs)
  chunks = [configs[i:i + size] for i in range(0, len(configs), size)]
  return config, strategy, configs, chunks


def _sample(dataset, batch_size: int):
  """One batch of inputs as a shape struct."""
  if is_streaming(dataset):
    x = next(iter(dataset.train_batches(0, batch_size)))[0]
  else:
    x = dataset.train_x[:batch_size]
  return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def _check_init(model, dataset, config, first: dict) -> None:
  """Initialises one config abstractly (shapes only, no computation).

  So that a method that cannot run on the model or grid (Bop on a 16-level
  grid, a mask that selects nothing) fails here, before any compilation or
  training, with the method's own message.
  """
  hp = {k: np.float32(v) for k, v in first.items() if k != "seed"}
  network = network_lib.as_network(model)
  jax.eval_shape(
      lambda key, x: train_lib.init_state(network, config, key, x, hp),
      jax.random.PRNGKey(0), _sample(dataset, config.batch_size))


def check(model, dataset, config: train_lib.TrainConfig, spec: SweepSpec, *,
          validation=None, max_configs_per_chunk: int | None = None) -> None:
  """Every check :func:`sweep` makes before training, without training.

  The validation split, the batch size against the data, each config's
  hyperparameters (names and values, by building the method), and an
  abstract initialisation of the model with the method and grid. Raises
  ``ValueError`` with the problem; returns None when the sweep can run.
  """
  dataset, _ = split_validation(dataset, validation)
  _plan(dataset, config, spec, "", Strategy(), max_configs_per_chunk, model)


def _abstract_params(model, dataset, batch_size: int):
  """The model's parameter shapes (no computation), to choose a strategy."""
  network = network_lib.as_network(model)
  return jax.eval_shape(network.init, jax.random.PRNGKey(0),
                        _sample(dataset, batch_size))[0]


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
