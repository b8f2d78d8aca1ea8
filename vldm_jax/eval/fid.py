"""Per-frame FID: the FID Inception's 2048-d pool3 features (models/inception.py, pytorch-fid's network and
weights) of every frame of two sets of videos or images, Fréchet distance of their Gaussians (float64,
eval/frechet.py). Features are computed sharded over the mesh (eval/features.FeatureExtractor) and streamed
into running statistics, so the sets never sit in memory.

Preprocessing is pytorch-fid's: uint8 frames -> ``x / 255`` -> bilinear resize to 299x299 (``F.interpolate``,
``align_corners=False``, no antialiasing; aspect ratio not kept) -> ``2x - 1``. (TensorFlow's original FID
resizes inside its graph with ``tf.image.resize_bilinear``; pytorch-fid's numbers differ from it slightly.)
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from vldm_jax.errors import UserError
from vldm_jax.eval.features import VIDEO_SUFFIXES, FeatureExtractor, _is_tfds_folder, _tfds_videos, resize_matrix
from vldm_jax.eval.frechet import RunningStats, distance_between_sets

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class InceptionPreprocess:
    size: int = 299
    antialias: bool = False

    def __call__(self, images):
        """uint8 or float in [0, 255] ``(B, H, W, 3)`` -> float32 ``(B, size, size, 3)`` in [-1, 1] (traceable)."""
        _, h, w, _ = images.shape
        x = images.astype(jnp.float32) / 255.0
        if (h, w) != (self.size, self.size):
            rh = jnp.asarray(resize_matrix(h, self.size, self.antialias))
            rw = jnp.asarray(resize_matrix(w, self.size, self.antialias))
            x = jnp.einsum("yh,bhwc->bywc", rh, x, precision="highest")
            x = jnp.einsum("xw,bywc->byxc", rw, x, precision="highest")
        return 2.0 * x - 1.0


def inception_extractor(model, *, size: int = 299, batch_size: int = 32, mesh=None, antialias: bool = False,
                        endpoint: str = "pool3") -> FeatureExtractor:
    """``extractor(frames uint8 (N, H, W, 3)) -> (N, 2048)`` pool3 features (or ``endpoint="logits"``)."""
    if endpoint not in ("pool3", "logits"):
        raise UserError(f"Inception endpoint must be 'pool3' or 'logits', got {endpoint!r}")
    fn = (lambda m, x: m.features(x)) if endpoint == "pool3" else (lambda m, x: m.logits(x))
    return FeatureExtractor(model, InceptionPreprocess(size=size, antialias=antialias), fn=fn,
                            batch_size=batch_size, mesh=mesh)


def _frames_of_file(path: Path, frames: int | None) -> np.ndarray:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        import imageio.v3 as iio

        img = np.asarray(iio.imread(path))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return img[None, ..., :3].astype(np.uint8)  # RGBA -> RGB (pytorch-fid converts to RGB)
    from vldm_jax.io.video import read_video

    return read_video(path)[0][:frames]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))


def iter_frame_batches(source: str | os.PathLike, *, batch_size: int, frames: int | None = None,
                       limit: int | None = None) -> Iterator[np.ndarray]:
    """uint8 ``(b, H, W, 3)`` batches of frames: every image of a folder and the first ``frames`` frames (all
    when None) of every video in it (recursively, sorted by path), or of a prepared array_record dataset folder.
    ``limit`` counts files (videos or images). A batch holds frames of one shape."""
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    if _is_tfds_folder(folder):
        arrays = (np.asarray(v)[:frames] for v in _tfds_videos(folder))
    else:
        files = frame_files(folder)
        if not files:
            raise UserError(f"{folder}: no images or videos ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
        arrays = (_frames_of_file(p, frames) for p in files)
    pending: list[np.ndarray] = []
    count = 0
    for n, clip in enumerate(arrays):
        if limit is not None and n >= limit:
            break
        for frame in clip:
            if pending and (frame.shape != pending[0].shape or count == batch_size):
                yield np.stack(pending)
                pending, count = [], 0
            pending.append(frame)
            count += 1
    if pending:
        yield np.stack(pending)


def set_statistics(source: str | os.PathLike, extractor: FeatureExtractor, *, frames: int | None = None,
                   limit: int | None = None, progress=None) -> tuple[int, np.ndarray, np.ndarray]:
    """(n frames, mu, sigma) of a folder / dataset folder, or read from a saved ``.npz``."""
    source = Path(source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise UserError(f"statistics file not found: {source}")
        return RunningStats.load_moments(source)
    stats = RunningStats()
    for batch in iter_frame_batches(source, batch_size=extractor.batch_size, frames=frames, limit=limit):
        stats.update(extractor(batch))
        if progress:
            progress(stats.n)
    if stats.n < 2:
        raise UserError(f"{source}: FID needs at least 2 frames, found {stats.n}")
    return stats.n, stats.mean, stats.cov


def fid_of_folders(real, generated, extractor: FeatureExtractor, *, frames: int | None = None,
                   limit: int | None = None, save_stats: str | os.PathLike | None = None, progress=None) -> dict:
    """``{"fid", "n_real", "n_generated" (frames), "seconds", "feature_seconds_per_1000_frames"}``."""
    t0 = time.perf_counter()
    d = distance_between_sets(lambda source: set_statistics(source, extractor, frames=frames, limit=limit, progress=progress), real, generated,
                              save_stats=save_stats)
    out = {"fid": d["distance"], "n_real": d["n_real"], "n_generated": d["n_generated"],
           "seconds": round(time.perf_counter() - t0, 3)}
    if extractor.count:
        out["feature_seconds_per_1000_frames"] = round(1000 * extractor.seconds / extractor.count, 1)
    return out
