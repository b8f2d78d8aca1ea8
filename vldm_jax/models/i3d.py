"""Inception-I3D (Carreira & Zisserman 2017), the feature network of FVD, channels-last in Flax NNX.

Module names mirror the PyTorch port that the FVD implementations load (piergiaj/pytorch-i3d, shipped by
TATS, StyleGAN-V and cd-fvd as ``pytorch_i3d.InceptionI3d``): ``Mixed_4b.b1b.conv3d``, ``Conv3d_1a_7x7.bn``,
``logits.conv3d``, so its state dicts load through a rename table (checkpoints/i3d.py).

Every convolution and max-pool uses TensorFlow ``SAME`` padding with zeros (the port pads with ``F.pad``
before a valid op; all pooled inputs are ReLU outputs, so zero padding is what it computes). The head is an
average pool (2, 7, 7) with stride 1 and no padding, a 1x1x1 convolution to the logits, and the mean over
the remaining positions: the 400 logits averaged over time that FVD uses as features. A 224x224 input of
16 frames reaches the head as (2, 7, 7); the pool needs at least that, so the smallest input is 9 frames at
193x193 (``min_input``). ``width`` scales every channel count (1.0 for the real network; the small network
that judges moving shapes uses 1/8 with a (2, 2, 2) head pool for 64x64 clips).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import UserError

# (name, output channels of the six branches) of the nine inception modules, in order.
_MIXED = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
# Max-pools that follow an endpoint: (kernel, stride).
_POOL_AFTER = {
    "Conv3d_1a_7x7": ("MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    "Conv3d_2c_3x3": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_3c": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_4f": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}


@dataclasses.dataclass(frozen=True)
class I3DConfig:
    """``width`` multiplies every channel count; ``pool_size`` is the head's average pool (frames, h, w)."""

    num_classes: int = 400
    in_channels: int = 3
    width: float = 1.0
    pool_size: tuple[int, int, int] = (2, 7, 7)
    batch_norm_eps: float = 1e-5  # the PyTorch port's BatchNorm3d default
    # Momentum of the running statistics when a network is trained here (torch momentum 0.001 = 1 - 0.999).
    batch_norm_momentum: float = 0.999

    def __post_init__(self):
        if self.width <= 0 or self.num_classes < 1 or self.in_channels < 1:
            raise UserError(f"I3DConfig: width, num_classes and in_channels must be positive, got {self}")
        object.__setattr__(self, "pool_size", tuple(int(p) for p in self.pool_size))

    def channels(self, c: int) -> int:
        return max(1, int(round(c * self.width)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "I3DConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def min_input(self) -> tuple[int, int]:
        """(frames, pixels) of the smallest input whose features reach the head's pool size."""
        t, h, _ = self.pool_size
        # time is strided by 2 three times (conv 1a, pools 4a and 5a); space five times.
        return 8 * (t - 1) + 1, 32 * (h - 1) + 1


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Unit3D(nnx.Module):
    """conv3d (SAME, no bias) -> BatchNorm -> ReLU, or conv with bias only (the logits)."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, config: I3DConfig,
                 rngs: nnx.Rngs, batch_norm: bool = True, activation: bool = True, dtype=jnp.float32):
        self.stride = tuple(stride)
        self.activation = activation
        self.conv3d = nnx.Conv(cin, cout, tuple(kernel), strides=self.stride, padding="SAME",
                               use_bias=not batch_norm, dtype=dtype, rngs=rngs)
        self.bn = (nnx.BatchNorm(cout, epsilon=config.batch_norm_eps, momentum=config.batch_norm_momentum,
                                 use_running_average=True, dtype=dtype, rngs=rngs) if batch_norm else None)

    def __call__(self, x):
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return jax.nn.relu(x) if self.activation else x


def max_pool_same(x, kernel, stride):
    """Max-pool over (frames, h, w) of ``(B, F, H, W, C)`` with SAME padding by zeros, as the PyTorch port pads."""
    pads = [(0, 0)] + [_same_pads(s, k, st) for s, k, st in zip(x.shape[1:4], kernel, stride)] + [(0, 0)]
    x = jnp.pad(x, pads)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1), "VALID")


class InceptionModule(nnx.Module):
    def __init__(self, cin: int, out: tuple[int, ...], *, config: I3DConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        c = [config.channels(o) for o in out]
        kw = dict(config=config, rngs=rngs, dtype=dtype)
        self.b0 = Unit3D(cin, c[0], **kw)
        self.b1a = Unit3D(cin, c[1], **kw)
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3), **kw)
        self.b2a = Unit3D(cin, c[3], **kw)
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3), **kw)
        self.b3b = Unit3D(cin, c[5], **kw)
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def __call__(self, x):
        b3 = self.b3b(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], axis=-1)


class InceptionI3d(nnx.Module):
    """``__call__(videos (B, F, H, W, 3) in [-1, 1]) -> logits (B, num_classes)`` averaged over time.

    ``features(videos, endpoint="logits"|"pool")``: the logits, or the 1024-d (x width) average-pooled
    activations before the logit layer (also averaged over the remaining positions).
    """

    def __init__(self, config: I3DConfig = I3DConfig(), *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        kw = dict(config=config, rngs=rngs, dtype=dtype)
        ch = config.channels
        self.Conv3d_1a_7x7 = Unit3D(config.in_channels, ch(64), (7, 7, 7), (2, 2, 2), **kw)
        self.Conv3d_2b_1x1 = Unit3D(ch(64), ch(64), **kw)
        self.Conv3d_2c_3x3 = Unit3D(ch(64), ch(192), (3, 3, 3), **kw)
        cin = ch(192)
        for name, out in _MIXED:
            module = InceptionModule(cin, out, **kw)
            setattr(self, name, module)
            cin = module.out_channels
        self.feature_dim = cin
        self.logits = Unit3D(cin, config.num_classes, batch_norm=False, activation=False, **kw)

    def _trunk(self, x):
        order = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"] + [name for name, _ in _MIXED]
        for name in order:
            x = getattr(self, name)(x)
            if name in _POOL_AFTER:
                _, kernel, stride = _POOL_AFTER[name]
                x = max_pool_same(x, kernel, stride)
        return x

    def _pooled(self, x):
        pool = self.config.pool_size
        if any(s < p for s, p in zip(x.shape[1:4], pool)):
            t, s = self.config.min_input()
            raise UserError(f"I3D input of {x.shape[1]} frames at {x.shape[2]}x{x.shape[3]} is too small for "
                            f"the head's pool {pool}; it needs at least {t} frames at {s}x{s}")
        # Average pool, stride 1, no padding (nn.AvgPool3d in the port): a window sum over the valid positions.
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *pool, 1), (1, 1, 1, 1, 1), "VALID") / math.prod(pool)

    def features(self, videos, endpoint: str = "logits"):
        x = self._pooled(self._trunk(videos))
        if endpoint == "pool":
            return x.mean(axis=(1, 2, 3))
        if endpoint != "logits":
            raise UserError(f"I3D endpoint must be 'logits' or 'pool', got {endpoint!r}")
        # The port squeezes the (1, 1) spatial positions of a 224 input and averages the logits over time.
        return self.logits(x).mean(axis=(1, 2, 3))

    def __call__(self, videos):
        return self.features(videos, "logits")
