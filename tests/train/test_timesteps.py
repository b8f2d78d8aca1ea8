"""objective.high_noise_fraction: the temporal stage's timestep sampling."""

import dataclasses

import jax
import numpy as np
import pytest

from vldm_jax.errors import ConfigError
from vldm_jax.train.config import load_config
from vldm_jax.train.objectives import TemporalObjective, noise_schedule

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_high_noise_fraction_moves_that_share_of_clips_to_the_upper_half():
    base = TemporalObjective(schedule=noise_schedule(SCHEDULE))
    uniform = np.asarray(base.sample_timesteps(jax.random.key(0), 20000))
    # 0 keeps the plain uniform draw, key for key (runs from before the option are unchanged).
    np.testing.assert_array_equal(uniform, np.asarray(jax.random.randint(jax.random.key(0), (20000,), 0, 1000)))
    biased = np.asarray(dataclasses.replace(base, high_noise_fraction=0.75).sample_timesteps(jax.random.key(0), 20000))
    assert biased.min() >= 0 and biased.max() <= 999
    assert np.mean(uniform >= 500) == pytest.approx(0.5, abs=0.02)
    assert np.mean(biased >= 500) == pytest.approx(0.75 + 0.25 * 0.5, abs=0.02)
    everything = dataclasses.replace(base, high_noise_fraction=1.0).sample_timesteps(jax.random.key(1), 5000)
    assert int(np.min(np.asarray(everything))) >= 500


def test_high_noise_fraction_reaches_the_objective_and_is_checked():
    from vldm_jax.train.objectives import make_temporal_objective

    config = load_config(data={"objective": {"high_noise_fraction": 0.3, "encode_in_step": False}})
    objective = make_temporal_objective(config.objective, SCHEDULE, null_context=np.zeros((1, 4, 8), np.float32))
    assert objective.high_noise_fraction == 0.3
    with pytest.raises(ConfigError, match="high_noise_fraction"):
        load_config(data={"objective": {"high_noise_fraction": 1.5}})
