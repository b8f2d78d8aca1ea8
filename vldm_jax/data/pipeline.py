"""The batch pipeline: a TFDS dataset -> per-host, shuffled, batched numpy clips, resumable exactly.

Order of operations per epoch (each epoch is its own tf.data pipeline, so an epoch's order is a
pure function of ``(seed, epoch, process_index)``):

    host shard (tfds.even_splits by example, equal sizes) -> seeded file shuffle + buffer shuffle
    (on the still-encoded records, so the buffer holds compressed frames) -> take whole batches
    -> skip what was already consumed -> decode only the frames needed -> temporal crop / resize
    -> float32 in [-1, 1] -> batch -> prefetch

The partial last batch of an epoch is dropped (every host then has the same number of steps
per epoch; the next epoch's reshuffle puts those examples elsewhere). The iterator position is
``(epoch, batch)``; restoring it rebuilds that epoch's pipeline and skips the consumed records
without decoding them, which gives exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

import numpy as np

from vldm_jax.data._tf import tf, tfds
from vldm_jax.data.frames import process_topology
from vldm_jax.errors import ConfigError, UserError

log = logging.getLogger("vldm_jax.data")

_STATE_VERSION = 1


def _epoch_seed(seed: int, epoch: int, process_index: int) -> int:
    # A well-mixed 63-bit seed; tf.data seeds are int64.
    return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _resize_center_crop(frames, height: int, width: int):
    """``(F, h, w, 3)`` uint8 -> ``(F, height, width, 3)`` float32 in [0, 255]: cover the target, crop the centre."""
    shape = tf.shape(frames)
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    scale = tf.maximum(height / h, width / w)
    new_h = tf.maximum(height, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(width, tf.cast(tf.round(w * scale), tf.int32))
    frames = tf.image.resize(tf.cast(frames, tf.float32), tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[:, top:top + height, left:left + width, :]


class DataIterator(Iterator[dict]):
    """Endless (or ``num_epochs``-long) iterator of this host's batches.

    Each ``next()`` returns a dict of host-local arrays, B = ``batch_size`` (per host):

    - ``"video"``: float32 ``(B, F, H, W, 3)`` in [-1, 1]; F is ``image_frames`` in image mode.
    - ``"image_only_indicator"``: float32 ``(B, F)``, 0 for video batches, 1 for image batches
      (frames to be treated as independent images: temporal layers off).
    - ``"caption"``: ``list[str]`` of length B (not an array; drop it before ``jax`` calls).
    - ``"input_ids"``: int32 ``(B, L)``, only when ``tokenize`` is given (``tokenize(captions)``).

    ``state()`` is a small JSON-able dict; ``restore(state)`` (or ``state=`` at construction)
    continues exactly after the last batch handed out before ``state()`` was taken.

    Args:
      source: a TFDS builder (prepared), the path of a prepared TFDS dataset version folder, or a
        finite ``tf.data.Dataset`` of dicts with ``"video"`` uint8 ``(F, H, W, 3)`` and ``"caption"``.
      batch_size: examples per batch on this host.
      seed: shuffling and frame-choice seed; with the epoch it fixes the order.
      split: TFDS split to read (builders and folders only).
      num_processes, process_index: host topology; default ``jax.process_count()/process_index()``.
        Hosts get disjoint, equal-sized shards by example.
      shuffle_buffer: examples in the shuffle buffer (encoded); 0 or 1 turns buffer shuffling off.
      shuffle: False keeps the stored order (no file or buffer shuffling), for evaluation.
      num_frames: take a random contiguous window of this many frames (default: all stored frames).
      resolution: resize (cover) and centre-crop frames to this int or ``(H, W)`` (default: as stored).
      image_frames: image mode: take this many distinct random frames of each clip as images.
      tokenize: ``list[str] -> int array (B, L)``, run on the host for each batch.
      num_epochs: stop after this many epochs (default: never stop).
      num_threads: tf.data thread pool size (default: half the cores, at most 8).
      prefetch: batches prepared ahead.
      state: a ``state()`` dict to resume from.
    """

    def __init__(self, source, *, batch_size: int, seed: int = 0, split: str = "train",
                 num_processes: int | None = None, process_index: int | None = None,
                 shuffle_buffer: int = 1024, shuffle: bool = True, num_frames: int | None = None,
                 resolution: int | tuple[int, int] | None = None, image_frames: int | None = None,
                 tokenize: Callable[[list[str]], np.ndarray] | None = None, num_epochs: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2, state: dict | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_processes, self.process_index = process_topology(num_processes, process_index)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle = bool(shuffle)
        self.num_frames = num_frames
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.image_frames = image_frames
        self.tokenize = tokenize
        self.num_epochs = num_epochs
        self.num_threads = num_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.prefetch = prefetch

        if isinstance(source, (str, os.PathLike)):
            if not os.path.isdir(source):
                raise UserError(f"dataset folder not found: {source}")
            source = tfds.builder_from_directory(os.fspath(source))
        if isinstance(source, tf.data.Dataset):
            self._builder = None
            self._dataset = source
            total = int(source.cardinality())
            if total < 0:  # unknown or infinite: count once
                if total == tf.data.INFINITE_CARDINALITY:
                    raise UserError("the data pipeline needs a finite dataset; it repeats epochs itself")
                total = int(source.reduce(np.int64(0), lambda n, _: n + 1))
            self.num_examples = total // self.num_processes
        elif isinstance(source, tfds.core.DatasetBuilder):
            self._builder = source
            if split not in source.info.splits:
                raise UserError(f"dataset {source.name} has no split {split!r}; it has {', '.join(source.info.splits)}")
            total = source.info.splits[split].num_examples
            self._split = tfds.even_splits(split, self.num_processes, drop_remainder=True)[self.process_index]
            self.num_examples = total // self.num_processes
        else:
            raise UserError(f"unsupported data source {type(source).__name__}: give a TFDS builder, a prepared "
                            "dataset folder or a tf.data.Dataset")
        self.steps_per_epoch = self.num_examples // self.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{total} examples over {self.num_processes} host(s) is {self.num_examples} per host, "
                            f"fewer than the batch size {self.batch_size}")
        stored = self._stored_frames()
        if num_frames is not None and stored is not None and not 1 <= num_frames <= stored:
            raise ConfigError(f"num_frames {num_frames} must be between 1 and the stored {stored} frames")
        frames_available = num_frames or stored
        if image_frames is not None and frames_available is not None and not 1 <= image_frames <= frames_available:
            raise ConfigError(f"image_frames {image_frames} must be between 1 and {frames_available}")

        self.epoch = 0
        self.batch = 0
        self._it = None
        if state is not None:
            self.restore(state)

    # ---------------------------------------------------------------- position

    def state(self) -> dict:
        """``{"epoch", "batch", ...}``: the position after the last batch returned, plus what fixes the order."""
        epoch, batch = self.epoch, self.batch
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return {"version": _STATE_VERSION, "epoch": int(epoch), "batch": int(batch), "seed": self.seed,
                "batch_size": self.batch_size, "num_processes": self.num_processes,
                "examples_per_process": int(self.num_examples)}

    def restore(self, state: dict) -> None:
        """Continues from ``state`` (from ``state()``, possibly of another host of the same run)."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"not a data iterator state: {state!r}") from None
        changed = [f"{k} {state[k]} -> {v}" for k, v in (("seed", self.seed), ("batch_size", self.batch_size),
                                                         ("num_processes", self.num_processes),
                                                         ("examples_per_process", self.num_examples))
                   if k in state and state[k] != v]
        if changed:
            log.warning("resuming data at epoch %d batch %d, but %s changed: the order differs from the "
                        "uninterrupted run", epoch, batch, ", ".join(changed))
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = epoch, batch
        self._it = None

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self._it is None:
                self._it = self.epoch_dataset(self.epoch, self.batch).as_numpy_iterator()
            try:
                raw = next(self._it)
            except StopIteration:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return self._to_host(raw)

    def _to_host(self, raw: dict) -> dict:
        captions = [c.decode("utf-8") for c in raw["caption"]]
        out = {"video": raw["video"], "image_only_indicator": raw["image_only_indicator"], "caption": captions}
        if self.tokenize is not None:
            out["input_ids"] = np.asarray(self.tokenize(captions), dtype=np.int32)
        return out

    # ---------------------------------------------------------------- tf.data

    def _stored_shape(self) -> tuple:
        """``(F, H, W)`` as stored, entries None where unknown."""
        if self._builder is not None:
            shape = tuple(self._builder.info.features["video"].shape)
        else:
            shape = tuple(self._dataset.element_spec["video"].shape)
        return (tuple(shape[:3]) + (None,) * 3)[:3] if shape else (None, None, None)

    def _stored_frames(self) -> int | None:
        return self._stored_shape()[0]

    def output_shape(self) -> tuple:
        """``(B, F, H, W, 3)`` of ``"video"`` batches (None where the source does not fix it)."""
        f, h, w = self._stored_shape()
        if self.resolution is not None:
            h, w = self.resolution
        return (self.batch_size, self.image_frames or self.num_frames or f, h, w, 3)

    def _records(self, epoch_seed: int):
        """This host's examples with ``video`` still encoded (a string per frame) when read from TFDS."""
        if self._builder is None:
            ds = self._dataset.shard(self.num_processes, self.process_index).take(self.num_examples)
            return ds.map(lambda ex: {"video": ex["video"], "caption": ex["caption"]})
        read_config = tfds.ReadConfig(shuffle_seed=epoch_seed if self.shuffle else None,
                                      shuffle_reshuffle_each_iteration=False, try_autocache=False,
                                      add_tfds_id=False)
        ds = self._builder.as_dataset(split=self._split, shuffle_files=self.shuffle, read_config=read_config,
                                      decoders={"video": tfds.decode.SkipDecoding()})
        return ds.map(lambda ex: {"video": ex["video"], "caption": ex["caption"]})

    def epoch_dataset(self, epoch: int, start_batch: int = 0) -> tf.data.Dataset:
        """The tf.data pipeline of one epoch from batch ``start_batch`` on (batched, numpy-ready)."""
        epoch_seed = _epoch_seed(self.seed, epoch, self.process_index)
        ds = self._records(epoch_seed)
        if self.shuffle and self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(self.steps_per_epoch * self.batch_size)
        start = start_batch * self.batch_size
        ds = ds.skip(start).enumerate(start=start)
        # Frame choices use stateless RNG keyed by the element's place in the epoch, so they
        # neither depend on thread scheduling nor change on resume.
        key = tf.constant(epoch_seed % (2**31), tf.int64)
        ds = ds.map(lambda i, ex: self._prepare(tf.stack([key, i]), ex),
                    num_parallel_calls=self.num_threads, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=True).prefetch(self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = self.num_threads
        options.threading.max_intra_op_parallelism = 1
        return ds.with_options(options)

    def _prepare(self, key, ex: dict) -> dict:
        video = ex["video"]
        encoded = video.dtype == tf.string
        count = tf.shape(video)[0]
        window = self.num_frames
        if window is not None:
            first = tf.random.stateless_uniform([], seed=key, minval=0, maxval=count - window + 1, dtype=tf.int32)
            video = video[first:first + window]
            count = window
        if self.image_frames is not None:
            order = tf.argsort(tf.random.stateless_uniform([count], seed=key + tf.constant([0, 7919], tf.int64)))
            video = tf.gather(video, tf.sort(order[: self.image_frames]))
        if encoded:
            video = tf.map_fn(lambda s: tf.io.decode_image(s, channels=3, expand_animations=False), video,
                              fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
        if self.resolution is not None:
            video = _resize_center_crop(video, *self.resolution)
        video = tf.clip_by_value(tf.cast(video, tf.float32) / 127.5 - 1.0, -1.0, 1.0)
        video = tf.ensure_shape(video, list(self.output_shape()[1:]))
        indicator = tf.fill([tf.shape(video)[0]], 1.0 if self.image_frames is not None else 0.0)
        return {"video": video, "image_only_indicator": indicator, "caption": ex["caption"]}


def prepare_dataset(data: str | os.PathLike, data_dir: str | os.PathLike, *, num_frames: int = 16,
                    resolution: int | tuple[int, int] = 64, frame_stride: int = 1, fps: float | None = None,
                    clips_per_video: int | None = None, num_examples: int = 1024, seed: int = 0):
    """Turns what a user names as ``--data`` into a prepared TFDS builder (built offline under ``data_dir``).

    ``data`` is one of:
      - ``"moving_shapes"``, ``"moving_shapes:N"`` or ``"moving_shapes:N:SETTING"``: the procedural dataset with N
        examples (SETTING: a renderer setting, ``varied`` or ``held_out``; default the original clips)
        (default ``num_examples``) of ``num_frames`` frames at ``resolution`` (square), from ``seed``;
      - a prepared TFDS dataset version folder (it holds ``dataset_info.json``): opened as is;
      - a folder of videos: cut into clips of ``num_frames`` frames every ``frame_stride`` (or at
        ``fps``), resized and centre-cropped to ``resolution``; unreadable videos are skipped
        and listed in ``builder.skipped``.
    """
    text = os.fspath(data)
    from vldm_jax.data.moving_shapes import parse_dataset_name, parse_dataset_setting

    count = parse_dataset_name(text, num_examples)
    if count is not None:
        from vldm_jax.data.moving_shapes import prepare_moving_shapes

        size = resolution if isinstance(resolution, int) else tuple(resolution)
        return prepare_moving_shapes(data_dir, num_examples=count, num_frames=num_frames, size=size, seed=seed,
                                     setting=parse_dataset_setting(text))
    if os.path.isfile(os.path.join(text, "dataset_info.json")):
        return tfds.builder_from_directory(text)
    from vldm_jax.data.video_folder import prepare_video_folder

    return prepare_video_folder(text, data_dir, num_frames=num_frames, frame_stride=frame_stride, fps=fps,
                                resolution=resolution, clips_per_video=clips_per_video)
