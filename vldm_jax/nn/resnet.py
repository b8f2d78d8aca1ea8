"""2D residual blocks and resampling layers (diffusers ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.nn.norm import GroupNorm
from vldm_jax.parallel.aot import trace_platform


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


# Nearest x2 then a 3x3 "SAME" conv, computed at the input's resolution (sub-pixel form). Output row 2i + a reads
# upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1): two taps
# per phase, the kernel's rows summed where they read the same input row. Over the input padded by one, the
# 2-tap window of phase a starts at row i + a; the same holds for columns. One 2x2 convolution with the four
# phases' kernels side by side (4 * C_out outputs) then gives every output pixel at 16/36 of the FLOPs and never
# builds the 4x larger upsampled input. It is the CPU's form (the whole temporal decode 7-8 % faster there,
# docs/benchmarks.md, session 14): compiled for a TPU (v5e, 16x64x64x256 bf16) it halves the FLOPs but XLA counts
# 976 against 573 MB of memory traffic (the 4x wider convolution output and the interleaving pass), and these
# convolutions are memory-bound on accelerators, so there the upsample stays fused into the 3x3 convolution.


def _phase_taps(k: jax.Array, axis: int) -> jax.Array:
    """The two taps of each phase along ``axis`` (size 3) of a kernel: a new leading phase axis, ``axis`` of size
    2: phase 0 = (k0, k1 + k2), phase 1 = (k0 + k1, k2)."""
    k0, k1, k2 = (jax.lax.index_in_dim(k, i, axis, keepdims=False) for i in range(3))
    return jnp.stack([jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)])


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """A 3x3 HWIO kernel of the conv after a nearest x2 upsample -> the 2x2 HWIO kernel of :func:`upsample2x_conv`:
    ``(2, 2, C_in, 4 * C_out)``, output channels ordered (row phase, column phase, channel). Summed in float32."""
    _, _, cin, cout = kernel.shape
    k = _phase_taps(_phase_taps(kernel.astype(jnp.float32), 0), 2)  # (b, a, t, u, I, O): rows t, columns u
    return k.transpose(2, 3, 4, 1, 0, 5).reshape(2, 2, cin, 4 * cout)


def upsample2x_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, precision=None) -> jax.Array:
    """``conv3x3_same(nearest_upsample_x2(x))`` without building the upsampled input.

    x: ``(N, H, W, C_in)``; kernel: 3x3 HWIO; bias: ``(C_out,)`` or None. Returns ``(N, 2H, 2W, C_out)`` in x's
    dtype. Equal to the direct form up to float rounding (kernel rows summed before, not after, the products).
    """
    n, h, w, _ = x.shape
    cout = kernel.shape[-1]
    k = subpixel_kernel(kernel).astype(x.dtype)
    z = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)  # (N, H + 1, W + 1, 4 * C_out)
    z = z.reshape(n, h + 1, w + 1, 2, 2, cout)
    # Phase (a, b) of output pixel (i, j) sits at window (i + a, j + b).
    rows = [jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]  # (N, H, W, 2, C)
    y = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, cout)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv. On the CPU an exact x2 runs as :func:`upsample2x_conv`, at the input's
    resolution; elsewhere, and for other output sizes (torch's nearest), the input is upsampled first."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = conv2d(channels, out_channels or channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x, output_size: tuple[int, int] | None = None):
        n, h, w, c = x.shape
        oh, ow = output_size or (2 * h, 2 * w)
        if (oh, ow) == (2 * h, 2 * w) and trace_platform() == "cpu":
            conv = self.conv
            kernel = conv.kernel[...]
            bias = conv.bias[...] if conv.bias is not None else None
            dtype = conv.dtype or jnp.result_type(x, kernel)
            return upsample2x_conv(x.astype(dtype), kernel, bias, precision=conv.precision)
        if (oh, ow) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # torch nearest: src = floor(dst * in / out)
            x = x[:, (jnp.arange(oh) * h) // oh][:, :, (jnp.arange(ow) * w) // ow]
        return self.conv(x)
