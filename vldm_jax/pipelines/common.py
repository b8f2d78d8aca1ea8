"""What every pipeline shares: the initial noise, and host-side progress for compiled sampling loops.

A compiled loop calls one fixed host function per step (:func:`advance`, through ``jax.debug.callback``),
so showing or hiding a bar never forces a recompile; :func:`denoising_bar` installs the bar it advances.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from vldm_jax.errors import UserError

_BAR: list = [None]


def advance(_step) -> None:
    """The per-step callback: advances the installed bar, if any (steps may arrive out of order)."""
    if _BAR[0] is not None:
        _BAR[0].update(1)


@contextlib.contextmanager
def denoising_bar(total: int, enabled: bool = True):
    """Shows a tqdm bar of ``total`` steps while the block runs (nothing when not ``enabled``)."""
    if enabled:
        from tqdm.auto import tqdm

        _BAR[0] = tqdm(total=total, desc="denoising")
    try:
        yield
    finally:
        if _BAR[0] is not None:
            _BAR[0].close()
            _BAR[0] = None


def initial_noise(latents, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """Unit-variance starting noise ``shape``: the caller's ``latents`` (checked) or drawn from ``key``.

    The samplers scale it by the scheduler's initial sigma, as diffusers' ``prepare_latents`` does."""
    if latents is None:
        return jax.random.normal(key, shape, jnp.float32)
    noise = jnp.asarray(latents, jnp.float32)
    if noise.shape != tuple(shape):
        raise UserError(f"latents must have shape {tuple(shape)} (got {tuple(noise.shape)})")
    return noise
