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
import numpy as np

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


def sample_keys(seed, batch: int) -> jax.Array:
    """Per-sample PRNG keys ``(B,)``: ``seed`` an int (every sample from that seed, so a prompt gives the same
    video alone or in a batch) or one int per sample."""
    seeds = [int(seed)] * batch if np.ndim(seed) == 0 else [int(s) for s in seed]
    if len(seeds) != batch:
        raise UserError(f"got {len(seeds)} seeds for {batch} samples")
    return jnp.stack([jax.random.key(s) for s in seeds])


def as_sample_keys(key: jax.Array, batch: int) -> jax.Array:
    """Per-sample keys ``(B,)`` from one key (every sample drawn from it) or from per-sample keys (checked)."""
    if key.ndim == 0:
        return jnp.stack([key] * batch)
    if key.shape != (batch,):
        raise UserError(f"got {key.shape[0]} keys for {batch} samples")
    return key


def fold_keys(keys: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in`` of every per-sample key ``(B,)``."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def per_sample_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Unit Gaussian noise ``(B,) + shape``, sample ``i`` drawn from ``keys[i]`` alone: the same draw whatever
    the batch (for ``B = 1`` exactly ``jax.random.normal(keys[0], (1,) + shape)``)."""
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys)


def initial_noise(latents, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """Unit-variance starting noise ``shape``: the caller's ``latents`` (checked) or drawn from ``key`` (one key
    for the whole batch, or per-sample keys ``(B,)``: :func:`per_sample_normal`).

    The samplers scale it by the scheduler's initial sigma, as diffusers' ``prepare_latents`` does."""
    if latents is None:
        if key.ndim == 1:
            return per_sample_normal(key, shape[1:])
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
        _cache_short_compiles()
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
    _cache_short_compiles()
    return str(folder)


def _cache_short_compiles() -> None:
    """Caches every compiled program that took noticeable time (JAX's default keeps only those over 1 s, which on a
    fast machine leaves the small default model's loops out), unless the user set the thresholds themselves."""
    import os

    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
