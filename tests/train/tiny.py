"""Tiny models and data for the training tests: a video denoiser with the video U-Net's call signature whose
temporal layers are named like Video LDM's, trained on precomputed latents (no VAE, no text encoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vldm_jax.nn.temporal import AlphaBlender, conv3d
from vldm_jax.train.config import load_config
from vldm_jax.train.loop import ArrayBatches
from vldm_jax.train.objectives import Setup, TemporalObjective, VideoModels, noise_schedule

C, F, H, W, S, D = 4, 4, 8, 8, 3, 16


@pytest.fixture(scope="module", autouse=True)
def classic_threefry():
    """Import into a test module to run it with the classic (non-partitionable) threefry: JAX 0.10's
    partitionable one compiles for seconds per random shape on a CPU. Values are sharding-invariant either way
    (all the sharding tests rely on); the setting is restored after the module."""
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", old)


class TinyVideoDenoiser(nnx.Module):
    """``(B, F, h, w, C), (B,), (B, S, D), image_only_indicator (B, F) -> (B, F, h, w, C)``."""

    def __init__(self, *, rngs: nnx.Rngs, channels: int = 16):
        self.conv_in = nnx.Conv(C, channels, (3, 3), rngs=rngs)
        self.time_proj = nnx.Linear(32, channels, rngs=rngs)
        self.context_proj = nnx.Linear(D, channels, rngs=rngs)
        self.temporal_conv = conv3d(channels, channels, (3, 1, 1), rngs=rngs)
        self.temporal_mixer = AlphaBlender(0.5, "learned_with_images")
        self.conv_out = nnx.Conv(channels, C, (3, 3), rngs=rngs)

    def __call__(self, sample, timestep, encoder_hidden_states, image_only_indicator=None):
        b, f = sample.shape[:2]
        x = self.conv_in(sample.reshape((b * f,) + sample.shape[2:]))
        freqs = jnp.exp(-jnp.arange(16) / 4.0)
        t = timestep.astype(jnp.float32)[:, None] * freqs
        temb = self.time_proj(jnp.concatenate([jnp.sin(t), jnp.cos(t)], -1))
        ctx = self.context_proj(encoder_hidden_states.mean(axis=1))
        x = x.reshape((b, f) + x.shape[1:]) + (temb + ctx)[:, None, None, None, :]
        x = jax.nn.silu(x)
        xt = self.temporal_conv(x)
        x = self.temporal_mixer(x, xt, image_only_indicator)
        x = self.conv_out(x.reshape((b * f,) + x.shape[2:]))
        return x.reshape((b, f) + x.shape[1:])


def tiny_config(**overrides):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    data = {
        "model": {"trainable": "temporal"},
        "data": {"batch_size_per_device": 2},
        "objective": {"encode_in_step": False},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 2, "weight_decay": 1e-2, "ema_decay": 0.9},
        "mesh": {"min_shard_size": 0},
        "train": {"steps": 6, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "progress": False,
                  "tensorboard": False, "compilation_cache": False},
    }
    return load_config(data=data, overrides=sets)


def tiny_setup(seed: int = 0, prediction_type: str = "epsilon", image_ratio: float = 0.0) -> Setup:
    objective = TemporalObjective(
        schedule=noise_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                 "prediction_type": prediction_type}),
        encode_in_step=False, image_ratio=image_ratio)
    return Setup(objective=objective, init_models=lambda: VideoModels(TinyVideoDenoiser(rngs=nnx.Rngs(seed))))


def tiny_arrays(n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, F, H, W, C)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((n, S, D)).astype(np.float32)}


def tiny_data(batch_size: int, process_index: int = 0, process_count: int = 1, n: int = 16) -> ArrayBatches:
    return ArrayBatches(tiny_arrays(n), batch_size, seed=0, process_index=process_index,
                        process_count=process_count)


def tiny_encoding_setup(config, seed: int = 0) -> Setup:
    """The tiny denoiser trained from frames: a one-block random VAE (no downsampling: latents at the frames' size)
    and a one-layer CLIP text encoder (D wide, the bundled tokenizer) run inside the step
    (``objective.encode_in_step``), as when training from a folder of videos."""
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from vldm_jax.models.tokenizer import load_tokenizer
    from vldm_jax.train.objectives import make_temporal_objective

    vae_config = AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4, latent_channels=C,
                                     mid_block_add_attention=False)
    text_config = CLIPTextConfig.from_dict({"vocab_size": 49408, "hidden_size": D, "intermediate_size": 2 * D,
                                            "num_attention_heads": 2, "num_hidden_layers": 1,
                                            "max_position_embeddings": 77, "projection_dim": D})
    tokenizer = load_tokenizer(None)
    scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    objective = make_temporal_objective(config.objective, scheduler, vae_config=vae_config, tokenizer=tokenizer)

    def init_models():
        rngs = nnx.Rngs(seed)
        return VideoModels(TinyVideoDenoiser(rngs=rngs), AutoencoderKL(vae_config, rngs=rngs),
                           CLIPTextModel(text_config, rngs=rngs))

    return Setup(objective=objective, init_models=init_models)
