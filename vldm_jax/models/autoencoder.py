"""The KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``) and its video-aware variant with a
temporal decoder (diffusers ``AutoencoderKLTemporalDecoder``, Video LDM / SVD), channels-last.

Images ``(B, H, W, 3)`` in [-1, 1] encode to a diagonal Gaussian over latents ``(B, H/f, W/f, latent_channels)``
with ``f = 2 ** (len(block_out_channels) - 1)``; latents decode back to images. The temporal decoder decodes
videos ``(B, F, h, w, C)`` -> ``(B, F, H, W, 3)`` with 3D-conv residual blocks mixed into every decoder
block, optionally ``decode_chunk_size`` frames at a time. As in diffusers, the latent ``scaling_factor``
(and ``shift_factor``) is not applied here: pipelines apply it.

Attribute names mirror diffusers so checkpoint keys map by the generic rule of
:mod:`vldm_jax.checkpoints.convert` (``encoder.down_blocks.0.resnets.1.conv1.weight`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vldm_jax.errors import ConfigError
from vldm_jax.nn.attention import Attention
from vldm_jax.nn.branches import per_sample, set_branches
from vldm_jax.nn.norm import GroupNorm
from vldm_jax.nn.remat import recompute_module
from vldm_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d
from vldm_jax.nn.temporal import AlphaBlender, TemporalResnetBlock, conv3d, fold_frames, unfold_frames
from vldm_jax.parallel.activations import CONTEXT_AXIS, activation_mesh, current_mesh

# Every norm in the autoencoder uses this epsilon (diffusers hard-codes it for the VAE).
VAE_EPS = 1e-6

# (in_channels, out_channels) -> residual block. The temporal decoder swaps in spatio-temporal blocks here.
ResnetFactory = Callable[[int, int], nnx.Module]


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Fields and defaults of diffusers' ``AutoencoderKL`` config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if self.act_fn not in ("silu", "swish"):
            raise ConfigError(f"AutoencoderKL: act_fn {self.act_fn!r} is not supported (only 'silu')")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ConfigError(f"AutoencoderKL: unsupported block types {bad} "
                              "(supported: DownEncoderBlock2D, UpDecoderBlock2D)")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError("AutoencoderKL: down_block_types, up_block_types and block_out_channels "
                              f"must have the same length (got {len(self.down_block_types)}, "
                              f"{len(self.up_block_types)}, {n})")
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            raise ConfigError(f"AutoencoderKL: norm_num_groups {self.norm_num_groups} does not divide "
                              f"block_out_channels {list(self.block_out_channels)}")

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------- posterior

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))``; arrays ``(B, h, w, latent_channels)``, float32.

    ``logvar`` is clipped to [-30, 20] on construction, as in diffusers, so ``std`` neither underflows
    nor overflows.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments: ``(B, h, w, 2 * latent_channels)``, mean channels first (diffusers' chunk order)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) per example ``(B,)``, summed over every other axis (frames too for a video
        posterior); ``other`` defaults to N(0, I)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


# ------------------------------------------------------------------------------------------------- blocks

def spatial_resnet(groups: int, *, rngs: nnx.Rngs, dtype) -> ResnetFactory:
    """The autoencoder's plain residual block: no timestep embedding, eps 1e-6."""
    return lambda cin, cout: ResnetBlock2D(cin, cout, temb_channels=None, groups=groups, eps=VAE_EPS,
                                           rngs=rngs, dtype=dtype)


class DownEncoderBlock2D(nnx.Module):
    """``resnets`` then an optional stride-2 ``downsamplers[0]`` (right/bottom padded, as the VAE was trained)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
                 resnet: ResnetFactory, rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([resnet(in_channels if i == 0 else out_channels, out_channels)
                                 for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=0, rngs=rngs, dtype=dtype)])
                             if add_downsample else None)

    def __call__(self, h, **resnet_kwargs):
        """h: ``(N, H, W, C_in)`` -> ``(N, H/2, W/2, C_out)`` (or ``(N, H, W, C_out)`` without downsampling)."""
        for resnet in self.resnets:
            h = resnet(h, **resnet_kwargs)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h


class UpDecoderBlock2D(nnx.Module):
    """``resnets`` then an optional nearest-x2 ``upsamplers[0]``."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
                 resnet: ResnetFactory, rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([resnet(in_channels if i == 0 else out_channels, out_channels)
                                 for i in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(out_channels, rngs=rngs, dtype=dtype)])
                           if add_upsample else None)

    branches: int | None = None  # per-sample pieces computed side by side on the CPU (nn/branches.py); None: auto

    def __call__(self, h, **resnet_kwargs):
        """h: ``(N, H, W, C_in)`` -> ``(N, 2H, 2W, C_out)`` (or ``(N, H, W, C_out)`` without upsampling).

        Plain 2D residual blocks and the upsampler work per sample, so they run as independent per-sample pieces
        (:func:`per_sample`); a temporal decoder's blocks split themselves."""
        for resnet in self.resnets:
            h = per_sample(resnet, h, self.branches) if isinstance(resnet, ResnetBlock2D) else resnet(h, **resnet_kwargs)
        if self.upsamplers is not None:
            h = per_sample(self.upsamplers[0], h, self.branches)
        return h


class UNetMidBlock2D(nnx.Module):
    """resnet, (single-head self-attention over all pixels, resnet); diffusers' ``UNetMidBlock2D`` for the VAE."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, resnet: ResnetFactory,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([resnet(channels, channels), resnet(channels, channels)])
        # One head as wide as the block; the reference upcasts the softmax, we upcast the whole op.
        self.attentions = (nnx.List([Attention(channels, heads=1, dim_head=channels, bias=True,
                                               upcast_attention=True, norm_num_groups=groups, eps=VAE_EPS,
                                               residual_connection=True, rngs=rngs, dtype=dtype)])
                           if add_attention else None)

    def __call__(self, h, **resnet_kwargs):
        """h: ``(N, H, W, C)`` -> ``(N, H, W, C)``."""
        h = self.resnets[0](h, **resnet_kwargs)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, **resnet_kwargs)


# ------------------------------------------------------------------------------------------ encoder/decoder

class Encoder(nnx.Module):
    """Images ``(N, H, W, in_channels)`` -> moments ``(N, H/f, W/f, 2 * latent_channels)``."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        ch = config.block_out_channels
        groups = config.norm_num_groups
        resnet = spatial_resnet(groups, rngs=rngs, dtype=dtype)
        self.conv_in = conv2d(config.in_channels, ch[0], 3, rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=config.layers_per_block,
                               add_downsample=i < len(ch) - 1, resnet=resnet, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], groups=groups, add_attention=config.mid_block_add_attention,
                                        resnet=resnet, rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=VAE_EPS, rngs=rngs)
        self.conv_out = conv2d(ch[-1], 2 * config.latent_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latents ``(N, h, w, latent_channels)`` -> images ``(N, h*f, w*f, out_channels)``.

    The residual blocks come from :meth:`make_resnet` and receive ``resnet_kwargs`` from every call, so a
    temporal decoder only overrides the block factory and its output head.
    """

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        ch = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        resnet = self.make_resnet(config, rngs=rngs, dtype=dtype)
        self.conv_in = conv2d(config.latent_channels, ch[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = UNetMidBlock2D(ch[0], groups=groups, add_attention=config.mid_block_add_attention,
                                        resnet=resnet, rngs=rngs, dtype=dtype)
        # The decoder has one more resnet per block than the encoder (diffusers: layers_per_block + 1).
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=config.layers_per_block + 1,
                             add_upsample=i < len(ch) - 1, resnet=resnet, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=VAE_EPS, rngs=rngs)
        self.conv_out = conv2d(ch[-1], config.out_channels, 3, rngs=rngs, dtype=dtype)

    def make_resnet(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype) -> ResnetFactory:
        return spatial_resnet(config.norm_num_groups, rngs=rngs, dtype=dtype)

    def mid(self, h, **resnet_kwargs):
        return self.mid_block(h, **resnet_kwargs)

    def up(self, h, **resnet_kwargs):
        for block in self.up_blocks:
            h = block(h, **resnet_kwargs)
        return h

    branches: int | None = None

    def head(self, h, **resnet_kwargs):
        return per_sample(lambda h: self.conv_out(jax.nn.silu(self.conv_norm_out(h))), h, self.branches)

    def set_branches(self, branches: int | None) -> None:
        """How many per-sample (per-frame) pieces the decoder's full-resolution layers run as, side by side
        (:mod:`vldm_jax.nn.branches`): None chooses by platform and size (split on the CPU only), 1 never splits."""
        set_branches(self, branches)

    def __call__(self, z, **resnet_kwargs):
        h = self.conv_in(z)
        h = self.mid(h, **resnet_kwargs)
        h = self.up(h, **resnet_kwargs)
        return self.head(h, **resnet_kwargs)


# -------------------------------------------------------------------------------------------------- model

class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL``: ``encoder`` + ``quant_conv`` -> posterior; ``post_quant_conv`` + ``decoder``."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        c = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = conv2d(2 * c, 2 * c, 1, rngs=rngs, dtype=dtype) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(c, c, 1, rngs=rngs, dtype=dtype) if config.use_post_quant_conv else None

    def encode(self, x) -> DiagonalGaussian:
        """x: images ``(B, H, W, in_channels)`` in [-1, 1]; H, W multiples of ``config.downscale_factor``."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z):
        """z: unscaled latents ``(B, h, w, latent_channels)`` -> images ``(B, h*f, w*f, out_channels)``."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, sample_posterior: bool = False, key: jax.Array | None = None):
        """Reconstruction ``(B, H, W, out_channels)``; samples the posterior (needs ``key``) or takes its mode."""
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)


# ======================================================================================= temporal decoder

# diffusers builds the temporal decoder's 3D blocks with GroupNorm eps 1e-5 (its spatial blocks keep 1e-6).
TEMPORAL_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class AutoencoderKLTemporalDecoderConfig:
    """Fields and defaults of diffusers' ``AutoencoderKLTemporalDecoder`` config.json, then our additions.

    The additions describe image VAEs that a temporal decoder is built from (:meth:`AutoencoderKLTemporalDecoder.
    from_image_vae`); their defaults are the diffusers architecture (32 groups, a ``quant_conv``, no
    ``post_quant_conv``, a mid block with ``layers_per_block`` resnets and one attention).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    # ---- our additions
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    mid_block_num_layers: int | None = None  # None: layers_per_block (diffusers); an SD image VAE has 2

    def __post_init__(self):
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        if bad:
            raise ConfigError(f"AutoencoderKLTemporalDecoder: unsupported down block types {bad} "
                              "(supported: DownEncoderBlock2D)")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ConfigError("AutoencoderKLTemporalDecoder: down_block_types and block_out_channels must have "
                              f"the same length (got {len(self.down_block_types)}, {len(self.block_out_channels)})")
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            raise ConfigError(f"AutoencoderKLTemporalDecoder: norm_num_groups {self.norm_num_groups} does not "
                              f"divide block_out_channels {list(self.block_out_channels)}")
        if self.mid_block_layers < 1:
            raise ConfigError("AutoencoderKLTemporalDecoder: the mid block needs at least one resnet")

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def mid_block_layers(self) -> int:
        return self.layers_per_block if self.mid_block_num_layers is None else self.mid_block_num_layers

    @classmethod
    def from_image_config(cls, ic: AutoencoderKLConfig) -> "AutoencoderKLTemporalDecoderConfig":
        """The temporal decoder of an image VAE with config ``ic``: the same encoder, latent space and spatial
        decoder layout (what :meth:`AutoencoderKLTemporalDecoder.from_image_vae` fills with its weights)."""
        if ic.shift_factor is not None or ic.latents_mean is not None:
            # Only the scale travels with the config; a shifted latent space would decode wrong in pipelines.
            raise ConfigError("from_image_vae: VAEs with shift_factor / latents_mean are not supported")
        return cls(
            in_channels=ic.in_channels, out_channels=ic.out_channels, down_block_types=ic.down_block_types,
            block_out_channels=ic.block_out_channels, layers_per_block=ic.layers_per_block,
            latent_channels=ic.latent_channels, sample_size=ic.sample_size, scaling_factor=ic.scaling_factor,
            force_upcast=ic.force_upcast, norm_num_groups=ic.norm_num_groups, use_quant_conv=ic.use_quant_conv,
            use_post_quant_conv=ic.use_post_quant_conv, mid_block_add_attention=ic.mid_block_add_attention,
            mid_block_num_layers=2)

    def image_config(self) -> AutoencoderKLConfig:
        """The image-VAE config of the same encoder (the encoder is shared by both classes)."""
        n = len(self.block_out_channels)
        return AutoencoderKLConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, down_block_types=self.down_block_types,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, sample_size=self.sample_size, scaling_factor=self.scaling_factor,
            force_upcast=self.force_upcast, use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv, mid_block_add_attention=self.mid_block_add_attention)


class VideoResBlock(nnx.Module):
    """The temporal decoder's residual block (diffusers builds it as a ``SpatioTemporalResBlock``, sgm calls it
    ``VideoResBlock``): a 2D residual block per frame, then a 3D-conv residual block over the frames of each
    video, mixed by ``time_mixer``. (The video U-Net's block with a timestep embedding lives in nn/temporal.py.)

    The mixer uses the temporal decoder's convention (``switch_spatial_to_temporal_mix``, merge ``learned``):
    ``out = (1 - sigmoid(m)) * spatial + sigmoid(m) * temporal``, ``m = time_mixer.mix_factor`` (init 0).
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 32, eps: float = VAE_EPS,
                 temporal_eps: float = TEMPORAL_EPS, merge_factor: float = 0.0, rngs: nnx.Rngs, dtype=jnp.float32):
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels=None, groups=groups, eps=eps,
                                               rngs=rngs, dtype=dtype)
        self.temporal_res_block = TemporalResnetBlock(out_channels, out_channels, temb_channels=None,
                                                      eps=temporal_eps, groups=groups, rngs=rngs, dtype=dtype)
        self.time_mixer = AlphaBlender(merge_factor, "learned", switch_spatial_to_temporal_mix=True, rngs=rngs)

    remat: bool = False  # recompute this block inside the backward pass (nn/remat.py); set by set_remat

    def __call__(self, x, *, num_frames: int, image_only_indicator=None):
        """x: folded frames ``(B*F, H, W, C_in)`` with ``F = num_frames`` -> ``(B*F, H, W, C_out)``."""
        if self.remat:
            return recompute_module(self, lambda blk, x: blk.forward(x, num_frames, image_only_indicator), x)
        return self.forward(x, num_frames, image_only_indicator)

    branches: int | None = None  # per-frame pieces of the 2D block (nn/branches.py); None: automatic

    def forward(self, x, num_frames: int, image_only_indicator=None):
        h = unfold_frames(per_sample(self.spatial_res_block, x, self.branches), num_frames)
        mixed = self.time_mixer(h, self.temporal_res_block(h), image_only_indicator)
        return fold_frames(mixed)


class MidBlockTemporalDecoder(nnx.Module):
    """diffusers ``MidBlockTemporalDecoder``: ``resnets[0]``, then ``attentions[0]`` and ``resnets[1]``.

    diffusers pairs ``resnets[1:]`` with its single attention, so a mid block with one resnet never runs its
    attention and resnets beyond the second are never run; we keep those parameters (checkpoints hold them)
    and reproduce the same forward pass.
    """

    def __init__(self, channels: int, *, num_layers: int, groups: int, add_attention: bool, resnet: ResnetFactory,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([resnet(channels, channels) for _ in range(num_layers)])
        self.attentions = (nnx.List([Attention(channels, heads=1, dim_head=channels, bias=True,
                                               upcast_attention=True, norm_num_groups=groups, eps=VAE_EPS,
                                               residual_connection=True, rngs=rngs, dtype=dtype)])
                           if add_attention else None)

    def __call__(self, h, **resnet_kwargs):
        """h: ``(B*F, H, W, C)`` -> ``(B*F, H, W, C)``."""
        h = self.resnets[0](h, **resnet_kwargs)
        if len(self.resnets) > 1:
            if self.attentions is not None:
                h = self.attentions[0](h)
            h = self.resnets[1](h, **resnet_kwargs)
        return h


class TemporalDecoder(Decoder):
    """diffusers ``TemporalDecoder``: the image decoder with spatio-temporal residual blocks (attention stays
    spatial) and a 3D conv ``time_conv_out`` (kernel (3, 1, 1)) after ``conv_out``.

    Folded latents ``(B*F, h, w, latent_channels)`` -> folded frames ``(B*F, h*f, w*f, out_channels)``; every
    call takes ``num_frames`` (F, static) and ``image_only_indicator`` ``(B, F)`` (unused by the learned mixer;
    passed as diffusers does).
    """

    def __init__(self, config: AutoencoderKLTemporalDecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        ch = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        resnet = self.make_resnet(config, rngs=rngs, dtype=dtype)
        self.conv_in = conv2d(config.latent_channels, ch[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlockTemporalDecoder(ch[0], num_layers=config.mid_block_layers, groups=groups,
                                                 add_attention=config.mid_block_add_attention, resnet=resnet,
                                                 rngs=rngs, dtype=dtype)
        # Same layout (``resnets`` + ``upsamplers``) as diffusers' UpBlockTemporalDecoder.
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=config.layers_per_block + 1,
                             add_upsample=i < len(ch) - 1, resnet=resnet, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=VAE_EPS, rngs=rngs)
        self.conv_out = conv2d(ch[-1], config.out_channels, 3, rngs=rngs, dtype=dtype)
        self.time_conv_out = conv3d(config.out_channels, config.out_channels, (3, 1, 1), rngs=rngs, dtype=dtype)

    def make_resnet(self, config, *, rngs: nnx.Rngs, dtype) -> ResnetFactory:
        return lambda cin, cout: VideoResBlock(cin, cout, groups=config.norm_num_groups, rngs=rngs, dtype=dtype)

    def features(self, z, *, num_frames: int, image_only_indicator=None):
        """Everything but ``time_conv_out``: ``(B*F, h, w, C_lat)`` -> ``(B*F, H, W, out_channels)``.

        Split out because the GAN recipe weighs its losses by their gradients at the last layer.
        """
        kw = dict(num_frames=num_frames, image_only_indicator=image_only_indicator)
        h = self.conv_in(z)
        h = self.mid(h, **kw)
        h = self.up(h, **kw)
        return self.head(h)

    def time_mix(self, x, *, num_frames: int):
        """``time_conv_out`` over the frames of each video: ``(B*F, H, W, C)`` -> ``(B*F, H, W, C)``."""
        return fold_frames(self.time_conv_out(unfold_frames(x, num_frames)))

    def __call__(self, z, *, num_frames: int, image_only_indicator=None):
        h = self.features(z, num_frames=num_frames, image_only_indicator=image_only_indicator)
        return self.time_mix(h, num_frames=num_frames)

    def set_remat(self, remat: bool) -> None:
        """Recompute every spatio-temporal residual block inside the backward pass (True) or keep its activations
        (False): the decoder fine-tune's memory at 320x512 is dominated by those blocks' activations."""
        for _, module in nnx.iter_graph(self):
            if isinstance(module, VideoResBlock):
                module.remat = bool(remat)

    def init_temporal_as_identity(self) -> None:
        """Makes every temporal layer the identity so the decoder equals its spatial (image) decoder:
        the last conv of each 3D residual block is zeroed (the block returns its input, whatever its mixer
        weight) and ``time_conv_out`` passes the centre frame through."""
        blocks = list(self.mid_block.resnets) + [r for block in self.up_blocks for r in block.resnets]
        for block in blocks:
            conv = block.temporal_res_block.conv2
            conv.kernel.set_value(jnp.zeros_like(conv.kernel[...]))
            conv.bias.set_value(jnp.zeros_like(conv.bias[...]))
        kernel = self.time_conv_out.kernel[...]  # (3, 1, 1, C, C), DHWIO
        centre = jnp.eye(kernel.shape[-1], dtype=kernel.dtype)
        self.time_conv_out.kernel.set_value(jnp.zeros_like(kernel).at[kernel.shape[0] // 2, 0, 0].set(centre))
        self.time_conv_out.bias.set_value(jnp.zeros_like(self.time_conv_out.bias[...]))


def is_temporal_path(path: tuple) -> bool:
    """Whether a parameter path belongs to a temporal layer (the project's naming rule: ``temporal`` or ``time_``)."""
    return any("temporal" in str(k) or str(k).startswith("time_") for k in path)


def _spatial_to_temporal_path(path: tuple) -> tuple:
    """Image-VAE parameter path -> the same parameter in the temporal-decoder layout (decoder resnets move
    under ``spatial_res_block``)."""
    if path[:3] == ("decoder", "mid_block", "resnets"):
        return path[:4] + ("spatial_res_block",) + path[4:]
    if path[:2] == ("decoder", "up_blocks") and len(path) > 4 and path[3] == "resnets":
        return path[:5] + ("spatial_res_block",) + path[5:]
    return path


class AutoencoderKLTemporalDecoder(nnx.Module):
    """diffusers ``AutoencoderKLTemporalDecoder``: the image ``encoder`` + ``quant_conv`` (per frame) and a
    :class:`TemporalDecoder` (optionally after a ``post_quant_conv``, for decoders made from an SD VAE)."""

    def __init__(self, config: AutoencoderKLTemporalDecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        c = config.latent_channels
        self.encoder = Encoder(config.image_config(), rngs=rngs, dtype=dtype)
        self.decoder = TemporalDecoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = conv2d(2 * c, 2 * c, 1, rngs=rngs, dtype=dtype) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(c, c, 1, rngs=rngs, dtype=dtype) if config.use_post_quant_conv else None

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, x) -> DiagonalGaussian:
        """x: images ``(B, H, W, in_channels)`` or videos ``(B, F, H, W, in_channels)`` in [-1, 1], encoded
        frame by frame; the posterior's arrays are ``(B, h, w, C)`` or ``(B, F, h, w, C)``."""
        if x.ndim == 5:
            post = self.encode(fold_frames(x))
            f = x.shape[1]
            # from_moments already clipped logvar; rebuild without clipping twice.
            return DiagonalGaussian(mean=unfold_frames(post.mean, f), logvar=unfold_frames(post.logvar, f))
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    # ------------------------------------------------------------------------------------------ decoding

    def decode_video(self, z, image_only_indicator=None):
        """z: unscaled latents ``(B, F, h, w, C)``, each video decoded as one temporal window of F frames
        -> ``(B, F, h*f, w*f, out_channels)``. ``image_only_indicator`` ``(B, F)`` defaults to zeros (diffusers)."""
        b, f = z.shape[:2]
        zf = fold_frames(z.astype(self.dtype))
        if self.post_quant_conv is not None:
            zf = self.post_quant_conv(zf)
        if image_only_indicator is None:
            image_only_indicator = jnp.zeros((b, f), self.dtype)
        return unfold_frames(self.decoder(zf, num_frames=f, image_only_indicator=image_only_indicator), f)

    def decode(self, z, num_frames: int | None = None, decode_chunk_size: int | None = None):
        """Latents -> frames.

        z: videos ``(B, F, h, w, C)`` -> ``(B, F, H, W, out_channels)``; or, as diffusers' ``decode``, folded
        latents ``(B*F, h, w, C)`` with ``num_frames=F`` (default 1: independent images) -> ``(B*F, H, W, out)``.

        ``decode_chunk_size=k`` follows diffusers' chunked decode (the SVD pipeline's ``decode_latents``)
        exactly: latents are flattened to ``B*F`` frames and cut into consecutive chunks of ``k``, each decoded
        on its own as one video of ``k`` frames (the last chunk may be shorter). So chunks do not see each
        other's frames, and when ``F`` is not a multiple of ``k`` with ``B > 1`` a chunk holds the end of one
        video and the start of the next, as in diffusers. The chunks run in a ``lax.fori_loop`` that writes
        into the output buffer, so the working memory stays that of one chunk whatever the number of frames.
        """
        if z.ndim == 4:
            n = 1 if num_frames is None else num_frames
            if z.shape[0] % n:
                raise ValueError(f"decode: {z.shape[0]} folded frames are not a multiple of num_frames={n}")
            return fold_frames(self.decode(unfold_frames(z, n), decode_chunk_size=decode_chunk_size))
        if z.ndim != 5:
            raise ValueError(f"decode: expected latents (B, F, h, w, C) or (B*F, h, w, C), got shape {z.shape}")
        if num_frames is not None and num_frames != z.shape[1]:
            raise ValueError(f"decode: num_frames={num_frames} does not match latents with {z.shape[1]} frames")
        if decode_chunk_size is None:
            return self.decode_video(z)
        if decode_chunk_size < 1:
            raise ValueError(f"decode: decode_chunk_size must be positive, got {decode_chunk_size}")
        return self._decode_chunked(z, decode_chunk_size)

    def _decode_chunked(self, z, k: int):
        b, f = z.shape[:2]
        flat = fold_frames(z)  # (N, h, w, C); chunks run over batch and frames together, as in diffusers
        n = flat.shape[0]
        if k >= n:
            return unfold_frames(self.decode_video(flat[None])[0], f)
        full, rest = divmod(n, k)
        s = self.config.downscale_factor
        out = jnp.zeros((n, flat.shape[1] * s, flat.shape[2] * s, self.config.out_channels), self.dtype)

        def decode_chunk(i, out):
            chunk = jax.lax.dynamic_slice_in_dim(flat, i * k, k, axis=0)
            frames = self.decode_video(chunk[None])[0]
            return jax.lax.dynamic_update_slice_in_dim(out, frames.astype(out.dtype), i * k, axis=0)

        mesh = current_mesh()
        p = mesh.shape.get(CONTEXT_AXIS, 1) if mesh is not None else 1
        done = 0
        if p > 1 and full >= p:
            # One chunk per device of the context axis at once: p chunks decoded as a batch of p videos (each
            # still its own temporal window), the batch split over the devices; inside, no frame constraints.
            rounds = full // p
            group_spec = NamedSharding(mesh, P(CONTEXT_AXIS))

            def decode_group(i, out):
                group = jax.lax.dynamic_slice_in_dim(flat, i * p * k, p * k, axis=0)
                group = jax.lax.with_sharding_constraint(group.reshape((p, k) + flat.shape[1:]), group_spec)
                with activation_mesh(None):
                    frames = self.decode_video(group)
                frames = frames.reshape((p * k,) + frames.shape[2:])
                return jax.lax.dynamic_update_slice_in_dim(out, frames.astype(out.dtype), i * p * k, axis=0)

            out = jax.lax.fori_loop(0, rounds, decode_group, out)
            done = rounds * p
        out = jax.lax.fori_loop(done, full, decode_chunk, out)
        if rest:
            frames = self.decode_video(flat[full * k:][None])[0]
            out = jax.lax.dynamic_update_slice_in_dim(out, frames.astype(out.dtype), full * k, axis=0)
        return unfold_frames(out, f)

    def __call__(self, x, sample_posterior: bool = False, key: jax.Array | None = None,
                 decode_chunk_size: int | None = None):
        """Reconstruction of images ``(B, H, W, C)`` (each its own 1-frame video, as diffusers' default) or
        videos ``(B, F, H, W, C)``; samples the posterior (needs ``key``) or takes its mode."""
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKLTemporalDecoder: sample_posterior=True needs a PRNG key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z, decode_chunk_size=decode_chunk_size)

    # ------------------------------------------------------------------------------- from an image VAE

    @classmethod
    def from_image_vae(cls, vae: "AutoencoderKL", *, rngs: nnx.Rngs | None = None,
                       dtype=None) -> "AutoencoderKLTemporalDecoder":
        """Video LDM's starting point: a temporal decoder whose spatial weights are those of ``vae`` (an
        :class:`AutoencoderKL`; a folder loads through :mod:`vldm_jax.checkpoints`) and whose temporal layers start
        as the identity, so it decodes every frame exactly as the image decoder does until it is fine-tuned.

        Temporal initialisation: the 3D residual blocks' first convs are random (from ``rngs``), their norms
        the identity, their last convs zero (so each block returns its input), the mixers' logits 0, and
        ``time_conv_out`` passes the centre frame through.
        """
        if not isinstance(vae, AutoencoderKL):  # modules don't load: a folder is the checkpoints layer's
            raise ConfigError(f"from_image_vae: expected an AutoencoderKL, got {type(vae).__name__}")
        config = AutoencoderKLTemporalDecoderConfig.from_image_config(vae.config)
        dtype = vae.dtype if dtype is None else dtype
        rngs = rngs or nnx.Rngs(0)
        # Built abstractly: initialising the spatial half only to overwrite it costs a compile per shape.
        abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))
        graphdef, state = nnx.split(abstract)
        target = {tuple(p): v for p, v in nnx.to_flat_state(state)}
        values = {}
        for path, var in nnx.to_flat_state(nnx.state(vae)):
            dst = _spatial_to_temporal_path(tuple(path))
            if dst not in target or target[dst].get_value().shape != var.get_value().shape:
                raise ConfigError(f"from_image_vae: image VAE parameter {'.'.join(map(str, path))} has no "
                                  "place in the temporal decoder")
            values[dst] = jnp.asarray(var.get_value(), target[dst].get_value().dtype)
        for path, var in target.items():
            if path in values:
                continue
            if not is_temporal_path(path):  # pragma: no cover - a layout bug, not a user error
                raise AssertionError(f"from_image_vae: spatial parameter {path} left unset")
            shape, vdtype = var.get_value().shape, var.get_value().dtype
            if path[-2:] == ("conv1", "kernel"):
                # The 3D blocks' first convs keep a random init (what Conv would draw) so that they learn;
                # the zeroed last convs (below) silence them at the start.
                values[path] = nnx.initializers.lecun_normal()(rngs.params(), shape, vdtype)
            elif path[-1] == "scale":
                values[path] = jnp.ones(shape, vdtype)
            else:
                values[path] = jnp.zeros(shape, vdtype)
        model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in target.items()]))
        model.decoder.init_temporal_as_identity()
        return model
