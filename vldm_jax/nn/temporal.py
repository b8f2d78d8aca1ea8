"""The Video LDM temporal layers: frame folding, 3D-conv residual block, the AlphaBlender that mixes
a spatial layer's output with its temporal layer's output, and the spatio-temporal pairs the video U-Net
is made of (``SpatioTemporalResBlock``, ``TransformerSpatioTemporalModel``; diffusers' SVD names).

Layouts: spatial layers see folded frames ``(B*F, H, W, C)``; 3D convolutions see ``(B, F, H, W, C)``;
temporal attention sees ``(B*H*W, F, C)``. The fold helpers here are the only place that reshapes
across the frame boundary, and so the place where activations are pinned to a mesh
(:mod:`vldm_jax.parallel.activations`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.attention import Attention, FeedForward, Transformer2DModel
from vldm_jax.nn.branches import MAX_ROW_BRANCHES, branch_count, join, split
from vldm_jax.nn.embeddings import TimestepEmbedding, frame_index_embedding, relative_frame_embedding
from vldm_jax.nn.norm import GroupNorm, LayerNorm
from vldm_jax.nn.resnet import PointwiseConv, ResnetBlock2D
from vldm_jax.parallel.activations import constrain_folded, constrain_frame_tokens, constrain_video

# ------------------------------------------------------------------------------------------ frame folding

def fold_frames(x: jax.Array) -> jax.Array:
    """``(B, F, ...)`` -> ``(B*F, ...)``."""
    return constrain_folded(x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), x.shape[1])


def unfold_frames(x: jax.Array, num_frames: int) -> jax.Array:
    """``(B*F, ...)`` -> ``(B, F, ...)``."""
    return constrain_video(x.reshape((x.shape[0] // num_frames, num_frames) + x.shape[1:]))


def to_frame_tokens(x: jax.Array, num_frames: int) -> jax.Array:
    """Folded frames ``(B*F, H, W, C)`` -> one sequence over frames per position ``(B*H*W, F, C)``. Under a
    mesh with frames on ``context`` this is where the frames-to-positions all-to-all happens."""
    bf, h, w, c = x.shape
    x = x.reshape(bf // num_frames, num_frames, h * w, c)
    return constrain_frame_tokens(x.transpose(0, 2, 1, 3).reshape(-1, num_frames, c), bf // num_frames)


def from_frame_tokens(x: jax.Array, num_frames: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`to_frame_tokens`: ``(B*H*W, F, C)`` -> ``(B*F, H, W, C)``."""
    c = x.shape[-1]
    x = x.reshape(-1, height * width, num_frames, c).transpose(0, 2, 1, 3)
    return constrain_folded(x.reshape(-1, height, width, c), num_frames)


# ------------------------------------------------------------------------------------------------ layers

class Buffer(nnx.Variable):
    """A stored constant that is part of the checkpoint but never trained (torch ``register_buffer``)."""


# Below this many input channels a (k, 1, 1) temporal convolution stays XLA's convolution (the temporal decoder's
# 3-channel ``time_conv_out``); from it on it is one matmul over k frame-shifted copies (see TemporalConv).
TEMPORAL_MATMUL_MIN_CHANNELS = 32


class TemporalConv(nnx.Conv):
    """A ``(k, 1, 1)`` convolution over frames (``(B, F, H, W, C)``, 'same' zero padding of ``k // 2`` frames) as
    one matmul: every frame times the ``k`` kernel slices side by side, ``(..., C) @ (C, k*O)``, then the ``k``
    outputs shifted by their frame offset and summed (one elementwise pass XLA fuses with the bias).

    Same parameters (``kernel`` ``(k, 1, 1, C, O)`` DHWIO, ``bias``) and the same sum as ``nnx.Conv``, in another
    order. Why: XLA's CPU convolution of this kernel ran 1.5-7x slower than a matmul at the video U-Net's shapes
    (8x32x32x96: 55 vs 8 ms forward, 165 vs 75 ms for input and kernel gradients; docs/benchmarks.md, issue 21),
    and its kernel gradient is canonicalised with transposes of whole activations. Shifting the outputs instead of
    concatenating ``k`` shifted inputs saves writing the inputs ``k`` times (the temporal decode, -5 %). Other
    kernels, strides or narrow inputs take ``nnx.Conv``'s path."""

    def __call__(self, x, out_sharding=None):
        k = self.kernel_size[0]
        if (tuple(self.kernel_size[1:]) != (1, 1) or k % 2 == 0
                or tuple(map(tuple, self.padding)) != ((k // 2, k // 2), (0, 0), (0, 0)) or self.in_features < TEMPORAL_MATMUL_MIN_CHANNELS
                or x.ndim != 5 or self.feature_group_count != 1 or out_sharding is not None
                or any(s != 1 for s in (self.strides if isinstance(self.strides, tuple) else (self.strides,)))):
            return super().__call__(x, out_sharding=out_sharding)
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)[:, 0, 0]  # (k, C, O)
        out = _frame_conv(x.astype(dtype), kernel, self.precision)
        if self.bias is not None:
            out = out + self.bias[...].astype(dtype)
        return out


def _shifted_sum(y, k: int, frames: int, width: int, sign: int):
    """``out[:, t] = sum_i y[:, t + sign * (i - k // 2), ..., i*width:(i+1)*width]`` (zero outside ``y``'s
    frames): each channel slice shifted by its own pad, so that XLA fuses the pads, slices and sum into one
    elementwise pass. Padding ``y`` once and slicing it made XLA write the padded copy first, a full extra
    pass over the ``k``-times-wide matmul output (the whole temporal VAE decode 4-7 % slower,
    docs/benchmarks.md)."""
    rest = ((0, 0),) * (y.ndim - 2)

    def shifted(i):
        d = sign * (i - k // 2)
        kept = max(frames - abs(d), 0)  # frames of y that land inside the output (none if |d| >= frames)
        part = y[:, max(d, 0):max(d, 0) + kept, ..., i * width:(i + 1) * width]
        zeros = frames - kept  # before the kept frames for a negative shift, after them for a positive one
        return jnp.pad(part, ((0, 0), (zeros if d < 0 else 0, zeros if d > 0 else 0)) + rest)

    return sum(shifted(i) for i in range(k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _frame_conv(x, kernel, precision=None):
    """'Same' convolution over frames of ``x`` ``(B, F, ..., C)`` with ``kernel`` ``(k, C, O)`` (odd ``k``): output
    frame t sums kernel slice i applied to input frame ``t + i - k // 2``. Forward: one matmul against the slices
    side by side, then the shifted sum. Backward (hand-written): the input gradient the same way with the
    transposed slices, and each kernel slice's gradient as one matmul of the overlapping frames of ``x`` and of
    the output gradient; differentiating the forward instead builds a k-times-wide gradient by padding and
    concatenation and transposes it in memory (2x slower at 8x32x32x64, docs/benchmarks.md)."""
    k, _, o = kernel.shape
    y = jnp.dot(x, jnp.concatenate(list(kernel), axis=-1), precision=precision)
    return _shifted_sum(y, k, x.shape[1], o, sign=1)


def _frame_conv_fwd(x, kernel, precision):
    return _frame_conv(x, kernel, precision), (x, kernel)


def _frame_conv_bwd(precision, res, g):
    x, kernel = res
    k, c, o = kernel.shape
    f, p = x.shape[1], k // 2
    z = jnp.dot(g, jnp.concatenate([w.T for w in kernel], axis=-1), precision=precision)
    dx = _shifted_sum(z, k, f, c, sign=-1)
    dkernel = []
    for i in range(k):  # kernel slice i pairs input frame s + i - p with output frame s
        d = i - p
        lo, hi = max(0, -d), min(f, f - d)
        xs = x[:, lo + d:hi + d].reshape(-1, c)
        dkernel.append(jnp.einsum("nc,no->co", xs, g[:, lo:hi].reshape(-1, o), precision=precision))
    return dx.astype(x.dtype), jnp.stack(dkernel).astype(kernel.dtype)


_frame_conv.defvjp(_frame_conv_fwd, _frame_conv_bwd)


def conv3d(cin: int, cout: int, kernel: tuple[int, int, int] = (3, 1, 1), *, rngs: nnx.Rngs,
           dtype=jnp.float32) -> nnx.Conv:
    """PyTorch-style ``Conv3d`` with 'same' symmetric padding over ``(F, H, W)``; DHWIO kernel. A temporal-only
    kernel ``(k, 1, 1)`` with odd ``k`` is a :class:`TemporalConv` (the same layer, computed as a matmul)."""
    pad = tuple((k // 2, k // 2) for k in kernel)
    cls = TemporalConv if tuple(kernel[1:]) == (1, 1) and kernel[0] % 2 == 1 else nnx.Conv
    return cls(cin, cout, kernel, padding=pad, dtype=dtype, rngs=rngs)


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
            self.conv2.kernel.set_value(jnp.zeros_like(self.conv2.kernel[...]))
            self.conv2.bias.set_value(jnp.zeros_like(self.conv2.bias[...]))
        self.conv_shortcut = (PointwiseConv(in_channels, out_channels, (1, 1, 1), dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    branches: int | None = None  # row pieces computed side by side (nn/branches.py); None: automatic

    def __call__(self, x, temb=None):
        """x: ``(B, F, H, W, C)``; temb: ``(B, F, temb_channels)`` or None.

        Every layer but the GroupNorm statistics works per pixel, so on the CPU the rows are split into
        independent pieces (:mod:`vldm_jax.nn.branches`) whose statistics are summed."""
        n = branch_count(x.shape[2], self.branches, cap=MAX_ROW_BRANCHES, elements=x.size)
        xs = split(x, n, axis=2)
        hs = [self.conv1(jax.nn.silu(h)) for h in self.norm1.over_pieces(xs)]
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(jax.nn.silu(temb))[:, :, None, None, :]
            hs = [h + t for h in hs]
        hs = [self.conv2(jax.nn.silu(h)) for h in self.norm2.over_pieces(hs)]
        if self.conv_shortcut is not None:
            xs = [self.conv_shortcut(x) for x in xs]
        return join([x + h for x, h in zip(xs, hs)], axis=2)


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


# ------------------------------------------------------------------------------------- video U-Net layers

FRAME_POSITION_ENCODINGS = ("absolute", "relative", "none")


def zero_init_layer(layer: nnx.Linear | nnx.Conv) -> None:
    """Zeroes a layer's kernel and bias: the branch it ends outputs 0, so its residual is the identity.

    Whole-value ``set_value``, not ``v[...] = x``: under ``nnx.eval_shape`` the indexed form asks a tracer
    for its sharding, whose error message costs time quadratic in the model size."""
    layer.kernel.set_value(jnp.zeros_like(layer.kernel[...]))
    if layer.bias is not None:
        layer.bias.set_value(jnp.zeros_like(layer.bias[...]))


class SpatioTemporalResBlock(nnx.Module):
    """diffusers ``SpatioTemporalResBlock``: a 2D resnet on every frame, then a 3D-conv temporal resnet
    across frames, mixed by ``time_mixer``: ``alpha * spatial + (1 - alpha) * temporal``.

    Folded frames ``(B*F, H, W, C_in)`` -> ``(B*F, H, W, C_out)``. With ``zero_init`` (a freshly inserted
    temporal layer) the temporal branch is the identity on the spatial output, so the block equals its
    2D resnet for any alpha.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int, eps: float = 1e-6,
                 groups: int = 32, time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 kernel: tuple[int, int, int] = (3, 1, 1), merge_factor: float = 0.5,
                 merge_strategy: str = "learned_with_images", zero_init: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        out_channels = out_channels or in_channels
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels=temb_channels, groups=groups,
                                               eps=eps, time_embedding_norm=time_embedding_norm,
                                               output_scale_factor=output_scale_factor, rngs=rngs, dtype=dtype)
        self.temporal_res_block = TemporalResnetBlock(out_channels, out_channels, temb_channels=temb_channels,
                                                      eps=eps, groups=groups, kernel=tuple(kernel),
                                                      zero_init=zero_init, rngs=rngs, dtype=dtype)
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy, rngs=rngs)

    def __call__(self, x, temb, *, num_frames: int, image_only_indicator=None, context_features=()):
        """x: ``(B*F, H, W, C_in)``; temb: ``(B*F, T)``; image_only_indicator: ``(B, F)``;
        context_features: the context-frame features of every resolution (see :func:`matching_feature`),
        added to the temporal branch's input."""
        x = self.spatial_res_block(x, temb)
        video = unfold_frames(x, num_frames)
        feature = matching_feature(context_features, x)
        temporal_in = video if feature is None else video + unfold_frames(feature, num_frames)
        temporal = self.temporal_res_block(temporal_in, unfold_frames(temb, num_frames) if temb is not None else None)
        return fold_frames(self.time_mixer(video, temporal, image_only_indicator))


class TemporalBasicTransformerBlock(nnx.Module):
    """diffusers ``TemporalBasicTransformerBlock`` on frame sequences ``(B*H*W, F, C)``: LayerNorm +
    GEGLU ``ff_in``, self-attention across frames, optional cross-attention, GEGLU feed-forward, each
    with a residual.

    ``relative_position_dim``: the paper's relative frame positions. Self-attention then gets a per-head
    logit bias ``b[h, i, j] = rel_pos_bias(sinusoid(i - j))[h]`` (a learned linear map of the sinusoidal
    embedding of the signed frame distance), which depends on ``i - j`` only, so it works for any frame
    count. ``zero_init`` zeroes the last layer of every residual branch: the block starts as the identity.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
                 cross_attention_dim: int | None = None, relative_position_dim: int | None = None,
                 upcast_attention: bool = False, zero_init: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
        attn = dict(heads=num_attention_heads, dim_head=attention_head_dim, upcast_attention=upcast_attention,
                    rngs=rngs, dtype=dtype)
        self.norm_in = LayerNorm(dim, rngs=rngs)
        self.ff_in = FeedForward(dim, dim_out=dim, activation_fn="geglu", rngs=rngs, dtype=dtype)
        self.norm1 = LayerNorm(dim, rngs=rngs)
        self.attn1 = Attention(dim, **attn)
        self.relative_position_dim = relative_position_dim
        self.rel_pos_bias = (nnx.Linear(relative_position_dim, num_attention_heads, dtype=jnp.float32, rngs=rngs)
                             if relative_position_dim else None)
        if cross_attention_dim is not None:
            self.norm2 = LayerNorm(dim, rngs=rngs)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = LayerNorm(dim, rngs=rngs)
        self.ff = FeedForward(dim, activation_fn="geglu", rngs=rngs, dtype=dtype)
        if zero_init:
            for layer in (self.ff_in.net[2], self.attn1.to_out[0], self.ff.net[2]) + (
                    (self.attn2.to_out[0],) if self.attn2 is not None else ()):
                zero_init_layer(layer)

    def position_bias(self, num_frames: int):
        """``(1, heads, F, F)`` float32 logit bias of the relative frame positions, or None."""
        if self.rel_pos_bias is None:
            return None
        bias = self.rel_pos_bias(relative_frame_embedding(num_frames, self.relative_position_dim))
        return bias.transpose(2, 0, 1)[None]

    def __call__(self, x, context=None):
        """x: ``(B*H*W, F, C)`` (batch-major); context: ``(B, S, D)`` or None. Returns ``(B*H*W, F, C)``.

        All ``B*H*W`` frame sequences attend in one call. Cross-attention queries are regrouped per video
        ``(B, H*W*F, C)``: every position of a video sees the same context, so its keys and values are
        computed once per video instead of once per position.
        """
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x), bias=self.position_bias(x.shape[1]))
        if self.attn2 is not None and context is not None:
            per_video = self.norm2(x).reshape(context.shape[0], -1, x.shape[-1])
            x = x + self.attn2(per_video, context).reshape(x.shape)
        return x + self.ff(self.norm3(x))


class TransformerSpatioTemporalModel(Transformer2DModel):
    """diffusers ``TransformerSpatioTemporalModel``: the spatial transformer (``norm``, ``proj_in``,
    ``transformer_blocks``, ``proj_out``, as in :class:`Transformer2DModel`) with a temporal block after
    every spatial block, mixed by one shared ``time_mixer``.

    Frame positions: ``"absolute"`` (SVD) adds ``time_pos_embed(sinusoid(frame index))`` to the temporal
    branch's input; ``"relative"`` (the paper) biases the temporal self-attention by frame distance;
    ``"none"`` uses neither. Temporal cross-attention (``temporal_cross_attention``) sees the context of
    each video's first frame (SVD; for text-to-video every frame has the same text), or with
    ``temporal_context_length`` only its first that many tokens.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *,
                 num_layers: int = 1, cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, upcast_attention: bool = False,
                 frame_position_encoding: str = "absolute", relative_position_dim: int = 64,
                 temporal_cross_attention: bool = True, merge_factor: float = 0.5,
                 merge_strategy: str = "learned_with_images", zero_init: bool = True,
                 temporal_context_length: int | None = None, rngs: nnx.Rngs, dtype=jnp.float32):
        if frame_position_encoding not in FRAME_POSITION_ENCODINGS:
            raise ConfigError(f"unknown frame_position_encoding {frame_position_encoding!r}; "
                              f"choose one of {FRAME_POSITION_ENCODINGS}")
        super().__init__(num_attention_heads, attention_head_dim, in_channels, num_layers=num_layers,
                         cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
                         use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                         rngs=rngs, dtype=dtype)
        inner = num_attention_heads * attention_head_dim
        if inner != in_channels:
            raise ConfigError(f"temporal transformer needs channels divisible by heads "
                              f"({in_channels} channels, {num_attention_heads} heads)")
        self.temporal_transformer_blocks = nnx.List([
            TemporalBasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim,
                cross_attention_dim=cross_attention_dim if temporal_cross_attention else None,
                relative_position_dim=relative_position_dim if frame_position_encoding == "relative" else None,
                upcast_attention=upcast_attention, zero_init=zero_init, rngs=rngs, dtype=dtype)
            for _ in range(num_layers)])
        if frame_position_encoding == "absolute":
            self.time_pos_embed = TimestepEmbedding(in_channels, in_channels * 4, out_dim=in_channels,
                                                    rngs=rngs, dtype=dtype)
            if zero_init:
                zero_init_layer(self.time_pos_embed.linear_2)
        else:
            self.time_pos_embed = None
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy, rngs=rngs)
        self.temporal_context_length = temporal_context_length

    def __call__(self, x, context=None, *, num_frames: int, image_only_indicator=None, context_features=()):
        """x: ``(B*F, H, W, C)``; context: ``(B*F, S, D)`` (the text repeated per frame) or None;
        image_only_indicator: ``(B, F)``; context_features: as for :class:`SpatioTemporalResBlock`, added to
        every temporal block's input sequences. Returns ``(B*F, H, W, C)``."""
        bf, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(bf, h * w, c))
        temporal_context = (unfold_frames(context, num_frames)[:, 0, :self.temporal_context_length]
                            if context is not None else None)  # a length of None keeps every token
        frame_pos = None
        if self.time_pos_embed is not None:
            frame_pos = self.time_pos_embed(frame_index_embedding(num_frames, c).astype(tokens.dtype))
        feature = matching_feature(context_features, x)
        if feature is not None:
            feature = to_frame_tokens(feature, num_frames)
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            tokens = block(tokens, context)
            seqs = to_frame_tokens(tokens[:, :, None, :], num_frames)  # (B*H*W, F, C)
            if frame_pos is not None:
                seqs = seqs + frame_pos[None]
            if feature is not None:
                seqs = seqs + feature
            seqs = temporal_block(seqs, temporal_context)
            temporal = from_frame_tokens(seqs, num_frames, h * w, 1)[:, :, 0, :]
            tokens = self.time_mixer(tokens, temporal, image_only_indicator)
        return self.proj_out(tokens).reshape(bf, h, w, c) + x


# ------------------------------------------------------------------------------- context-frame conditioning

CONTEXT_CONDITIONINGS = ("none", "concat", "temporal")


def context_input(context_latents, context_mask, dtype):
    """The conditioning input of context frames: masked latents and the mask, ``(B*F, h, w, C + 1)``.

    context_latents: ``(B, F, h, w, C)`` (scaled clean latents; values of non-context frames are ignored);
    context_mask: ``(B, F)``, 1 for a given (context) frame."""
    mask = context_mask.astype(dtype)[:, :, None, None, None]
    masked = context_latents.astype(dtype) * mask
    mask = jnp.broadcast_to(mask, masked.shape[:-1] + (1,))
    return fold_frames(jnp.concatenate([masked, mask], axis=-1))


def matching_feature(features, x):
    """The entry of ``features`` (a tuple of ``(B*F, h, w, c)`` arrays, one per U-Net resolution) with
    ``x``'s spatial size and channels, or None when there are no features. The choice is static (shapes)."""
    if not features:
        return None
    for feature in features:
        if feature.shape[1:] == x.shape[1:]:
            return feature.astype(x.dtype)
    raise ValueError(f"no context feature of shape {x.shape[1:]} among {[f.shape[1:] for f in features]}")


class TemporalContextEncoder(nnx.Module):
    """The paper's context-frame conditioning (Video LDM Sec. 3.2/3.3): the masked context latents and the
    mask ``(B*F, h, w, C+1)`` go through a learned downsampling (3x3 convs, stride 2 between levels, the
    U-Net's own resolution ladder) to one feature map per U-Net resolution, each ending in a zero-initialised
    1x1 projection; the features are added to the inputs of the temporal layers at that resolution, so the
    spatial (image) layers never see them and a fresh encoder leaves the model unchanged.

    Returns a tuple of ``(B*F, h_l, w_l, channels[l])``, one per level.
    """

    def __init__(self, latent_channels: int, block_out_channels: tuple[int, ...], *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        channels = tuple(block_out_channels)
        self.conv_in = nnx.Conv(latent_channels + 1, channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                                rngs=rngs)
        convs, projections = [], []
        for i, ch in enumerate(channels):
            prev = channels[max(i - 1, 0)]
            stride = 1 if i == 0 else 2
            convs.append(nnx.Conv(prev, ch, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                                  dtype=dtype, rngs=rngs))
            proj = PointwiseConv(ch, ch, (1, 1), dtype=dtype, rngs=rngs)
            zero_init_layer(proj)
            projections.append(proj)
        self.convs = nnx.List(convs)
        self.projections = nnx.List(projections)

    def __call__(self, conditioning):
        h = jax.nn.silu(self.conv_in(conditioning))
        features = []
        for conv, proj in zip(self.convs, self.projections):
            h = jax.nn.silu(conv(h))
            features.append(proj(h))
        return tuple(features)


# --------------------------------------------------------------------------------- AnimateDiff motion modules

def sinusoidal_positions(max_seq_length: int, dim: int) -> jax.Array:
    """``(1, max_seq_length, dim)`` float32: sin at even channels, cos at odd ones, frequencies
    ``10000 ** (-2k / dim)`` (the frame positions AnimateDiff adds before each temporal attention)."""
    pos = jnp.arange(max_seq_length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-jnp.log(10000.0) / dim))
    table = jnp.zeros((max_seq_length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * freq)).at[:, 1::2].set(jnp.cos(pos * freq))
    return table[None]


class FramePositions(nnx.Module):
    """The stored table of frame positions ``pe (1, max_seq_length, dim)`` (a checkpoint buffer, not trained)."""

    def __init__(self, dim: int, max_seq_length: int):
        self.pe = Buffer(sinusoidal_positions(max_seq_length, dim))

    def __call__(self, num_frames: int, dtype):
        if num_frames > self.pe.shape[1]:
            raise ConfigError(f"{num_frames} frames exceed the motion module's window of {self.pe.shape[1]} "
                              "(motion_max_seq_length); use context windows (FreeNoise) for longer videos")
        return self.pe[...][:, :num_frames].astype(dtype)


FREE_NOISE_WEIGHTINGS = ("flat", "pyramid", "delayed_reverse_sawtooth")


def free_noise_frame_weights(context_length: int, weighting_scheme: str) -> list[float]:
    """FreeNoise's per-frame weights of one window (diffusers' ``flat``, ``pyramid``,
    ``delayed_reverse_sawtooth``)."""
    n = context_length
    if weighting_scheme == "flat":
        return [1.0] * n
    half = n // 2 if n % 2 == 0 else (n + 1) // 2
    if weighting_scheme == "pyramid":
        rise = list(range(1, half + 1)) if n % 2 == 0 else list(range(1, half))
        return [float(w) for w in (rise + rise[::-1] if n % 2 == 0 else rise + [half] + rise[::-1])]
    if weighting_scheme == "delayed_reverse_sawtooth":
        head = [0.01] * (half - 1) + [half] if n % 2 == 0 else [0.01] * half
        return [float(w) for w in head + list(range(half, 0, -1))]
    raise ConfigError(f"unknown FreeNoise weighting {weighting_scheme!r}; choose one of {FREE_NOISE_WEIGHTINGS}")


def free_noise_windows(num_frames: int, context_length: int, context_stride: int, weighting_scheme: str):
    """The static windows of FreeNoise over ``num_frames``: ``(start, end, value_weights, count_weights)``.

    Windows of ``context_length`` frames every ``context_stride`` frames; when they do not reach the last frame,
    one more window ends there and only its frames past the previous windows accumulate. As in diffusers, that
    last window's frames are counted with the single weight of its first new frame (its ``count_weights``), which
    is what makes our frames match diffusers' ``enable_free_noise`` exactly."""
    if num_frames < context_length:
        raise ConfigError(f"FreeNoise needs at least context_length={context_length} frames, got {num_frames}")
    w = free_noise_frame_weights(context_length, weighting_scheme)
    windows = [(s, s + context_length, tuple(w), tuple(w))
               for s in range(0, num_frames - context_length + 1, context_stride)]
    covered = windows[-1][1]
    if covered != num_frames:
        rest = num_frames - covered
        head = [0.0] * (context_length - rest)
        windows.append((num_frames - context_length, num_frames, tuple(head + w[-rest:]),
                        tuple(head + [w[-rest]] * rest)))
    return tuple(windows)


class MotionTransformerBlock(nnx.Module):
    """One block of an AnimateDiff temporal transformer on frame sequences ``(N, F, C)``: two self-attentions
    across frames (diffusers' ``double_self_attention``), each fed its LayerNorm'd input plus the sinusoidal
    frame positions, then a GEGLU feed-forward; every branch residual. No cross-attention: the text reaches
    motion only through the spatial layers."""

    def __init__(self, dim: int, heads: int, max_seq_length: int, *, upcast_attention: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        attn = dict(heads=heads, dim_head=dim // heads, upcast_attention=upcast_attention, rngs=rngs, dtype=dtype)
        self.norm1 = LayerNorm(dim, rngs=rngs)
        self.attn1 = Attention(dim, **attn)
        self.norm2 = LayerNorm(dim, rngs=rngs)
        self.attn2 = Attention(dim, **attn)
        self.norm3 = LayerNorm(dim, rngs=rngs)
        self.ff = FeedForward(dim, activation_fn="geglu", rngs=rngs, dtype=dtype)
        self.pos_embed = FramePositions(dim, max_seq_length)
        # FreeNoise: (context_length, context_stride, weighting_scheme), or None (see set_free_noise)
        self.free_noise = None

    def _attend(self, x):
        pos = self.pos_embed(x.shape[1], x.dtype)
        x = x + self.attn1(self.norm1(x) + pos)
        return x + self.attn2(self.norm2(x) + pos)

    def __call__(self, x):
        if self.free_noise is None:
            x = self._attend(x)
        else:  # FreeNoise: both attentions per window of frames, blended per frame by the windows' weights
            total = jnp.zeros(x.shape, jnp.float32)
            count = jnp.zeros((x.shape[1],), jnp.float32)
            for start, end, values, counts in free_noise_windows(x.shape[1], *self.free_noise):
                out = self._attend(x[:, start:end]).astype(jnp.float32)
                total = total.at[:, start:end].add(out * jnp.asarray(values, jnp.float32)[None, :, None])
                count = count.at[start:end].add(jnp.asarray(counts, jnp.float32))
            count = count[None, :, None]
            x = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), total).astype(x.dtype)
        return x + self.ff(self.norm3(x))


def set_free_noise(module: nnx.Module, free_noise: tuple[int, int, str] | None) -> None:
    """Turns FreeNoise's context windows on (``(context_length, context_stride, weighting_scheme)``) or off
    (None) in every motion-module transformer block of ``module``. A static setting: split the module again."""
    for _, block in nnx.iter_graph(module):
        if isinstance(block, MotionTransformerBlock):
            block.free_noise = None if free_noise is None else tuple(free_noise)


class MotionModule(nnx.Module):
    """An AnimateDiff motion module (diffusers ``AnimateDiffTransformer3D``): GroupNorm with statistics over
    all frames of a video, ``proj_in``, ``num_layers`` :class:`MotionTransformerBlock` over frames,
    ``proj_out``, plus the input (a plain residual, no AlphaBlender).

    Folded frames ``(B*F, H, W, C)`` -> ``(B*F, H, W, C)``. ``zero_init`` zeroes ``proj_out`` so that a fresh
    module is the identity (AnimateDiff's insertion into a frozen image model)."""

    def __init__(self, channels: int, heads: int, *, num_layers: int = 1, norm_num_groups: int = 32,
                 max_seq_length: int = 32, upcast_attention: bool = False, zero_init: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if channels % heads:
            raise ConfigError(f"motion module: {channels} channels do not divide into {heads} heads")
        self.norm = GroupNorm(norm_num_groups, channels, eps=1e-6, rngs=rngs)
        self.proj_in = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            MotionTransformerBlock(channels, heads, max_seq_length, upcast_attention=upcast_attention,
                                   rngs=rngs, dtype=dtype) for _ in range(num_layers)])
        self.proj_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        if zero_init:
            zero_init_layer(self.proj_out)

    def __call__(self, x, *, num_frames: int):
        _, h, w, _ = x.shape
        normed = fold_frames(self.norm(unfold_frames(x, num_frames)).astype(x.dtype))
        seqs = self.proj_in(to_frame_tokens(normed, num_frames))
        for block in self.transformer_blocks:
            seqs = block(seqs)
        return from_frame_tokens(self.proj_out(seqs), num_frames, h, w) + x
