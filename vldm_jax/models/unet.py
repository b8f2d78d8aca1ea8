"""The Stable Diffusion U-Net (diffusers ``UNet2DConditionModel``) and the video U-Net built on it, in Flax NNX.

Attribute names mirror diffusers (``down_blocks[i].resnets[j]``, ``.attentions[j]``,
``.downsamplers[0].conv``, ``mid_block``, ``up_blocks[i].upsamplers[0].conv``...), so a diffusers
``diffusion_pytorch_model.safetensors`` loads by the generic key rule of ``checkpoints/convert.py``.

The video U-Net builds on this file: every block runs its layers through two hooks,
``_resnet(j, ...)`` and ``_attention(j, ...)``, and makes them through ``_make_resnet`` and
``_make_attention``, so a subclass can put a temporal layer after every spatial resnet and every
spatial transformer (or wrap them) without repeating the block logic. Extra keyword arguments of a
block call (``num_frames``...) are handed to the hooks untouched. Spatial layers always see
``(N, H, W, C)``, where ``N`` may be ``B*F`` folded frames.

The video U-Net (:class:`VideoUNet`; :class:`UNetSpatioTemporalConditionModel` for Stable Video
Diffusion folders) is this code with temporal layers switched on by its config: its blocks make
``SpatioTemporalResBlock`` / ``TransformerSpatioTemporalModel`` layers (diffusers' SVD names: the 2D
resnet sits at ``resnets.N.spatial_res_block``, the temporal parts at ``temporal_res_block``,
``temporal_transformer_blocks``, ``time_pos_embed``, ``time_mixer``), and its forward folds frames
around the same network. An SD image checkpoint maps into that layout by one rename,
``resnets.N.<rest>`` -> ``resnets.N.spatial_res_block.<rest>`` (``models/roles.py``); transformer keys
keep their names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError, UserError
from vldm_jax.nn.attention import Transformer2DModel
from vldm_jax.nn.branches import set_branches
from vldm_jax.nn.embeddings import TimestepEmbedding, timestep_embedding
from vldm_jax.nn.norm import GroupNorm
from vldm_jax.nn.remat import recompute_module
from vldm_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d
from vldm_jax.nn.temporal import (
    CONTEXT_CONDITIONINGS,
    FRAME_POSITION_ENCODINGS,
    MERGE_STRATEGIES,
    MotionModule,
    SpatioTemporalResBlock,
    TemporalContextEncoder,
    TransformerSpatioTemporalModel,
    context_input,
    fold_frames,
    unfold_frames,
    zero_init_layer,
)
from vldm_jax.parallel.activations import videos_per_call

IntOrTuple = Any  # int | tuple[int, ...] (| tuple[tuple[int, ...], ...] for transformer layers)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """diffusers ``UNet2DConditionModel`` config.json fields and defaults.

    Head counts follow diffusers' historical naming: when ``num_attention_heads`` is None (every
    Stable Diffusion config), ``attention_head_dim`` is the number of heads per block (SD1: 8; SD2:
    ``[5, 10, 20, 20]``) and the head width is ``channels // heads``. Fields that only select
    architecture variants we do not implement must keep their default; other values raise ConfigError.
    ``dropout``, ``resnet_skip_time_act`` and ``resnet_out_scale_factor`` do not change these block
    types' inference (diffusers ignores the latter two for them too), nor does
    ``mid_block_only_cross_attention`` (``UNetMidBlock2DCrossAttn`` ignores it in diffusers).
    ``num_class_embeds`` (with ``class_embed_type`` null) adds the embedding table ``class_embedding`` of
    ``class_labels`` to the timestep embedding (the SD x4 upscaler's noise level); ``only_cross_attention``
    (per block) makes the spatial transformers' ``attn1`` attend to the context (the x4 upscaler).
    """

    sample_size: IntOrTuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None

    # Block types this config accepts (the video config adds its own).
    supported_down_blocks: ClassVar[tuple] = DOWN_BLOCK_TYPES
    supported_up_blocks: ClassVar[tuple] = UP_BLOCK_TYPES
    supported_mid_blocks: ClassVar[tuple] = MID_BLOCK_TYPES

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"{type(self).__name__}: {msg}")

        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            bad(f"down_block_types, up_block_types and block_out_channels must have the same length "
                f"(got {len(self.down_block_types)}, {len(self.up_block_types)}, {len(self.block_out_channels)})")
        for name in ("layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                     "transformer_layers_per_block", "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                bad(f"{name} has {len(value)} entries for {n} blocks")
        for t in self.down_block_types:
            if _strip_res(t) not in self.supported_down_blocks:
                bad(f"unsupported down block type {t!r} (supported: {', '.join(self.supported_down_blocks)})")
        for t in self.up_block_types:
            if _strip_res(t) not in self.supported_up_blocks:
                bad(f"unsupported up block type {t!r} (supported: {', '.join(self.supported_up_blocks)})")
        if self.mid_block_type not in self.supported_mid_blocks:
            names = ", ".join(str(m) for m in self.supported_mid_blocks if m) + " or null"
            bad(f"unsupported mid block type {self.mid_block_type!r} (supported: {names})")
        if (isinstance(self.transformer_layers_per_block, tuple)
                and any(isinstance(v, tuple) for v in self.transformer_layers_per_block)
                and self.reverse_transformer_layers_per_block is None):
            bad("per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block")
        if self.act_fn not in ("silu", "swish"):
            bad(f"act_fn {self.act_fn!r} is not supported (only silu)")
        if self.norm_num_groups is None:
            bad("norm_num_groups=null is not supported")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            bad(f"resnet_time_scale_shift {self.resnet_time_scale_shift!r} is not supported")
        if self.time_embedding_type != "positional":
            bad(f"time_embedding_type {self.time_embedding_type!r} is not supported (only positional)")
        unsupported = {
            "dual_cross_attention": (self.dual_cross_attention, False),
            "class_embed_type": (self.class_embed_type, None),
            "addition_embed_type": (self.addition_embed_type, None),
            "encoder_hid_dim": (self.encoder_hid_dim, None),
            "encoder_hid_dim_type": (self.encoder_hid_dim_type, None),
            "time_embedding_act_fn": (self.time_embedding_act_fn, None),
            "timestep_post_act": (self.timestep_post_act, None),
            "time_cond_proj_dim": (self.time_cond_proj_dim, None),
            "class_embeddings_concat": (self.class_embeddings_concat, False),
            "attention_type": (self.attention_type, "default"),
            "cross_attention_norm": (self.cross_attention_norm, None),
        }
        for name, (value, default) in unsupported.items():
            if value != default:
                bad(f"{name}={value!r} is not supported (only {default!r})")

    # Per-block values, expanded the way diffusers expands them.
    def per_block(self, name: str) -> tuple:
        value = getattr(self, name)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


def _strip_res(block_type: str) -> str:
    # diffusers accepts a "UNetRes" prefix on block type names and drops it.
    return block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type


def _per_layer(value, num_layers: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_layers


# ------------------------------------------------------------------------------------------------- blocks

# ``remat`` value of a block: recompute each resnet/transformer inside the backward pass (nn/remat.py).
RECOMPUTE_IN_BACKWARD = "recompute_in_backward"


class UNetBlock(nnx.Module):
    """Shared plumbing of the U-Net blocks: layer factories, layer hooks, optional rematerialisation.

    ``remat``: False, True (recompute every resnet/transformer in the backward pass), or a
    ``jax.checkpoint`` policy.
    """

    remat: bool | str | Callable = False

    def _make_resnet(self, in_channels: int, out_channels: int, *, temb_channels: int, eps: float, groups: int,
                     time_scale_shift: str, output_scale_factor: float = 1.0, rngs: nnx.Rngs, dtype) -> nnx.Module:
        return ResnetBlock2D(in_channels, out_channels, temb_channels=temb_channels, groups=groups, eps=eps,
                             time_embedding_norm=time_scale_shift, output_scale_factor=output_scale_factor,
                             rngs=rngs, dtype=dtype)

    def _make_attention(self, channels: int, *, heads: int, num_layers: int, cross_attention_dim: int, groups: int,
                        use_linear_projection: bool, upcast_attention: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
        return Transformer2DModel(heads, channels // heads, channels, num_layers=num_layers,
                                  cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                                  use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                                  rngs=rngs, dtype=dtype)

    def _resnet(self, j: int, x, temb, **extra):
        """Hook: the ``j``-th resnet on ``(N, H, W, C)``; a video block adds its temporal layer here."""
        return self.resnets[j](x, temb)

    def _attention(self, j: int, x, context, **extra):
        """Hook: the ``j``-th transformer on ``(N, H, W, C)``; a video block adds its temporal layer here."""
        return self.attentions[j](x, context)

    def _checkpointed(self, fn: Callable, *args):
        """Runs ``fn(self, *args)``, rematerialised in the backward pass when ``self.remat`` is set."""
        if not self.remat:
            return fn(self, *args)
        if self.remat == RECOMPUTE_IN_BACKWARD:
            return recompute_module(self, fn, *args)
        policy = None if self.remat is True else self.remat
        # Plain jax.checkpoint over the split state: nnx.remat cannot re-enter a module that was merged
        # inside jax.grad (the train step's pattern), it refuses to touch Params of the outer trace.
        graphdef, state = nnx.split(self)
        return jax.checkpoint(lambda st, *a: fn(nnx.merge(graphdef, st), *a), policy=policy)(state, *args)

    def _run_resnet(self, j, x, temb, extra):
        return self._checkpointed(lambda blk, x, temb: blk._resnet(j, x, temb, **extra), x, temb)

    def _run_attention(self, j, x, context, extra):
        return self._checkpointed(lambda blk, x, context: blk._attention(j, x, context, **extra), x, context)


class DownBlock2D(UNetBlock):
    """Resnets, then an optional stride-2 downsampler. Returns the output and the skips it produces."""

    has_attention = False

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int, eps: float,
                 groups: int, time_scale_shift: str, add_downsample: bool, downsample_padding: int,
                 remat=False, rngs: nnx.Rngs, dtype=jnp.float32, **attention_kwargs):
        self.remat = remat
        common = dict(temb_channels=temb_channels, eps=eps, groups=groups, time_scale_shift=time_scale_shift,
                      rngs=rngs, dtype=dtype)
        self.resnets = nnx.List([self._make_resnet(in_channels if j == 0 else out_channels, out_channels, **common)
                                 for j in range(num_layers)])
        if self.has_attention:
            layers = _per_layer(attention_kwargs.pop("transformer_layers"), num_layers)
            self.attentions = nnx.List([
                self._make_attention(out_channels, num_layers=layers[j], groups=groups, rngs=rngs, dtype=dtype,
                                     **attention_kwargs)
                for j in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding,
                                                    rngs=rngs, dtype=dtype)])
                             if add_downsample else None)

    def __call__(self, x, temb, context=None, **extra):
        """x: ``(N, H, W, C_in)``; temb: ``(N, T)``; context: ``(N, S, D)``.
        Returns ``(N, H', W', C_out)`` and the tuple of skip activations, in order."""
        skips = []
        for j in range(len(self.resnets)):
            x = self._run_resnet(j, x, temb, extra)
            if self.has_attention:
                x = self._run_attention(j, x, context, extra)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
    """``DownBlock2D`` with a spatial transformer after every resnet."""

    has_attention = True


class UpBlock2D(UNetBlock):
    """Resnets on the input concatenated with one skip each (last skip first), then an optional upsampler."""

    has_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *, temb_channels: int,
                 num_layers: int, eps: float, groups: int, time_scale_shift: str, add_upsample: bool,
                 remat=False, rngs: nnx.Rngs, dtype=jnp.float32, **attention_kwargs):
        self.remat = remat
        common = dict(temb_channels=temb_channels, eps=eps, groups=groups, time_scale_shift=time_scale_shift,
                      rngs=rngs, dtype=dtype)
        resnets = []
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if j == 0 else out_channels
            resnets.append(self._make_resnet(resnet_in + skip_channels, out_channels, **common))
        self.resnets = nnx.List(resnets)
        if self.has_attention:
            layers = _per_layer(attention_kwargs.pop("transformer_layers"), num_layers)
            self.attentions = nnx.List([
                self._make_attention(out_channels, num_layers=layers[j], groups=groups, rngs=rngs, dtype=dtype,
                                     **attention_kwargs)
                for j in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(out_channels, out_channels, rngs=rngs, dtype=dtype)])
                           if add_upsample else None)

    def __call__(self, x, temb, context=None, skips=(), upsample_size=None, **extra):
        """x: ``(N, H, W, C)``; skips: ``len(self.resnets)`` arrays ``(N, H, W, C_skip)``, consumed from
        the end; upsample_size: ``(H_out, W_out)`` when the upsampled size is not ``2H, 2W``."""
        skips = list(skips)
        for j in range(len(self.resnets)):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self._run_resnet(j, x, temb, extra)
            if self.has_attention:
                x = self._run_attention(j, x, context, extra)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """``UpBlock2D`` with a spatial transformer after every resnet."""

    has_attention = True


class UNetMidBlock2DCrossAttn(UNetBlock):
    """resnet, then (transformer, resnet) ``num_layers`` times, at the lowest resolution."""

    def __init__(self, channels: int, *, temb_channels: int, eps: float, groups: int, time_scale_shift: str,
                 output_scale_factor: float = 1.0, num_layers: int = 1, transformer_layers: IntOrTuple = 1,
                 remat=False, rngs: nnx.Rngs, dtype=jnp.float32, **attention_kwargs):
        self.remat = remat
        common = dict(temb_channels=temb_channels, eps=eps, groups=groups, time_scale_shift=time_scale_shift,
                      output_scale_factor=output_scale_factor, rngs=rngs, dtype=dtype)
        self.resnets = nnx.List([self._make_resnet(channels, channels, **common) for _ in range(num_layers + 1)])
        layers = _per_layer(transformer_layers, num_layers)
        self.attentions = nnx.List([
            self._make_attention(channels, num_layers=layers[j], groups=groups, rngs=rngs, dtype=dtype,
                                 **attention_kwargs)
            for j in range(num_layers)])

    def __call__(self, x, temb, context=None, **extra):
        """``(N, H, W, C)`` -> ``(N, H, W, C)``. The resnet after transformer ``j`` is ``resnets[j + 1]``."""
        x = self._run_resnet(0, x, temb, extra)
        for j in range(len(self.attentions)):
            x = self._run_attention(j, x, context, extra)
            x = self._run_resnet(j + 1, x, temb, extra)
        return x


# -------------------------------------------------------------------------------------------------- model

class UNet2DConditionModel(nnx.Module):
    """Text-conditioned latent U-Net: ``(sample, timestep, context) -> prediction`` (eps or v).

    ``dtype`` is the compute dtype (parameters stay float32); ``remat`` rematerialises every resnet and
    transformer in the backward pass (True or a ``jax.checkpoint`` policy); see :meth:`set_remat`.
    """

    DOWN_BLOCKS: dict[str, type] = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
    UP_BLOCKS: dict[str, type] = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}
    MID_BLOCKS: dict[str, type] = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 remat: bool | Callable = False):
        self.config = config
        self.dtype = dtype
        c = config
        channels = c.block_out_channels
        n = len(channels)
        heads = c.heads_per_block
        cross_dims = c.per_block("cross_attention_dim")
        layers = c.per_block("layers_per_block")
        tlayers = c.per_block("transformer_layers_per_block")
        temb = c.time_embed_dim

        self.conv_in = conv2d(c.in_channels, channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2,
                              rngs=rngs, dtype=dtype)
        self.time_embedding = TimestepEmbedding(channels[0], temb, act_fn=c.act_fn, rngs=rngs, dtype=dtype)

        common = dict(temb_channels=temb, eps=c.norm_eps, groups=c.norm_num_groups,
                      time_scale_shift=c.resnet_time_scale_shift, remat=remat, rngs=rngs, dtype=dtype,
                      **self._block_kwargs())

        def attention_kwargs(block_type, heads, cross_attention_dim, transformer_layers):
            # Mid blocks always attend; down/up blocks say so with has_attention.
            block_cls = {**self.DOWN_BLOCKS, **self.UP_BLOCKS, **self.MID_BLOCKS}[block_type]
            if not getattr(block_cls, "has_attention", True):
                return {}
            return dict(heads=heads, cross_attention_dim=cross_attention_dim, transformer_layers=transformer_layers,
                        use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)

        down = []
        out_ch = channels[0]
        for i, block_type in enumerate(c.down_block_types):
            block_type = _strip_res(block_type)
            in_ch, out_ch = out_ch, channels[i]
            down.append(self.DOWN_BLOCKS[block_type](
                in_ch, out_ch, num_layers=layers[i], add_downsample=i < n - 1,
                downsample_padding=c.downsample_padding, **common,
                **attention_kwargs(block_type, heads[i], cross_dims[i], tlayers[i])))
        self.down_blocks = nnx.List(down)

        if c.mid_block_type is None:
            self.mid_block = None
        else:
            mid_kwargs = attention_kwargs(c.mid_block_type, heads[-1], cross_dims[-1], tlayers[-1])
            self.mid_block = self.MID_BLOCKS[c.mid_block_type](
                channels[-1], output_scale_factor=c.mid_block_scale_factor,
                transformer_layers=mid_kwargs.pop("transformer_layers"), **common, **mid_kwargs)

        rev_channels = channels[::-1]
        rev_heads = heads[::-1]
        rev_cross = cross_dims[::-1]
        rev_layers = layers[::-1]
        rev_tlayers = (c.reverse_transformer_layers_per_block if c.reverse_transformer_layers_per_block is not None
                       else tlayers[::-1])
        up = []
        out_ch = rev_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            block_type = _strip_res(block_type)
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]
            kw = attention_kwargs(block_type, rev_heads[i], rev_cross[i], rev_tlayers[i])
            up.append(self.UP_BLOCKS[block_type](
                in_ch, prev_ch, out_ch, num_layers=rev_layers[i] + 1, add_upsample=i < n - 1, **common, **kw))
        self.up_blocks = nnx.List(up)

        # diffusers' per-block only_cross_attention: set on the built transformer blocks, so block subclasses
        # (the video U-Net's) need no extra factory argument. Up blocks take the reversed flags.
        only = c.per_block("only_cross_attention")
        for blocks, flags, dims in ((self.down_blocks, only, cross_dims), (self.up_blocks, only[::-1], rev_cross)):
            for block, flag, dim in zip(blocks, flags, dims):
                if flag:
                    for attention in getattr(block, "attentions", None) or ():
                        for tb in attention.transformer_blocks:
                            tb.set_only_cross_attention(dim, rngs=rngs, dtype=dtype)
        # class_embed_type null + num_class_embeds: a table indexed by class_labels (B,) -> (B, time_embed_dim).
        self.class_embedding = (nnx.Embed(c.num_class_embeds, temb, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
                                if c.num_class_embeds is not None else None)

        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps, rngs=rngs)
        self.conv_out = conv2d(channels[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2,
                               rngs=rngs, dtype=dtype)

    def _block_kwargs(self) -> dict:
        """Extra keyword arguments for every block's constructor (the video U-Net's temporal settings)."""
        return {}

    def set_remat(self, remat: bool | Callable) -> None:
        """Turns rematerialisation of every block's layers on (True or a policy) or off (False)."""
        for _, module in nnx.iter_graph(self):
            if isinstance(module, UNetBlock):
                module.remat = remat

    def set_branches(self, branches: int | None) -> None:
        """How many row pieces each 3D residual block runs as, side by side (:mod:`vldm_jax.nn.branches`): None
        chooses by platform and size (split on the CPU only), 1 never splits."""
        set_branches(self, branches)

    def time_embed(self, timestep, n: int):
        """Timestep (scalar or ``(n,)``) -> embedding ``(n, time_embed_dim)`` in the compute dtype."""
        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timestep, jnp.float32)), (n,))
        emb = timestep_embedding(t, self.config.block_out_channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
                                 downscale_freq_shift=self.config.freq_shift)
        return self.time_embedding(emb.astype(self.dtype))

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, *, added_cond_kwargs=None,
                 return_skips=False, **extra):
        """sample: ``(B, H, W, in_channels)``; timestep: scalar or ``(B,)``; encoder_hidden_states:
        ``(B, S, cross_attention_dim)``; class_labels: ``(B,)`` ints (or a scalar) for a config with
        ``num_class_embeds`` (the x4 upscaler's noise level). Returns ``(B, H, W, out_channels)`` in the compute
        dtype, and with ``return_skips`` also the tuple of down-path skip activations (``conv_in`` output first).

        ``added_cond_kwargs`` is accepted for diffusers call compatibility; no supported config uses it.
        ``extra`` keyword arguments go to every block's layer hooks (used by the video U-Net).
        """
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        emb = self.time_embed(timestep, x.shape[0])
        if self.class_embedding is not None:
            if class_labels is None:
                raise UserError("this U-Net is conditioned on class_labels (B,) (num_class_embeds is set)")
            labels = jnp.broadcast_to(jnp.asarray(class_labels).astype(jnp.int32).reshape(-1), (x.shape[0],))
            emb = emb + self.class_embedding(labels).astype(emb.dtype)
        elif class_labels is not None:
            raise UserError("class_labels given to a U-Net without num_class_embeds")
        return self.forward_embedded(x, emb, context, return_skips=return_skips, **extra)

    def forward_embedded(self, x, emb, context, *, return_skips=False, input_residual=None, **extra):
        """The network after conditioning: x ``(N, H, W, in_channels)``, emb ``(N, time_embed_dim)``, context
        ``(N, S, D)``, all in the compute dtype (``N`` may be ``B*F`` folded frames). ``input_residual``: added
        to ``conv_in``'s output (the video U-Net's concatenated context channels)."""
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        if input_residual is not None:
            x = x + input_residual
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, **extra)
            skips.extend(block_skips)
        down_skips = tuple(skips)

        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, **extra)

        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size: equals 2x when H, W divide by 2**num_upsamplers,
            # and undoes the ceil of an odd-sized stride-2 downsampling otherwise.
            size = tuple(skips[-1].shape[1:3]) if block.upsamplers is not None else None
            x = block(x, emb, context, skips=block_skips, upsample_size=size, **extra)

        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return (x, down_skips) if return_skips else x


# ============================================================================================ video U-Net

# Rematerialisation policies by name (config ``remat_policy``, train config ``model.remat``): "full" recomputes
# each resnet/transformer inside the backward pass, once the cotangent of its output exists (nn/remat.py: the
# recomputation cannot be hoisted next to the forward pass, so the peak really falls); "checkpoint" is plain
# ``jax.checkpoint`` per layer (XLA's CPU scheduler runs its recomputations early: no memory saved there);
# "dots_saveable" is ``jax.checkpoint`` keeping matmul/conv outputs, recomputing the cheap elementwise rest.
REMAT_POLICIES: dict[str, Any] = {
    "none": False,
    "full": RECOMPUTE_IN_BACKWARD,
    "checkpoint": True,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_policy(value: str | bool | Callable) -> bool | Callable:
    """A ``remat`` setting from a policy name (``none``, ``full``, ``checkpoint``, ``dots_saveable``), a bool or a
    policy."""
    if isinstance(value, str):
        if value not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat_policy {value!r}; choose one of {', '.join(REMAT_POLICIES)}")
        return REMAT_POLICIES[value]
    return value


# "spatio_temporal": Video LDM / SVD layers (3D-conv resnets, temporal attention, AlphaBlenders);
# "motion_module": AnimateDiff motion modules (a temporal transformer after every spatial layer pair, plain residual).
TEMPORAL_LAYER_TYPES = ("spatio_temporal", "motion_module")


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
    """Settings of the temporal layers. The defaults reproduce Stable Video Diffusion; :meth:`paper` gives
    the Video LDM variant (relative frame positions), the default of :meth:`VideoUNet.from_image_unet`.

    ``frame_position_encoding``: ``"absolute"`` (SVD: the sinusoid of the frame index through the MLP
    ``time_pos_embed``, added to the temporal branch's input), ``"relative"`` (the paper: a learned
    per-head bias of the temporal self-attention logits, a linear map of the sinusoid of the frame
    distance ``i - j`` of width ``relative_position_dim``), or ``"none"``.
    ``temporal_cross_attention``: temporal blocks cross-attend to the context (the text; SVD: the image
    embedding of the first frame). ``temporal_kernel_size``: the ``(F, H, W)`` kernel of the temporal
    resnets' 3D convolutions. ``merge_strategy`` / ``merge_factor``: the AlphaBlenders' strategy and
    initial value (a logit for the learned strategies: alpha = sigmoid(merge_factor)).
    ``num_frames``: the frame count the model was trained for (SVD's config field; the forward pass
    takes any count).
    ``temporal_context_length``: the temporal cross-attention reads only the first this many context tokens
    (None: all). For short captions padded to 77 tokens (the bundled moving-shapes model: at most 7 real
    tokens), the caption's tokens are then most of the keys instead of 7 of 77, so a single word's
    difference (the direction of motion) is not averaged away by 70 padding states. The spatial layers
    always see the whole context.

    ``temporal_layer_type``: ``"spatio_temporal"`` (the layers above) or ``"motion_module"`` (AnimateDiff: the
    spatial resnets and transformers stay as in the image U-Net, under the same names, and a motion module
    (:class:`~vldm_jax.nn.temporal.MotionModule`) follows every down/up layer and each mid-block transformer;
    stored under ``motion_modules``). The ``motion_*`` fields and ``use_motion_mid_block`` are diffusers'
    ``MotionAdapter`` fields (heads and transformer layers per down block, reversed for the up blocks, the
    last for the mid block; ``motion_max_seq_length`` is the longest frame window).

    ``context_conditioning``: how context frames (prediction, interpolation) reach the model: ``"none"``;
    ``"temporal"`` (the paper: masked context latents and the mask, through a learned downsampling
    (:class:`~vldm_jax.nn.temporal.TemporalContextEncoder`), added to the inputs of the temporal layers at
    every resolution); ``"concat"`` (SVD-style input channels: ``[x, mask * context, mask]`` into the first
    convolution, stored as the image ``conv_in`` plus a zero-initialised ``temporal_context_in`` over the extra
    channels, which is the same linear map and keeps the image layers frozen).
    """

    num_frames: int = 25
    frame_position_encoding: str = "absolute"
    relative_position_dim: int = 64
    temporal_cross_attention: bool = True
    temporal_kernel_size: tuple[int, int, int] = (3, 1, 1)
    merge_strategy: str = "learned_with_images"
    merge_factor: float = 0.5
    context_conditioning: str = "none"
    temporal_context_length: int | None = None
    temporal_layer_type: str = "spatio_temporal"
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    motion_transformer_layers_per_block: int | tuple[int, ...] = 1
    motion_transformer_layers_per_mid_block: int = 1

    def __post_init__(self):
        name = type(self).__name__
        if self.temporal_layer_type not in TEMPORAL_LAYER_TYPES:
            raise ConfigError(f"{name}: temporal_layer_type {self.temporal_layer_type!r} is not one of "
                              f"{', '.join(TEMPORAL_LAYER_TYPES)}")
        for field in ("motion_num_attention_heads", "motion_transformer_layers_per_block"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.motion_max_seq_length < 1:
            raise ConfigError(f"{name}: motion_max_seq_length must be positive, got {self.motion_max_seq_length}")
        n = self.temporal_context_length
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"{name}: temporal_context_length must be a positive number of tokens or null, "
                              f"got {self.temporal_context_length}")
        if self.context_conditioning not in CONTEXT_CONDITIONINGS:
            raise ConfigError(f"{name}: context_conditioning {self.context_conditioning!r} is not one of "
                              f"{', '.join(CONTEXT_CONDITIONINGS)}")
        if self.frame_position_encoding not in FRAME_POSITION_ENCODINGS:
            raise ConfigError(f"{name}: frame_position_encoding {self.frame_position_encoding!r} is not one of "
                              f"{', '.join(FRAME_POSITION_ENCODINGS)}")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ConfigError(f"{name}: merge_strategy {self.merge_strategy!r} is not one of "
                              f"{', '.join(MERGE_STRATEGIES)}")
        k = self.temporal_kernel_size
        if isinstance(k, list):  # from YAML or a JSON config: the config is hashed (jit's static graphdef)
            object.__setattr__(self, "temporal_kernel_size", k := tuple(k))
        if len(k) != 3 or any(int(v) < 1 or int(v) % 2 == 0 for v in k):
            raise ConfigError(f"{name}: temporal_kernel_size must be three odd sizes (F, H, W), got {k}")
        if self.relative_position_dim < 2 or self.relative_position_dim % 2:
            raise ConfigError(f"{name}: relative_position_dim must be a positive even number")

    @classmethod
    def paper(cls, **overrides) -> "TemporalConfig":
        """The Video LDM paper's temporal layers: relative sinusoidal frame positions."""
        return cls(**{"frame_position_encoding": "relative", **overrides})

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TemporalConfig))

    @classmethod
    def from_stored(cls, config: dict) -> "TemporalConfig":
        """The temporal settings of a stored (JSON) video U-Net config: its TemporalConfig fields, others ignored."""
        return cls(**{k: v for k, v in config.items() if k in cls.fields()})


VIDEO_DOWN_BLOCK_TYPES = DOWN_BLOCK_TYPES + ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
VIDEO_UP_BLOCK_TYPES = UP_BLOCK_TYPES + ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")
VIDEO_MID_BLOCK_TYPES = MID_BLOCK_TYPES + ("UNetMidBlockSpatioTemporal",)


@dataclasses.dataclass(frozen=True)
class VideoUNetConfig(TemporalConfig, UNet2DConditionConfig):
    """A U-Net config with temporal layers: every ``UNet2DConditionConfig`` field, the
    :class:`TemporalConfig` fields, and:

    ``use_added_time_ids``: SVD's micro-conditioning: ``added_time_ids (B, n)`` (fps, motion bucket,
    noise augmentation) -> sinusoids of width ``addition_time_embed_dim`` -> ``add_embedding``
    (``projection_class_embeddings_input_dim = n * addition_time_embed_dim``), added to the timestep
    embedding. ``remat_policy``: ``none``, ``full``, ``checkpoint`` or ``dots_saveable``.

    2D block types (``CrossAttnDownBlock2D``...) take their resnet eps from ``norm_eps`` (a video U-Net
    made from an SD checkpoint); SVD's ``*SpatioTemporal`` types use the eps diffusers hard-codes per block.
    """

    use_added_time_ids: bool = False
    remat_policy: str = "none"

    supported_down_blocks: ClassVar[tuple] = VIDEO_DOWN_BLOCK_TYPES
    supported_up_blocks: ClassVar[tuple] = VIDEO_UP_BLOCK_TYPES
    supported_mid_blocks: ClassVar[tuple] = VIDEO_MID_BLOCK_TYPES

    def __post_init__(self):
        UNet2DConditionConfig.__post_init__(self)
        TemporalConfig.__post_init__(self)
        remat_policy(self.remat_policy)
        if self.temporal_layer_type == "motion_module":
            types = (*self.down_block_types, *self.up_block_types, self.mid_block_type or "")
            if any("SpatioTemporal" in t for t in types) or self.use_added_time_ids \
                    or self.context_conditioning != "none":
                raise ConfigError(f"{type(self).__name__}: motion modules go into an SD-style U-Net "
                                  "(2D block types, no added time ids, no context conditioning)")
        if self.use_added_time_ids and (self.addition_time_embed_dim is None
                                        or self.projection_class_embeddings_input_dim is None):
            raise ConfigError(f"{type(self).__name__}: added time ids need addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")

    @property
    def temporal(self) -> TemporalConfig:
        return TemporalConfig(**{name: getattr(self, name) for name in TemporalConfig.fields()})

    @classmethod
    def from_image_config(cls, image: UNet2DConditionConfig, temporal: TemporalConfig | None = None,
                          **overrides) -> "VideoUNetConfig":
        """The image U-Net's config with temporal layers (``temporal``: default :meth:`TemporalConfig.paper`)."""
        temporal = TemporalConfig.paper() if temporal is None else temporal
        image_fields = {f.name: getattr(image, f.name) for f in dataclasses.fields(UNet2DConditionConfig)}
        temporal_fields = {name: getattr(temporal, name) for name in TemporalConfig.fields()}
        return cls(**{**image_fields, **temporal_fields, **overrides})

    def image_config(self) -> UNet2DConditionConfig:
        """The config of the image U-Net whose weights are this video U-Net's spatial layers."""
        types = (*self.down_block_types, *self.up_block_types, self.mid_block_type or "")
        if any("SpatioTemporal" in t for t in types):
            raise ConfigError("SVD block types (*SpatioTemporal) have no image-only U-Net counterpart")
        names = [f.name for f in dataclasses.fields(UNet2DConditionConfig)]
        return UNet2DConditionConfig(**{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True)
class UNetSpatioTemporalConditionConfig(VideoUNetConfig):
    """diffusers ``UNetSpatioTemporalConditionModel`` config.json (Stable Video Diffusion): its fields
    (sample_size, in_channels, out_channels, down/up_block_types, block_out_channels,
    addition_time_embed_dim, projection_class_embeddings_input_dim, layers_per_block, cross_attention_dim,
    transformer_layers_per_block, num_attention_heads, num_frames) with diffusers' defaults, on top of
    :class:`VideoUNetConfig` (whose other fields keep the values diffusers hard-codes for SVD).
    """

    in_channels: int = 8
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
    mid_block_type: str | None = "UNetMidBlockSpatioTemporal"
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                       "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")
    cross_attention_dim: IntOrTuple = 1024
    num_attention_heads: IntOrTuple | None = (5, 10, 20, 20)
    use_linear_projection: bool = True
    addition_time_embed_dim: int | None = 256
    projection_class_embeddings_input_dim: int | None = 768
    use_added_time_ids: bool = True


class _VideoLayers:
    """Mixin for U-Net blocks: makes spatio-temporal layers and runs them with the frame arguments.

    ``resnet_eps``: the eps an SVD block type hard-codes (None: the config's ``norm_eps``).
    """

    resnet_eps: ClassVar[float | None] = None

    def __init__(self, *args, temporal: TemporalConfig, **kwargs):
        self.temporal = temporal
        super().__init__(*args, **kwargs)

    @property
    def _motion(self) -> bool:
        return self.temporal.temporal_layer_type == "motion_module"

    def _make_resnet(self, in_channels, out_channels, *, temb_channels, eps, groups, time_scale_shift,
                     output_scale_factor=1.0, rngs, dtype):
        t = self.temporal
        if self._motion:  # AnimateDiff: the image resnet as is; motion modules are added by the VideoUNet
            return super()._make_resnet(in_channels, out_channels, temb_channels=temb_channels, eps=eps,
                                        groups=groups, time_scale_shift=time_scale_shift,
                                        output_scale_factor=output_scale_factor, rngs=rngs, dtype=dtype)
        return SpatioTemporalResBlock(in_channels, out_channels, temb_channels=temb_channels,
                                      eps=self.resnet_eps or eps, groups=groups, time_embedding_norm=time_scale_shift,
                                      output_scale_factor=output_scale_factor, kernel=tuple(t.temporal_kernel_size),
                                      merge_factor=t.merge_factor, merge_strategy=t.merge_strategy,
                                      rngs=rngs, dtype=dtype)

    def _make_attention(self, channels, *, heads, num_layers, cross_attention_dim, groups, use_linear_projection,
                        upcast_attention, rngs, dtype):
        t = self.temporal
        if self._motion:
            return super()._make_attention(channels, heads=heads, num_layers=num_layers,
                                           cross_attention_dim=cross_attention_dim, groups=groups,
                                           use_linear_projection=use_linear_projection,
                                           upcast_attention=upcast_attention, rngs=rngs, dtype=dtype)
        return TransformerSpatioTemporalModel(
            heads, channels // heads, channels, num_layers=num_layers, cross_attention_dim=cross_attention_dim,
            norm_num_groups=groups, use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
            frame_position_encoding=t.frame_position_encoding, relative_position_dim=t.relative_position_dim,
            temporal_cross_attention=t.temporal_cross_attention, merge_factor=t.merge_factor,
            merge_strategy=t.merge_strategy, temporal_context_length=t.temporal_context_length,
            rngs=rngs, dtype=dtype)

    # AnimateDiff's motion module ``j`` follows layer pair ``j``: after the resnet in a block without attention,
    # after the transformer otherwise (in the mid block: between transformer j and resnet j + 1).
    motion_modules = None

    def _resnet(self, j, x, temb, *, num_frames, image_only_indicator, context_features=()):
        if self._motion:
            x = self.resnets[j](x, temb)
            if not getattr(self, "has_attention", True) and self.motion_modules is not None:
                x = self.motion_modules[j](x, num_frames=num_frames)
            return x
        return self.resnets[j](x, temb, num_frames=num_frames, image_only_indicator=image_only_indicator,
                               context_features=context_features)

    def _attention(self, j, x, context, *, num_frames, image_only_indicator, context_features=()):
        if self._motion:
            x = self.attentions[j](x, context)
            return self.motion_modules[j](x, num_frames=num_frames) if self.motion_modules is not None else x
        return self.attentions[j](x, context, num_frames=num_frames, image_only_indicator=image_only_indicator,
                                  context_features=context_features)


class VideoDownBlock(_VideoLayers, DownBlock2D):
    """``DownBlock2D`` with a temporal resnet after every resnet."""


class VideoCrossAttnDownBlock(_VideoLayers, CrossAttnDownBlock2D):
    """``CrossAttnDownBlock2D`` with temporal layers after every resnet and every spatial transformer block."""


class VideoUpBlock(_VideoLayers, UpBlock2D):
    """``UpBlock2D`` with a temporal resnet after every resnet."""


class VideoCrossAttnUpBlock(_VideoLayers, CrossAttnUpBlock2D):
    """``CrossAttnUpBlock2D`` with temporal layers after every resnet and every spatial transformer block."""


class VideoMidBlock(_VideoLayers, UNetMidBlock2DCrossAttn):
    """``UNetMidBlock2DCrossAttn`` with temporal layers."""


# SVD's block types: the same blocks with the resnet eps diffusers hard-codes in each.
class DownBlockSpatioTemporal(VideoDownBlock):
    resnet_eps = 1e-5


class CrossAttnDownBlockSpatioTemporal(VideoCrossAttnDownBlock):
    resnet_eps = 1e-6


class UpBlockSpatioTemporal(VideoUpBlock):
    resnet_eps = 1e-6


class CrossAttnUpBlockSpatioTemporal(VideoCrossAttnUpBlock):
    resnet_eps = 1e-6


class UNetMidBlockSpatioTemporal(VideoMidBlock):
    resnet_eps = 1e-5


class VideoUNet(UNet2DConditionModel):
    """The video U-Net: ``(sample (B, F, h, w, C), timestep, context) -> (B, F, h, w, C_out)``.

    The image U-Net's code with temporal layers after every spatial resnet and transformer block. Spatial
    layers run on folded frames ``(B*F, h, w, C)``, temporal layers on ``(B, F, h, w, C)`` (3D convs) or
    ``(B*h*w, F, C)`` (attention). A freshly initialised video U-Net has every temporal branch zeroed at
    its last layer, so it equals its spatial network frame by frame (:meth:`from_image_unet`).

    ``remat``: None (the config's ``remat_policy``), a policy name, a bool or a ``jax.checkpoint`` policy.
    """

    DOWN_BLOCKS = {"CrossAttnDownBlock2D": VideoCrossAttnDownBlock, "DownBlock2D": VideoDownBlock,
                   "CrossAttnDownBlockSpatioTemporal": CrossAttnDownBlockSpatioTemporal,
                   "DownBlockSpatioTemporal": DownBlockSpatioTemporal}
    UP_BLOCKS = {"CrossAttnUpBlock2D": VideoCrossAttnUpBlock, "UpBlock2D": VideoUpBlock,
                 "CrossAttnUpBlockSpatioTemporal": CrossAttnUpBlockSpatioTemporal,
                 "UpBlockSpatioTemporal": UpBlockSpatioTemporal}
    MID_BLOCKS = {"UNetMidBlock2DCrossAttn": VideoMidBlock, "UNetMidBlockSpatioTemporal": UNetMidBlockSpatioTemporal}

    def __init__(self, config: VideoUNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 remat: str | bool | Callable | None = None):
        if not isinstance(config, VideoUNetConfig):
            raise ConfigError(f"{type(self).__name__} needs a VideoUNetConfig, got {type(config).__name__}")
        super().__init__(config, rngs=rngs, dtype=dtype,
                         remat=remat_policy(config.remat_policy if remat is None else remat))
        c = config
        self.add_embedding = (TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim,
                                                act_fn=c.act_fn, rngs=rngs, dtype=dtype)
                              if c.use_added_time_ids else None)
        self.temporal_context_encoder = (
            TemporalContextEncoder(c.out_channels, tuple(c.block_out_channels), rngs=rngs, dtype=dtype)
            if c.context_conditioning == "temporal" else None)
        context_in = None
        if c.context_conditioning == "concat":
            context_in = conv2d(c.out_channels + 1, c.block_out_channels[0], c.conv_in_kernel,
                                padding=(c.conv_in_kernel - 1) // 2, rngs=rngs, dtype=dtype)
            zero_init_layer(context_in)
        self.temporal_context_in = context_in
        if c.temporal_layer_type == "motion_module":
            self._add_motion_modules(rngs, dtype)

    def _add_motion_modules(self, rngs, dtype) -> None:
        """AnimateDiff: a :class:`MotionModule` per layer of every down/up block (``motion_modules[j]``) and per
        mid-block transformer, with diffusers' ``UNetMotionModel`` head and layer counts (config ``motion_*``)."""
        c = self.config
        n = len(c.block_out_channels)
        heads = _per_layer(c.motion_num_attention_heads, n)
        layers = c.motion_transformer_layers_per_block
        layers = tuple(layers) if isinstance(layers, (tuple, list)) else (layers,) * n

        def modules(block, channels, heads, num_layers, count):
            per = _per_layer(num_layers, count)
            block.motion_modules = nnx.List([
                MotionModule(channels, heads, num_layers=per[j], norm_num_groups=c.norm_num_groups,
                             max_seq_length=c.motion_max_seq_length, upcast_attention=c.upcast_attention,
                             rngs=rngs, dtype=dtype) for j in range(count)])

        for i, block in enumerate(self.down_blocks):
            modules(block, c.block_out_channels[i], heads[i], layers[i], len(block.resnets))
        for i, block in enumerate(self.up_blocks):
            modules(block, c.block_out_channels[::-1][i], heads[::-1][i], layers[::-1][i], len(block.resnets))
        if self.mid_block is not None and c.use_motion_mid_block:
            modules(self.mid_block, c.block_out_channels[-1], heads[-1], c.motion_transformer_layers_per_mid_block,
                    len(self.mid_block.attentions))

    def _block_kwargs(self) -> dict:
        return {"temporal": self.config.temporal}

    def set_remat(self, remat: str | bool | Callable) -> None:
        super().set_remat(remat_policy(remat))

    def __call__(self, sample, timestep, encoder_hidden_states, added_time_ids=None, *, image_only_indicator=None,
                 context_latents=None, context_mask=None, class_labels=None, return_skips=False):
        """sample: ``(B, F, h, w, in_channels)``; timestep: scalar, ``(B,)`` or per frame ``(B, F)``;
        encoder_hidden_states: ``(B, S, cross_attention_dim)``; added_time_ids: ``(B, n)`` (SVD configs);
        image_only_indicator: ``(B, F)``, 1 for frames that are independent images (alpha = 1 under
        ``learned_with_images``); default all zeros.
        context_latents ``(B, F, h, w, out_channels)`` and context_mask ``(B, F)`` (1: a given frame) for a
        model with ``context_conditioning``; omitted: no context frames (the unconditional branch).
        class_labels: ``(B,)`` ints for a config with ``num_class_embeds`` (the upsampler's noise level).

        Returns ``(B, F, h, w, out_channels)`` in the compute dtype (with ``return_skips`` also the folded
        down-path skips).
        """
        c = self.config
        if sample.ndim != 5:
            raise UserError(f"the video U-Net takes samples (B, F, h, w, C), got shape {tuple(sample.shape)}")
        b, f = sample.shape[:2]
        g = videos_per_call(b, f)
        if g < b and not return_skips:
            # Frames split over devices, several videos per device: one call per group of videos keeps every
            # fold in the video's own layout (see vldm_jax.parallel.activations.videos_per_call).
            def part(a, i):
                a = None if a is None else jnp.asarray(a)
                return a if a is None or a.ndim == 0 else a[i:i + g]

            return jnp.concatenate([
                self(sample[i:i + g], part(timestep, i), part(encoder_hidden_states, i), part(added_time_ids, i),
                     image_only_indicator=part(image_only_indicator, i), context_latents=part(context_latents, i),
                     context_mask=part(context_mask, i), class_labels=part(class_labels, i))
                for i in range(0, b, g)])
        t = jnp.asarray(timestep, jnp.float32)
        if t.ndim == 2:  # per-frame timesteps
            emb = self.time_embed(t.reshape(-1), b * f).reshape(b, f, -1)
        else:
            emb = jnp.broadcast_to(self.time_embed(t, b)[:, None], (b, f, c.time_embed_dim))
        if self.add_embedding is not None:
            if added_time_ids is None:
                raise UserError("this U-Net is conditioned on added_time_ids (B, n) (fps, motion bucket, noise aug)")
            ids = jnp.asarray(added_time_ids, jnp.float32)
            if ids.ndim != 2 or ids.shape[0] != b or ids.shape[1] * c.addition_time_embed_dim != \
                    c.projection_class_embeddings_input_dim:
                raise UserError(f"added_time_ids must have shape ({b}, "
                                f"{c.projection_class_embeddings_input_dim // c.addition_time_embed_dim}), "
                                f"got {tuple(ids.shape)}")
            sinus = timestep_embedding(ids.reshape(-1), c.addition_time_embed_dim, flip_sin_to_cos=True,
                                       downscale_freq_shift=0)
            emb = emb + self.add_embedding(sinus.reshape(b, -1).astype(self.dtype))[:, None]
        if getattr(self, "class_embedding", None) is not None:
            if class_labels is None:
                raise UserError("this U-Net is conditioned on class_labels (B,) (the upsampler's noise level)")
            labels = jnp.broadcast_to(jnp.asarray(class_labels).astype(jnp.int32).reshape(-1), (b,))
            emb = emb + self.class_embedding(labels).astype(emb.dtype)[:, None]
        if image_only_indicator is None:
            image_only_indicator = jnp.zeros((b, f), self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        context = jnp.broadcast_to(context[:, None], (b, f) + context.shape[1:])
        x = fold_frames(sample.astype(self.dtype))
        conditioning = self._context_conditioning(context_latents, context_mask, sample.shape)
        extra = {}
        if self.temporal_context_encoder is not None:
            extra["context_features"] = self.temporal_context_encoder(conditioning)
        out = self.forward_embedded(x, fold_frames(emb), fold_frames(context), return_skips=return_skips,
                                    num_frames=f, image_only_indicator=image_only_indicator,
                                    input_residual=(self.temporal_context_in(conditioning)
                                                    if self.temporal_context_in is not None else None),
                                    **extra)
        if return_skips:
            return unfold_frames(out[0], f), out[1]
        return unfold_frames(out, f)

    def _context_conditioning(self, context_latents, context_mask, shape):
        """``(B*F, h, w, C+1)`` conditioning input, or None for a model without context conditioning."""
        b, f, h, w = shape[:4]
        if self.config.context_conditioning == "none":
            if context_latents is not None or context_mask is not None:
                raise UserError("this U-Net has no context-frame conditioning (context_conditioning: none)")
            return None
        latent_channels = self.config.out_channels
        if context_latents is None:
            context_latents = jnp.zeros((b, f, h, w, latent_channels), self.dtype)
        if context_mask is None:
            context_mask = jnp.zeros((b, f), self.dtype)
        if tuple(context_latents.shape) != (b, f, h, w, latent_channels) or tuple(context_mask.shape) != (b, f):
            raise UserError(f"context_latents must be {(b, f, h, w, latent_channels)} and context_mask {(b, f)}, "
                            f"got {tuple(context_latents.shape)} and {tuple(context_mask.shape)}")
        return context_input(context_latents, context_mask, self.dtype)

    @classmethod
    def from_image_unet(cls, image_unet, temporal_config: TemporalConfig | dict | None = None, *,
                        seed: int = 0, dtype=None, remat=None) -> "VideoUNet":
        """The paper's construction: an image U-Net (a :class:`UNet2DConditionModel`) with freshly initialised
        temporal layers inserted after its spatial layers.

        ``temporal_config``: :class:`TemporalConfig` or a dict of its fields (default
        :meth:`TemporalConfig.paper`). The spatial weights are the image U-Net's (copied); every temporal
        branch ends in a zeroed layer, so at initialisation the result equals the image U-Net frame by frame,
        while the AlphaBlenders keep their learnable logits.
        """
        from vldm_jax.models.roles import transplant_spatial

        image = _as_image_unet(image_unet)
        if isinstance(temporal_config, dict):
            temporal_config = TemporalConfig(**temporal_config)
        config = VideoUNetConfig.from_image_config(image.config, temporal_config)
        return transplant_spatial(image, config, seed=seed, dtype=image.dtype if dtype is None else dtype,
                                  remat=remat, model_cls=cls)


def _as_image_unet(module) -> UNet2DConditionModel:
    # Loading is the checkpoints layer's job (vldm_jax.checkpoints.pipeline_folder.load_component): modules don't load.
    if not isinstance(module, nnx.Module):
        raise ConfigError(f"expected an image U-Net module (UNet2DConditionModel), got {type(module).__name__}; load "
                          "a folder with vldm_jax.checkpoints.pipeline_folder.load_component(path, 'unet')")
    if isinstance(module, VideoUNet) or type(module) is not UNet2DConditionModel:
        raise ConfigError(f"expected an image U-Net (UNet2DConditionModel), got {type(module).__name__}")
    return module


class UNetSpatioTemporalConditionModel(VideoUNet):
    """Stable Video Diffusion's U-Net (diffusers ``UNetSpatioTemporalConditionModel``): a :class:`VideoUNet`
    with SVD's config. Call: ``model(sample (B, F, h, w, 8), timestep, encoder_hidden_states (B, 1, 1024),
    added_time_ids (B, 3))`` -> ``(B, F, h, w, 4)``; the image-latent channels are part of ``sample``.
    """

    def __init__(self, config: UNetSpatioTemporalConditionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 remat=None):
        super().__init__(config, rngs=rngs, dtype=dtype, remat=remat)
