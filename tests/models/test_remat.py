"""``nn/remat.recompute_in_backward``: gradients equal to the plain function's (closed-over traced values included),
and the recomputation really runs in the backward pass: XLA's peak for a chain of layers falls, where
``jax.checkpoint`` on this CPU backend leaves it (the recomputations are scheduled beside the forward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vldm_jax.nn.remat import recompute_in_backward


def _layer(w, x):
    h = jnp.tanh(x @ w)
    return x + jnp.sin(x) * jnp.cos(h @ w.T)


def test_gradients_match_the_plain_function():
    keys = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(keys[0], (16, 32)) * 0.3
    x = jax.random.normal(keys[1], (5, 16))
    scale = jax.random.normal(keys[2], (16,))

    def plain(w, x, scale):
        return jnp.sum(_layer(w, x * scale) ** 2)

    def rematted(w, x, scale):
        # ``scale`` is closed over: its gradient must still flow (closure_convert makes it an input).
        return jnp.sum(recompute_in_backward(lambda w, x: _layer(w, x * scale), w, x) ** 2)

    v0, g0 = jax.value_and_grad(plain, argnums=(0, 1, 2))(w, x, scale)
    v1, g1 = jax.jit(jax.value_and_grad(rematted, argnums=(0, 1, 2)))(w, x, scale)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # Integer inputs pass through (float0 cotangents), as they do for jax.checkpoint.
    out = jax.grad(lambda x: jnp.sum(recompute_in_backward(lambda x, n: x * n, x, jnp.int32(3))))(x)
    np.testing.assert_allclose(out, 3.0)


def _temp_bytes(remat) -> int:
    depth, width = 24, 256
    ws = jax.random.normal(jax.random.key(1), (depth, width, 2 * width)) * 0.05
    x = jax.random.normal(jax.random.key(2), (512, width))

    def loss(ws, x):
        for i in range(depth):
            x = remat(_layer, ws[i], x)
        return jnp.mean(x ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_recomputation_lowers_the_peak():
    none = _temp_bytes(lambda f, *a: f(*a))
    ours = _temp_bytes(recompute_in_backward)
    # Each layer keeps ~6 activations of 512 KiB without remat; with recomputation only its input is kept.
    assert ours < 0.5 * none, (ours, none)
