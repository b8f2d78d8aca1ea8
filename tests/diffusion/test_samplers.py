"""Sampler parity with the diffusers schedulers: same timesteps, same trajectory end.

The denoiser is a fixed elementwise function computed identically in torch and jax, so the only
difference between the two loops is the scheduler arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from vldm_jax.diffusion.samplers import init_state, make_sampler, progress_bar, sample, scale_model_input, step
from vldm_jax.errors import ConfigError

# diffusers deprecates the non-++ DPM-Solver variants that some cases cover on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*dpmsolver.*:FutureWarning")

SHAPE = (1, 8, 8, 4)

SD1 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading",
)
SD2_V_TRAILING = {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
SD2_V_LEADING = {**SD1, "prediction_type": "v_prediction"}
COSINE_LINSPACE = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample=False)
LINEAR_SAMPLE = dict(beta_schedule="linear", prediction_type="sample", timestep_spacing="linspace")
ZERO_SNR_V = {**SD2_V_TRAILING, "rescale_betas_zero_snr": True}
# Stable Video Diffusion's scheduler_config.json (EulerDiscreteScheduler).
SVD = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False, sigma_max=700.0,
    sigma_min=0.002, steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
    trained_betas=None, use_karras_sigmas=True, clip_sample=False,
)

DIFFUSERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def fake_model_torch(x, t):
    return 0.3 * torch.tanh(x) + 0.01 * (float(t) / 1000.0) * torch.cos(x)


def fake_model_jax(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * (t.astype(jnp.float32) / 1000.0) * jnp.cos(x)


def initial_noise(seed=0):
    return np.random.RandomState(seed).randn(*SHAPE).astype(np.float32)


def diffusers_loop(name, config, steps, noise, step_kwargs=None, variance_noise=None):
    scheduler = DIFFUSERS[name].from_config(config)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        kwargs = dict(step_kwargs or {})
        if variance_noise is not None:
            kwargs["variance_noise"] = torch.from_numpy(variance_noise[i])
        latents = scheduler.step(fake_model_torch(model_input, t), t, latents, **kwargs).prev_sample
    return scheduler, latents.numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def jit_sample():
    # One jitted function; the sampler is an argument, so each distinct sampler structure compiles once.
    @jax.jit
    def run(sampler, noise, variance_noise=None):
        return sample(fake_model_jax, sampler, noise, variance_noise=variance_noise)

    return run


CASES = [
    # (sampler, config, steps, overrides/step options)
    ("ddim", SD1, 20, {}),
    ("ddim", SD2_V_TRAILING, 10, {}),
    ("ddim", SD2_V_LEADING, 25, {}),
    ("ddim", COSINE_LINSPACE, 12, {}),
    ("ddim", LINEAR_SAMPLE, 10, {}),
    ("ddim", {**SD1, "clip_sample": True}, 10, {}),  # x0 clipping is active with these latents
    ("ddim", ZERO_SNR_V, 10, {}),
    ("ddim", {**SD1, "set_alpha_to_one": True, "timestep_spacing": "trailing"}, 15, {"use_clipped_model_output": True}),
    ("ddim", {**SD1, "thresholding": True, "sample_max_value": 3.0}, 10, {}),
    ("dpm++", SD1, 20, {}),
    ("dpm++", {**SD1, "thresholding": True, "sample_max_value": 3.0}, 10, {}),
    ("dpm++", SD1, 10, {"use_karras_sigmas": True}),
    ("dpm++", SD2_V_TRAILING, 10, {}),
    ("dpm++", COSINE_LINSPACE, 15, {}),
    ("dpm++", {**SD1, "solver_order": 3}, 20, {}),
    ("dpm++", {**SD1, "solver_order": 3, "lower_order_final": True}, 10, {}),
    ("dpm++", {**SD1, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 12, {}),
    ("dpm++", {**SD1, "use_exponential_sigmas": True, "timestep_spacing": "linspace"}, 10, {}),
    ("dpm++", {**LINEAR_SAMPLE, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 10, {}),
    ("dpm++", ZERO_SNR_V, 10, {}),
    ("euler", SD1, 20, {}),
    ("euler", SD1, 15, {"use_karras_sigmas": True}),
    ("euler", SD2_V_TRAILING, 10, {}),
    ("euler", COSINE_LINSPACE, 10, {}),
    ("euler", COSINE_LINSPACE, 10, {"use_karras_sigmas": True}),
    ("euler", {**SD1, "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, 10, {}),
    ("euler", SVD, 25, {}),
    ("euler", ZERO_SNR_V, 10, {}),
]


@pytest.mark.parametrize("name,config,steps,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity_with_diffusers(name, config, steps, overrides, jit_sample):
    noise = initial_noise()
    config_overrides = {k: v for k, v in overrides.items() if k != "use_clipped_model_output"}
    step_kwargs = {k: v for k, v in overrides.items() if k == "use_clipped_model_output"}
    scheduler, ref = diffusers_loop(name, {**config, **config_overrides}, steps, noise, step_kwargs)

    sampler = make_sampler(name, config, steps, **overrides)
    theirs_t = scheduler.timesteps.numpy()
    ours_t = np.asarray(sampler.timesteps)
    assert ours_t.shape == theirs_t.shape
    if np.issubdtype(theirs_t.dtype, np.integer):
        np.testing.assert_array_equal(ours_t, theirs_t)
    else:
        # Fractional timesteps come from float32 sigmas whose last bit depends on torch's sqrt.
        np.testing.assert_allclose(ours_t, theirs_t, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(float(sampler.init_noise_sigma), float(scheduler.init_noise_sigma), rtol=1e-6)

    out = jit_sample(sampler, jnp.asarray(noise))
    assert out.shape == SHAPE and out.dtype == jnp.float32
    err = rel_err(out, ref)
    assert err < 1e-4, f"{name} {config} {overrides}: rel err {err:.2e}"


@pytest.mark.parametrize(
    "name,config,steps,step_kwargs",
    [
        ("ddim", SD1, 10, {"eta": 1.0}),
        ("ddim", SD2_V_TRAILING, 10, {"eta": 0.5}),
        ("dpm++", {**SD1, "algorithm_type": "sde-dpmsolver++"}, 12, {}),
        ("dpm++", {**SD1, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 16, {}),
        ("dpm++", {**LINEAR_SAMPLE, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 10, {}),
    ],
)
def test_stochastic_parity_with_injected_noise(name, config, steps, step_kwargs, jit_sample):
    noise = initial_noise()
    variance_noise = np.random.RandomState(1).randn(steps, *SHAPE).astype(np.float32)
    _, ref = diffusers_loop(name, config, steps, noise, step_kwargs, variance_noise)
    sampler = make_sampler(name, config, steps, **step_kwargs)
    assert sampler.is_stochastic
    out = jit_sample(sampler, jnp.asarray(noise), jnp.asarray(variance_noise))
    assert rel_err(out, ref) < 1e-4


def test_euler_churn_parity():
    # diffusers draws the churn noise with torch.randn from the generator, one draw per step.
    steps, config = 10, {**SD1, "timestep_spacing": "linspace"}
    churn = dict(s_churn=1.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.003)
    noise = initial_noise()
    g = torch.Generator().manual_seed(3)
    draws = np.stack([torch.randn(SHAPE, generator=g).numpy() for _ in range(steps)])
    _, ref = diffusers_loop("euler", config, steps, noise, {**churn, "generator": torch.Generator().manual_seed(3)})
    sampler = make_sampler("euler", config, steps, **churn)
    out = jax.jit(lambda n, v: sample(fake_model_jax, sampler, n, variance_noise=v))(noise, draws)
    assert rel_err(out, ref) < 1e-4


def test_stochastic_needs_key_and_is_deterministic_given_it():
    sampler = make_sampler("ddim", SD1, 8, eta=1.0)
    noise = jnp.asarray(initial_noise())
    with pytest.raises(ValueError, match="key"):
        sample(fake_model_jax, sampler, noise)
    run = jax.jit(lambda key: sample(fake_model_jax, sampler, noise, key=key))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_euler_churn_runs_with_key():
    sampler = make_sampler("euler", SD1, 10, s_churn=2.0)
    assert sampler.is_stochastic
    out = jax.jit(lambda k: sample(fake_model_jax, sampler, jnp.asarray(initial_noise()), key=k))(jax.random.key(0))
    assert bool(jnp.isfinite(out).all())


def test_manual_step_loop_matches_sample():
    # The public step / scale_model_input / init_state API reproduces the scan.
    sampler = make_sampler("dpm++", {**SD1, "solver_order": 3}, 10)
    noise = jnp.asarray(initial_noise())
    x = noise * sampler.init_noise_sigma
    state = init_state(sampler, x)
    for i in range(sampler.num_inference_steps):
        out = fake_model_jax(scale_model_input(sampler, x, i), sampler.timesteps[i])
        x, state = step(sampler, i, out, x, state)
    np.testing.assert_allclose(x, sample(fake_model_jax, sampler, noise), rtol=1e-5, atol=1e-6)


def test_video_latents_and_bf16():
    sampler = make_sampler("euler", SVD, 6)
    noise = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 4), jnp.bfloat16)
    out = jax.jit(lambda n: sample(fake_model_jax, sampler, n))(noise)
    assert out.shape == noise.shape and out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_progress_callback_under_jit():
    sampler = make_sampler("ddim", SD1, 7)
    seen = []
    run = jax.jit(lambda n: sample(fake_model_jax, sampler, n, progress=lambda i: seen.append(int(i))))
    jax.block_until_ready(run(jnp.asarray(initial_noise())))
    jax.effects_barrier()
    assert sorted(seen) == list(range(7))
    with progress_bar(sampler.num_inference_steps, disable=True) as cb:
        run2 = jax.jit(lambda n: sample(fake_model_jax, sampler, n, progress=cb))
        jax.block_until_ready(run2(jnp.asarray(initial_noise())))
        jax.effects_barrier()


def test_sampler_is_a_pytree_and_jit_argument():
    sampler = make_sampler("dpm++", SD1, 10)
    leaves = jax.tree.leaves(sampler)
    assert all(isinstance(l, jax.Array) for l in leaves)
    # Same structure, different step arrays: no retrace.
    traces = []

    @jax.jit
    def run(s, n):
        traces.append(1)
        return sample(fake_model_jax, s, n)

    run(sampler, jnp.asarray(initial_noise()))
    run(make_sampler("dpm++", {**SD1, "timestep_spacing": "trailing"}, 10), jnp.asarray(initial_noise()))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "name,kwargs,needle",
    [
        ("plms", {}, "unknown sampler"),
        ("euler", {"eta": 0.5}, "eta"),
        ("ddim", {"no_such_field": 1}, "no_such_field"),
        ("ddim", {"prediction_type": "flow"}, "prediction_type"),
        ("dpm++", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("dpm++", {"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    ],
)
def test_bad_options_are_config_errors(name, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_sampler(name, SD1, 10, **kwargs)


def test_too_many_ddim_steps():
    with pytest.raises(ConfigError, match="num_inference_steps"):
        make_sampler("ddim", SD1, 1001)
