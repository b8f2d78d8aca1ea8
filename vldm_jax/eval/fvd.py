"""Fréchet Video Distance: I3D logits (400-d, averaged over time) of real and generated videos, Fréchet
distance of their Gaussians (float64, vldm_jax/eval/frechet.py). Features are computed sharded over the mesh
and streamed into running statistics, so the video sets never sit in memory.

A set's statistics can be saved (``--save-stats``) and given in place of its folder (an ``.npz``), as the
reference implementations cache the real set's statistics.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from vldm_jax.errors import UserError
from vldm_jax.eval.features import FeatureExtractor, I3DPreprocess, iter_video_batches
from vldm_jax.eval.frechet import RunningStats, distance_between_sets


def i3d_extractor(model, *, size: int = 224, frames: int = 16, batch_size: int = 8, mesh=None,
                  endpoint: str = "logits", antialias: bool = False) -> FeatureExtractor:
    pre = I3DPreprocess(size=size, frames=frames, antialias=antialias)
    return FeatureExtractor(model, pre, fn=lambda m, x: m.features(x, endpoint), batch_size=batch_size, mesh=mesh)


def set_statistics(source: str | os.PathLike, extractor: FeatureExtractor, *, frames: int = 16,
                   limit: int | None = None, progress=None) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mu, sigma) of a video folder / dataset folder, or read from a saved ``.npz``."""
    source = Path(source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise UserError(f"statistics file not found: {source}")
        return RunningStats.load_moments(source)
    stats = RunningStats()
    for batch in iter_video_batches(source, frames=frames, batch_size=extractor.batch_size, limit=limit):
        stats.update(extractor(batch))
        if progress:
            progress(stats.n)
    if stats.n < 2:
        raise UserError(f"{source}: FVD needs at least 2 videos, found {stats.n}")
    return stats.n, stats.mean, stats.cov


def fvd_of_folders(real, generated, extractor: FeatureExtractor, *, frames: int = 16, limit: int | None = None,
                   save_stats: str | os.PathLike | None = None, progress=None) -> dict:
    """``{"fvd", "n_real", "n_generated", "seconds", "seconds_per_1000_videos"}``."""
    t0 = time.perf_counter()
    d = distance_between_sets(lambda source: set_statistics(source, extractor, frames=frames, limit=limit, progress=progress), real, generated,
                              save_stats=save_stats)
    out = {"fvd": d["distance"], "n_real": d["n_real"], "n_generated": d["n_generated"],
           "seconds": round(time.perf_counter() - t0, 3)}
    if extractor.count:
        out["feature_seconds_per_1000_videos"] = round(1000 * extractor.seconds / extractor.count, 1)
    return out
