"""Timestep embeddings (diffusers ``Timesteps`` / ``get_timestep_embedding`` and ``TimestepEmbedding``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps -> ``(N, dim)`` float32.

    ``t``: scalar or ``(N,)``; a scalar gives ``N = 1``. Frequencies are
    ``exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))``; the output is ``[sin, cos]``,
    or ``[cos, sin]`` with ``flip_sin_to_cos``, zero-padded by one column when ``dim`` is odd.
    """
    t = jnp.atleast_1d(jnp.asarray(t)).astype(jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or 1-D, got shape {t.shape}")
    half = dim // 2
    # The operation order mirrors diffusers in float32 so that the arguments of sin/cos, which reach
    # ~1000 for late timesteps, round the same way.
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = scale * (t[:, None] * freqs[None, :])
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str):
    """diffusers ``get_activation`` names -> functions (torch's exact-erf GELU for ``"gelu"``)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r} (known: {', '.join(sorted(_ACTIVATIONS))})") from None


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> act -> linear_2`` on a sinusoidal embedding: ``(N, in_channels) -> (N, out_dim)``."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, act_fn: str = "silu", out_dim: int | None = None,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        activation(act_fn)  # fail early on an unknown name
        self.act_fn = act_fn
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, out_dim or time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(activation(self.act_fn)(self.linear_1(x)))


# ------------------------------------------------------------------------------- frame positions (video)

def frame_index_embedding(num_frames: int, dim: int):
    """SVD's absolute frame position: the sinusoid of the frame index ``0..F-1`` (``flip_sin_to_cos``,
    no shift) -> ``(F, dim)`` float32; a learned MLP (``time_pos_embed``) maps it to channels."""
    return timestep_embedding(jnp.arange(num_frames, dtype=jnp.float32), dim, flip_sin_to_cos=True,
                              downscale_freq_shift=0)


def relative_frame_embedding(num_frames: int, dim: int):
    """The paper's relative frame positions: the sinusoid of the signed distance ``i - j`` between query
    frame ``i`` and key frame ``j`` -> ``(F, F, dim)`` float32.

    The sine half is odd in ``i - j``, so a learned projection of it can tell "before" from "after";
    the cosine half is even and carries the distance alone.
    """
    idx = jnp.arange(num_frames, dtype=jnp.float32)
    dist = (idx[:, None] - idx[None, :]).reshape(-1)
    emb = timestep_embedding(dist, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.reshape(num_frames, num_frames, dim)
