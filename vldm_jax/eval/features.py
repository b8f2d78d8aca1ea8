"""Video sources and features computed sharded over the mesh (batch over ``data``), streamed into statistics.

Preprocessing for I3D (what the PyTorch FVD implementations do: StyleGAN-V, TATS, cd-fvd ``preprocess_i3d``):
uint8 frames -> float -> bilinear resize of every frame to ``size`` x ``size`` (PyTorch ``F.interpolate``,
``align_corners=False``, no antialiasing; aspect ratio not kept) -> ``2 x / 255 - 1`` in [-1, 1]. The first
``frames`` frames of each video are used (every frame when it has fewer). ``I3DPreprocess`` makes size,
frame count, value range and antialiasing configurable to match another reference (TF-Hub's FVD resizes
with ``tf.image.resize`` bilinear and the same scaling).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.errors import UserError
from vldm_jax.eval.frechet import RunningStats
from vldm_jax.parallel.mesh import batch_sharding, make_mesh, replicated

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp", ".webm", ".mov", ".avi")


def resize_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights with half-pixel centres: PyTorch's bilinear
    ``align_corners=False`` (source index clamped at 0), or with ``antialias`` a triangle filter widened by
    the downscale factor (PIL / ``antialias=True``)."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    if not antialias or scale <= 1:
        src = np.clip(centres, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m.astype(np.float32)
    support = np.arange(n_in)
    w = np.clip(1 - np.abs(support[None, :] - centres[:, None]) / scale, 0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class I3DPreprocess:
    size: int = 224
    frames: int = 16
    value_range: tuple[float, float] = (-1.0, 1.0)
    antialias: bool = False

    def __call__(self, videos):
        """uint8 or float in [0, 255] ``(B, F, H, W, 3)`` -> float32 ``(B, F, size, size, 3)`` in value_range.
        Traceable (the resize is two matrix products with constant weights)."""
        _, _, h, w, _ = videos.shape
        x = videos.astype(jnp.float32)
        if (h, w) != (self.size, self.size):
            rh = jnp.asarray(resize_matrix(h, self.size, self.antialias))
            rw = jnp.asarray(resize_matrix(w, self.size, self.antialias))
            x = jnp.einsum("yh,bfhwc->bfywc", rh, x, precision="highest")
            x = jnp.einsum("xw,bfywc->bfyxc", rw, x, precision="highest")
        lo, hi = self.value_range
        return x * ((hi - lo) / 255.0) + lo


class FeatureExtractor:
    """Features of video batches: ``fn(module, preprocessed videos) -> (B, D)`` compiled once per input
    shape, the batch split over the mesh's data axes, the module's state replicated.

    ``__call__(videos uint8 (N, F, H, W, 3)) -> float32 (N, D)``: runs in chunks of ``batch_size`` (padded to
    it, so one compilation serves every chunk). ``seconds`` accumulates the time spent, for reports.
    """

    def __init__(self, module: nnx.Module, preprocess: Callable, *, fn: Callable | None = None,
                 batch_size: int = 8, mesh=None):
        self.mesh = mesh if mesh is not None else make_mesh()
        n_dev = self.mesh.devices.size
        self.batch_size = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
        graphdef, state = nnx.split(module)
        self.state = jax.device_put(state, replicated(self.mesh))
        fn = fn or (lambda m, x: m(x))

        def run(state, videos):
            return fn(nnx.merge(graphdef, state), preprocess(videos)).astype(jnp.float32)

        self._run = jax.jit(run, in_shardings=(replicated(self.mesh), batch_sharding(self.mesh)),
                            out_shardings=batch_sharding(self.mesh))
        self.seconds = 0.0
        self.count = 0

    def __call__(self, videos) -> np.ndarray:
        videos = np.asarray(videos)
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(videos), self.batch_size):
            chunk = videos[i:i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            x = jax.device_put(chunk, batch_sharding(self.mesh))
            out.append(np.asarray(self._run(self.state, x))[:n])
        self.seconds += time.perf_counter() - t0
        self.count += len(videos)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def statistics(self, batches: Iterable[np.ndarray], stats: RunningStats | None = None) -> RunningStats:
        """Streams video batches through the network into float64 running statistics."""
        stats = stats or RunningStats()
        for videos in batches:
            stats.update(self(videos))
        return stats


# ------------------------------------------------------------------------------------------- sources

def video_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"video folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    return files


def _is_tfds_folder(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file()


def count_videos(source: str | os.PathLike) -> int:
    folder = Path(source)
    if _is_tfds_folder(folder):
        import json

        info = json.loads((folder / "dataset_info.json").read_text())
        return sum(int(s.get("numExamples", sum(int(n) for n in s.get("shardLengths", [])))) for s in info["splits"])
    return len(video_files(folder))


def iter_video_batches(source: str | os.PathLike, *, frames: int, batch_size: int,
                       limit: int | None = None) -> Iterator[np.ndarray]:
    """uint8 ``(b, F, H, W, 3)`` batches of the videos of ``source``: a folder of video files (sorted by path,
    recursively), or a prepared TFDS/array_record dataset folder (every split, stored order). Each video keeps
    its first ``frames`` frames; a batch holds consecutive videos of one shape (a new shape starts a batch)."""
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"video folder not found: {folder}")
    if _is_tfds_folder(folder):
        videos = _tfds_videos(folder)
    else:
        files = video_files(folder)
        if not files:
            raise UserError(f"{folder}: no videos ({', '.join(VIDEO_SUFFIXES)})")
        videos = (_read(p) for p in files)
    pending: list[np.ndarray] = []
    n = 0
    for v in videos:
        if limit is not None and n >= limit:
            break
        v = v[:frames]
        n += 1
        if pending and (v.shape != pending[0].shape or len(pending) == batch_size):
            yield np.stack(pending)
            pending = []
        pending.append(v)
    if pending:
        yield np.stack(pending)


def _read(path: Path) -> np.ndarray:
    from vldm_jax.io.video import read_video

    return read_video(path)[0]


def _tfds_videos(folder: Path) -> Iterator[np.ndarray]:
    from vldm_jax.data._tf import tfds

    builder = tfds.builder_from_directory(os.fspath(folder))
    for split in builder.info.splits:
        for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
            yield np.asarray(ex["video"], np.uint8)
