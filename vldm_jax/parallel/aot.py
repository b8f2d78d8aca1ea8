"""Ahead-of-time compilation: compile a jitted function for a TPU slice (or this host's devices) without running
it, and report what one chip would hold and do.

On a machine without TPUs, ``libtpu`` (``pip install libtpu``) still compiles for a named topology:
:func:`topology_devices` (``"v5e:4x4"``, ``"v5p:2x2x2"``...) gives the slice's devices, a mesh is built over
them with :func:`vldm_jax.parallel.mesh.make_mesh`, parameters and inputs are ``jax.ShapeDtypeStruct`` s with
``NamedSharding`` s (:func:`abstract_module`, :func:`abstract_sharded`: no weights are allocated), and
:func:`compile_report` lowers and compiles under :func:`~vldm_jax.parallel.activations.activation_mesh`, then
reads XLA's analyses of the per-device program:

- memory (``memory_analysis()``): argument, output, temporary and aliased bytes of one device; the peak is
  ``argument + output - alias + temp`` (generated code apart), compared with the chip's HBM (:data:`CHIPS`);
- FLOPs (``cost_analysis()``) of one device's program, and a time: XLA's own estimate (``optimal_seconds``)
  where the compiler gives one (TPU), else FLOPs / the chip's peak bf16 FLOP/s, a lower bound, labelled so.

Loops count once. XLA's cost analysis counts the body of a ``while`` (``lax.scan``, ``fori_loop``, ``lax.map``)
one time, not times its trip count: compile one iteration (one denoising step, one decode chunk) for FLOPs and
time, and multiply.

The function is traced with the target platform set (:func:`target_platform`), so code that picks a kernel by
platform (:func:`vldm_jax.nn.attention.dot_product_attention`) picks the target's, not this host's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vldm_jax.errors import ConfigError
from vldm_jax.parallel.activations import activation_mesh, current_mesh
from vldm_jax.parallel.mesh import DEFAULT_RULES, tree_shardings

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU chip: HBM bytes and peak dense bf16 FLOP/s (Google Cloud's TPU pages)."""

    name: str
    hbm_bytes: int
    peak_flops: float


# By ``device.device_kind``. Cloud TPU docs: v4 "32 GiB, 275 TFLOPs"; v5e "16 GB, 197 TFLOPs"; v5p "95 GB,
# 459 TFLOPs"; v6e (Trillium) "32 GB, 918 TFLOPs". The runtime keeps a little of each for itself (a v5e reports
# about 15.75 GiB usable), so a compile within a few hundred MiB of the limit may still not fit.
CHIPS: dict[str, ChipSpec] = {
    "TPU v4": ChipSpec("v4", 32 * GiB, 275e12),
    "TPU v5 lite": ChipSpec("v5e", 16 * GiB, 197e12),
    "TPU v5e": ChipSpec("v5e", 16 * GiB, 197e12),
    "TPU v5": ChipSpec("v5p", 95 * GiB, 459e12),
    "TPU v5p": ChipSpec("v5p", 95 * GiB, 459e12),
    "TPU v6 lite": ChipSpec("v6e", 32 * GiB, 918e12),
    "TPU v6e": ChipSpec("v6e", 32 * GiB, 918e12),
}

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("vldm_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None) -> Iterator[str | None]:
    """Within this block, functions are traced for ``platform`` ("tpu", "gpu", "cpu"; None: this host's)."""
    token = _PLATFORM.set(platform)
    try:
        yield platform
    finally:
        _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform being compiled for: the one set by :func:`target_platform`, else this host's backend."""
    return _PLATFORM.get() or jax.default_backend()


def trace_platform() -> str:
    """The platform the current trace is compiled for: the activation mesh's devices, else
    :func:`current_platform`. Layers that pick a formulation per platform ask this."""
    mesh = current_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return current_platform()


# ---------------------------------------------------------------------------------------------- devices

def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU slice named like ``"v5e:4x4"`` or ``"v5p:2x2x2"`` (compile-only: nothing runs on
    them), from libtpu, which need not find a TPU on this machine."""
    # libtpu takes a lock file per process on a TPU host; compiling for a topology needs no exclusive chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu missing, bad name: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "not installed" in first or "libtpu" in first.lower():
            first += " (pip install libtpu)"
        raise ConfigError(f"TPU topology {topology!r}: {first}") from None
    return list(desc.devices)


def target_devices(topology: str | None = None) -> list[jax.Device]:
    """A TPU topology's devices, or this host's (``jax.devices()``) when ``topology`` is None."""
    return topology_devices(topology) if topology else jax.devices()


def devices_per_chip(devices: Sequence[jax.Device]) -> int:
    """Devices sharing one chip (v4 without megacore shows each TensorCore as a device); 1 off TPU."""
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    if not coords or not coords[0]:
        return 1
    counts: dict[tuple, int] = {}
    for c in coords:
        counts[c] = counts.get(c, 0) + 1
    return max(counts.values())


def chip_spec(devices: Sequence[jax.Device]) -> ChipSpec | None:
    """The per-device share of the chip's HBM and FLOP/s, or None for a device kind not in :data:`CHIPS`."""
    spec = CHIPS.get(devices[0].device_kind)
    if spec is None:
        return None
    n = devices_per_chip(devices)
    return ChipSpec(spec.name, spec.hbm_bytes // n, spec.peak_flops / n)


# -------------------------------------------------------------------------------------- abstract inputs

class _ShapeRngs:
    """Stands in for ``nnx.Rngs`` under ``nnx.eval_shape``: every stream returns one key, no counters (whose
    traced increments make building a U-Net-sized module slow)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return jax.random.key(0)


def abstract_module(factory: Callable[[Any], Any]):
    """``(graphdef, state)`` of ``factory(rngs)`` with every array a ``ShapeDtypeStruct``: no weights allocated
    or initialised."""
    from flax import nnx

    return nnx.split(nnx.eval_shape(lambda: factory(_ShapeRngs())))


def abstract_sharded(tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES,
                     min_shard_size: int = 0, dtype=None) -> Any:
    """``tree`` (arrays or ShapeDtypeStructs, e.g. an abstract NNX state) as ShapeDtypeStructs carrying the
    NamedShardings of :func:`~vldm_jax.parallel.mesh.tree_shardings`; floating leaves cast to ``dtype`` if given
    (bf16 weights for inference)."""
    shardings = tree_shardings(tree, mesh, rules, min_shard_size)

    def one(leaf, sharding):
        leaf_dtype = leaf.dtype
        if dtype is not None and np.issubdtype(np.dtype(leaf_dtype), np.floating):
            leaf_dtype = dtype
        return jax.ShapeDtypeStruct(leaf.shape, leaf_dtype, sharding=sharding)

    return jax.tree.map(one, tree, shardings)


def abstract_array(shape: Sequence[int], dtype, sharding: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def replicated(mesh: Mesh, shape: Sequence[int], dtype) -> jax.ShapeDtypeStruct:
    return abstract_array(shape, dtype, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------- report

@dataclasses.dataclass
class CompileReport:
    """What XLA says of one compiled program, per device. Bytes are per device; ``flops`` is one device's
    program (loop bodies once: see the module docstring); ``est_seconds`` is XLA's estimate when
    ``est_source == "xla"``, FLOPs / peak FLOP/s (a lower bound) when ``"flops/peak"``, None off known chips."""

    name: str
    platform: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    hbm_bytes: int | None
    fits: bool | None
    flops: float | None
    bytes_accessed: float | None
    est_seconds: float | None
    est_source: str | None
    flops_seconds: float | None
    lower_seconds: float
    compile_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        gib = lambda b: "n/a" if b is None else f"{b / GiB:.2f} GiB"  # noqa: E731
        fits = {True: "fits", False: "does NOT fit", None: "HBM unknown"}[self.fits]
        est = "n/a" if self.est_seconds is None else f"{self.est_seconds * 1e3:.1f} ms ({self.est_source})"
        flops = "n/a" if self.flops is None else f"{self.flops / 1e12:.2f} TFLOP"
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "1 device"
        return (f"{self.name}: {self.device_kind} x{self.num_devices} [{mesh}] peak {gib(self.peak_bytes)} of "
                f"{gib(self.hbm_bytes)} ({fits}); args {gib(self.argument_bytes)}, temp {gib(self.temp_bytes)}; "
                f"{flops}/device, est {est}; compiled in {self.compile_seconds:.1f} s")


def _cost(compiled) -> dict[str, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def analyse(compiled, *, name: str, devices: Sequence[jax.Device], mesh: Mesh | None,
            lower_seconds: float = 0.0, compile_seconds: float = 0.0) -> CompileReport:
    """A :class:`CompileReport` of an already compiled function."""
    mem = compiled.memory_analysis()
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak = arg + out - alias + temp
    spec = chip_spec(devices)
    cost = _cost(compiled)
    flops = cost.get("flops")
    flops_seconds = flops / spec.peak_flops if (spec is not None and flops) else None
    if cost.get("optimal_seconds", 0) > 0:
        est, source = float(cost["optimal_seconds"]), "xla"
    elif flops_seconds is not None:
        est, source = flops_seconds, "flops/peak"
    else:
        est, source = None, None
    return CompileReport(
        name=name, platform=devices[0].platform, device_kind=devices[0].device_kind,
        num_devices=len(devices), mesh=dict(mesh.shape) if mesh is not None else {},
        argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
        peak_bytes=peak, hbm_bytes=None if spec is None else spec.hbm_bytes,
        fits=None if spec is None else peak <= spec.hbm_bytes,
        flops=None if flops is None else float(flops), bytes_accessed=cost.get("bytes accessed"),
        est_seconds=est, est_source=source, flops_seconds=flops_seconds,
        lower_seconds=lower_seconds, compile_seconds=compile_seconds)


def compile_report(fn: Callable, *args, mesh: Mesh | None, name: str = "", devices: Sequence[jax.Device] | None = None,
                   **kwargs) -> tuple[Any, CompileReport]:
    """Lowers and compiles ``fn`` (a ``jax.jit`` function) for ``args``/``kwargs`` (ShapeDtypeStructs with
    shardings on ``mesh``, or static values) with activations pinned to ``mesh`` and the target platform set;
    returns ``(compiled, report)``. ``devices`` default to the mesh's (or this host's)."""
    if devices is None:
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    platform = devices[0].platform
    with activation_mesh(mesh), target_platform(platform):
        t0 = time.perf_counter()
        lowered = fn.lower(*args, **kwargs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    report = analyse(compiled, name=name or getattr(fn, "__name__", "fn"), devices=devices, mesh=mesh,
                     lower_seconds=t1 - t0, compile_seconds=t2 - t1)
    return compiled, report


def format_table(reports: Sequence[CompileReport], steps: dict[str, int] | None = None) -> str:
    """A markdown table of reports; ``steps[name]`` multiplies the estimated time into a per-stage time."""
    steps = steps or {}
    head = ("| stage | chips | mesh | peak / chip | HBM | fits | TFLOP / chip | est. per call | calls | est. stage "
            "| compile |")
    rows = [head, "|" + "---|" * 11]
    for r in reports:
        n = steps.get(r.name, 1)
        est = "n/a" if r.est_seconds is None else f"{r.est_seconds:.3g} s ({r.est_source})"
        stage = "n/a" if r.est_seconds is None else f"{r.est_seconds * n:.3g} s"
        rows.append(f"| {r.name} | {r.device_kind} x{r.num_devices} | {mesh_summary_dict(r.mesh)} | "
                    f"{r.peak_bytes / GiB:.2f} GiB | {'n/a' if r.hbm_bytes is None else f'{r.hbm_bytes / GiB:.0f} GiB'}"
                    f" | {'n/a' if r.fits is None else ('yes' if r.fits else 'NO')} | "
                    f"{'n/a' if r.flops is None else f'{r.flops / 1e12:.2f}'} | {est} | {n} | {stage} | "
                    f"{r.compile_seconds:.0f} s |")
    return "\n".join(rows)


def mesh_summary_dict(shape: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items() if v > 1) or "1 device"


def total_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (global, not per device)."""
    return sum(math.prod(getattr(x, "shape", ())) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
