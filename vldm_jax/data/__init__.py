"""Training data: TFDS builders for video folders and moving shapes, and the batch pipeline.

Needs the ``data`` extra (``pip install 'vldm_jax[data]'``: tensorflow-cpu, tensorflow-datasets).
TF is imported only when a TF-backed name is first used, and is then hidden from every GPU/TPU
(``tf.config.set_visible_devices([], ...)``) with small thread pools, so it never competes with
JAX for an accelerator. ``render_clip`` and the rest of ``moving_shapes`` except the builder
are plain numpy and never import TF.

How the trainer gets batches::

    from vldm_jax.data import DataIterator, default_data_dir, prepare_dataset

    builder = prepare_dataset(args.data, default_data_dir(workdir),      # folder of videos,
                              num_frames=8, resolution=64)                # "moving_shapes[:N]", or a
    it = DataIterator(builder, batch_size=per_host_batch, seed=cfg.seed)  # prepared TFDS folder
    if resumed:
        it.restore(saved["data"])          # the dict that it.state() returned at save time
    batch = next(it)
    # batch["video"]                float32 (B, F, H, W, 3) in [-1, 1], this host's examples only
    # batch["image_only_indicator"] float32 (B, F): 0 video, 1 image batches
    # batch["caption"]              list[str] of length B (host-side only)
    # batch["input_ids"]            int32 (B, L), when DataIterator(tokenize=fn) is given
    saved["data"] = it.state()         # small JSON-able dict {"epoch", "batch", ...}; save with the step

- Batches are per host: ``batch_size`` is the host's share; hosts (``num_processes``,
  ``process_index``, default from ``jax``) read disjoint, equal-sized shards by example, and
  the global batch is made with ``jax.make_array_from_process_local_data``. All hosts advance
  in lockstep, so process 0's ``state()`` restores every host.
- Order is a pure function of ``(seed, epoch, process_index)``; ``state()`` taken after N batches
  and restored in a fresh iterator gives exactly the batches N+1, N+2, ... of the original.
  The partial last batch of each epoch is dropped; ``it.steps_per_epoch`` says how many remain.
- Mixed image/video training: a second ``DataIterator(..., image_frames=k)`` yields k random
  frames of each clip as ``(B, k, H, W, 3)`` with ``image_only_indicator`` all ones.
- ``num_frames=`` takes a random contiguous window of the stored frames, ``resolution=``
  resizes and centre-crops at load time; ``shuffle=False, num_epochs=1`` reads once in order.
- Skipped (corrupt or too short) videos: ``builder.skipped`` -> ``[{"file", "reason"}]``,
  also logged as warnings on the ``vldm_jax.data`` logger when the build runs.
- Several hosts: each host may build into its own local ``data_dir`` (the build is
  deterministic), or process 0 builds into a shared one before the others open it.

Without TensorFlow (a WebVid-style list, decoded once; grain reads it on every host)::

    vldm prepare clips.csv --out gs://bucket/webvid_16x256 --frames 16 --resolution 256x256 --shards 64
    # clips.csv: path,caption[,start,end]  (or a .jsonl of {"path", "caption", "start", "end"})

    from vldm_jax.data.grain_pipeline import GrainIterator      # what data.path=<that folder> selects
    it = GrainIterator(folder, batch_size=per_host_batch, seed=cfg.seed)
    # batch["video"] uint8 (B, F, H, W, 3); "image_only_indicator", "caption" as above; state()/restore() too

Each host reads its own slice of every global batch of one seeded stream (reshuffled each epoch); the position
is the count of batches, so restore is exact. Skipped videos are counted in the folder's ``spec.json``.

Modules: ``array_record`` (``prepare_array_record``, the record format, ``spec.json``), ``grain_pipeline``
(``GrainIterator``), ``frames`` (numpy frame helpers), ``video_folder`` (``VideoFolder`` builder, ``prepare_video_folder``), ``moving_shapes``
(``render_clip``, ``example``, ``MovingShapes`` builder, ``prepare_moving_shapes``),
``pipeline`` (``DataIterator``, ``prepare_dataset``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

_EXPORTS = {
    "DataIterator": "pipeline",
    "prepare_dataset": "pipeline",
    "VideoFolder": "video_folder",
    "video_folder_builder": "video_folder",
    "prepare_video_folder": "video_folder",
    "MovingShapes": "moving_shapes",
    "moving_shapes_builder": "moving_shapes",
    "prepare_moving_shapes": "moving_shapes",
    "render_clip": "moving_shapes",
    "ShapeClip": "moving_shapes",
    "caption_for": "moving_shapes",
}

__all__ = sorted([*_EXPORTS, "default_data_dir"])


def default_data_dir(workdir: str | os.PathLike) -> Path:
    """Where a run's dataset builds live: ``<workdir>/cache/tfds``."""
    return Path(workdir) / "cache" / "tfds"


def __getattr__(name):
    # Lazy, so that `import vldm_jax.data` (and moving shapes' numpy side) does not start TF.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vldm_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
