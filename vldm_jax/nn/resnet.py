"""2D residual blocks and resampling layers (diffusers ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.nn.norm import GroupNorm


def conv2d(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: int | str | None = None,
           rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True) -> nnx.Conv:
    """A PyTorch-style ``Conv2d``: symmetric integer padding (default ``kernel // 2``), HWIO kernel."""
    if padding is None:
        padding = kernel // 2
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad, use_bias=use_bias,
                    dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with an optional timestep embedding added between the convs.

    ``temb_channels=None`` gives the autoencoder's block (no embedding). ``time_embedding_norm``:
    ``"default"`` adds the projected embedding, ``"scale_shift"`` applies ``norm2(h) * (1 + scale) + shift``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6,
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 conv_shortcut_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
        out_channels = out_channels or in_channels
        groups_out = groups_out or groups
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, rngs=rngs, dtype=dtype)
        if temb_channels is not None:
            proj_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nnx.Linear(temb_channels, proj_out, dtype=dtype, rngs=rngs)
        else:
            self.time_emb_proj = None
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, rngs=rngs)
        self.conv2 = conv2d(out_channels, out_channels, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (conv2d(in_channels, out_channels, 1, rngs=rngs, dtype=dtype, use_bias=conv_shortcut_bias)
                              if in_channels != out_channels else None)

    def __call__(self, x, temb=None):
        """x: ``(N, H, W, C_in)``; temb: ``(N, temb_channels)`` or None. Returns ``(N, H, W, C_out)``."""
        h = jax.nn.silu(self.norm1(x))
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(jax.nn.silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the autoencoder's variant: pad right/bottom by one first."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.padding = padding
        self.conv = conv2d(channels, out_channels or channels, 3, stride=2, padding=padding, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = conv2d(channels, out_channels or channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x, output_size: tuple[int, int] | None = None):
        n, h, w, c = x.shape
        oh, ow = output_size or (2 * h, 2 * w)
        if (oh, ow) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # torch nearest: src = floor(dst * in / out)
            x = x[:, (jnp.arange(oh) * h) // oh][:, :, (jnp.arange(ow) * w) // ow]
        return self.conv(x)
