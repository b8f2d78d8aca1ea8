"""The KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``), channels-last.

Images ``(B, H, W, 3)`` in [-1, 1] encode to a diagonal Gaussian over latents ``(B, H/f, W/f, latent_channels)``
with ``f = 2 ** (len(block_out_channels) - 1)``; latents decode back to images. As in diffusers, the latent
``scaling_factor`` (and ``shift_factor``) is not applied here: pipelines apply it.

Attribute names mirror diffusers so checkpoint keys map by the generic rule of
:mod:`vldm_jax.checkpoints.convert` (``encoder.down_blocks.0.resnets.1.conv1.weight`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.attention import Attention
from vldm_jax.nn.norm import GroupNorm
from vldm_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d

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
        """KL(self || other) per example ``(B,)``, summed over latent axes; ``other`` defaults to N(0, I)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


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

    def __call__(self, h, **resnet_kwargs):
        """h: ``(N, H, W, C_in)`` -> ``(N, 2H, 2W, C_out)`` (or ``(N, H, W, C_out)`` without upsampling)."""
        for resnet in self.resnets:
            h = resnet(h, **resnet_kwargs)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
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

    def head(self, h, **resnet_kwargs):
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))

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
