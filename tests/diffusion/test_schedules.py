"""Noise schedules and parameterisations against diffusers' DDIMScheduler / EulerDiscreteScheduler."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from vldm_jax.diffusion import schedules
from vldm_jax.diffusion.schedules import NoiseSchedule
from vldm_jax.errors import ConfigError

SD1 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
           set_alpha_to_one=False, clip_sample=False)

CONFIGS = [
    SD1,
    {**SD1, "prediction_type": "v_prediction"},
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    {**SD1, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 50)), num_train_timesteps=50),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_betas_and_alphas_cumprod(config):
    ref = DDIMScheduler.from_config(config)
    ours = NoiseSchedule.from_config(config)
    assert ours.num_train_timesteps == ref.config.num_train_timesteps
    # Zero-SNR rescaling recovers betas as 1 - ratio of neighbouring float32 alphas: both
    # implementations carry that cancellation noise (torch's float32 sqrt is not correctly rounded).
    rtol = 1e-4 if config.get("rescale_betas_zero_snr") else 1e-6
    atol = 1e-5 if config.get("rescale_betas_zero_snr") else 1e-9
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("config", CONFIGS[:5])
def test_add_noise_and_velocity(config):
    ref = DDIMScheduler.from_config(config)
    ours = NoiseSchedule.from_config(config)
    rng = np.random.RandomState(0)
    x0 = rng.randn(4, 3, 8, 8, 4).astype(np.float32)  # video-shaped (B, F, h, w, C)
    noise = rng.randn(*x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    a = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(schedules.add_noise(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                               a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(schedules.get_velocity(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                               v, rtol=1e-5, atol=1e-6)
    target = schedules.training_target(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    expected = v if ours.prediction_type == "v_prediction" else noise
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)


def test_add_noise_scalar_timestep():
    ours = NoiseSchedule.from_config(SD1)
    x0, noise = jnp.ones((2, 4, 4, 4)), jnp.zeros((2, 4, 4, 4))
    out = schedules.add_noise(ours, x0, noise, 10)
    np.testing.assert_allclose(out, np.sqrt(float(ours.alphas_cumprod[10])) * np.ones((2, 4, 4, 4)), rtol=1e-6)


@pytest.mark.parametrize("source", schedules.PREDICTION_TYPES)
@pytest.mark.parametrize("target", schedules.PREDICTION_TYPES)
def test_convert_prediction_is_consistent(source, target):
    rng = np.random.RandomState(1)
    x0, eps = rng.randn(2, 4, 4, 3), rng.randn(2, 4, 4, 3)
    acp = np.array([0.9, 0.2]).reshape(2, 1, 1, 1)
    alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    x = alpha * x0 + sigma * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}
    out = schedules.convert_prediction(jnp.asarray(truth[source]), jnp.asarray(x), jnp.asarray(alpha),
                                       jnp.asarray(sigma), source, target)
    np.testing.assert_allclose(out, truth[target], rtol=1e-4, atol=1e-5)


def test_karras_sigmas_match_diffusers():
    ref = EulerDiscreteScheduler.from_config({**SD1, "use_karras_sigmas": True, "sigma_min": 0.002,
                                              "sigma_max": 700.0})
    expected = ref._convert_to_karras(in_sigmas=torch.ones(3), num_inference_steps=25)
    np.testing.assert_allclose(schedules.karras_sigmas(0.002, 700.0, 25), expected, rtol=1e-12)


def test_sigma_to_t_matches_diffusers():
    ref = EulerDiscreteScheduler.from_config(SD1)
    log_sigmas = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    sigmas = schedules.karras_sigmas(0.03, 14.6, 9)
    expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_allclose(schedules.sigma_to_t(sigmas, log_sigmas), expected, rtol=1e-12)


def test_edm_preconditioning_reproduces_euler_x0():
    # x0 = c_skip x + c_out F(c_in x): Euler's v / eps x0 formulas with c_in = scale_model_input.
    sigma = jnp.asarray([0.1, 3.0, 80.0]).reshape(3, 1)
    x, out = jnp.ones((3, 5)) * 2.0, jnp.ones((3, 5)) * 0.5
    c_skip, c_out, c_in, c_noise = schedules.edm_preconditioning(sigma, "v_prediction")
    expected = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    np.testing.assert_allclose(c_skip * x + c_out * out, expected, rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(np.asarray(sigma) ** 2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 0.25 * np.log(np.asarray(sigma)), rtol=1e-6)
    c_skip, c_out, _, _ = schedules.edm_preconditioning(sigma, "epsilon")
    np.testing.assert_allclose(c_skip * x + c_out * out, x - sigma * out, rtol=1e-6)


def test_dynamic_threshold_matches_diffusers():
    ref = DDIMScheduler.from_config({**SD1, "thresholding": True, "sample_max_value": 2.5})
    x0 = (np.random.RandomState(2).randn(3, 4, 8, 8) * 2).astype(np.float32)
    expected = ref._threshold_sample(torch.from_numpy(x0)).numpy()
    np.testing.assert_allclose(schedules.dynamic_threshold(jnp.asarray(x0), 0.995, 2.5), expected,
                               rtol=1e-5, atol=1e-6)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ConfigError, match="timestep_spacing"):
        schedules.scheduler_config_from_dict({"timestep_spacing": "middle"})
    with pytest.raises(ConfigError, match="unknown scheduler options"):
        schedules.scheduler_config_from_dict({}, betta_start=0.1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_diffusers_training_scripts(prediction_type):
    # diffusers' train_text_to_image.py --snr_gamma: mse_loss_weights = min(snr, gamma) / snr for epsilon,
    # / (snr + 1) for v_prediction; the x0 weight min(snr, gamma) follows the paper.
    from diffusers.training_utils import compute_snr

    config = {**SD1, "prediction_type": prediction_type}
    ref = DDIMScheduler.from_config(config)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(ref, t)
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    ours = schedules.min_snr_weight(NoiseSchedule.from_config(config), jnp.asarray(t.numpy()), gamma)
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=1e-5)
    assert float(ours[0]) != float(ours[-1])
