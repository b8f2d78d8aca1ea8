"""The Video LDM temporal layers: frame folding, 3D-conv residual block, and the AlphaBlender that mixes
a spatial layer's output with its temporal layer's output.

Layouts: spatial layers see folded frames ``(B*F, H, W, C)``; 3D convolutions see ``(B, F, H, W, C)``;
temporal attention sees ``(B*H*W, F, C)``. The fold helpers here are the only place that reshapes
across the frame boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.norm import GroupNorm


# ------------------------------------------------------------------------------------------ frame folding

def fold_frames(x: jax.Array) -> jax.Array:
    """``(B, F, ...)`` -> ``(B*F, ...)``."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold_frames(x: jax.Array, num_frames: int) -> jax.Array:
    """``(B*F, ...)`` -> ``(B, F, ...)``."""
    return x.reshape((x.shape[0] // num_frames, num_frames) + x.shape[1:])


def to_frame_tokens(x: jax.Array, num_frames: int) -> jax.Array:
    """Folded frames ``(B*F, H, W, C)`` -> one sequence over frames per position ``(B*H*W, F, C)``."""
    bf, h, w, c = x.shape
    x = x.reshape(bf // num_frames, num_frames, h * w, c)
    return x.transpose(0, 2, 1, 3).reshape(-1, num_frames, c)


def from_frame_tokens(x: jax.Array, num_frames: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`to_frame_tokens`: ``(B*H*W, F, C)`` -> ``(B*F, H, W, C)``."""
    c = x.shape[-1]
    x = x.reshape(-1, height * width, num_frames, c).transpose(0, 2, 1, 3)
    return x.reshape(-1, height, width, c)


# ------------------------------------------------------------------------------------------------ layers

class Buffer(nnx.Variable):
    """A stored constant that is part of the checkpoint but never trained (torch ``register_buffer``)."""


def conv3d(cin: int, cout: int, kernel: tuple[int, int, int] = (3, 1, 1), *, rngs: nnx.Rngs,
           dtype=jnp.float32) -> nnx.Conv:
    """PyTorch-style ``Conv3d`` with 'same' symmetric padding over ``(F, H, W)``; DHWIO kernel."""
    pad = tuple((k // 2, k // 2) for k in kernel)
    return nnx.Conv(cin, cout, kernel, padding=pad, dtype=dtype, rngs=rngs)


class TemporalResnetBlock(nnx.Module):
    """diffusers ``TemporalResnetBlock``: GroupNorm (statistics over all frames), SiLU, 3D conv, twice,
    with the per-frame timestep embedding added between; residual.

    ``zero_init`` zeroes the last conv so that the block starts as the identity (Video LDM insertion).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 eps: float = 1e-6, groups: int = 32, kernel: tuple[int, int, int] = (3, 1, 1),
                 zero_init: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, rngs=rngs)
        self.conv1 = conv3d(in_channels, out_channels, kernel, rngs=rngs, dtype=dtype)
        self.time_emb_proj = (nnx.Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                              if temb_channels is not None else None)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, rngs=rngs)
        self.conv2 = conv3d(out_channels, out_channels, kernel, rngs=rngs, dtype=dtype)
        if zero_init:
            self.conv2.kernel[...] = jnp.zeros_like(self.conv2.kernel[...])
            self.conv2.bias[...] = jnp.zeros_like(self.conv2.bias[...])
        self.conv_shortcut = (nnx.Conv(in_channels, out_channels, (1, 1, 1), dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x, temb=None):
        """x: ``(B, F, H, W, C)``; temb: ``(B, F, temb_channels)`` or None."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, :, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


class AlphaBlender(nnx.Module):
    """``alpha * spatial + (1 - alpha) * temporal`` (Video LDM's learned mixing).

    Strategies: ``fixed`` (alpha is a stored constant), ``learned`` (alpha = sigmoid of a trained
    logit ``mix_factor``), ``learned_with_images`` (as learned, but alpha = 1 for frames flagged
    image-only, so image batches train the spatial path only). ``switch_spatial_to_temporal_mix``
    puts alpha on the temporal branch (the temporal decoder's convention).
    """

    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images",
                 switch_spatial_to_temporal_mix: bool = False, *, rngs: nnx.Rngs | None = None):
        if merge_strategy not in MERGE_STRATEGIES:
            raise ConfigError(f"unknown merge_strategy {merge_strategy!r}; choose one of {MERGE_STRATEGIES}")
        self.merge_strategy = merge_strategy
        self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
        value = jnp.asarray([alpha], jnp.float32)
        self.mix_factor = Buffer(value) if merge_strategy == "fixed" else nnx.Param(value)

    def alpha(self, image_only_indicator=None):
        """Mixing weight; per frame ``(B, F)`` when ``learned_with_images``, else a scalar array ``(1,)``."""
        m = self.mix_factor[...].astype(jnp.float32)
        if self.merge_strategy == "fixed":
            return m
        a = jax.nn.sigmoid(m)
        if self.merge_strategy == "learned_with_images":
            if image_only_indicator is None:
                raise ValueError("merge_strategy 'learned_with_images' needs image_only_indicator (B, F)")
            a = jnp.where(image_only_indicator.astype(bool), 1.0, a[0])
        return a

    def __call__(self, x_spatial, x_temporal, image_only_indicator=None):
        """Video-shaped ``(B, F, ...)`` inputs, or folded ``(B*F, ...)`` inputs (then the per-frame alpha
        is folded the same way)."""
        a = self.alpha(image_only_indicator)
        if a.ndim == 2:  # (B, F) per-frame weights
            if x_spatial.shape[:2] == a.shape:
                a = a.reshape(a.shape + (1,) * (x_spatial.ndim - 2))
            else:
                a = a.reshape((-1,) + (1,) * (x_spatial.ndim - 1))
        if self.switch_spatial_to_temporal_mix:
            a = 1.0 - a
        a = a.astype(x_spatial.dtype)
        return a * x_spatial + (1 - a) * x_temporal
