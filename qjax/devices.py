"""Device placement: CPU cores as devices, the config axis sharded.

A sweep's leading config axis is sharded over the local devices
(:func:`config_sharding`), its datasets replicated (:func:`replicated`), and
for the ``"loop"`` config strategy split into per-config lanes that stay on
the device holding them (:func:`lanes`, :func:`stack_lanes`), so that
configs on different devices run concurrently. On a CPU host,
:func:`cpu_devices` exposes the cores as devices and :func:`cpu_flags` sets
qjax's XLA:CPU code-generation defaults.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

# XLA:CPU options qjax sets when it owns the process (the experiment
# commands, the notebooks' first cell, the benchmarks), unless XLA_FLAGS
# already names them. ``--xla_cpu_prefer_vector_width=512``: XLA asks LLVM
# for 256-bit vectors by default; on a CPU with AVX-512 the quantizers'
# elementwise integer work (the Threefry hash of SR, the float-format
# index arithmetic) runs in 512-bit registers instead. Measured on 2 cores
# with AVX-512 (benchmarks/format_step.py, alternating processes): bf16
# SR 173.5/188.0 -> 197.6/196.6 steps/s, fp8 e4m3 R 144.8/149.8 ->
# 174.2/172.6. A CPU without AVX-512 has no 512-bit vectors, and LLVM
# keeps the widths it has.
CPU_FLAGS = ("--xla_cpu_prefer_vector_width=512",)


def _flag_name(flag: str) -> str:
  return flag.lstrip("-").split("=", 1)[0]


def cpu_flags(flags=CPU_FLAGS) -> tuple[str, ...]:
  """Adds qjax's XLA:CPU defaults (:data:`CPU_FLAGS`) to ``XLA_FLAGS``.

  XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so this
  must run before the first array; afterwards it changes nothing. A flag
  whose name ``XLA_FLAGS`` already holds is left as the user set it (e.g.
  ``XLA_FLAGS=--xla_cpu_prefer_vector_width=256`` keeps XLA's own
  default). The experiment commands and the benchmarks call it (through
  :func:`cpu_devices`, or directly); a library user who wants the same
  code as they measure sets the flags in ``XLA_FLAGS`` or calls this first.
  Only XLA:CPU reads them: GPU and TPU code is unchanged.

  Returns:
    The flags this call added (empty when none was needed or possible).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    return ()
  current = os.environ.get("XLA_FLAGS", "")
  present = {_flag_name(f) for f in current.split()}
  added = tuple(f for f in flags if _flag_name(f) not in present)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def cpu_devices(count: int | None = None) -> int:
  """Exposes the host CPU as ``count`` JAX devices (default: one per core).

  A sweep shards its configs over all local devices; on a CPU host that is
  one device unless the cores are exposed as several, and then the configs
  of each device run concurrently on its share of the cores. Measured here
  (2 cores, 16 configs; ``benchmarks/sweep_throughput.py``): the vmapped MLP
  sweep and the looped CNN sweep both run faster on 2 devices than on 1.
  Single runs are unaffected (a one-config run uses one device). It also
  sets qjax's XLA:CPU flags (:func:`cpu_flags`).

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
  cpu_flags()
  chosen = ("xla_force_host_platform_device_count"
            in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1)
  if not chosen:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: keep what they have
      pass
  return len(jax.devices("cpu"))


def config_sharding(num_configs: int, pad: bool | None = None):
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


def replicated(sharding, tree):
  """``tree`` copied to every device of ``sharding``'s mesh (once per run)."""
  if sharding is None:  # device_put copies about 1.6x faster than asarray
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))


def pad_configs(configs: list[dict], multiple: int) -> list[dict]:
  extra = (-len(configs)) % multiple
  return configs + [configs[-1]] * extra


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


def lanes(tree) -> list:
  """Splits a pytree with a leading config axis into per-config pytrees."""
  leaves, treedef = jax.tree.flatten(tree)
  rows = [_rows(v) for v in leaves]
  return [treedef.unflatten([r[i] for r in rows])
          for i in range(len(rows[0]))]


def device_of(tree):
  leaf = jax.tree.leaves(tree)[0]
  return next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else None


def on_device(tree, device):
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


def stack_lanes(lanes: list):
  """Inverse of :func:`lanes`: stacks per-config pytrees along axis 0.

  Lanes on several devices (grouped by device in config order, as
  :func:`lanes` returns them) are stacked on their devices and assembled
  into one array sharded over the config axis, without copies between
  devices.
  """
  devices = [device_of(lane) for lane in lanes]
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
