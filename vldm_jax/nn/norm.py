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
        return self.over_pieces([x])[0]

    def over_pieces(self, pieces):
        """The normalisation of the pieces' concatenation along any axis but the batch axis, returned as pieces:
        the statistics are summed over all pieces, then each piece is normalised alone (nn/branches.py)."""
        # Per-channel sums first, then per group: XLA's CPU code reduces the contiguous (N, L, C) layout far faster
        # than a (N, L, G, C/G) reduction over axes 1 and 3 (2.9x for 8x32x32x64, docs/benchmarks.md). Still two
        # passes (mean, then the centred squares) as PyTorch computes it; the normalisation and the affine map
        # fold into one multiply-add per element.
        #
        # A batch of one (a single video through a 3D block) is laid out (L, C), not (1, L, C): the backward pass
        # of the (1, C) statistics broadcast over a (1, L, C) array is a sum over its middle axis, which XLA's CPU
        # (YNNPACK) fusion of a product and a reduction ran 40-100x slower than the same sum over axis 0 of
        # (L, C) (a (1, 8192, 64) sum of products: 7.2 vs 0.13 ms; docs/benchmarks.md).
        n, c, g = pieces[0].shape[0], pieces[0].shape[-1], self.num_groups
        if n == 1:
            xf = [x.astype(jnp.float32).reshape(-1, c) for x in pieces]
            count = sum(x.shape[0] for x in xf) * (c // g)
            sums, per_row = (lambda a: a.sum(axis=0, keepdims=True)), (lambda a: a)
        else:
            xf = [x.astype(jnp.float32).reshape(n, -1, c) for x in pieces]
            count = sum(x.shape[1] for x in xf) * (c // g)
            sums, per_row = (lambda a: a.sum(axis=1)), (lambda a: a[:, None])
        total = sum(sums(x) for x in xf)
        mean = jnp.repeat(total.reshape(n, g, -1).sum(-1) / count, c // g, axis=1)  # (N, C)
        centred = [x - per_row(mean) for x in xf]
        var = sum(sums(jnp.square(x)) for x in centred).reshape(n, g, -1).sum(-1) / count
        scale = jnp.repeat(jnp.reciprocal(jnp.sqrt(var + self.eps)), c // g, axis=1)  # (N, C)
        if self.scale is not None:
            scale = scale * self.scale[...]
        out = []
        for x, cx in zip(pieces, centred):
            y = cx * per_row(scale)
            if self.bias is not None:
                y = y + self.bias[...]
            out.append(y.reshape(x.shape).astype(x.dtype))
        return out


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
