"""The video discriminator of Video LDM's decoder fine-tuning: a PatchGAN (pix2pix / taming
``NLayerDiscriminator``) made of 3D convolutions, so that each logit judges a space-time patch and
temporal flicker is something it can see.

Clips ``(B, F, H, W, C)`` in [-1, 1] -> logits ``(B, F', H', W', 1)``: the first convolution and
``num_layers - 1`` more halve H and W (kernel 4, padding 1), two stride-1 convolutions follow (the last
outputs one channel). Time uses kernel ``temporal_kernel`` with 'same' padding, stride 1 unless
``temporal_downsample``. GroupNorm (batch-independent, so logits do not depend on what else is in the
batch) follows every inner convolution; LeakyReLU 0.2 every convolution but the last.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.norm import GroupNorm

NORMS = ("group", "none")


@dataclasses.dataclass(frozen=True)
class PatchDiscriminator3DConfig:
    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3  # strided inner convolutions + 1: the 70x70 PatchGAN at 3
    max_channel_mult: int = 8
    temporal_kernel: int = 3
    temporal_downsample: bool = False  # stride 2 over frames in the strided inner convolutions
    norm: str = "group"
    norm_num_groups: int = 32

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ConfigError(f"PatchDiscriminator3D: norm {self.norm!r} is not one of {NORMS}")
        if self.num_layers < 1:
            raise ConfigError("PatchDiscriminator3D: num_layers must be at least 1")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ConfigError(f"PatchDiscriminator3D: temporal_kernel must be odd, got {self.temporal_kernel}")
        if self.norm == "group":
            bad = [c for c in self.channels[1:] if c % self.norm_num_groups]
            if bad:
                raise ConfigError(f"PatchDiscriminator3D: norm_num_groups {self.norm_num_groups} does not divide "
                                  f"the channels {bad}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of the first and every inner convolution."""
        return tuple(self.base_channels * min(2 ** i, self.max_channel_mult) for i in range(self.num_layers + 1))


class PatchDiscriminator3D(nnx.Module):
    """``conv_in`` -> ``convs[i]`` + ``norms[i]`` -> ``conv_out``; see the module docstring."""

    def __init__(self, config: PatchDiscriminator3DConfig = PatchDiscriminator3DConfig(), *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.config = config
        kt = config.temporal_kernel
        ch = config.channels
        # The GAN literature's init (DCGAN, pix2pix): N(0, 0.02) kernels.
        init = nnx.initializers.normal(0.02)

        def conv(cin, cout, stride_t, stride_s, bias=True):
            return nnx.Conv(cin, cout, (kt, 4, 4), strides=(stride_t, stride_s, stride_s),
                            padding=((kt // 2, kt // 2), (1, 1), (1, 1)), use_bias=bias, kernel_init=init,
                            dtype=dtype, rngs=rngs)

        use_norm = config.norm == "group"
        st = 2 if config.temporal_downsample else 1
        self.conv_in = conv(config.in_channels, ch[0], 1, 2)
        # Strided inner convolutions, then one at stride 1; no bias where a norm follows.
        self.convs = nnx.List([conv(ch[i - 1], ch[i], st if i < config.num_layers else 1,
                                    2 if i < config.num_layers else 1, bias=not use_norm)
                               for i in range(1, config.num_layers + 1)])
        self.norms = (nnx.List([GroupNorm(config.norm_num_groups, ch[i], eps=1e-5, rngs=rngs)
                                for i in range(1, config.num_layers + 1)]) if use_norm else None)
        self.conv_out = conv(ch[-1], 1, 1, 1)

    def __call__(self, x):
        """x: clips ``(B, F, H, W, C)`` -> patch logits ``(B, F', H', W', 1)`` (float32)."""
        h = jax.nn.leaky_relu(self.conv_in(x), 0.2)
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if self.norms is not None:
                h = self.norms[i](h)
            h = jax.nn.leaky_relu(h, 0.2)
        return self.conv_out(h).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss ``(mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2`` (taming's scale)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's side of the hinge GAN: ``-mean D(fake)``."""
    return -jnp.mean(logits_fake)
