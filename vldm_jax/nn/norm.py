"""Normalisation layers with PyTorch's numerics (two-pass variance, float32 statistics)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last input ``(N, ..., C)``; statistics over every non-batch axis of a group.

    A video ``(B, F, H, W, C)`` is normalised over all its frames together (Video LDM's 3D blocks),
    a folded batch ``(B*F, H, W, C)`` frame by frame.
    """

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, affine: bool = True, rngs: nnx.Rngs):
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32)) if affine else None

    def __call__(self, x):
        dtype = x.dtype
        shape = x.shape
        c = shape[-1]
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(shape[0], -1, g, c // g)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        xf = (xf - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        xf = xf.reshape(shape)
        if self.scale is not None:
            xf = xf * self.scale[...] + self.bias[...]
        return xf.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, float32 statistics, PyTorch default eps 1e-5."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, use_bias: bool = True, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32)) if affine and use_bias else None

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        xf = (xf - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        if self.scale is not None:
            xf = xf * self.scale[...]
        if self.bias is not None:
            xf = xf + self.bias[...]
        return xf.astype(dtype)
