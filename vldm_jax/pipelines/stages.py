"""The stages of the Video LDM generation stack, as jitted functions of split NNX states.

    keyframes      noise -> (B, F, h, w, C) latents from text (the key-frame video U-Net)
    predict        context latents (first frames) -> a window that continues them (the prediction model)
    rollout        predict, again and again, the newest frames becoming the next context (long videos)
    interpolate    T keyframes -> 4T - 3 frames, the 3 between each pair predicted (the interpolation model)
    decode         latents -> frames through the (temporal) VAE decoder, in chunks of frames

Context frames (prediction, interpolation) are given to the model through ``context_latents``/``context_mask``
(the U-Net's ``context_conditioning``) and held fixed in the sampler (:func:`~vldm_jax.diffusion.samplers.sample`'s
``known``), so they come back unchanged. Classifier-free guidance may act on the text, on the context frames,
or on both (:func:`~vldm_jax.diffusion.guidance.guided_output`). Every sampling loop is one ``lax.scan`` compiled once per
(sampler, shapes, guidance branches); a stage's later calls with new prompts, seeds or scales reuse it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion.guidance import guided_output
from vldm_jax.diffusion.samplers import make_sampler, sample
from vldm_jax.errors import UserError
from vldm_jax.nn.temporal import fold_frames, unfold_frames
from vldm_jax.parallel.activations import activation_mesh, place_inputs, place_state
from vldm_jax.pipelines.common import advance, as_sample_keys, fold_keys, per_sample_normal

INTERPOLATION_FACTOR = 4  # the paper's interpolation model: 3 new frames between each pair of keyframes


@functools.partial(jax.jit, static_argnames=("graph", "guide_text", "guide_context", "progress", "mesh"))
def _sample(graph, state, sampler, noise, text, null_text, context_latents, context_mask, text_scale, context_scale,
            key, *, guide_text: bool, guide_context: bool, progress: bool, mesh=None):
    with activation_mesh(mesh):  # traced under the mesh: activations pinned where frames fold
        return _sample_body(graph, state, sampler, noise, text, null_text, context_latents, context_mask, text_scale,
                            context_scale, key, guide_text=guide_text, guide_context=guide_context, progress=progress)


def _sample_body(graph, state, sampler, noise, text, null_text, context_latents, context_mask, text_scale,
                 context_scale, key, *, guide_text: bool, guide_context: bool, progress: bool):
    unet = nnx.merge(graph, state)

    def call(x, t, txt, lat, mask):
        tt = jnp.broadcast_to(t, (x.shape[0],))
        kwargs = {} if lat is None else {"context_latents": lat, "context_mask": mask}
        return unet(x, tt, txt, **kwargs)

    def denoise(x, t):
        return guided_output(call, x, t, text, null_text, context_latents, context_mask, text_scale, context_scale,
                             guide_text=guide_text, guide_context=guide_context)

    known = None
    if context_latents is not None:
        known = (context_latents, context_mask[:, :, None, None, None])
    return sample(denoise, sampler, noise, key=key, progress=advance if progress else None, known=known)


class VideoSampler:
    """One video U-Net, split once, with its scheduler config: samples latents ``(B, F, h, w, C)``."""

    def __init__(self, unet: nnx.Module, scheduler_config: dict[str, Any]):
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.graph, self.state = nnx.split(unet)
        self._placed: dict = {}

    def state_on(self, mesh):
        """The parameters placed on ``mesh`` (sharded by the default logical-axis rules: over ``fsdp`` where the
        mesh has it, else replicated), once per mesh."""
        if mesh not in self._placed:
            self._placed[mesh] = place_state(self.state, mesh)
        return self._placed[mesh]

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def has_context(self) -> bool:
        return getattr(self.unet.config, "context_conditioning", "none") != "none"

    def __call__(self, noise, text, null_text=None, *, context_latents=None, context_mask=None, steps: int = 25,
                 scheduler: str = "ddim", guidance_scale: float = 1.0, context_guidance_scale: float = 1.0,
                 key: jax.Array | None = None, progress: bool = False, mesh=None, **sampler_options) -> jax.Array:
        """noise ``(B, F, h, w, C)`` unit Gaussian; text ``(B, S, D)``; null_text: the empty prompt's context
        (needed for text guidance); context_latents ``(B, F, h, w, C)`` / context_mask ``(B, F)``.

        ``mesh``: a device mesh (:mod:`vldm_jax.parallel`): samples over ``data``/``fsdp``, frames over
        ``context``; the loop is still one compiled ``lax.scan``, with the same result up to float rounding."""
        if steps < 1:
            raise UserError(f"the number of denoising steps must be at least 1 (got {steps})")
        guide_text = guidance_scale != 1.0
        guide_context = context_guidance_scale != 1.0 and context_latents is not None
        if guide_text and null_text is None:
            raise UserError("text guidance needs the empty prompt's context (null_text)")
        if context_latents is not None and not self.has_context:
            raise UserError("this model has no context-frame conditioning")
        sampler = make_sampler(scheduler, self.scheduler_config, steps, **sampler_options)
        key = jax.random.key(0) if key is None else key
        null = null_text if null_text is not None else text
        state = self.state
        if mesh is not None and mesh.devices.size > 1:
            state = self.state_on(mesh)
            noise, text, null, context_latents, context_mask = place_inputs(
                mesh, noise, text, null, context_latents, context_mask)
        else:
            mesh = None
        return _sample(self.graph, state, sampler, noise, text, null, context_latents, context_mask,
                       jnp.float32(guidance_scale), jnp.float32(context_guidance_scale), key,
                       guide_text=guide_text, guide_context=guide_context, progress=progress, mesh=mesh)


# ------------------------------------------------------------------------------------------- prediction

def context_window(context: jax.Array, num_frames: int) -> tuple[jax.Array, jax.Array]:
    """Context latents ``(B, Fc, h, w, C)`` placed at the start of a window of ``num_frames``:
    ``(latents (B, F, h, w, C), mask (B, F))``."""
    b, fc = context.shape[:2]
    if not 0 < fc < num_frames:
        raise UserError(f"a prediction window of {num_frames} frames needs 1 to {num_frames - 1} context frames "
                        f"(got {fc})")
    pad = jnp.zeros((b, num_frames - fc) + context.shape[2:], context.dtype)
    mask = jnp.concatenate([jnp.ones((b, fc)), jnp.zeros((b, num_frames - fc))], axis=1)
    return jnp.concatenate([context, pad], axis=1), mask


def rollout(predictor: VideoSampler, context: jax.Array, total_frames: int, window: int, text, null_text=None, *,
            num_context: int | None = None, key: jax.Array, progress_fn=None, **kwargs) -> jax.Array:
    """A video of ``total_frames`` latents continuing ``context`` ``(B, Fc, h, w, C)`` (its first frames):
    windows of ``window`` frames, each conditioned on the newest ``num_context`` frames so far (default ``Fc``).
    Every window has the same shape, so the sampling loop compiles once; the last window may overlap more.
    ``key``: per-sample keys ``(B,)`` (:func:`~vldm_jax.pipelines.common.sample_keys`). Returns ``(B, total_frames, h, w, C)`` whose first ``Fc`` frames are ``context``."""
    fc = context.shape[1]
    key = as_sample_keys(key, context.shape[0])
    n_ctx = fc if num_context is None else num_context
    if total_frames < fc:
        raise UserError(f"asked for {total_frames} frames but {fc} context frames were given")
    if not 0 < n_ctx < window:
        raise UserError(f"num_context must be between 1 and window - 1 = {window - 1} (got {n_ctx})")
    video = context
    i = 0
    while video.shape[1] < total_frames:
        given = video[:, -n_ctx:] if video.shape[1] >= n_ctx else video
        lat, mask = context_window(given, window)
        noise = per_sample_normal(fold_keys(key, 2 * i), lat.shape[1:])
        out = predictor(noise, text, null_text, context_latents=lat, context_mask=mask,
                        key=jax.random.fold_in(key[0], 2 * i + 1), **kwargs)
        new = out[:, given.shape[1]:]
        video = jnp.concatenate([video, new[:, : total_frames - video.shape[1]]], axis=1)
        i += 1
        if progress_fn is not None:
            progress_fn(int(video.shape[1]))
    return video


# ---------------------------------------------------------------------------------------- interpolation

def interpolation_layout(num_keyframes: int, factor: int = INTERPOLATION_FACTOR) -> np.ndarray:
    """Positions of the keyframes among the ``factor * (T - 1) + 1`` output frames."""
    return np.arange(num_keyframes) * factor


def interpolation_windows(num_keyframes: int, window_keyframes: int) -> list[int]:
    """First keyframe of each window of ``window_keyframes`` consecutive keyframes (consecutive windows share a
    keyframe; the last one is moved back so every window has the same size)."""
    k = min(window_keyframes, num_keyframes)
    if k < 2:
        raise UserError("interpolation needs at least 2 keyframes")
    starts = list(range(0, num_keyframes - 1, k - 1))
    starts = sorted({min(s, num_keyframes - k) for s in starts})
    return starts


def interpolate(interpolator: VideoSampler, keyframes: jax.Array, text, null_text=None, *, key: jax.Array,
                window_keyframes: int | None = None, factor: int = INTERPOLATION_FACTOR, **kwargs) -> jax.Array:
    """Keyframe latents ``(B, T, h, w, C)`` -> ``(B, factor*(T-1)+1, h, w, C)``: the ``factor - 1`` frames between
    each pair are predicted by masking (keyframes are the context frames, returned unchanged).

    ``window_keyframes``: how many keyframes the model sees at once (default all: one window). Windows share
    their end keyframes and run as one batch. ``key``: per-sample keys ``(B,)``; each sample's noise is drawn
    from its own key, so a video does not depend on the others in the batch."""
    b, t = keyframes.shape[:2]
    key = as_sample_keys(key, b)
    k = t if window_keyframes is None else min(window_keyframes, t)
    starts = interpolation_windows(t, k)
    f = factor * (k - 1) + 1
    pos = interpolation_layout(k, factor)
    lat = jnp.zeros((b * len(starts), f) + keyframes.shape[2:], keyframes.dtype)
    windows = jnp.concatenate([keyframes[:, s:s + k] for s in starts])  # (W*B, k, ...)
    lat = lat.at[:, pos].set(windows)
    mask = jnp.zeros((lat.shape[0], f)).at[:, pos].set(1.0)
    reps = len(starts)
    noise = per_sample_normal(fold_keys(key, 0), (reps,) + lat.shape[1:])  # (B, W, f, ...) -> window-major
    noise = jnp.swapaxes(noise, 0, 1).reshape(lat.shape)
    out = interpolator(noise, jnp.concatenate([text] * reps), None if null_text is None else
                       jnp.concatenate([null_text] * reps), context_latents=lat, context_mask=mask,
                       key=jax.random.fold_in(key[0], 1), **kwargs)
    out = out.reshape((reps, b) + out.shape[1:])
    # Stitch: the frames after keyframe j come from the first window that starts at or before j.
    total = factor * (t - 1) + 1
    pieces, done = [], 0
    for w, s in enumerate(starts):
        lo = factor * s
        hi = factor * (s + k - 1) + 1
        if hi <= done:
            continue
        pieces.append(out[w][:, done - lo:hi - lo])
        done = hi
    video = jnp.concatenate(pieces, axis=1)
    assert video.shape[1] == total, (video.shape, total)
    return video


# ------------------------------------------------------------------------------------------------ decode

@functools.partial(jax.jit, static_argnames=("graph", "chunk", "mesh"))
def _decode(graph, state, latents, scaling_factor, shift_factor, chunk: int | None, mesh=None):
    with activation_mesh(mesh):
        return _decode_body(graph, state, latents, scaling_factor, shift_factor, chunk)


def _decode_body(graph, state, latents, scaling_factor, shift_factor, chunk: int | None):
    vae = nnx.merge(graph, state)
    z = latents / scaling_factor + shift_factor
    if hasattr(vae, "decode_video"):  # the temporal decoder: frames of a chunk see each other
        frames = vae.decode(z, decode_chunk_size=chunk)
    else:
        b, f = z.shape[:2]
        flat = fold_frames(z)
        k = chunk or flat.shape[0]
        n = -(-flat.shape[0] // k)
        padded = jnp.concatenate([flat, jnp.zeros((n * k - flat.shape[0],) + flat.shape[1:], flat.dtype)])
        frames = jax.lax.map(vae.decode, padded.reshape((n, k) + flat.shape[1:]))
        frames = unfold_frames(frames.reshape((n * k,) + frames.shape[2:])[: b * f], f)
    return jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graph",))
def _encode(graph, state, frames, scaling_factor, shift_factor):
    vae = nnx.merge(graph, state)
    b, f = frames.shape[:2]
    z = vae.encode(fold_frames(frames * 2.0 - 1.0)).mode()
    return unfold_frames((z - shift_factor) * scaling_factor, f)


class LatentCodec:
    """A VAE (image ``AutoencoderKL`` or the temporal decoder), split once: frames <-> scaled latents."""

    def __init__(self, vae: nnx.Module):
        self.vae = vae
        self.graph, self.state = nnx.split(vae)
        self._placed: dict = {}
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, frames) -> jax.Array:
        """``(B, F, H, W, 3)`` float in [0, 1] -> scaled latents ``(B, F, h, w, C)`` (posterior mode)."""
        frames = jnp.asarray(frames, jnp.float32)
        h, w = frames.shape[2:4]
        if h % self.factor or w % self.factor:
            raise UserError(f"frame size {h}x{w} is not a multiple of the VAE's factor {self.factor}")
        return _encode(self.graph, self.state, frames, jnp.float32(self.scaling_factor),
                       jnp.float32(self.shift_factor))

    def decode(self, latents, chunk: int | None = 8, mesh=None) -> jax.Array:
        """Scaled latents ``(B, F, h, w, C)`` -> frames ``(B, F, H, W, 3)`` in [0, 1], ``chunk`` frames at a time.
        With a ``mesh``, the temporal decoder decodes one chunk per device of its ``context`` axis at once."""
        state = self.state
        if mesh is not None and mesh.devices.size > 1:
            if mesh not in self._placed:
                self._placed[mesh] = place_state(self.state, mesh)
            state, (latents,) = self._placed[mesh], place_inputs(mesh, latents)
        else:
            mesh = None
        return _decode(self.graph, state, latents, jnp.float32(self.scaling_factor),
                       jnp.float32(self.shift_factor), chunk=chunk, mesh=mesh)
