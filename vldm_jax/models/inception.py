"""The FID Inception-v3 (TensorFlow's ``inception-2015-12-05`` graph as pytorch-fid ports it), channels-last in
Flax NNX: the network whose 2048-d ``pool3`` features define FID.

Module names are torchvision's ``Inception3`` names (``Mixed_5b.branch1x1.conv``, ``Conv2d_1a_3x3.bn``, ``fc``),
which are the keys of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; checkpoints/inception.py reads it.
pytorch-fid builds torchvision's Inception3 and patches it where the TensorFlow graph differs
(``FIDInceptionA``/``C``/``E_1``/``E_2``); this module is that patched network:

- every convolution is ``BasicConv2d``: conv without bias, BatchNorm (eps 1e-3), ReLU;
- the pool branch of the A, C and first E blocks averages a 3x3 window over the pixels inside the image only
  (TensorFlow's ``SAME`` average pool: ``count_include_pad=False``);
- the pool branch of the last E block (``Mixed_7c``) is a 3x3 *max* pool (stride 1, padding 1);
- the reduction blocks (``Mixed_6a``, ``Mixed_7a``) and the stem's pools are 3x3 max pools, stride 2, no padding.

``features`` returns the global average of ``Mixed_7c`` (2048-d, pytorch-fid's block 3 / ``pool3``); ``logits``
the 1008-way ``fc`` (TensorFlow's classes, for an Inception Score). Input: ``(B, H, W, 3)`` in [-1, 1], at least
75x75 (299x299 in the FID protocol; eval/fid.py resizes). ``width`` scales every channel count (1.0 is the
real network; tests use a narrow one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import UserError

MIN_SIZE = 75  # 75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1: the smallest input that reaches Mixed_7c


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    num_classes: int = 1008  # the TF graph's fc (1001 ImageNet classes padded to 1008)
    width: float = 1.0
    batch_norm_eps: float = 1e-3  # torchvision's BasicConv2d

    def __post_init__(self):
        if self.width <= 0 or self.num_classes < 1:
            raise UserError(f"InceptionConfig: width and num_classes must be positive, got {self}")

    def channels(self, c: int) -> int:
        return max(1, int(round(c * self.width)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InceptionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """conv (no bias, explicit zero padding as torch's) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride=1, padding=0, config: InceptionConfig,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                             use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=config.batch_norm_eps, use_running_average=True, dtype=dtype,
                                rngs=rngs)
        self.out_channels = cout

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, kernel: int, stride: int, padding: int = 0):
    """``(B, H, W, C)`` max pool; padding counts as -inf (torch's ``max_pool2d``)."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pads)


def avg_pool_same(x):
    """3x3 average pool, stride 1, over the pixels inside the image only (``count_include_pad=False``)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, **kw):
        c = kw["config"].channels
        self.branch1x1 = BasicConv2d(cin, c(64), 1, **kw)
        self.branch5x5_1 = BasicConv2d(cin, c(48), 1, **kw)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(cin, c(pool_features), 1, **kw)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_same(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, **kw):
        c = kw["config"].channels
        self.branch3x3 = BasicConv2d(cin, c(384), 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2, **kw)
        self.out_channels = c(384) + c(96) + cin

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 3, 2),
        ], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, channels_7x7: int, **kw):
        c = kw["config"].channels
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(cin, c(192), 1, **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, c(192), (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(cin, c(192), 1, **kw)
        self.out_channels = 4 * c(192)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, **kw):
        c = kw["config"].channels
        self.branch3x3_1 = BasicConv2d(cin, c(192), 1, **kw)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), 3, stride=2, **kw)
        self.out_channels = c(320) + c(192) + cin

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``"max"``: FIDInceptionE_2 (Mixed_7c)."""

    def __init__(self, cin: int, pool: str, **kw):
        c = kw["config"].channels
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, c(320), 1, **kw)
        self.branch3x3_1 = BasicConv2d(cin, c(384), 1, **kw)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(cin, c(192), 1, **kw)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool_same(x)
        return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """``__call__(images (B, H, W, 3) in [-1, 1]) -> (B, 2048)`` pool3 features (``features``); ``logits``."""

    def __init__(self, config: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        kw = dict(config=config, rngs=rngs, dtype=dtype)
        c = config.channels
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3, **kw)
        self.Mixed_5b = InceptionA(c(192), 32, **kw)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, **kw)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, **kw)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, **kw)
        cin = self.Mixed_6a.out_channels
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            setattr(self, name, InceptionC(cin, c7, **kw))
            cin = getattr(self, name).out_channels
        self.Mixed_7a = InceptionD(cin, **kw)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, "avg", **kw)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, "max", **kw)
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = nnx.Linear(self.feature_dim, config.num_classes, dtype=dtype, rngs=rngs)
        self.has_logits = True  # False when loaded from a file without fc (checkpoints/inception.py)

    @staticmethod
    def feature_dim_of(config: InceptionConfig) -> int:
        c = config.channels
        return c(320) + 4 * c(384) + c(192)

    def features(self, images):
        if min(images.shape[1:3]) < MIN_SIZE:
            raise UserError(f"Inception input of {images.shape[1]}x{images.shape[2]} is smaller than its minimum "
                            f"{MIN_SIZE}x{MIN_SIZE}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(axis=(1, 2))  # AdaptiveAvgPool2d(1): pool3

    def logits(self, images):
        """The 1008 class logits (torchvision applies dropout before fc only in training)."""
        return self.fc(self.features(images))

    def __call__(self, images):
        return self.features(images)
