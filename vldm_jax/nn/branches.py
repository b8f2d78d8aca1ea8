"""Independent branches for the CPU: one layer's work split into pieces that XLA runs side by side.

XLA's CPU runtime runs the operations of a program in their data order and gives each operation to one
worker. Its elementwise and reduction kernels (GroupNorm, SiLU, residual adds, resampling) run on one core
while the others wait. So do YNNPACK's convolutions and matmuls at these models' sizes: only large matmuls
(2048^3) split over the cores (docs/benchmarks.md, session 12). And every activation of a whole video at the
temporal VAE decoder's full resolution is far larger than the caches. Computed as ``n`` pieces with no data
between them (frames for a per-frame layer, rows for a per-pixel one), the runtime runs the pieces
concurrently and each piece's intermediates stay small: the whole 8-frame medium decode took 0.63-0.76x the
time split this way (docs/benchmarks.md, issue 21).

On a GPU or TPU, or with activations sharded over a mesh, a split only adds launches and copies, so the
automatic choice (``requested=None``) is 1 there; an explicit count is always honoured (tests, benchmarks).
Results equal the unsplit computation up to float reassociation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from vldm_jax.parallel.activations import current_mesh
from vldm_jax.parallel.aot import current_platform

# Automatic splits: at most this many pieces, and each piece at least this many elements (below it the
# per-operation overhead outweighs the concurrency; the tiny test models stay unsplit).
MAX_FRAME_BRANCHES = 8
MAX_ROW_BRANCHES = 4
MIN_BRANCH_ELEMENTS = 1 << 16


def _cpu_without_mesh() -> bool:
    return current_mesh() is None and current_platform() == "cpu"


def branch_count(size: int, requested: int | None, *, cap: int, elements: int) -> int:
    """Into how many equal pieces to split an axis of ``size`` items (``elements`` in the whole array).

    ``requested`` None: automatic (at most ``cap`` pieces, each of at least :data:`MIN_BRANCH_ELEMENTS`, on the CPU
    without a mesh; else 1). An int: at most that many. Either way the largest count that divides ``size``."""
    if requested is None:
        if not _cpu_without_mesh():
            return 1
        n = min(cap, max(1, elements // MIN_BRANCH_ELEMENTS))
    else:
        n = int(requested)
    n = max(1, min(n, size))
    while size % n:
        n -= 1
    return n


def split(x: jax.Array, n: int, axis: int) -> list[jax.Array]:
    return [x] if n == 1 else jnp.split(x, n, axis=axis)


def join(parts: Sequence[jax.Array], axis: int) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def map_branches(fn: Callable[..., jax.Array], n: int, axis: int, *arrays: jax.Array) -> jax.Array:
    """``fn(*arrays)`` computed as ``n`` pieces along ``axis`` of every array, joined on that axis. ``fn`` must treat
    the items along ``axis`` independently (a per-frame layer over folded frames, say)."""
    pieces = [split(a, n, axis) for a in arrays]
    return join([fn(*args) for args in zip(*pieces)], axis)


def per_sample(fn: Callable[[jax.Array], jax.Array], x: jax.Array, branches: int | None) -> jax.Array:
    """``fn(x)`` for a per-sample layer (folded frames, say), as at most :data:`MAX_FRAME_BRANCHES` independent pieces
    of samples where that is faster (automatic: the CPU) or ``branches`` pieces when given."""
    n = branch_count(x.shape[0], branches, cap=MAX_FRAME_BRANCHES, elements=x.size)
    return map_branches(fn, n, 0, x)


def set_branches(module, branches: int | None) -> None:
    """Sets ``branches`` on every layer of ``module`` that splits itself (None: automatic, 1: never split)."""
    from flax import nnx

    for _, layer in nnx.iter_graph(module):
        if hasattr(type(layer), "branches"):
            layer.branches = branches
