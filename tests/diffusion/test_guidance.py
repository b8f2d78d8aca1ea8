"""Classifier-free guidance: one batched call, scalar and per-frame scales, pytree conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vldm_jax.diffusion.guidance import (
    classifier_free_guidance,
    guidance_weights,
    guided_denoiser,
    per_frame_scales,
)
from vldm_jax.diffusion.samplers import make_sampler, sample


def toy_model(calls):
    """A conditional 'denoiser' whose output depends on x, t and every conditioning leaf."""

    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        ctx = cond["context"].mean(axis=(1, 2))  # (B,)
        extra = cond["image"].sum(axis=-1)  # (B,)
        shape = (-1,) + (1,) * (x.ndim - 1)
        t = jnp.asarray(t, jnp.float32)
        t = t.reshape(shape) if t.ndim else t
        return jnp.tanh(x) * ctx.reshape(shape) + extra.reshape(shape) + 0.001 * t

    return model_fn


def conditioning(rng, b, value):
    return {
        "context": jnp.asarray(rng.randn(b, 5, 3).astype(np.float32) + value),
        "image": jnp.asarray(rng.randn(b, 2).astype(np.float32)),
    }


def test_scalar_scale_one_batched_call():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 4, 4, 3).astype(np.float32))
    cond, uncond = conditioning(rng, 2, 1.0), conditioning(rng, 2, 0.0)
    calls = []
    model = toy_model(calls)
    out = classifier_free_guidance(model, x, 500, cond, uncond, 7.5)
    assert calls == [4]
    c, u = model(x, 500, cond), model(x, 500, uncond)
    np.testing.assert_allclose(out, u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)


def test_scale_one_skips_unconditional_branch():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 4, 4, 3).astype(np.float32))
    calls = []
    out = classifier_free_guidance(toy_model(calls), x, 3, conditioning(rng, 2, 1.0), conditioning(rng, 2, 0.0), 1.0)
    assert calls == [2] and out.shape == x.shape


def test_per_frame_scale_matches_svd_broadcast():
    rng = np.random.RandomState(1)
    b, f = 2, 5
    x = jnp.asarray(rng.randn(b, f, 4, 4, 3).astype(np.float32))
    cond, uncond = conditioning(rng, b, 1.0), conditioning(rng, b, -0.5)
    t = jnp.asarray([10.0, 20.0])  # per-sample timesteps are doubled with the batch
    scales = per_frame_scales(1.0, 3.0, f)
    # diffusers' SVD pipeline: torch.linspace(min, max, F) broadcast as (1, F, 1, 1, 1).
    np.testing.assert_allclose(scales, torch.linspace(1.0, 3.0, f).numpy(), rtol=1e-6)
    calls = []
    model = toy_model(calls)
    out = jax.jit(lambda x: classifier_free_guidance(model, x, t, cond, uncond, scales))(x)
    c, u = np.asarray(model(x, t, cond)), np.asarray(model(x, t, uncond))
    expected = u + np.asarray(scales).reshape(1, f, 1, 1, 1) * (c - u)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_guidance_weights_shapes():
    assert guidance_weights(2.0, 5).shape == ()
    assert guidance_weights(jnp.ones(7), 5).shape == (1, 7, 1, 1, 1)
    assert guidance_weights(jnp.ones(7), 4, frame_axis=3).shape == (1, 1, 1, 7)
    with pytest.raises(ValueError):
        guidance_weights(jnp.ones((2, 3)), 5)


def test_guided_sampling_under_jit():
    rng = np.random.RandomState(2)
    cond, uncond = conditioning(rng, 1, 1.0), conditioning(rng, 1, 0.0)
    sampler = make_sampler("dpm++", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 6)
    denoise = guided_denoiser(toy_model([]), cond, uncond, jnp.asarray(5.0))
    out = jax.jit(lambda n: sample(denoise, sampler, n))(jnp.asarray(rng.randn(1, 4, 4, 3).astype(np.float32)))
    assert out.shape == (1, 4, 4, 3) and bool(jnp.isfinite(out).all())
