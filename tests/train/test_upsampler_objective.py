"""Upsampler training through the real loop (vldm_jax.train.loop.train) on configs/upsampler_tiny.yaml: finite
losses, only temporal parameters change, sample GIFs at 4x the conditioning; the conditioning itself (×4
antialiased downsampling, noise level as class label); option validation."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.tiny import classic_threefry  # noqa: F401  (module fixture)
from vldm_jax.errors import ConfigError
from vldm_jax.models.roles import is_temporal_path
from vldm_jax.train.config import load_config
from vldm_jax.train.loop import ArrayBatches, train
from vldm_jax.train.objectives import build_setup
from vldm_jax.train.upsampler_objective import UpsamplerObjective, downsample

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "upsampler_tiny.yaml"
SMALL = ["data.height=16", "data.width=16", "data.num_frames=2", "data.batch_size_per_device=2",
         "objective.sample_steps=2", "train.sample_every=3", "train.log_every=1", "train.checkpoint_every=3",
         "train.steps=3", "train.progress=false", "train.tensorboard=false", "train.compilation_cache=false",
         "optim.learning_rate=1e-2", "optim.warmup_steps=0", "optim.ema_decay=0.0", "mesh.min_shard_size=0",
         "model.vae.block_out_channels=[8,8,8]", "model.vae.norm_num_groups=4",
         "model.vae.mid_block_add_attention=false", "model.text_encoder.num_hidden_layers=1",
         "model.temporal.relative_position_dim=8"]


def _flat(tree):
    return {".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _batches(n=4, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1, 1, (n, 2, 16, 16, 3)).astype(np.float32)
    ids = np.zeros((n, 77), np.int32)
    ids[:, 0], ids[:, 1:] = 49406, 49407
    return ArrayBatches({"video": video, "input_ids": ids}, 2, seed=0)


@pytest.mark.slow
def test_training_steps_change_only_temporal_parameters(tmp_path):
    config = load_config(CONFIG, SMALL)
    setup = build_setup(config)
    assert isinstance(setup.objective, UpsamplerObjective)
    result = train(config, setup=setup, data=_batches(), workdir=tmp_path / "run", echo=lambda m: None)
    assert result.step == 3
    losses = [r["loss"] for r in result.metrics]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    trained = _flat(result.state.trainable)
    frozen = _flat(result.state.frozen)
    assert trained and all(is_temporal_path(k) for k in trained), [k for k in trained if not is_temporal_path(k)]
    assert not any("unet" in k and is_temporal_path(k) for k in frozen)
    # Against a fresh init (the setup is pure: same seed, same values): frozen equal, temporal moved.
    init = _flat(nnx.state(setup.init_models()))
    for k, v in frozen.items():
        np.testing.assert_allclose(v, init[k], rtol=1e-6, atol=1e-7, err_msg=k)
    moved = [k for k, v in trained.items() if np.abs(v - init[k]).max() > 0]
    assert len(moved) > len(trained) // 2, (len(moved), len(trained))
    gifs = list((tmp_path / "run" / "samples").glob("step_0000003_*.gif"))
    assert gifs
    import imageio.v3 as iio

    assert iio.imread(gifs[0], index=None).shape[1:3] == (16, 16)


def test_conditioning_is_antialiased_x4_and_noised_at_the_level():
    from vldm_jax.diffusion.schedules import NoiseSchedule

    video = jnp.zeros((1, 1, 16, 16, 3)).at[:, :, ::2].set(1.0)  # stripes at the Nyquist rate
    low = downsample(video, 4)
    assert low.shape == (1, 1, 4, 4, 3)
    assert float(jnp.abs(low - 0.5).max()) < 0.05  # antialiased: the stripes average out, no aliasing
    sched = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02})
    obj = UpsamplerObjective(schedule=sched, low_res_schedule=sched, scheduler_config={}, scaling_factor=0.08333)
    key = jax.random.key(0)
    clean = obj.conditioning(video, key, jnp.array([0]))
    noisy = obj.conditioning(video, key, jnp.array([300]))
    assert float(jnp.abs(clean - low).max()) < 0.02  # level 0: beta_0 = 1e-4
    assert float(jnp.abs(noisy - low).max()) > 0.1


def test_unknown_option_and_wrong_in_channels_are_config_errors():
    with pytest.raises(ConfigError, match="max_nosie_level"):
        build_setup(load_config(CONFIG, ["objective.options.max_nosie_level=3"]))
    with pytest.raises(ConfigError, match="in_channels"):
        build_setup(load_config(CONFIG, ["model.unet.in_channels=4"]))
    with pytest.raises(ConfigError, match="num_class_embeds"):
        build_setup(load_config(CONFIG, ["objective.options.max_noise_level=400"]))
