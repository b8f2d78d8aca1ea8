"""Random weights without running initialisers: eager JAX init compiles one kernel per op and shape, which
dominates tiny tests on a CPU. Numpy draws are instant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomize(model: nnx.Module, seed: int = 0, noise: float = 0.05) -> nnx.Module:
    """``model`` with every parameter redrawn: kernels ~ N(0, 1/fan_in), norm scales 1 + noise, everything
    else (biases, mixing logits) noise. Works on abstract models from ``nnx.eval_shape``."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def draw(path, x):
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        shape = tuple(x.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        elif name == "scale":
            value = 1 + noise * rng.normal(size=shape)
        else:
            value = noise * rng.normal(size=shape)
        return jnp.asarray(value, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def random_model(factory, seed: int = 0) -> nnx.Module:
    """``factory()`` built abstractly and filled by :func:`randomize`."""
    return randomize(nnx.eval_shape(factory), seed)
