"""What every pipeline shares: the initial noise, prompt encoding, and host-side progress for compiled sampling
loops (pipeline folders are read and written by :mod:`vldm_jax.checkpoints.pipeline_folder`).

A compiled loop calls one fixed host function per step (:func:`advance`, through ``jax.debug.callback``),
so showing or hiding a bar never forces a recompile; :func:`denoising_bar` installs the bar it advances.
"""

from __future__ import annotations

import contextlib
import functools

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


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for command-line runs, so a second ``vldm generate`` reuses
    the first one's compiled sampling loops. Folder: ``$VLDM_COMPILATION_CACHE`` (``0`` disables), else
    ``$XDG_CACHE_HOME/vldm_jax/jax`` (``~/.cache/vldm_jax/jax``). A cache already configured is kept.
    Returns the folder in use, or None."""
    import os
    from pathlib import Path

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get("VLDM_COMPILATION_CACHE")
    if setting == "0":
        return None
    folder = Path(setting) if setting else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vldm_jax" / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every compiled program that took noticeable time; the sampling loops take seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(folder)


@functools.partial(jax.jit, static_argnames=("text_graph", "clip_skip"))
def _encode_ids(text_graph, text_state, input_ids, clip_skip: int = 0):
    from flax import nnx

    return nnx.merge(text_graph, text_state).encode(input_ids, clip_skip=clip_skip)


def encode_prompts(tokenizer, text_graph, text_state, prompts, clip_skip: int = 0) -> jax.Array:
    """Prompts -> text-encoder context ``(B, 77, D)``: the bundled/loaded tokenizer, then one jitted encode (every
    pipeline's ``encode_prompt``)."""
    from vldm_jax.models.tokenizer import tokenize

    ids = tokenize(tokenizer, list(prompts), max_length=tokenizer.model_max_length)
    return _encode_ids(text_graph, text_state, jnp.asarray(ids), clip_skip=clip_skip)
