"""Checkpoint tensors to device arrays in one pass over their bytes, and where a load's time went.

A diffusers tensor is in PyTorch's layout (linear ``(out, in)``, conv ``OIHW``); ours is ``(in, out)`` / ``HWIO``.
Each tensor is written once, from the memory-mapped file straight into its device buffer in the target layout:
``jax.device_put`` of the transposed view (XLA's transpose plan; no intermediate host copy). A dtype change or a
``VLDM_LOAD_COPY=tiled|numpy`` choice copies into a 64-byte aligned host buffer instead, which ``device_put``
aliases on the CPU backend. A tensor already in the target layout, dtype and alignment (our converted format) is
not copied at all: the device array aliases the private memory map, and pages are read when first touched (a
lazy load).

The copies run in worker threads and start before the model's abstract state is built, so building the module
(Python, 1.5-5 s for an SD U-Net on a loaded 2-core machine) overlaps the copies. They start from the layout the
tensor's rank implies (2-D transposed, 4-D/5-D to channels-last); when the key map then wants another one for a
tensor (an embedding table...), that tensor is copied again from the map, so a guess can cost time but never a
wrong weight.

``VLDM_LOAD_TIMING=1`` (or INFO logging for ``vldm_jax.checkpoints``) prints each load's breakdown;
:func:`last_load_timing` returns the last one as a dict.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger("vldm_jax.checkpoints")

ALIGN = 64  # XLA's CPU client aliases host buffers aligned to this (and copies anything else)
_LAST: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------- timing


class LoadTiming:
    """Wall time per phase of one load, in seconds: ``read`` (open and map the weights), ``build`` (the model's
    abstract state), ``convert`` (key map, layout checks), ``place`` (waiting for the copies, device arrays),
    ``merge`` (the module from its state); ``copy_s`` is the time the worker threads spent copying, much of
    it overlapped with ``build``."""

    def __init__(self, what: str):
        self.what = what
        self.phases: dict[str, float] = {}
        self.bytes = 0
        self.copied_bytes = 0
        self.aliased_bytes = 0
        self.recopied = 0
        self.copy_s = 0.0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "total_s": time.perf_counter() - self.t0,
                **{f"{k}_s": v for k, v in self.phases.items()}, "copy_threads_s": self.copy_s,
                "bytes": self.bytes, "copied_bytes": self.copied_bytes, "aliased_bytes": self.aliased_bytes,
                "recopied_tensors": self.recopied}

    def finish(self) -> dict[str, Any]:
        d = self.as_dict()
        _LAST.clear()
        _LAST.update(d)
        if os.environ.get("VLDM_LOAD_TIMING") or log.isEnabledFor(logging.INFO):
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())
            msg = (f"loaded {self.what}: {d['total_s']:.2f} s ({phases}; copies {self.copy_s:.2f} s in threads); "
                   f"{self.bytes / 2**20:.0f} MiB, {self.copied_bytes / 2**20:.0f} MiB copied into place, "
                   f"{self.aliased_bytes / 2**20:.0f} MiB aliased (memory-mapped)")
            if os.environ.get("VLDM_LOAD_TIMING"):
                print(msg, file=__import__("sys").stderr, flush=True)
            log.info(msg)
        return d


def last_load_timing() -> dict[str, Any]:
    """The breakdown of the last ``load_model`` / converted-folder load in this process (empty before one)."""
    return dict(_LAST)


# ---------------------------------------------------------------------------------------------- buffers


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def is_aliasable(a: np.ndarray, dtype) -> bool:
    """Whether ``device_put(a)`` can alias ``a`` on the CPU backend: target dtype, C-contiguous, aligned."""
    return (a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.size > 0
            and a.ctypes.data % ALIGN == 0)


def _squeezed(a: np.ndarray) -> tuple:
    """(data pointer, shape, strides) with size-1 axes dropped: two views with equal keys list the same
    elements in the same order, so a C-contiguous copy of one is, reshaped, a copy of the other."""
    keep = [i for i, d in enumerate(a.shape) if d != 1]
    return a.__array_interface__["data"][0], tuple(a.shape[i] for i in keep), tuple(a.strides[i] for i in keep)


def rank_layout(a: np.ndarray) -> np.ndarray:
    """The target-layout view a tensor's rank suggests (PyTorch -> ours): 2-D transposed, conv2d OIHW -> HWIO,
    conv3d OIDHW -> DHWIO, conv1d (O, I, 1) -> (1, I, O), anything else as is. The first guess of :class:`Prefetch`."""
    if a.ndim == 2:
        return a.T
    if a.ndim == 3 and a.shape[2] == 1:  # conv1d with k=1 used as a linear layer
        return a.transpose(2, 1, 0)
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 5:
        return a.transpose(2, 3, 4, 1, 0)
    return a


def copy_into_place(view: np.ndarray, dtype) -> np.ndarray:
    """One pass from ``view`` (any strides, e.g. a transposed view of a memory map) into an aligned C-contiguous
    buffer of ``dtype``."""
    out = aligned_empty(view.shape, dtype)
    np.copyto(out, view, casting="unsafe")
    return out


TILE_OUT, TILE_IN = 256, 64  # output x input channels per tile: the source tile (256 x 64 x taps floats) fits L2


def tiled_layout_copy(a: np.ndarray, dtype) -> np.ndarray:
    """:func:`rank_layout` of a C-contiguous PyTorch-layout tensor ``a`` ``(O, I, *taps)`` copied tile by tile
    into an aligned buffer ``(*taps, I, O)``: one numpy copy of a transposed view strides across the whole
    source for each output row (5-10x slower than memcpy); a tile of 256 x 64 channels keeps its source in cache.
    """
    o, i = a.shape[:2]
    taps = int(np.prod(a.shape[2:], dtype=np.int64))
    src = a.reshape(o, i, taps)
    out = aligned_empty((taps, i, o), dtype)
    for o0 in range(0, o, TILE_OUT):
        for i0 in range(0, i, TILE_IN):
            np.copyto(out[:, i0:i0 + TILE_IN, o0:o0 + TILE_OUT],
                      src[o0:o0 + TILE_OUT, i0:i0 + TILE_IN].transpose(2, 1, 0), casting="unsafe")
    return out.reshape(rank_layout(a).shape)


def _copy_kind() -> str:
    # Measured on the SD 1.5 U-Net (docs/benchmarks.md): XLA's transpose plan (device_put of the transposed view,
    # written straight into the device buffer) beat numpy's copies, tiled or not, by 1.5-2x on this CPU.
    # VLDM_LOAD_COPY=tiled|numpy|pjrt selects the others (pjrt: device_put for 2-D, tiled numpy for convs).
    return os.environ.get("VLDM_LOAD_COPY", "pjrt_all")


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Prefetch:
    """Copies the tensors of a state dict into their probable target layout in worker threads, started at once.

    ``dtype``: the parameter dtype the caller asked for (None: float32 for floating tensors, as our modules
    declare). :meth:`take` returns the copy when it has the layout and dtype the key map settled on, or makes
    the right one from the memory map."""

    def __init__(self, state_dict: Mapping[str, Any], dtype=None, timing: LoadTiming | None = None):
        self.timing = timing
        self.futures: dict[int, tuple[np.ndarray, Future]] = {}
        arrays = [a for a in state_dict.values() if isinstance(a, np.ndarray) and a.size > 0]
        arrays.sort(key=lambda a: -a.nbytes)  # the big ones first: the pool ends with small, even work
        self.pool = ThreadPoolExecutor(_workers(), thread_name_prefix="vldm-load") if arrays else None
        for a in arrays:
            want = np.dtype(dtype) if dtype is not None else (
                np.dtype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V" else a.dtype)
            if is_aliasable(a, want) and a.ndim <= 1:
                continue  # already in place: nothing to copy
            guess = rank_layout(a)
            self.futures[id(a)] = (guess, self.pool.submit(self._copy, a, guess, want))

    def _copy(self, a: np.ndarray, guess: np.ndarray, dtype) -> np.ndarray:
        t0 = time.perf_counter()
        kind = _copy_kind()
        if guess is a or not a.flags.c_contiguous or kind == "numpy":
            out = copy_into_place(guess, dtype)
        elif (kind == "pjrt_all" or (kind == "pjrt" and a.ndim == 2)) and a.dtype == dtype:
            out = jax.device_put(guess)  # XLA's own transpose plan, straight into device memory
        else:
            out = tiled_layout_copy(a, dtype)
        if self.timing is not None:
            self.timing.copy_s += time.perf_counter() - t0  # += on a float under the GIL: fine for a report
        return out

    def take(self, source: np.ndarray | None, final: np.ndarray, dtype) -> tuple[np.ndarray, bool]:
        """(host array for ``final`` in ``dtype``, whether it was copied). ``source`` is the state-dict array
        ``final`` is a view of (None when unknown)."""
        dtype = np.dtype(dtype)
        entry = self.futures.pop(id(source), None) if source is not None else None
        if entry is not None:
            guess, fut = entry
            out = fut.result()
            if out.dtype == dtype and _squeezed(guess) == _squeezed(final):
                return (out.reshape(final.shape) if out.shape != final.shape else out), True
            if self.timing is not None:
                self.timing.recopied += 1
        if is_aliasable(final, dtype):
            return final, False
        return copy_into_place(final, dtype), True

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.futures.clear()


def place(arrays: Mapping[tuple, np.ndarray], dtypes: Mapping[tuple, Any], *, sources: Mapping[tuple, Any] | None = None,
          prefetch: Prefetch | None = None, timing: LoadTiming | None = None) -> dict[tuple, jax.Array]:
    """Device arrays of ``arrays`` (path -> host view in the target layout) in ``dtypes`` (path -> dtype).
    ``sources``: path -> the state-dict array the view was made from (to find its prefetched copy)."""
    sources = sources or {}
    out = {}
    for path, a in arrays.items():
        a = np.asarray(a)
        dtype = np.dtype(dtypes[path])
        if prefetch is not None:
            host, copied = prefetch.take(sources.get(path), a, dtype)
        elif is_aliasable(a, dtype):
            host, copied = a, False
        else:
            host, copied = copy_into_place(a, dtype), True
        if timing is not None:
            timing.bytes += host.nbytes
            if copied:
                timing.copied_bytes += host.nbytes
            else:
                timing.aliased_bytes += host.nbytes
        out[path] = host if isinstance(host, jax.Array) else jax.device_put(host)
    return out
