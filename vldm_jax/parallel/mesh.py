"""Device mesh, parameter shardings from logical axis rules, and global batches: used by training and by
every pipeline.

The mesh has four axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data
parallelism whose parameters, gradients and optimizer state are sharded; XLA gathers each weight where it
is used), ``context`` (the frames of one video split over devices: see :mod:`vldm_jax.parallel.activations`)
and ``tensor`` (a weight's output or input channels split, by the rules). The batch is split over ``data``
and ``fsdp``. Sizes come from the config or ``--mesh data=2,context=4``; ``-1`` takes the remaining devices.

Our modules carry no sharding annotations, so every parameter gets *logical* axis names from its leaf name
and rank (:func:`logical_axes`): a ``kernel`` ``(..., in, out)`` has ``spatial`` window axes then ``in``
and ``out``; an ``embedding`` is ``(vocab, out)``; vectors (biases, norm scales) are ``channels``. Ordered
rules ``[logical, mesh_axis]`` then place logical axes on mesh axes, skipping any that do not divide the
dimension, so one rule set works for every layer width. Optimizer state and EMA leaves end in the same
names and shapes as their parameters, so the same function shards them identically.

Multi-host: :func:`initialize_distributed` starts ``jax.distributed`` when the environment or config says
so; each process loads ``batch_size_per_device * local_device_count`` examples (its own slice of the
data) and :func:`global_batch` assembles the global arrays with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vldm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")
# The batch dimension is split over every device; within an fsdp group, devices see different examples.
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (("out", "fsdp"), ("in", "fsdp"), ("vocab", "fsdp"))

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_IP")


# ---------------------------------------------------------------------------------------------- multi-host

def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Starts ``jax.distributed`` once when asked: ``mode`` 'true', or 'auto' with a coordinator address in the
    config or in ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). On TPU pods and
    SLURM/Open MPI clusters JAX finds the rest itself. Returns whether this process is part of a multi-process
    run. Must run before anything touches a device."""
    mode = str(mode).lower()
    if mode == "false":
        return False
    if _distributed_is_initialized():
        return jax.process_count() > 1
    env_address = next((os.environ[k] for k in _DISTRIBUTED_ENV if os.environ.get(k)), None)
    if mode == "auto" and not (coordinator_address or env_address):
        return False
    kwargs: dict[str, Any] = {}
    address = coordinator_address or env_address
    if address:
        kwargs["coordinator_address"] = address
    n = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if n is not None:
        kwargs["num_processes"] = int(n)
    if pid is not None:
        kwargs["process_id"] = int(pid)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"jax.distributed.initialize failed ({', '.join(f'{k}={v}' for k, v in kwargs.items())}):"
                          f" {str(e).splitlines()[0]}") from None
    return jax.process_count() > 1


def _distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False


# -------------------------------------------------------------------------------------------------- mesh

def mesh_shape(data: int, fsdp: int, num_devices: int, context: int = 1,
               tensor: int = 1) -> tuple[int, int, int, int]:
    """``(data, fsdp, context, tensor)`` with a ``-1`` resolved; the product must be the device count."""
    sizes = [data, fsdp, context, tensor]
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh size may be -1 (got {named})")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1 (got {named})")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide into groups of {known}; "
                              "choose mesh sizes that divide the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {' x '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))} = {math.prod(sizes)} "
                          f"devices, but there are {num_devices}; set one size to -1 to use them all")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *,
              context: int = 1, tensor: int = 1) -> Mesh:
    """A ``('data', 'fsdp', 'context', 'tensor')`` mesh over ``devices`` (default: all devices of all
    processes)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, len(devices), context, tensor)
    if devices == jax.devices():
        try:
            # Topology-aware placement (the inner axes, context and tensor, take the fastest links).
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
            return Mesh(grid, MESH_AXES)
        except Exception:
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,context=4"`` -> ``{"data": 2, "context": 4}`` (the CLI's ``--mesh``); unknown axes and
    non-integers are a :class:`ConfigError`."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"--mesh {text!r}: each entry is AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: the size of {name} is not an integer") from None
    return sizes


def mesh_from_sizes(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from ``{axis: size}``: missing axes are 1, one size may be -1 (the remaining devices); without a
    -1 the mesh takes the first ``prod(sizes)`` devices."""
    devices = list(devices) if devices is not None else jax.devices()
    wanted = math.prod(s for s in sizes.values() if s > 0)
    if wanted > len(devices):
        hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices)"
                if devices[0].platform == "cpu" else "")
        raise ConfigError(f"mesh {','.join(f'{k}={v}' for k, v in sizes.items())} needs {wanted} devices, but there "
                          f"are {len(devices)}{hint}")
    if -1 not in sizes.values():
        devices = devices[:wanted]
    return make_mesh(sizes.get("data", 1), sizes.get("fsdp", 1), devices, context=sizes.get("context", 1),
                     tensor=sizes.get("tensor", 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


# ----------------------------------------------------------------------------------------- logical axes

def path_names(keypath) -> tuple[str, ...]:
    """A jax key path as plain names: dict keys, list indices (as strings) and attribute names; the ``value``
    attribute of an NNX Variable is dropped, so a parameter's names are its module path."""
    names = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:  # pragma: no cover
            names.append(str(k))
    if names and names[-1] in ("value", "raw_value"):
        names.pop()
    return tuple(names)


def logical_axes(names: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or of an optimizer-state leaf shaped like it)."""
    ndim = len(shape)
    leaf = names[-1] if names else ""
    if ndim == 0:
        return ()
    if ndim == 1:
        return ("channels",)
    if leaf == "embedding" and ndim == 2:
        return ("vocab", "out")
    if leaf == "kernel" or ndim >= 2:
        return ("spatial",) * (ndim - 2) + ("in", "out")
    return (None,) * ndim  # pragma: no cover


def _rule_axes(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def partition_spec(names: Sequence[str], shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[Sequence[Any]] = DEFAULT_RULES, min_shard_size: int = 0) -> P:
    """The PartitionSpec of one array: rules applied in order to its logical axes."""
    shape = tuple(int(s) for s in shape)
    if not shape or math.prod(shape) < min_shard_size:
        return P()
    logical = logical_axes(names, shape)
    spec: list[Any] = [None] * len(shape)
    used: set[str] = set()
    for logical_name, mesh_axes in rules:
        axes = _rule_axes(mesh_axes)
        if not axes or used.intersection(axes):
            continue
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ConfigError(f"mesh.rules: unknown mesh axis {unknown[0]!r} (mesh axes: {', '.join(MESH_AXES)})")
        size = math.prod(mesh.shape[a] for a in axes)
        for i, name in enumerate(logical):
            if name == logical_name and spec[i] is None and shape[i] % size == 0:
                if size > 1:
                    spec[i] = axes[0] if len(axes) == 1 else axes
                    used.update(axes)
                break
    return P(*spec) if any(a is not None for a in spec) else P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES,
                   min_shard_size: int = 0) -> Any:
    """NamedShardings for every array leaf of ``tree`` (arrays or ShapeDtypeStructs), same structure."""
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_names(path), shape, mesh, rules, min_shard_size))

    return jax.tree_util.tree_map_with_path(one, tree)


# ------------------------------------------------------------------------------------------------ batches

def local_batch_size(batch_size_per_device: int, mesh: Mesh) -> int:
    """Examples this process loads per step: its devices in the mesh times the per-device batch."""
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    return batch_size_per_device * local


def global_batch_size(batch_size_per_device: int, mesh: Mesh) -> int:
    return batch_size_per_device * mesh.devices.size


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch (leading dim ``local_batch_size``) -> global arrays sharded over
    ``BATCH_AXES``. Non-numeric leaves (strings) are dropped: they never enter a compiled step."""
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf" or value.ndim == 0:
            continue
        global_shape = (value.shape[0] * n_proc,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
