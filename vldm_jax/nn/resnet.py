"""2D residual blocks and resampling layers (diffusers ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from vldm_jax.nn.norm import GroupNorm
from vldm_jax.parallel.aot import trace_platform


class PointwiseConv(nnx.Conv):
    """A 1x1 (or 1x1x1) convolution with stride 1 and no padding, computed as one matmul over the channels.

    The same parameters (``kernel`` ``(1, 1, C, O)`` HWIO or ``(1, 1, 1, C, O)``, ``bias``) and the same sum as
    ``nnx.Conv``. Why: XLA:CPU's (YNNPACK) convolution without padding runs 2-6x slower than the matmul at these
    models' shapes (8x128x128, 64 -> 32: 32.6 against 5.3 ms; 16x32x32, 192 -> 64: 6.9 against 2.9 ms;
    docs/benchmarks.md, session 15), and on accelerators a 1x1 convolution is this matmul anyway. Any other
    setting (strides, dilation, padding, groups, a mask, an output sharding) takes ``nnx.Conv``'s path."""

    def _pointwise(self) -> bool:
        ones = lambda v: v is None or all(int(s) == 1 for s in ((v,) if isinstance(v, int) else v))
        pad = canonicalize_padding(self.padding, len(self.kernel_size))  # 'SAME' pads a 1x1 window by nothing
        no_pad = pad in ("VALID", "SAME") or (not isinstance(pad, str) and all(tuple(p) == (0, 0) for p in pad))
        return (all(k == 1 for k in self.kernel_size) and no_pad and ones(self.strides)
                and ones(self.input_dilation) and ones(self.kernel_dilation) and self.feature_group_count == 1
                and self.mask is None)

    def __call__(self, x, out_sharding=None):
        if out_sharding is not None or not self._pointwise():
            return super().__call__(x, out_sharding=out_sharding)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = jnp.dot(x, kernel.reshape(kernel.shape[-2:]), precision=self.precision)
        return y if bias is None else y + bias


def conv2d(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: int | str | None = None,
           rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True) -> nnx.Conv:
    """A PyTorch-style ``Conv2d``: symmetric integer padding (default ``kernel // 2``), HWIO kernel. A 1x1 kernel
    with stride 1 is a :class:`PointwiseConv` (the same layer, computed as a matmul)."""
    if padding is None:
        padding = kernel // 2
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    cls = PointwiseConv if kernel == 1 and stride == 1 else nnx.Conv
    return cls(cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad, use_bias=use_bias,
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


_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _phase_conv(x, k, precision=None):
    """The 2x2 convolution of :func:`upsample2x_conv` over ``x`` padded by one on every side: ``(N, H + 1, W + 1,
    4 * C_out)``. Its input gradient is written by hand: XLA's transpose of this convolution is an unpadded 2x2
    convolution of the cotangent, which XLA:CPU (YNNPACK) runs 2-3x slower than the same convolution padded by
    one at the end and cropped, from 17x17 up (16x17x17x512 -> 128: 38.7 against 15.5 ms; 0.88x at 9x9;
    docs/benchmarks.md, session 15). On accelerators the two are the same work."""
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC, precision=precision)


def _phase_conv_fwd(x, k, precision):
    return _phase_conv(x, k, precision), (x, k)


def _phase_conv_bwd(precision, res, g):
    x, k = res
    _, h, w, _ = x.shape
    # dx[i] = sum_t g[i + 1 - t] k[t] (t = 0, 1 per spatial axis): the flipped, transposed kernel over g. Padding
    # g by one at the end only adds an output row and column past the input's, cropped here.
    kt = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    dx = jax.lax.conv_general_dilated(g, kt, (1, 1), ((0, 1), (0, 1)), dimension_numbers=_NHWC,
                                      precision=precision)[:, :h, :w]
    # The kernel's gradient as XLA derives it (dropped by XLA when the layer is frozen).
    _, kernel_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC, precision=precision), k)
    return dx.astype(x.dtype), kernel_vjp(g)[0]


_phase_conv.defvjp(_phase_conv_fwd, _phase_conv_bwd)


def upsample2x_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, precision=None) -> jax.Array:
    """``conv3x3_same(nearest_upsample_x2(x))`` without building the upsampled input.

    x: ``(N, H, W, C_in)``; kernel: 3x3 HWIO; bias: ``(C_out,)`` or None. Returns ``(N, 2H, 2W, C_out)`` in x's
    dtype. Equal to the direct form up to float rounding (kernel rows summed before, not after, the products).
    """
    n, h, w, _ = x.shape
    cout = kernel.shape[-1]
    k = subpixel_kernel(kernel).astype(x.dtype)
    z = _phase_conv(x, k, precision)  # (N, H + 1, W + 1, 4 * C_out)
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
