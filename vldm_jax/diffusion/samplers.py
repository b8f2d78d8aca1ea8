"""Samplers as data: DDIM, DPM-Solver++ (multistep) and Euler, with one ``lax.scan`` sampling loop.

A :class:`Sampler` is a pytree: the per-step timesteps the denoiser is called with, the noise
levels, and per-step coefficient arrays, computed once on the host by :func:`make_sampler`
exactly as the corresponding diffusers scheduler's ``set_timesteps`` would. Its static fields
(the method name, prediction type, options) select the branch of the pure :func:`step`.
:func:`sample` runs every step inside one ``jax.lax.scan``, so it compiles once per latent shape
and can sit inside a caller's ``jax.jit``::

    sampler = make_sampler("dpm++", scheduler_config, 25)
    latents = jax.jit(lambda noise: sample(denoise, sampler, noise))(noise)

where ``denoise(model_input, timestep) -> model_output`` (the U-Net with guidance folded in).

Parity with diffusers (``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
``EulerDiscreteScheduler``) is tested in ``tests/diffusion/test_samplers.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vldm_jax.diffusion import schedules
from vldm_jax.diffusion.schedules import SchedulerConfig
from vldm_jax.errors import ConfigError

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLER_NAMES = ("ddim", "dpm++", "euler", "lcm")
_ALIASES = {"dpm": "dpm++", "dpmsolver++": "dpm++", "dpm-solver++": "dpm++"}

# Per-call options of diffusers' step() that we make sampler fields, with their defaults.
_STEP_OPTIONS = {
    "ddim": {"eta": 0.0, "use_clipped_model_output": False},
    "dpm++": {},
    "euler": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0},
    # LCMScheduler's own config fields (not in SchedulerConfig): read from the scheduler config dict too.
    "lcm": {"original_inference_steps": 50, "timestep_scaling": 10.0},
}
# diffusers' default timestep_spacing differs per scheduler class.
_DEFAULT_SPACING = {"ddim": "leading", "dpm++": "linspace", "euler": "linspace", "lcm": "leading"}


@struct.dataclass
class Sampler:
    """A discretised reverse process: what :func:`sample` needs, as arrays.

    ``N`` is the number of denoiser evaluations.

    Attributes:
      timesteps: ``(N,)`` the timestep passed to the denoiser at each step: int32 training
        timesteps for DDIM and DPM-Solver, float32 for Euler (fractional with Karras sigmas,
        ``0.25 ln sigma`` when ``timestep_type='continuous'``).
      sigmas: ``(N + 1,)`` float32 noise level ``sqrt((1 - acp) / acp)`` at each step and after
        the last one.
      input_scales: ``(N,)`` float32 factor of ``scale_model_input`` (``1 / sqrt(sigma^2 + 1)`` for
        Euler, 1 otherwise).
      coefficients: method-specific per-step arrays with leading axis ``N``.
      init_noise_sigma: ``()`` float32 standard deviation of the initial latents.
      name: ``'ddim'``, ``'dpm++'``, ``'euler'`` or ``'lcm'``.
      prediction_type: ``'epsilon'``, ``'v_prediction'`` or ``'sample'``.
      options: static method options as sorted ``(name, value)`` pairs (hashable).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    input_scales: jax.Array
    coefficients: dict[str, jax.Array]
    init_noise_sigma: jax.Array
    name: str = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    options: tuple[tuple[str, Any], ...] = struct.field(pytree_node=False, default=())

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]

    def option(self, key: str) -> Any:
        return dict(self.options)[key]

    @property
    def is_stochastic(self) -> bool:
        """Whether a step draws fresh noise (DDIM eta > 0, SDE-DPM-Solver, Euler churn)."""
        return bool(self.option("stochastic"))


# ----------------------------------------------------------------------------- host-side set_timesteps


def _ddim_timesteps(config: SchedulerConfig, spacing: str, n: int) -> np.ndarray:
    T = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + config.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return schedules.sigmas_from_alphas_cumprod(alphas_cumprod).astype(np.float32)


def _make_ddim(config: SchedulerConfig, spacing: str, n: int, opts: dict) -> dict:
    T = config.num_train_timesteps
    if n > T:
        raise ConfigError(f"num_inference_steps {n} exceeds num_train_timesteps {T}")
    acp = schedules.alphas_cumprod_from_config(config)
    timesteps = _ddim_timesteps(config, spacing, n)
    # diffusers steps back by T // n whatever the spacing, and past t=0 uses the final alpha.
    prev = timesteps - T // n
    final = np.float32(1.0) if config.set_alpha_to_one else acp[0]
    acp_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final).astype(np.float32)
    with np.errstate(divide="ignore"):  # a zero-SNR schedule has sigma = inf at t = T - 1
        sigmas = _train_sigmas(np.concatenate([acp[timesteps], [acp_prev[-1]]]))
    return dict(
        timesteps=timesteps.astype(np.int32),
        sigmas=sigmas,
        input_scales=np.ones(len(timesteps), np.float32),
        coefficients={"alpha_prod_t": acp[timesteps], "alpha_prod_t_prev": acp_prev},
        init_noise_sigma=np.float32(1.0),
        options={
            "eta": float(opts["eta"]),
            "use_clipped_model_output": bool(opts["use_clipped_model_output"]),
            "clip_sample": bool(config.clip_sample),
            "clip_sample_range": float(config.clip_sample_range),
            "thresholding": bool(config.thresholding),
            "dynamic_thresholding_ratio": float(config.dynamic_thresholding_ratio),
            "sample_max_value": float(config.sample_max_value),
            "stochastic": float(opts["eta"]) > 0,
        },
    )


def _alphas_cumprod_for_sigma_samplers(config: SchedulerConfig) -> np.ndarray:
    acp = schedules.alphas_cumprod_from_config(config)
    if config.rescale_betas_zero_snr:
        # A zero terminal alpha would make sigma infinite; diffusers nudges it to 2^-24.
        acp = acp.copy()
        acp[-1] = np.float32(2.0**-24)
    return acp


def _check_sigma_options(config: SchedulerConfig) -> None:
    if sum([config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas]) > 1:
        raise ConfigError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
    for flag in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if getattr(config, flag):
            raise ConfigError(f"scheduler option {flag} is not supported")
    if config.final_sigmas_type not in ("zero", "sigma_min"):
        raise ConfigError(f"final_sigmas_type {config.final_sigmas_type!r} is not 'zero' or 'sigma_min'")


def _final_sigma(config: SchedulerConfig, acp: np.ndarray) -> np.float32:
    if config.final_sigmas_type == "sigma_min":
        return _train_sigmas(acp[:1])[0]
    return np.float32(0.0)


def _dpm_timesteps_and_sigmas(config: SchedulerConfig, spacing: str, n: int, acp: np.ndarray):
    T = config.num_train_timesteps
    alpha_t, sigma_t = np.sqrt(acp), np.sqrt(1 - acp)
    lambda_t = np.log(alpha_t) - np.log(sigma_t)
    clipped = int(np.searchsorted(lambda_t[::-1], config.lambda_min_clipped))
    last = T - clipped
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (n + 1)
        timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:
        timesteps = np.arange(last, 0, -T / n).round().astype(np.int64) - 1

    train_sigmas = _train_sigmas(acp)
    log_sigmas = np.log(train_sigmas)
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        # DPM-Solver's config has no sigma_min / sigma_max: the ends are the training extremes.
        lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
        if config.use_karras_sigmas:
            sigmas = schedules.karras_sigmas(lo, hi, n)
        else:
            sigmas = schedules.exponential_sigmas(lo, hi, n)
        t = schedules.sigma_to_t(sigmas, log_sigmas)
        if config.use_karras_sigmas and config.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        timesteps = t.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, acp)]]).astype(np.float32)
    return timesteps, sigmas


def _dpm_orders(config: SchedulerConfig, n: int) -> list[int]:
    """The solver order diffusers uses at each step (warm-up, and lower order near the end)."""
    orders, history = [], 0
    for i in range(n):
        final = i == n - 1 and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        second = i == n - 2 and config.lower_order_final and n < 15
        if config.solver_order == 1 or history < 1 or final:
            orders.append(1)
        elif config.solver_order == 2 or history < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
        history = min(history + 1, config.solver_order)
    return orders


def _dpm_update_coefficients(config: SchedulerConfig, sigmas: np.ndarray, orders: list[int]):
    """Per-step ``c_x, c_m (N, 3), c_noise`` with ``x_next = c_x x + sum_k c_m[k] m_k + c_noise z``.

    ``m_0`` is the current converted model output (x0 for ``dpmsolver++``, eps for ``dpmsolver``),
    ``m_1, m_2`` the previous ones. Expanding the solver's finite differences D0, D1, D2 into
    weights on the outputs turns every order and variant into one linear combination; the
    weights are computed in float64 from diffusers' float32 sigmas.
    """
    algo, midpoint = config.algorithm_type, config.solver_type == "midpoint"
    s = sigmas.astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)
    # A final sigma of zero gives lambda = +inf and h = +inf at the (first-order) last step, where
    # the weights reduce to x_next = x0; the unused higher-order terms may be nan there.
    with np.errstate(all="ignore"):
        return _dpm_weights(algo, midpoint, alpha, s * alpha, orders)


def _dpm_weights(algo: str, midpoint: bool, alpha: np.ndarray, sig: np.ndarray, orders: list[int]):
    lam = np.log(alpha) - np.log(sig)
    n = len(orders)
    c_x, c_m, c_noise = np.zeros(n), np.zeros((n, 3)), np.zeros(n)
    for i, order in enumerate(orders):
        a_t, s_t, s_0, a_0 = alpha[i + 1], sig[i + 1], sig[i], alpha[i]
        h = lam[i + 1] - lam[i]
        em, ep = np.exp(-h), np.expm1(h)
        em1 = np.expm1(-h)  # exp(-h) - 1
        if algo == "dpmsolver++":
            cx = s_t / s_0
            c0 = -a_t * em1
            c1 = -0.5 * a_t * em1 if midpoint else a_t * (em1 / h + 1.0)
            c1_3 = a_t * (em1 / h + 1.0)
            c2_3 = -a_t * ((em1 + h) / h**2 - 0.5)
            cn = 0.0
        elif algo == "sde-dpmsolver++":
            e2 = -np.expm1(-2.0 * h)  # 1 - exp(-2h)
            cx = s_t / s_0 * em
            c0 = a_t * e2
            c1 = 0.5 * a_t * e2 if midpoint else a_t * (e2 / (-2.0 * h) + 1.0)
            c1_3 = a_t * (e2 / (-2.0 * h) + 1.0)
            c2_3 = a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            cn = s_t * np.sqrt(e2)
        elif algo == "dpmsolver":
            cx = a_t / a_0
            c0 = -s_t * ep
            c1 = -0.5 * s_t * ep if midpoint else -s_t * (ep / h - 1.0)
            c1_3 = -s_t * (ep / h - 1.0)
            c2_3 = -s_t * ((ep - h) / h**2 - 0.5)
            cn = 0.0
        else:  # sde-dpmsolver
            cx = a_t / a_0
            c0 = -2.0 * s_t * ep
            c1 = -s_t * ep if midpoint else -2.0 * s_t * (ep / h - 1.0)
            c1_3 = c2_3 = None  # diffusers has no third-order SDE-DPM-Solver
            cn = s_t * np.sqrt(np.expm1(2.0 * h))
        c_x[i], c_noise[i] = cx, cn
        if order == 1:
            c_m[i] = (c0, 0.0, 0.0)
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            # D1 = (m0 - m1) / r0
            c_m[i] = (c0 + c1 / r0, -c1 / r0, 0.0)
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            r1 = (lam[i - 1] - lam[i - 2]) / h
            # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
            # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
            k = r0 / (r0 + r1)
            p = c1_3 * (1 + k) + c2_3 / (r0 + r1)  # weight of D1_0
            q = -c1_3 * k - c2_3 / (r0 + r1)  # weight of D1_1
            c_m[i] = (c0 + p / r0, -p / r0 + q / r1, -q / r1)
    return c_x.astype(np.float32), c_m.astype(np.float32), c_noise.astype(np.float32)


def _make_dpm(config: SchedulerConfig, spacing: str, n: int, opts: dict) -> dict:
    _check_sigma_options(config)
    algo = config.algorithm_type
    if algo == "deis":
        algo = "dpmsolver++"
    if algo not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
        raise ConfigError(f"algorithm_type {config.algorithm_type!r} is not supported")
    solver_type = config.solver_type if config.solver_type in ("midpoint", "heun") else "midpoint"
    if config.solver_type not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
        raise ConfigError(f"solver_type {config.solver_type!r} is not supported")
    if config.solver_order not in (1, 2, 3):
        raise ConfigError(f"solver_order must be 1, 2 or 3, got {config.solver_order}")
    if algo == "sde-dpmsolver" and config.solver_order == 3:
        raise ConfigError("sde-dpmsolver supports solver_order 1 or 2")
    if algo in ("dpmsolver", "sde-dpmsolver") and config.final_sigmas_type == "zero":
        raise ConfigError(f"final_sigmas_type 'zero' needs algorithm_type dpmsolver++, not {algo}")
    if config.variance_type is not None:
        raise ConfigError("DPM-Solver with a learned variance (variance_type) is not supported")
    if config.thresholding and algo not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ConfigError("thresholding is supported with algorithm_type dpmsolver++ only")
    config = dataclasses.replace(config, algorithm_type=algo, solver_type=solver_type)

    acp = _alphas_cumprod_for_sigma_samplers(config)
    timesteps, sigmas = _dpm_timesteps_and_sigmas(config, spacing, n, acp)
    orders = _dpm_orders(config, len(timesteps))
    c_x, c_m, c_noise = _dpm_update_coefficients(config, sigmas, orders)
    s = sigmas[:-1].astype(np.float64)
    alpha_s = 1 / np.sqrt(s**2 + 1)
    return dict(
        timesteps=timesteps.astype(np.int32),
        sigmas=sigmas,
        input_scales=np.ones(len(timesteps), np.float32),
        coefficients={
            "alpha_s": alpha_s.astype(np.float32),
            "sigma_s": (s * alpha_s).astype(np.float32),
            "c_x": c_x,
            "c_m": c_m,
            "c_noise": c_noise,
            "order": np.asarray(orders, np.int32),
        },
        init_noise_sigma=np.float32(1.0),
        options={
            "algorithm_type": algo,
            "solver_order": int(config.solver_order),
            "thresholding": bool(config.thresholding),
            "dynamic_thresholding_ratio": float(config.dynamic_thresholding_ratio),
            "sample_max_value": float(config.sample_max_value),
            "stochastic": algo.startswith("sde"),
        },
    )


def _make_euler(config: SchedulerConfig, spacing: str, n: int, opts: dict) -> dict:
    _check_sigma_options(config)
    if config.interpolation_type != "linear":
        raise ConfigError(f"interpolation_type {config.interpolation_type!r} is not supported (only 'linear')")
    if config.timestep_type not in ("discrete", "continuous"):
        raise ConfigError(f"timestep_type {config.timestep_type!r} is not 'discrete' or 'continuous'")
    T = config.num_train_timesteps
    acp = _alphas_cumprod_for_sigma_samplers(config)
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + config.steps_offset
    else:
        timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    train_sigmas = _train_sigmas(acp)
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        # Euler's ends: the config's sigma_min / sigma_max if set (SVD: 0.002 / 700), else the
        # noise levels of the last and first inference timesteps.
        lo = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        hi = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        if config.use_karras_sigmas:
            sigmas = schedules.karras_sigmas(lo, hi, n)
        else:
            sigmas = schedules.exponential_sigmas(lo, hi, n)
        timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, acp)]]).astype(np.float32)
    if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
        timesteps = np.float32(0.25) * np.log(sigmas[:-1])
    timesteps = timesteps.astype(np.float32)

    sigma = sigmas[:-1].astype(np.float64)
    gamma = np.where(
        (opts["s_tmin"] <= sigma) & (sigma <= opts["s_tmax"]),
        min(opts["s_churn"] / (len(sigmas) - 1), 2**0.5 - 1),
        0.0,
    )
    sigma_hat = sigma * (gamma + 1)
    churn = np.where(gamma > 0, opts["s_noise"] * np.sqrt(np.maximum(sigma_hat**2 - sigma**2, 0.0)), 0.0)
    max_sigma = sigmas.max()
    init = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return dict(
        timesteps=timesteps,
        sigmas=sigmas,
        input_scales=(1 / np.sqrt(sigma**2 + 1)).astype(np.float32),
        coefficients={
            "sigma": sigmas[:-1],
            "sigma_hat": sigma_hat.astype(np.float32),
            "sigma_next": sigmas[1:],
            "churn": churn.astype(np.float32),
        },
        init_noise_sigma=np.float32(init),
        options={"stochastic": bool((gamma > 0).any())},
    )


def _make_lcm(config: SchedulerConfig, spacing: str, n: int, opts: dict) -> dict:
    """diffusers ``LCMScheduler.set_timesteps``: ``n`` timesteps picked at evenly spaced indices (floored) of the
    distillation schedule ``k - 1, 2k - 1, ..., T - 1`` (``k = T // original_inference_steps``), descending; the
    boundary-condition scalings ``c_skip``, ``c_out`` of each; fresh noise after every step but the last."""
    T = config.num_train_timesteps
    original = int(opts["original_inference_steps"])
    if original > T:
        raise ConfigError(f"original_inference_steps {original} exceeds num_train_timesteps {T}")
    if n > original:
        raise ConfigError(f"num_inference_steps {n} exceeds the LCM schedule's original_inference_steps {original}")
    acp = schedules.alphas_cumprod_from_config(config)
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    prev = np.concatenate([timesteps[1:], timesteps[-1:]])
    # the last step returns the denoised sample itself: no noise, alpha_prev = 1
    acp_prev = np.concatenate([acp[prev[:-1]], [1.0]]).astype(np.float32)
    scaled = timesteps.astype(np.float64) * float(opts["timestep_scaling"])
    c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data = 0.5
    c_out = scaled / np.sqrt(scaled**2 + 0.25)
    final = np.float32(1.0) if config.set_alpha_to_one else acp[0]
    with np.errstate(divide="ignore"):
        sigmas = _train_sigmas(np.concatenate([acp[timesteps], [final]]))
    return dict(
        timesteps=timesteps.astype(np.int32),
        sigmas=sigmas,
        input_scales=np.ones(n, np.float32),
        coefficients={"alpha_prod_t": acp[timesteps].astype(np.float32), "alpha_prod_t_prev": acp_prev,
                      "c_skip": c_skip.astype(np.float32), "c_out": c_out.astype(np.float32),
                      "add_noise": (np.arange(n) < n - 1).astype(np.float32)},
        init_noise_sigma=np.float32(1.0),
        options={
            "original_inference_steps": original,
            "timestep_scaling": float(opts["timestep_scaling"]),
            "clip_sample": bool(config.clip_sample),
            "clip_sample_range": float(config.clip_sample_range),
            "thresholding": bool(config.thresholding),
            "dynamic_thresholding_ratio": float(config.dynamic_thresholding_ratio),
            "sample_max_value": float(config.sample_max_value),
            "stochastic": n > 1,
        },
    )


_MAKERS = {"ddim": _make_ddim, "dpm++": _make_dpm, "euler": _make_euler, "lcm": _make_lcm}


def make_sampler(
    name: str,
    scheduler_config: Mapping[str, Any] | SchedulerConfig | None,
    num_inference_steps: int,
    **overrides: Any,
) -> Sampler:
    """Builds the sampler ``name`` for a diffusers scheduler config, as its ``set_timesteps`` would.

    Args:
      name: ``'ddim'``, ``'lcm'`` (diffusers ``LCMScheduler``: few-step latent consistency sampling; its
        ``original_inference_steps`` and ``timestep_scaling`` come from the config dict or overrides), ``'dpm++'``
        (diffusers ``DPMSolverMultistepScheduler``; its
        ``algorithm_type`` picks the variant) or ``'euler'`` (``EulerDiscreteScheduler``).
      scheduler_config: a diffusers ``scheduler_config.json`` dict (any scheduler class; the
        fields this sampler knows are used), a :class:`SchedulerConfig`, or None for defaults.
      num_inference_steps: number of denoiser evaluations.
      **overrides: scheduler config fields (``timestep_spacing='trailing'``,
        ``use_karras_sigmas=True``...) and step options: ``eta``, ``use_clipped_model_output``
        (DDIM); ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` (Euler).
    """
    key = _ALIASES.get(name, name)
    if key not in _MAKERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES}")
    if int(num_inference_steps) < 1:
        raise ConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    step_options = dict(_STEP_OPTIONS[key])
    if isinstance(scheduler_config, Mapping):  # scheduler-specific fields of a diffusers config (LCMScheduler's)
        step_options.update({k: v for k, v in scheduler_config.items() if k in step_options})
    config_overrides = {}
    for k, v in overrides.items():
        if k in step_options:
            step_options[k] = v
        elif any(k in opts for opts in _STEP_OPTIONS.values()):
            raise ConfigError(f"option {k!r} does not apply to sampler {key!r}")
        else:
            config_overrides[k] = v
    try:  # a scheduler_config.json with a wrong type or an empty list must end in one line, not a traceback
        config = schedules.scheduler_config_from_dict(scheduler_config or {}, **config_overrides)
        spacing = config.timestep_spacing or _DEFAULT_SPACING[key]
        built = _MAKERS[key](config, spacing, int(num_inference_steps), step_options)
    except (TypeError, ValueError, ZeroDivisionError, KeyError, IndexError, OverflowError) as e:
        raise ConfigError(f"the scheduler config does not describe a {key} sampler ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return Sampler(
        timesteps=jnp.asarray(built["timesteps"]),
        sigmas=jnp.asarray(built["sigmas"], jnp.float32),
        input_scales=jnp.asarray(built["input_scales"], jnp.float32),
        coefficients={k: jnp.asarray(v) for k, v in built["coefficients"].items()},
        init_noise_sigma=jnp.asarray(built["init_noise_sigma"], jnp.float32),
        name=key,
        prediction_type=config.prediction_type,
        options=tuple(sorted(built["options"].items())),
    )


# ----------------------------------------------------------------------------- the pure step


def init_state(sampler: Sampler, latents: jax.Array) -> tuple[jax.Array, ...]:
    """The multistep history carried between steps: the previous ``solver_order - 1`` converted
    outputs for DPM-Solver (zeros until filled; their weights are zero until then), else ``()``."""
    if sampler.name == "dpm++":
        return tuple(jnp.zeros(latents.shape, jnp.float32) for _ in range(sampler.option("solver_order") - 1))
    return ()


def scale_model_input(sampler: Sampler, latents: jax.Array, i: jax.Array) -> jax.Array:
    """diffusers' ``scheduler.scale_model_input`` at step ``i``."""
    return (latents.astype(jnp.float32) * sampler.input_scales[i]).astype(latents.dtype)


def _threshold(sampler: Sampler, x0: jax.Array) -> jax.Array:
    return schedules.dynamic_threshold(
        x0, sampler.option("dynamic_thresholding_ratio"), sampler.option("sample_max_value")
    )


def _ddim_step(sampler, i, state, out, x, noise):
    c = sampler.coefficients
    a_t, a_prev = c["alpha_prod_t"][i], c["alpha_prod_t_prev"][i]
    b_t = 1 - a_t
    x0, eps = schedules.predict_x0_eps(out, x, a_t**0.5, b_t**0.5, sampler.prediction_type)
    # Thresholding takes precedence over clipping, as in diffusers.
    if sampler.option("thresholding"):
        x0 = _threshold(sampler, x0)
    elif sampler.option("clip_sample"):
        x0 = jnp.clip(x0, -sampler.option("clip_sample_range"), sampler.option("clip_sample_range"))
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = sampler.option("eta") * variance**0.5
    if sampler.option("use_clipped_model_output"):
        eps = (x - a_t**0.5 * x0) / b_t**0.5
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if sampler.option("eta") > 0:
        prev = prev + std * noise
    return prev, state


def _dpm_step(sampler, i, state, out, x, noise):
    c = sampler.coefficients
    alpha, sigma = c["alpha_s"][i], c["sigma_s"][i]
    if sampler.option("algorithm_type").endswith("++"):
        m, _ = schedules.predict_x0_eps(out, x, alpha, sigma, sampler.prediction_type)
        if sampler.option("thresholding"):
            m = _threshold(sampler, m)
    else:
        _, m = schedules.predict_x0_eps(out, x, alpha, sigma, sampler.prediction_type)
    history = (m,) + tuple(state)
    prev = c["c_x"][i] * x
    for k, m_k in enumerate(history):
        prev = prev + c["c_m"][i, k] * m_k
    if sampler.is_stochastic:
        prev = prev + c["c_noise"][i] * noise
    return prev, history[: len(state)]


def _euler_step(sampler, i, state, out, x, noise):
    c = sampler.coefficients
    sigma, sigma_hat, sigma_next = c["sigma"][i], c["sigma_hat"][i], c["sigma_next"][i]
    if sampler.is_stochastic:
        x = x + c["churn"][i] * noise
    if sampler.prediction_type == "epsilon":
        x0 = x - sigma_hat * out
    elif sampler.prediction_type == "v_prediction":
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        x0 = out
    derivative = (x - x0) / sigma_hat
    return x + derivative * (sigma_next - sigma_hat), state


def _lcm_step(sampler, i, state, out, x, noise):
    c = sampler.coefficients
    a_t, a_prev = c["alpha_prod_t"][i], c["alpha_prod_t_prev"][i]
    x0, _ = schedules.predict_x0_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, sampler.prediction_type)
    if sampler.option("thresholding"):
        x0 = _threshold(sampler, x0)
    elif sampler.option("clip_sample"):
        x0 = jnp.clip(x0, -sampler.option("clip_sample_range"), sampler.option("clip_sample_range"))
    denoised = c["c_out"][i] * x0 + c["c_skip"][i] * x
    prev = a_prev**0.5 * denoised
    if noise is not None:
        prev = prev + c["add_noise"][i] * (1 - a_prev) ** 0.5 * noise
    return prev, state


_STEPS = {"ddim": _ddim_step, "dpm++": _dpm_step, "euler": _euler_step, "lcm": _lcm_step}


def step(
    sampler: Sampler,
    i: jax.Array,
    model_output: jax.Array,
    latents: jax.Array,
    state: tuple[jax.Array, ...],
    noise: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One reverse step from step index ``i`` (not the timestep) to ``i + 1``.

    ``model_output`` is the denoiser's output at ``scale_model_input(latents)`` and
    ``sampler.timesteps[i]``; ``noise`` (same shape as ``latents``) is required when
    ``sampler.is_stochastic``. Arithmetic is float32; the result has ``latents.dtype``.
    Returns ``(latents at step i + 1, new state)``.
    """
    if sampler.is_stochastic and noise is None:
        raise ValueError(f"sampler {sampler.name!r} is stochastic with these options: pass noise")
    noise = None if noise is None else noise.astype(jnp.float32)
    prev, state = _STEPS[sampler.name](
        sampler, i, state, model_output.astype(jnp.float32), latents.astype(jnp.float32), noise
    )
    return prev.astype(latents.dtype), state


def output_for_x0(sampler: Sampler, i: jax.Array, latents: jax.Array, x0: jax.Array) -> jax.Array:
    """The model output that makes step ``i`` see ``x0`` as its clean estimate at ``latents`` (unscaled, as
    :func:`step` receives them): how known frames (context frames of prediction and interpolation) are held
    fixed while the others are sampled. Every sampler's step computes its ``x0`` estimate from this output
    exactly (for the stochastic Euler variant, up to the churn noise added inside the step)."""
    if sampler.name == "lcm":
        raise ConfigError("known (context) frames are not supported with the LCM sampler")
    c = sampler.coefficients
    x = latents.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    if sampler.name == "euler":
        sigma, sigma_hat = c["sigma"][i], c["sigma_hat"][i]
        if sampler.prediction_type == "epsilon":
            return (x - x0) / sigma_hat
        if sampler.prediction_type == "v_prediction":
            return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1) ** 0.5 / sigma
        return x0
    if sampler.name == "ddim":
        a_t = c["alpha_prod_t"][i]
        alpha, sigma = a_t**0.5, (1 - a_t) ** 0.5
    else:
        alpha, sigma = c["alpha_s"][i], c["sigma_s"][i]
    eps = (x - alpha * x0) / sigma
    if sampler.prediction_type == "epsilon":
        return eps
    if sampler.prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


# ----------------------------------------------------------------------------- the loop


def sample(
    denoise_fn: DenoiseFn,
    sampler: Sampler,
    noise: jax.Array,
    *,
    key: jax.Array | None = None,
    variance_noise: jax.Array | None = None,
    progress: Callable[[int], Any] | None = None,
    known: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Runs the whole reverse process in one ``lax.scan``; traceable (jit it, or call it under jit).

    Args:
      denoise_fn: ``(model_input, timestep) -> model_output``, with ``model_input`` already
        scaled by ``scale_model_input`` (same shape and dtype as ``noise``) and ``timestep`` the
        scalar diffusers would pass to the U-Net (int32 for DDIM / DPM-Solver, float32 for Euler).
      sampler: from :func:`make_sampler`.
      noise: unit-variance Gaussian latents, e.g. ``(B, h, w, C)`` or ``(B, F, h, w, C)``. They
        are multiplied by ``sampler.init_noise_sigma`` here, as diffusers' ``prepare_latents``
        does, so callers never scale them.
      key: PRNG key for the fresh noise of stochastic samplers (step ``i`` uses
        ``fold_in(key, i)``).
      variance_noise: instead of ``key``, the per-step noise ``(N, *noise.shape)`` (diffusers'
        ``variance_noise``; used by the parity tests).
      progress: host callback receiving each finished step index (e.g. :func:`progress_bar`);
        it runs through ``jax.debug.callback``, possibly out of order.
      known: ``(x0, mask)``: clean latents (shape of ``noise``) and a mask broadcastable to it (1 where
        known, e.g. ``(B, F, 1, 1, 1)`` for context frames). At every step the denoiser's output there is
        replaced by :func:`output_for_x0`, so the sampler's clean estimate of known entries is exactly
        ``x0`` and the rest is sampled consistently with them; the result holds ``x0`` there.

    Returns:
      The final latents, shape and dtype of ``noise``.
    """
    n = sampler.num_inference_steps
    stochastic = sampler.is_stochastic
    if stochastic and key is None and variance_noise is None:
        raise ValueError(f"sampler {sampler.name!r} is stochastic with these options: pass key or variance_noise")
    if variance_noise is not None and variance_noise.shape != (n, *noise.shape):
        raise ValueError(f"variance_noise must have shape {(n, *noise.shape)}, got {variance_noise.shape}")

    latents = (noise.astype(jnp.float32) * sampler.init_noise_sigma).astype(noise.dtype)
    xs = {"i": jnp.arange(n)}
    if stochastic and variance_noise is not None:
        xs["noise"] = variance_noise

    def body(carry, xs):
        x, state = carry
        i = xs["i"]
        out = denoise_fn(scale_model_input(sampler, x, i), sampler.timesteps[i])
        if known is not None:
            out = jnp.where(known[1] > 0.5, output_for_x0(sampler, i, x, known[0]), out.astype(jnp.float32))
        z = None
        if stochastic:
            z = xs["noise"] if "noise" in xs else jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        x, state = step(sampler, i, out, x, state, z)
        if progress is not None:
            jax.debug.callback(progress, i)
        return (x, state), None

    (latents, _), _ = jax.lax.scan(body, (latents, init_state(sampler, latents)), xs)
    if known is not None:
        latents = jnp.where(known[1] > 0.5, known[0].astype(latents.dtype), latents)
    return latents


@contextlib.contextmanager
def progress_bar(total: int, **tqdm_kwargs: Any) -> Iterator[Callable[[Any], None]]:
    """A tqdm bar and the callback for :func:`sample`'s ``progress`` that advances it::

        with progress_bar(sampler.num_inference_steps, desc="denoising") as cb:
            latents = jax.block_until_ready(sample_jit(noise, cb))
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, **tqdm_kwargs)

    def callback(_step: Any) -> None:
        # Steps may arrive out of order from the device; the bar only counts them.
        bar.update(1)

    try:
        yield callback
    finally:
        bar.close()
