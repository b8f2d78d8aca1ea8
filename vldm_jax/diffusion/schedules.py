"""Noise schedules: betas, cumulative alphas and sigmas; eps / v / x0 parameterisations; EDM helpers.

Conventions (those of diffusers, so checkpoints and configs carry over unchanged):

* Discrete training timesteps ``t`` in ``[0, num_train_timesteps)``; ``alphas_cumprod[t]`` is
  ``prod_{s<=t} (1 - beta_s)``.
* Variance-preserving forward process ``x_t = alpha_t x0 + sigma_t eps`` with
  ``alpha_t = sqrt(acp)``, ``sigma_t = sqrt(1 - acp)``.
* The equivalent variance-exploding noise level (what Euler / Karras samplers step on) is
  ``sigma = sqrt((1 - acp) / acp)``; ``x_t / alpha_t = x0 + sigma * eps``.

Table construction is numpy on the host (it happens once per config); everything that touches
latents is jnp and traceable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vldm_jax.errors import ConfigError
from vldm_jax.models.config import config_from_dict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The union of the diffusers DDIM / DPMSolverMultistep / EulerDiscrete config fields we honour.

    A ``scheduler_config.json`` of any of those classes (or of PNDM, as Stable Diffusion ships)
    loads as is. Fields whose diffusers default differs between scheduler classes
    (``timestep_spacing``) default to ``None``, meaning "that sampler's diffusers default".
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # DDIM
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # DPM-Solver multistep
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    # Euler
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"


def scheduler_config_from_dict(data: Mapping[str, Any] | SchedulerConfig, **overrides: Any) -> SchedulerConfig:
    """Builds a :class:`SchedulerConfig` from a diffusers scheduler config dict, plus overrides."""
    if isinstance(data, SchedulerConfig):
        data = dataclasses.asdict(data)
    merged = {**dict(data), **overrides}
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    unknown = sorted(k for k in overrides if k not in names)
    if unknown:
        raise ConfigError(f"unknown scheduler options {unknown}")
    config = config_from_dict(SchedulerConfig, merged)
    if config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {config.prediction_type!r} is not one of {PREDICTION_TYPES}")
    if config.trained_betas is None and config.beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"beta_schedule {config.beta_schedule!r} is not one of {BETA_SCHEDULES}")
    if config.timestep_spacing is not None and config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(f"timestep_spacing {config.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return config


# ----------------------------------------------------------------------------- betas


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's cosine alpha-bar, discretised as diffusers does (python floats, then float32).
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float32
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(acp) so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    betas = np.asarray(betas, np.float32)
    sqrt_acp = np.sqrt(_cumprod(1.0 - betas))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    # Accumulating in float64 and rounding once reproduces torch's float32 cumprod bit for bit.
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def betas_from_config(config: SchedulerConfig) -> np.ndarray:
    """The training betas, float32 ``(num_train_timesteps,)``."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ConfigError(f"beta_schedule {config.beta_schedule!r} is not one of {BETA_SCHEDULES}")
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_config(config: SchedulerConfig) -> np.ndarray:
    """``prod (1 - beta)`` as float32 ``(num_train_timesteps,)``."""
    return _cumprod(1.0 - betas_from_config(config))


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """Variance-exploding noise level ``sqrt((1 - acp) / acp)`` (works on numpy and jnp arrays)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# ----------------------------------------------------------------------------- the schedule pytree


@struct.dataclass
class NoiseSchedule:
    """The training noise schedule. Leaves are float32 arrays of shape ``(num_train_timesteps,)``."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | SchedulerConfig, **overrides: Any) -> "NoiseSchedule":
        config = scheduler_config_from_dict(scheduler_config, **overrides)
        betas = betas_from_config(config)
        return cls(
            betas=jnp.asarray(betas),
            alphas_cumprod=jnp.asarray(_cumprod(1.0 - betas)),
            prediction_type=config.prediction_type,
        )


def _per_sample(values: jax.Array, ndim: int) -> jax.Array:
    # (B,) per-sample scalars broadcast against (B, ...) arrays; a scalar broadcasts as is.
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def alpha_sigma(schedule: NoiseSchedule, t: jax.Array, ndim: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(acp[t]), sqrt(1 - acp[t]))``, shaped to broadcast against arrays of rank ``ndim``.

    ``t``: int timesteps, scalar or ``(B,)``.
    """
    acp = schedule.alphas_cumprod[jnp.asarray(t)]
    return _per_sample(acp**0.5, ndim), _per_sample((1 - acp) ** 0.5, ndim)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process ``q(x_t | x0)``: ``sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise``.

    ``x0``, ``noise``: ``(B, ...)``; ``t``: int ``(B,)`` or scalar.
    """
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    return (alpha * x0 + sigma * noise).astype(x0.dtype)


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target ``sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0`` (Salimans & Ho 2022)."""
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    return (alpha * noise - sigma * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the denoiser should output for ``add_noise(schedule, x0, noise, t)``, per prediction type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    if schedule.prediction_type == "sample":
        return x0
    raise ConfigError(f"prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}")


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights ``(B,)`` (Hang et al. 2023, diffusers' ``--snr_gamma``) for the MSE on this
    schedule's prediction target: ``min(snr, gamma) / snr`` for epsilon, ``min(snr, gamma) / (snr + 1)`` for
    v-prediction, ``min(snr, gamma)`` for x0, with ``snr = acp / (1 - acp)``. The weights equalise how much
    each noise level pulls on the shared weights, which speeds training up severalfold in the paper."""
    acp = schedule.alphas_cumprod[jnp.asarray(t)]
    snr = acp / (1.0 - acp)
    clipped = jnp.minimum(snr, gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if schedule.prediction_type == "sample":
        return clipped
    raise ConfigError(f"prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}")


def predict_x0_eps(
    model_output: jax.Array, sample: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """``(x0, eps)`` implied by a model output at a point ``sample = alpha x0 + sigma eps``.

    ``alpha``, ``sigma``: the variance-preserving coefficients (``sqrt(acp)``, ``sqrt(1 - acp)``),
    broadcastable against ``sample``.
    """
    if prediction_type == "epsilon":
        eps = model_output
        return (sample - sigma * eps) / alpha, eps
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "sample":
        x0 = model_output
        return x0, (sample - alpha * x0) / sigma
    raise ConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def convert_prediction(
    model_output: jax.Array,
    sample: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    source: str,
    target: str,
) -> jax.Array:
    """Re-expresses a prediction of type ``source`` as one of type ``target`` (eps / v / x0).

    ``target`` may be ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (x0).
    """
    if source == target:
        return model_output
    x0, eps = predict_x0_eps(model_output, sample, alpha, sigma, source)
    if target == "epsilon":
        return eps
    if target == "sample":
        return x0
    if target == "v_prediction":
        return alpha * eps - sigma * x0
    raise ConfigError(f"prediction_type {target!r} is not one of {PREDICTION_TYPES}")


def dynamic_threshold(x0: jax.Array, ratio: float = 0.995, max_value: float = 1.0) -> jax.Array:
    """Imagen's dynamic thresholding of an ``x0`` prediction ``(B, ...)``, per batch element.

    The ``ratio`` quantile of ``|x0|`` (clamped to ``[1, max_value]``) bounds and rescales it.
    """
    flat = x0.reshape(x0.shape[0], -1).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


# ----------------------------------------------------------------------------- EDM / Karras


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: ``n`` values from ``sigma_max`` down to ``sigma_min``, float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` noise levels log-uniform from ``sigma_max`` down to ``sigma_min``, float64."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose noise level is ``sigmas``, by interpolation in log sigma.

    ``log_sigmas``: ``log`` of the training sigmas ``(T,)`` (ascending with t). Mirrors diffusers'
    ``_sigma_to_t`` including its dtypes, so timesteps derived from Karras sigmas agree with it.
    """
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def edm_preconditioning(sigma: jax.Array, prediction_type: str = "v_prediction"):
    """``(c_skip, c_out, c_in, c_noise)`` of the EDM view of a VP model (sigma_data = 1).

    ``x0 = c_skip * x + c_out * model(c_in * x, c_noise)`` for a noisy ``x = x0 + sigma * eps``;
    this is how diffusers' Euler scheduler (and so Stable Video Diffusion) drives a U-Net, with
    ``c_noise = 0.25 * ln(sigma)`` the continuous timestep SVD feeds its U-Net.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    c_in = 1 / (sigma**2 + 1) ** 0.5
    c_noise = 0.25 * jnp.log(sigma)
    if prediction_type == "epsilon":
        return jnp.ones_like(sigma), -sigma, c_in, c_noise
    if prediction_type == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in, c_noise
    if prediction_type == "sample":
        return jnp.zeros_like(sigma), jnp.ones_like(sigma), c_in, c_noise
    raise ConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
