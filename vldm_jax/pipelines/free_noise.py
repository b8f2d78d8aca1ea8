"""FreeNoise for AnimateDiff (Qiu et al. 2023; diffusers ``enable_free_noise``): videos longer than the motion
modules' window. Every motion-module transformer block runs its two attentions on sliding windows of
``context_length`` frames every ``context_stride`` frames and blends the windows' outputs per frame
(:func:`vldm_jax.nn.temporal.free_noise_windows`), inside the one compiled sampling loop; the initial noise is
rescheduled so that the windows share noise (``shuffle_context``: each new stride of frames is a shuffled copy of
the frames one window earlier)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vldm_jax.errors import UserError
from vldm_jax.nn.temporal import FREE_NOISE_WEIGHTINGS

NOISE_TYPES = ("shuffle_context", "repeat_context", "random")


def check_free_noise_options(context_length: int, context_stride: int, weighting_scheme: str, noise_type: str,
                             window: int) -> None:
    if not 1 <= int(context_length) <= window:
        raise UserError(f"FreeNoise context_length must be between 1 and the motion modules' window {window} "
                        f"(got {context_length})")
    if not 1 <= int(context_stride) <= int(context_length):
        raise UserError(f"FreeNoise context_stride must be between 1 and context_length (got {context_stride})")
    if weighting_scheme not in FREE_NOISE_WEIGHTINGS:
        raise UserError(f"unknown FreeNoise weighting_scheme {weighting_scheme!r}; choose one of "
                        f"{', '.join(FREE_NOISE_WEIGHTINGS)}")
    if noise_type not in NOISE_TYPES:
        raise UserError(f"unknown FreeNoise noise_type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}")


def rescheduled_frames(num_frames: int, context_length: int, context_stride: int, noise_type: str,
                       seed: int) -> np.ndarray:
    """``(F,)`` source frame of every frame's noise: identity (``random``), the first window repeated
    (``repeat_context``), or diffusers' in-place shuffles (``shuffle_context``: for each ``i`` from
    ``context_length`` in steps of ``context_stride``, the frames ``[i - context_length, + stride)`` shuffled
    into ``[i, + stride)``)."""
    src = np.arange(num_frames)
    if noise_type == "repeat_context":
        return src % context_length
    if noise_type == "shuffle_context":
        rng = np.random.default_rng(seed)
        for i in range(context_length, num_frames, context_stride):
            start = max(0, i - context_length)
            end = min(num_frames, start + context_stride)
            if end == start:
                break
            shuffled = src[start:end][rng.permutation(end - start)]
            n = min(num_frames, i + len(shuffled)) - i
            src[i:i + n] = shuffled[:n]
    return src


def reschedule_noise(key: jax.Array, shape: tuple[int, ...], context_length: int, context_stride: int,
                     noise_type: str) -> jax.Array:
    """Unit-variance initial noise ``shape`` ``(B, F, h, w, C)`` with FreeNoise's frame rescheduling."""
    noise = jax.random.normal(key, shape, jnp.float32)
    seed = int(jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1))
    return noise[:, rescheduled_frames(shape[1], context_length, context_stride, noise_type, seed)]
