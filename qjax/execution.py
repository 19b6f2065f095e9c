"""How a sweep runs: the strategy, and the compiled per-chunk programs.

A sweep is a whole training run vmapped (or ``lax.map``-ped, or looped)
over a leading config axis. How the program runs is a :class:`Strategy`:

* ``steps``: ``"scan"`` runs an epoch as one ``lax.scan``; ``"loop"`` calls
  one jitted step from Python. On XLA:CPU a scanned convnet step measured
  several times slower than the same step jitted alone, while an MLP is fine
  either way (``benchmarks/sweep_throughput.py``).
* ``configs``: ``"vmap"`` batches the configs into one program; ``"map"``
  runs them one after another inside it (``lax.map``, a scan); ``"loop"``
  calls the unbatched compiled step once per config from Python. For the
  small CNN on XLA:CPU a vmapped step of 8 configs cost 3.2x the unbatched
  step per config, and ``lax.map`` pays the scan penalty, so ``loop`` wins.
  For the MLP on XLA:CPU ``loop`` won too (2 cores with AVX-512, 2026-12-07,
  ``python -m benchmarks.sweep_throughput --models mlp --strategies all``:
  16 SR-ADAM configs trained 72.4k examples/s as scan/loop against 60.7k
  as scan/vmap; one FP-ADAM config 232 steps/s unbatched against 196
  vmapped on a config axis of size 1, ``python -m
  benchmarks.step_breakdown``). The loop's configs run asynchronously, one
  per CPU device when the CPU is split into devices
  (:func:`qjax.sweep.cpu_devices`), so both cores stay busy.

:func:`choose_strategy` picks by backend and parameter tree; pass
``strategy=`` to :func:`qjax.sweep.sweep` to override. :class:`Programs`
holds the jitted ``init``/``step``/``epoch``/``eval`` of one (model, config,
strategy, task), the public seam that benchmarks and custom loops use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from qjax import devices as devices_lib
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


CONV_MODELS = ("cnn", "allconv", "vgg9", "vgg_bc", "resnet56", "wrn56_2",
               "resnet18")


def choose_strategy(params_or_name, backend: str | None = None) -> Strategy:
  """The measured-fastest strategy for a model on ``backend``.

  On CPU every model runs its configs one after another, unbatched
  (``configs="loop"``: a vmapped step measured slower there, for the MLP
  and several times slower for convnets: ``benchmarks/sweep_throughput.py``);
  a convnet's epoch is a Python loop of jitted steps (a scanned conv step
  measured several times slower), an MLP's a scanned epoch. On GPU/TPU every
  model uses a scanned epoch with vmapped configs.

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
  if backend == "cpu":
    return Strategy(steps="loop" if conv else "scan", configs="loop")
  return Strategy(steps="scan", configs="vmap")


def over_configs(fn: Callable, how: str, in_axes: tuple) -> Callable:
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
    lanes = [devices_lib.lanes(a) for a in batched]
    outs = []
    for i in range(len(lanes[0])):
      it = iter(lane[i] for lane in lanes)
      device = devices_lib.device_of(lanes[0][i])
      outs.append(single(*[next(it) if ax == 0
                           else devices_lib.on_device(a, device)
                           for a, ax in zip(args, in_axes)]))
    return devices_lib.stack_lanes(outs)
  looped.single = single
  return looped


def compiled_count(program: Callable) -> int:
  """How many executables a :class:`Programs` callable has compiled.

  A vmapped or mapped program is one jitted function (one executable per
  distinct input signature and placement); a looped one compiles its
  unbatched function once per device its configs ran on. A count that grows
  from epoch to epoch is a recompilation.
  """
  return getattr(program, "single", program)._cache_size()  # pylint: disable=protected-access


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

    self.init = over_configs(init_one, how, (0, None, 0))
    self.step = over_configs(step_one, how, (0, None, None, 0, 0))
    self.shared_step = over_configs(shared_step_one, how, (0, None, None, 0))
    self.epoch = over_configs(epoch_one, how, (0, None, None, 0, 0))
    self.eval = over_configs(eval_one, how, (0, None, None, 0))
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
    lanes = devices_lib.lanes(states)
    hp_lanes, idx_lanes = devices_lib.lanes(hps), devices_lib.lanes(idx)
    devices = [devices_lib.device_of(lane) for lane in lanes]
    data = [devices_lib.on_device((x, y), d) for d in devices]
    step = self.step.single
    sums = [None] * len(lanes)
    for t in range(idx.shape[1]):
      for i, lane in enumerate(lanes):
        lanes[i], metrics = step(lane, *data[i], idx_lanes[i][t], hp_lanes[i])
        sums[i] = metrics if sums[i] is None else jax.tree.map(
            jnp.add, sums[i], metrics)
    means = [jax.tree.map(lambda v: v / idx.shape[1], m) for m in sums]
    return (devices_lib.stack_lanes(lanes),
            devices_lib.stack_lanes(means))


def programs(model, config, strategy: Strategy,
             task: train_lib.Task = train_lib.CLASSIFICATION) -> Programs:
  """Compiled programs, shared by every sweep of the same model and config.

  Flax modules, NNX constructors and the frozen configs are hashable, so a
  second sweep (another seed set, another batch of learning rates, a later
  chunk) reuses the jitted functions and XLA's compiled executables instead
  of recompiling.
  """
  return _programs(model, config, strategy, task)


@functools.lru_cache(maxsize=32)
def _programs(model, config, strategy, task) -> Programs:
  # Every argument positional, so that a default task and an explicit one
  # share the cache entry.
  return Programs(model, config, strategy, task)


@functools.partial(jax.jit, static_argnums=(1, 2))
def shuffles(keys: jax.Array, num_examples: int, batch_size: int):
  """One epoch of batch indices per config, ``[C, steps, batch]``.

  Jitted once at module level, so that it compiles once per dataset size and
  batch size rather than once per run (a fresh ``jax.jit`` per run recompiled
  the shuffle every time: 0.5 s of each single MNIST run).
  """
  return jax.vmap(lambda k: batching.shuffle_batches(
      k, num_examples, batch_size))(keys)
