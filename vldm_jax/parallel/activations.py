"""Activation shardings: where a video's batch and frames sit on the mesh while a model runs.

A pipeline or a training step traces its model inside :func:`activation_mesh`; the frame helpers of
:mod:`vldm_jax.nn.temporal` (the one place frames fold and unfold) then pin their outputs with
``with_sharding_constraint``, and XLA's SPMD partitioner derives everything between those points:

- videos ``(B, F, H, W, C)``: batch over ``data``/``fsdp``, **frames over ``context``**;
- folded frames ``(B*F, H, W, C)`` (every spatial layer): the folded dimension over ``data``/``fsdp`` and
  ``context``, so a spatial layer runs on its own frames with no communication;
- frame sequences ``(B*H*W, F, C)`` (temporal attention): the positions over ``context``. Going from
  frames-sharded to positions-sharded is one all-to-all, the exchange of DeepSpeed-Ulysses: there the
  sequence is traded for heads, here for spatial positions, since the sequences of different positions are
  independent and each device then attends over all frames of its positions, exactly;
- temporal convolutions ``(B, F, H, W, C)`` with frames sharded: XLA exchanges the halo of ``k // 2`` frames
  with the neighbouring devices (collective permutes); GroupNorm statistics over frames are all-reduced.

When ``context`` does not divide the frame count (5 key frames on 4 devices), the rows ``H`` of each frame
are split over ``context`` instead (spatial convolutions then exchange row halos); when it divides neither,
that dimension stays whole. The same jitted function thus runs on one device, or on any mesh, with results
equal up to float reassociation.

The mesh is read at trace time: a function traced under one mesh must be jitted anew (or carry the mesh as a
static argument) to run under another.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vldm_jax.parallel.mesh import BATCH_AXES, tree_shardings

CONTEXT_AXIS = "context"

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("vldm_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within this block, models traced by ``jax.jit`` pin their activations to ``mesh`` (None: no
    constraints, the single-device behaviour)."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh activations are pinned to, or None when there is none or it has a single device."""
    mesh = _MESH.get()
    if mesh is None or mesh.devices.size == 1:
        return None
    return mesh


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def _context_size(mesh: Mesh) -> int:
    return mesh.shape.get(CONTEXT_AXIS, 1)


def _entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _constrain(x: jax.Array, mesh: Mesh, spec: list) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def video_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of a video ``(B, F, H, ...)``: batch over data/fsdp, frames over context (or rows
    when the frames do not divide), each only where it divides."""
    batch, ctx = _batch_axes(mesh), _context_size(mesh)
    spec: list = [None] * len(shape)
    if batch and shape[0] % _size(mesh, batch) == 0:
        spec[0] = _entry(batch)
    if ctx > 1:
        if shape[1] % ctx == 0:
            spec[1] = CONTEXT_AXIS
        elif len(shape) > 3 and shape[2] % ctx == 0:
            spec[2] = CONTEXT_AXIS
    return P(*spec)


def constrain_video(x: jax.Array) -> jax.Array:
    """Pins a video ``(B, F, H, W, C)`` (or any ``(B, F, ...)`` per-frame array) to the active mesh."""
    mesh = current_mesh()
    if mesh is None or x.ndim < 2:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, video_spec(x.shape, mesh)))


def constrain_folded(x: jax.Array, num_frames: int) -> jax.Array:
    """Pins folded frames ``(B*F, H, W, C)`` (or ``(B*F, ...)``): the folded dimension over data/fsdp and
    context when both divide (batch-major, so this is the video's own layout), else rows over context."""
    mesh = current_mesh()
    if mesh is None or x.ndim < 1:
        return x
    b, f = x.shape[0] // num_frames, num_frames
    batch, ctx = _batch_axes(mesh), _context_size(mesh)
    batch_ok = bool(batch) and b % _size(mesh, batch) == 0
    spec: list = [None] * x.ndim
    if ctx > 1 and f % ctx == 0:
        spec[0] = _entry((batch if batch_ok else ()) + (CONTEXT_AXIS,))
    else:
        spec[0] = _entry(batch) if batch_ok else None
        if ctx > 1 and x.ndim > 2 and x.shape[1] % ctx == 0:
            spec[1] = CONTEXT_AXIS
    return _constrain(x, mesh, spec)


def constrain_frame_tokens(x: jax.Array, batch_size: int) -> jax.Array:
    """Pins frame sequences ``(B*H*W, F, C)``: batch over data/fsdp and positions over context (each video's
    positions are contiguous, so the split is the video's rows)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    positions = x.shape[0] // batch_size
    batch, ctx = _batch_axes(mesh), _context_size(mesh)
    axes: tuple[str, ...] = batch if batch and batch_size % _size(mesh, batch) == 0 else ()
    if ctx > 1 and positions % ctx == 0:
        axes = axes + (CONTEXT_AXIS,)
    return _constrain(x, mesh, [_entry(axes)] + [None] * (x.ndim - 1))


def videos_per_call(batch: int, num_frames: int) -> int:
    """How many videos one model call should take under the active mesh: all ``batch`` of them, except when
    frames are split over ``context`` and a device would hold frames of several videos. The folded layout
    ``(B*F, ...)`` is then not the video layout ``(B, F/c, ...)`` and XLA would regather activations at every
    fold, so the caller runs groups of one video per batch shard instead (classifier-free guidance's doubled
    batch on a context-only mesh: two calls of one video, each split over all devices)."""
    mesh = current_mesh()
    if mesh is None or _context_size(mesh) == 1 or num_frames % _context_size(mesh):
        return batch
    shards = _size(mesh, _batch_axes(mesh))
    return shards if batch % shards == 0 else 1


def video_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding a pipeline puts its noise and latents ``(B, F, h, w, C)`` in."""
    return NamedSharding(mesh, video_spec(shape, mesh))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading dimension over data/fsdp where it divides; the rest replicated (text embeddings, images)."""
    batch = _batch_axes(mesh)
    spec: list = [None] * len(shape)
    if batch and shape and shape[0] % _size(mesh, batch) == 0:
        spec[0] = _entry(batch)
    return NamedSharding(mesh, P(*spec))


def place_state(state, mesh: Mesh):
    """A model state (parameters) on ``mesh``, sharded by the default logical-axis rules (over ``fsdp`` where the
    mesh has it, else replicated)."""
    return jax.device_put(state, tree_shardings(state, mesh))


def place_inputs(mesh: Mesh, *arrays):
    """Videos ``(B, F, ...)`` (5-D) with frames over ``context``, every other array by its batch; None stays."""
    def one(a):
        if a is None:
            return None
        a = jnp.asarray(a)
        return jax.device_put(a, video_sharding(mesh, a.shape) if a.ndim == 5 else batch_sharding(mesh, a.shape))

    return tuple(one(a) for a in arrays)
