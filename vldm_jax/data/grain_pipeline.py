"""Batches from a prepared array_record folder (``vldm prepare``) through grain: no TensorFlow, every host.

The global order is one stream for the whole run: the examples are shuffled with ``seed`` (a new permutation
each epoch, grain's ``MapDataset.shuffle`` + ``repeat``), cut into global batches of ``batch_size *
num_processes``, and each host reads its own ``batch_size`` slice of every global batch (random access into
the shards; nothing is read twice or by two hosts). Frames are stored decoded at the training resolution, so a
batch is a gather of uint8 arrays (the objectives scale them to [-1, 1] on the device); a ``num_frames``
shorter than stored takes a window whose start is a pure function of ``(seed, example position)``.

The position is the number of batches handed out: ``state()`` is ``{"batches", "grain": the grain iterator's
state, ...}`` (JSON-able; the trainer saves it in every checkpoint) and ``restore(state)`` continues exactly
with the next batch. Since the stream is global, every host's state holds the same position.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from vldm_jax.data.array_record import decode_record, read_spec, shard_paths
from vldm_jax.data.frames import process_topology
from vldm_jax.errors import ConfigError, UserError

log = logging.getLogger("vldm_jax.data")

_STATE_VERSION = 1


class _Example:
    """Picklable map: global index -> decoded example (a window of frames when ``num_frames`` is shorter)."""

    def __init__(self, stream, *, seed: int, stored_frames: int, num_frames: int, keys: tuple[str, ...]):
        self.stream, self.seed = stream, seed
        self.stored, self.num_frames, self.keys = stored_frames, num_frames, keys

    def __call__(self, index: int) -> dict:
        rec = decode_record(self.stream[index])
        out = {k: rec[k] for k in self.keys if k in rec}
        if self.num_frames < self.stored:
            first = int(np.random.default_rng([self.seed, 1, int(index)]).integers(0, self.stored - self.num_frames + 1))
            for k in ("video", "latents"):
                if k in out:
                    out[k] = out[k][first:first + self.num_frames]
        out["video"] = np.asarray(out["video"])
        out["caption"] = rec.get("caption", "")
        return out


class GrainIterator:
    """Endless iterator of this host's batches from a prepared folder.

    ``next()`` -> ``{"video": uint8 (B, F, H, W, 3), "image_only_indicator": float32 (B, F) zeros, "caption":
    list[str]}`` plus ``"latents"`` / ``"encoder_hidden_states"`` when the folder caches them (``prepare
    --encode``). ``state()`` / ``restore()`` as the trainer's data protocol (see :mod:`vldm_jax.train.loop`).

    Args:
      folder: the prepared folder (``spec.json`` + shards). ``spec.json`` is read through ``etils.epath``; the
        shards are opened by array_record's reader (local paths or a mounted bucket; ``gs://`` only where
        array_record's build reads GCS).
      batch_size: examples per batch on this host.
      seed: the shuffle and window seed.
      shuffle: False reads in storage order (evaluation).
      num_processes, process_index: host topology (default from ``jax``).
      num_frames: frames per clip (default: as stored; fewer takes a window).
      resolution: ``(H, W)`` the trainer expects; must match the stored one (checked).
      num_threads, prefetch: grain's reader threads and batches read ahead.
      state: a ``state()`` dict to resume from.
    """

    def __init__(self, folder, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_processes: int | None = None, process_index: int | None = None, num_frames: int | None = None,
                 resolution: tuple[int, int] | None = None, num_threads: int | None = None, prefetch: int = 2,
                 state: dict | None = None):
        import grain

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.folder = os.fspath(folder)
        self.spec = spec = read_spec(folder)
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.num_processes, self.process_index = process_topology(num_processes, process_index)
        stored = int(spec["num_frames"])
        self.num_frames = int(num_frames or stored)
        if not 1 <= self.num_frames <= stored:
            raise ConfigError(f"data.num_frames {self.num_frames} must be between 1 and the {stored} frames stored "
                              f"in {folder}")
        if resolution is not None and tuple(resolution) != (spec["height"], spec["width"]):
            raise ConfigError(f"{folder} holds {spec['height']}x{spec['width']} frames but the config asks for "
                              f"{resolution[0]}x{resolution[1]}; set data.height/data.width to match or prepare "
                              "again with --resolution")
        self.num_examples = int(spec["num_examples"])
        self.global_batch = self.batch_size * self.num_processes
        if self.global_batch > self.num_examples:
            raise UserError(f"{self.num_examples} examples are fewer than the global batch: batch size "
                            f"{self.batch_size} x {self.num_processes} host(s)")
        self.steps_per_epoch = self.num_examples // self.global_batch

        source = grain.sources.ArrayRecordDataSource(shard_paths(folder, spec))
        if len(source) != self.num_examples:
            raise UserError(f"{folder}: the shards hold {len(source)} examples, spec.json says {self.num_examples}")
        stream = grain.MapDataset.source(source)
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed)  # followed by repeat: a fresh permutation every epoch
        stream = stream.repeat(None)
        keys = tuple(k for k in ("video", "latents", "encoder_hidden_states") if k in spec.get("features", {}))
        B, P, p = self.batch_size, self.num_processes, self.process_index
        # Host p's j-th example is element j % B of its slice of global batch j // B.
        host = grain.MapDataset.range(0, len(stream) // P).map(
            lambda j: (j // B) * B * P + p * B + j % B)
        host = host.map(_Example(stream, seed=self.seed, stored_frames=stored, num_frames=self.num_frames,
                                 keys=keys or ("video",)))
        self._batched = host.batch(B, drop_remainder=True, batch_fn=_collate)
        self._read_options = grain.ReadOptions(
            num_threads=num_threads or max(1, min(8, (os.cpu_count() or 2) // 2)), prefetch_buffer_size=prefetch)
        self._it = None
        self.batches = 0
        if state is not None:
            self.restore(state)

    # ---------------------------------------------------------------- position

    def state(self) -> dict:
        return {"version": _STATE_VERSION, "batches": int(self.batches), "grain": {"next_index": int(self.batches)},
                "epoch": int(self.batches // self.steps_per_epoch), "seed": self.seed,
                "batch_size": self.batch_size, "num_processes": self.num_processes,
                "global_batch": self.global_batch, "num_examples": self.num_examples}

    def restore(self, state: dict) -> None:
        try:
            batches = int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"not a grain data iterator state: {state!r}") from None
        # The stream is global: another host count with the same global batch continues the same order.
        changed = [f"{k} {state[k]} -> {v}" for k, v in (("seed", self.seed), ("global_batch", self.global_batch),
                                                         ("num_examples", self.num_examples))
                   if k in state and state[k] != v]
        if changed:
            log.warning("resuming data at batch %d, but %s changed: the order differs from the uninterrupted "
                        "run", batches, ", ".join(changed))
        self.batches = batches
        self._it = None

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._batched.to_iter_dataset(self._read_options))
            if self.batches:
                self._it.set_state({"next_index": self.batches})
        batch = next(self._it)
        self.batches += 1
        return batch

    def output_shape(self) -> tuple:
        return (self.batch_size, self.num_frames, self.spec["height"], self.spec["width"], 3)


def _collate(examples: list[dict]) -> dict:
    out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0] if k != "caption"}
    out["caption"] = [ex["caption"] for ex in examples]
    out["image_only_indicator"] = np.zeros(out["video"].shape[:2], np.float32)
    return out
