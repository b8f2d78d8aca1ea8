"""Classifier-free guidance: one batched denoiser call for the conditional and unconditional branch.

Conditioning is any pytree of arrays with the batch on axis 0 (text context, context frames and
their mask, image embeddings, added time ids...), so the same function serves text guidance,
guidance on context frames and Stable Video Diffusion's per-frame scales. :func:`guided_output` is the
Video LDM form with separate scales on the text and on the context frames (up to three branches).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _concat(uncond: Any, cond: Any) -> Any:
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def _is_one(scale: Any) -> bool:
    return isinstance(scale, (int, float)) and float(scale) == 1.0


def guidance_weights(scale: Any, ndim: int, frame_axis: int = 1) -> jax.Array:
    """``scale`` shaped to broadcast against a model output of rank ``ndim``.

    A scalar stays a scalar; a ``(F,)`` per-frame scale lands on ``frame_axis`` (videos
    ``(B, F, h, w, C)``); an array of rank ``ndim`` is used as is.
    """
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 0 or scale.ndim == ndim:
        return scale
    if scale.ndim == 1:
        shape = [1] * ndim
        shape[frame_axis] = scale.shape[0]
        return scale.reshape(shape)
    raise ValueError(f"guidance scale of shape {scale.shape} does not fit an output of rank {ndim}")


def combine_guidance(uncond_out: jax.Array, cond_out: jax.Array, scale: Any, frame_axis: int = 1) -> jax.Array:
    """``uncond + scale * (cond - uncond)``, computed in float32 and returned in the outputs' dtype."""
    w = guidance_weights(scale, cond_out.ndim, frame_axis)
    u = uncond_out.astype(jnp.float32)
    return (u + w * (cond_out.astype(jnp.float32) - u)).astype(cond_out.dtype)


def classifier_free_guidance(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    cond: Any,
    uncond: Any,
    scale: Any,
    *,
    frame_axis: int = 1,
) -> jax.Array:
    """Guided model output ``uncond + scale * (cond - uncond)`` from one call on a doubled batch.

    Args:
      model_fn: ``(x, t, conditioning) -> output`` with ``x`` ``(2B, ...)``.
      x: model input ``(B, ...)``, e.g. ``(B, h, w, C)`` or ``(B, F, h, w, C)``.
      t: timestep, a scalar or ``(B,)`` (then doubled with the batch).
      cond, uncond: pytrees of conditioning arrays with matching structure, batch on axis 0.
      scale: a Python number, a scalar array, or a per-frame ``(F,)`` array (Stable Video
        Diffusion's linearly increasing scales; see :func:`per_frame_scales`). A Python ``1.0``
        skips the unconditional branch entirely.
      frame_axis: the axis of the output a ``(F,)`` scale applies to.

    The unconditional half comes first in the batch, as in diffusers' pipelines.
    """
    if _is_one(scale):
        return model_fn(x, t, cond)
    b = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)
    t = jnp.asarray(t)
    t2 = jnp.concatenate([t, t], axis=0) if t.ndim > 0 else t
    out = model_fn(x2, t2, _concat(uncond, cond))
    return combine_guidance(out[:b], out[b:], scale, frame_axis)


def text_guided_denoiser(unet: Callable, context, uncontext, guidance_scale, guided: bool) -> Callable:
    """``(x, t) -> unet(x, t, context)``, with classifier-free guidance against ``uncontext`` when ``guided``
    (the text-to-image and AnimateDiff denoisers)."""
    def denoise(x, t):
        if guided:
            return classifier_free_guidance(lambda xx, tt, c: unet(xx, tt, c), x, t, context, uncontext,
                                            guidance_scale)
        return unet(x, t, context)

    return denoise


def per_frame_scales(min_scale: float, max_scale: float, num_frames: int) -> jax.Array:
    """``(F,)`` guidance scales rising linearly from the first frame to the last (SVD's default)."""
    return jnp.linspace(min_scale, max_scale, num_frames, dtype=jnp.float32)


def guided_denoiser(
    model_fn: ModelFn, cond: Any, uncond: Any, scale: Any, *, frame_axis: int = 1
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The ``denoise_fn(model_input, timestep)`` that :func:`vldm_jax.diffusion.samplers.sample` wants."""

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        return classifier_free_guidance(model_fn, x, t, cond, uncond, scale, frame_axis=frame_axis)

    return denoise


def guided_output(call, x, t, text, null_text, context_latents, context_mask, text_scale, context_scale, *,
                  guide_text: bool, guide_context: bool):
    """The denoiser output with classifier-free guidance on the text and/or the context frames, one batched
    U-Net call.

    ``call(x, t, text, context_latents, context_mask)``. Branches (∅ = empty prompt / no context frames):
    text only: ``e(∅, c) + s_text (e(t, c) - e(∅, c))``; context only: ``e(t, ∅) + s_ctx (e(t, c) - e(t, ∅))``;
    both: ``e(∅, ∅) + s_text (e(t, ∅) - e(∅, ∅)) + s_ctx (e(t, c) - e(t, ∅))``. With neither (or both scales
    1 in the two-branch forms) the output is ``e(t, c)``, exactly the unguided model.
    """
    has_context = context_latents is not None
    no_mask = None if not has_context else jnp.zeros_like(context_mask)
    branches = []  # (text, mask) per branch, in order
    if guide_text and guide_context:
        branches = [(null_text, no_mask), (text, no_mask), (text, context_mask)]
    elif guide_text:
        branches = [(null_text, context_mask), (text, context_mask)]
    elif guide_context:
        branches = [(text, no_mask), (text, context_mask)]
    else:
        return call(x, t, text, context_latents, context_mask)
    n = len(branches)
    b = x.shape[0]
    xs = jnp.concatenate([x] * n)
    texts = jnp.concatenate([br[0] for br in branches])
    lat = jnp.concatenate([context_latents] * n) if has_context else None
    masks = jnp.concatenate([br[1] for br in branches]) if has_context else None
    out = call(xs, t, texts, lat, masks).astype(jnp.float32)
    e = [out[i * b:(i + 1) * b] for i in range(n)]
    if n == 3:
        res = e[0] + text_scale * (e[1] - e[0]) + context_scale * (e[2] - e[1])
    else:
        res = e[0] + (text_scale if guide_text else context_scale) * (e[1] - e[0])
    return res.astype(x.dtype)
