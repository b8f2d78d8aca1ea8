"""The LCM sampler against diffusers' ``LCMScheduler``: timesteps, and the whole trajectory with the same
injected per-step noise (the scheduler draws fresh noise after every step but the last)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from vldm_jax.diffusion.samplers import make_sampler, sample
from vldm_jax.errors import ConfigError

SHAPE = (1, 3, 8, 8, 4)
ANIMATELCM = dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  clip_sample=False, set_alpha_to_one=True, steps_offset=1, original_inference_steps=100,
                  timestep_scaling=10.0, prediction_type="epsilon")
CASES = [(ANIMATELCM, 4), ({**ANIMATELCM, "original_inference_steps": 50, "beta_schedule": "scaled_linear",
                            "set_alpha_to_one": False, "prediction_type": "v_prediction"}, 6),
         ({**ANIMATELCM, "clip_sample": True, "timestep_scaling": 5.0}, 1)]


def model_torch(x, t):
    return 0.3 * torch.tanh(x) + 0.01 * (float(t) / 1000.0) * torch.cos(x)


def model_jax(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * (t.astype(jnp.float32) / 1000.0) * jnp.cos(x)


@pytest.mark.parametrize("config,steps", CASES)
def test_lcm_matches_diffusers(config, steps):
    rng = np.random.RandomState(0)
    noise = rng.randn(*SHAPE).astype(np.float32)
    step_noise = rng.randn(steps, *SHAPE).astype(np.float32)
    scheduler = LCMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = _step_with_noise(scheduler, model_torch(x, t), t, x, step_noise[i])
    sampler = make_sampler("lcm", config, steps)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), scheduler.timesteps.numpy())
    out = jax.jit(lambda n, v: sample(model_jax, sampler, n, variance_noise=v) if sampler.is_stochastic
                  else sample(model_jax, sampler, n))(jnp.asarray(noise), jnp.asarray(step_noise))
    ref = x.numpy()
    assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() < 1e-5


def _step_with_noise(scheduler, out, t, x, noise):
    """``scheduler.step`` with its randn replaced by ``noise`` (diffusers draws it inside the step)."""
    import diffusers.schedulers.scheduling_lcm as lcm

    original = lcm.randn_tensor
    lcm.randn_tensor = lambda shape, **kw: torch.from_numpy(noise).reshape(shape)
    try:
        return scheduler.step(out, t, x, return_dict=False)[0]
    finally:
        lcm.randn_tensor = original


def test_lcm_bad_options():
    with pytest.raises(ConfigError, match="original_inference_steps"):
        make_sampler("lcm", ANIMATELCM, 101)
