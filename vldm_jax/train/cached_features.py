"""Cached training features for ``vldm prepare --encode``: a Stable Diffusion pipeline's frozen VAE and text encoder
run once over the prepared clips, so training with ``objective.encode_in_step=false`` reads ``latents`` (scaled,
the posterior's mode) and ``encoder_hidden_states`` instead of encoding every step."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def pipeline_encoder(path: str | os.PathLike, *, batch_size: int = 8, allow_pickle: bool = False
                     ) -> tuple[Callable[[list[dict]], list[dict]], dict]:
    """``(encode, info)``: ``encode(examples)`` maps up to ``batch_size`` examples (``video`` uint8 ``(F, H, W, 3)``,
    ``caption``) to ``[{"latents": (F, h, w, C) float32, "encoder_hidden_states": (S, D) float32}]``; ``info``
    (the pipeline, scaling) goes into the prepared folder's ``spec.json``. Batches are padded to ``batch_size`` so
    the encoders compile once."""
    from vldm_jax.pipelines.stages import LatentCodec
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(path, allow_pickle=allow_pickle)
    codec = LatentCodec(pipe.vae)

    def encode(examples: list[dict]) -> list[dict]:
        n = len(examples)
        frames = np.stack([ex["video"] for ex in examples]).astype(np.float32) / 255.0
        captions = [ex["caption"] for ex in examples]
        if n < batch_size:
            frames = np.concatenate([frames, np.zeros((batch_size - n,) + frames.shape[1:], frames.dtype)])
            captions = captions + [""] * (batch_size - n)
        latents = np.asarray(codec.encode(frames), np.float32)[:n]
        context = np.asarray(pipe.encode_prompt(captions), np.float32)[:n]
        return [{"latents": l, "encoder_hidden_states": c} for l, c in zip(latents, context)]

    info = {"pipeline": os.fspath(path), "scaling_factor": codec.scaling_factor, "shift_factor": codec.shift_factor,
            "latents": "posterior mode, scaled", "clip_skip": int(pipe.clip_skip)}
    return encode, info
