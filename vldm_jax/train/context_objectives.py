"""Training objectives of the context-frame models: prediction (``objective.name: prediction``) and
interpolation (``objective.name: interpolation``), Video LDM (Blattmann et al. 2023) Sec. 3.1.1 and 3.3.

Both are the temporal fine-tuning loss of :class:`~vldm_jax.train.objectives.TemporalObjective` (same batches,
schedule, text dropout, frozen spatial layers) on a video U-Net with ``context_conditioning`` (``temporal``: the
paper's learned downsampling into the temporal layers; ``concat``: SVD-style input channels), plus the paper's
*masking*: some frames of the clip are *context frames*, given to the model clean (scaled latents, multiplied by
the binary mask) through ``context_latents`` / ``context_mask``; the denoising loss is taken on the other frames
only. All frames are noised to the same timestep as usual, so at sampling time the context frames can be held
fixed by :func:`~vldm_jax.diffusion.samplers.sample`'s ``known`` (what :mod:`vldm_jax.pipelines.stages` does).

:class:`PredictionObjective`
    Per sample, the number of context frames ``n`` is drawn from ``{0, 1, ..., len(context_probs) - 1}`` with
    probabilities ``context_probs`` (default ``[0.1, 0.45, 0.45]``: 0, 1 or 2 frames); the context frames are the
    first ``n`` frames of the clip. ``n = 0`` (an all-zero mask) is the unconditional branch that classifier-free
    guidance on the context uses at sampling time.
:class:`InterpolationObjective`
    The clip has ``factor * (T - 1) + 1`` frames (``factor`` 4: 5, 9, 13, 17 ...); the keyframes at positions
    0, 4, 8, ... are the context and the 3 frames between each pair are predicted (T -> 4T - 3, the layout of
    :func:`~vldm_jax.pipelines.stages.interpolation_layout`). With probability ``drop_context_prob`` a sample's
    context is dropped (all-zero mask), for guidance.

The loss is the mean squared error over the *non-context* frames of the batch (a sample whose context was
dropped, or that drew ``n = 0``, contributes all its frames); ``loss_on_context: true`` takes it on every frame.
``context_noise_aug`` (default 0) adds Gaussian noise to the context latents the model sees, with a standard
deviation drawn per sample uniformly from ``[0, context_noise_aug]``; the model is not told the level, and sampling
gives clean context (a robustness augmentation; the targets and the noised frames are unchanged).

``objective.options`` (validated, unknown keys are errors): see :class:`PredictionOptions` and
:class:`InterpolationOptions`. The standard ``objective`` fields (``prediction_type``, ``encode_in_step``,
``text_dropout``, ``sample_*``) mean what they mean for the temporal objective; ``image_ratio`` must stay 0
(an image-only sample bypasses the temporal layers, so it could not use its context).

Models (:func:`build_prediction_setup`, :func:`build_interpolation_setup`): as the temporal stage builds them
(:func:`vldm_jax.train.objectives.build_setup`), with ``model.temporal.context_conditioning`` (``temporal`` when
not set):

* ``model.pretrained`` an image LDM: its U-Net becomes a video U-Net by ``VideoUNet.from_image_unet`` (spatial
  weights copied, temporal layers and context modules new);
* ``model.pretrained`` a Video LDM pipeline folder (or any folder whose ``unet/`` is a video U-Net, e.g. the
  key-frame model): its video U-Net is the start, temporal layers included; context modules it lacks are added
  fresh (zero-initialised, so the start is exactly the key-frame model);
* ``objective.options.init_temporal``: a ``temporal.safetensors`` written by an earlier run (the key-frame
  model's ``vldm train`` export) whose temporal layers replace the fresh ones (every array must fit; the context
  modules stay fresh unless the file has them);
* ``model.pretrained: null``: random tiny models from ``model.unet`` / ``vae`` / ``text_encoder`` (a smoke test).

The trained temporal layers, context modules included (their names contain ``temporal``), are written to
``workdir/temporal.safetensors`` at the end of a run, as for the temporal stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.temporal import fold_frames, unfold_frames
from vldm_jax.train.objectives import Setup, TemporalObjective

INTERPOLATION_FACTOR = 4


# ================================================================================================= options

@dataclasses.dataclass(frozen=True)
class PredictionOptions:
    """``objective.options`` of ``prediction``."""

    # Probability of 0, 1, 2, ... context frames (the first frames of the clip) per training sample.
    context_probs: tuple = (0.1, 0.45, 0.45)
    # Largest std of the Gaussian noise added to the context latents the model sees (0: clean context).
    context_noise_aug: float = 0.0
    # Take the loss on every frame (false: on the non-context frames only, the paper's masking).
    loss_on_context: bool = False
    # Sample GIFs: context frames given (the first ones of the batch's clip) and the context guidance scale.
    sample_context_frames: int = 2
    sample_context_guidance: float = 1.0
    # A temporal.safetensors (an earlier run's export, e.g. the key-frame model) to start the temporal layers from.
    init_temporal: str | None = None


@dataclasses.dataclass(frozen=True)
class InterpolationOptions:
    """``objective.options`` of ``interpolation``."""

    # Probability of training a sample without its keyframes (all-zero mask): the unconditional branch.
    drop_context_prob: float = 0.1
    # Frames per keyframe interval: clips have factor * (T - 1) + 1 frames, keyframes every factor frames.
    factor: int = INTERPOLATION_FACTOR
    context_noise_aug: float = 0.0
    loss_on_context: bool = False
    sample_context_guidance: float = 1.0
    init_temporal: str | None = None


def _coerce_option(name: str, value: Any, default: Any, where: str):
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return tuple(float(v) for v in value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if value is None or isinstance(value, str):
            return value
        raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"objective.options.{name} for {where!r}: bad value {value!r} "
                          f"(expected something like {default!r})") from None


def parse_options(cls, options: Mapping[str, Any] | None, where: str):
    """``cls`` (:class:`PredictionOptions` / :class:`InterpolationOptions`) from the ``objective.options`` dict;
    unknown keys and bad values are ConfigErrors naming them."""
    options = dict(options or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise ConfigError(f"unknown objective.options key {unknown[0]!r} for objective {where!r} "
                          f"(known: {', '.join(names)})")
    defaults = cls()
    return cls(**{k: _coerce_option(k, v, getattr(defaults, k), where) for k, v in options.items()})


# ============================================================================================== objectives

def frame_weighted_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean squared error over the frames with weight 1: pred, target ``(B, F, h, w, C)``, weights ``(B, F)``.
    Each weighted frame counts equally (a float32 scalar; 0 when no frame is weighted)."""
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(2, 3, 4))
    weights = weights.astype(jnp.float32)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class ContextObjective(TemporalObjective):
    """The temporal objective with masked context frames; subclasses say which frames are context
    (:meth:`context_mask` for training, :meth:`sample_mask` for sample GIFs)."""

    context_noise_aug: float = 0.0
    loss_on_context: bool = False
    sample_context_guidance: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.context_noise_aug < 0:
            raise ConfigError(f"objective.options.context_noise_aug must be >= 0 (got {self.context_noise_aug})")
        if self.image_ratio > 0:
            raise ConfigError("objective.image_ratio must be 0 for prediction and interpolation (an image-only "
                              "sample bypasses the temporal layers and could not use its context frames)")

    # --------------------------------------------------------------------------------------- frame layout
    def check_frames(self, num_frames: int) -> None:
        """Raises a ConfigError when clips of ``num_frames`` frames do not fit the objective."""

    def context_mask(self, key: jax.Array, batch_size: int, num_frames: int) -> jax.Array:
        """The ``(B, F)`` float32 training mask (1: a context frame)."""
        raise NotImplementedError

    def sample_mask(self, batch_size: int, num_frames: int) -> jax.Array:
        """The ``(B, F)`` float32 mask of the sample GIFs."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- the loss
    def loss(self, model, batch, key):
        k_step, k_img, k_ctx, k_aug = jax.random.split(key, 4)
        x0, text, t, x_t, target = self.noised(model, batch, k_step)
        b, f = x0.shape[:2]
        self.check_frames(f)
        mask = self.context_mask(k_ctx, b, f)
        context = x0
        if self.context_noise_aug > 0:
            k_level, k_eps = jax.random.split(k_aug)
            level = self.context_noise_aug * jax.random.uniform(k_level, (b, 1, 1, 1, 1))
            context = context + level * jax.random.normal(k_eps, x0.shape, jnp.float32)
        indicator = self.image_only(batch, k_img, b, f)
        pred = model.unet(x_t, t, text, image_only_indicator=indicator.astype(x_t.dtype),
                          context_latents=context.astype(x_t.dtype), context_mask=mask.astype(x_t.dtype))
        weights = jnp.ones_like(mask) if self.loss_on_context else 1.0 - mask
        loss = frame_weighted_loss(pred, target, weights)
        metrics = {"context_frames": jnp.mean(jnp.sum(mask, axis=1)),
                   "unconditional_fraction": jnp.mean((jnp.sum(mask, axis=1) == 0).astype(jnp.float32))}
        return loss, metrics

    # ---------------------------------------------------------------------------------------- sampling
    def generate(self, model, x0, text, mask, key, *, null_text=None, steps: int | None = None,
                 scheduler: str | None = None, guidance: float | None = None,
                 context_guidance: float | None = None) -> jax.Array:
        """Latents ``(B, F, h, w, C)`` sampled with the frames of ``mask`` ``(B, F)`` (1: given) taken from ``x0``
        (scaled clean latents; returned unchanged there), the others predicted; guidance on the text
        (``guidance`` > 1, needs ``null_text``) and/or on the context (``context_guidance`` != 1), as
        :func:`vldm_jax.diffusion.guidance.guided_output`. Traceable."""
        from vldm_jax.diffusion.guidance import guided_output
        from vldm_jax.diffusion.samplers import make_sampler, sample

        b, f = x0.shape[:2]
        steps = self.sample_steps if steps is None else steps
        sampler = make_sampler(scheduler or self.sample_scheduler, dict(self.scheduler_config), steps)
        guidance = self.sample_guidance if guidance is None else guidance
        context_guidance = self.sample_context_guidance if context_guidance is None else context_guidance
        guide_text = guidance != 1.0 and null_text is not None
        guide_context = context_guidance != 1.0

        def call(x, t, txt, lat, m):
            n = x.shape[0]
            return model.unet(x, jnp.broadcast_to(t, (n,)), txt, image_only_indicator=jnp.zeros((n, f), x.dtype),
                              context_latents=lat, context_mask=m)

        def denoise(x, t):
            return guided_output(call, x, t, text, null_text if guide_text else text, x0, mask,
                                 jnp.float32(guidance), jnp.float32(context_guidance),
                                 guide_text=guide_text, guide_context=guide_context)

        noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
        return sample(denoise, sampler, noise, key=jax.random.fold_in(key, 2),
                      known=(x0, mask[:, :, None, None, None]))

    def sample(self, model, batch, key):
        """The batch's clips (left) beside samples (right) that were given the clip's context frames
        (:meth:`sample_mask`) and predicted the rest: ``(B, F, H, 2W, 3)`` in [0, 1]; None without a VAE."""
        if model.vae is None:
            return None
        x0, text = self.latents_and_context(model, batch, key)
        b, f = x0.shape[:2]
        self.check_frames(f)
        guided = self.sample_guidance > 1.0 and self.null_condition is not None
        null_text = self.null_context(model, b).astype(text.dtype) if guided else None
        latents = self.generate(model, x0, text, self.sample_mask(b, f), key, null_text=null_text,
                                guidance=self.sample_guidance if guided else 1.0)
        both = jnp.concatenate([x0, latents.astype(x0.dtype)])
        images = model.vae.decode(fold_frames(both) / self.scaling_factor + self.shift_factor)
        videos = unfold_frames(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0), f)
        return jnp.concatenate([videos[:b], videos[b:]], axis=3)


@dataclasses.dataclass(frozen=True, eq=False)
class PredictionObjective(ContextObjective):
    """Video LDM's prediction model: per sample 0, 1 or 2 (``context_probs``) *first* frames of the clip are
    given clean as context (mask 1, scaled latents masked), and the denoising loss is taken on the non-context
    frames only (the paper's masking; ``loss_on_context`` for all frames). 0 context frames train the
    unconditional branch of context guidance."""

    context_probs: tuple = (0.1, 0.45, 0.45)
    sample_context_frames: int = 2

    def __post_init__(self):
        super().__post_init__()
        p = np.asarray(self.context_probs, np.float64)
        if p.ndim != 1 or p.size < 1 or np.any(p < 0) or not np.isclose(p.sum(), 1.0, atol=1e-4):
            raise ConfigError(f"objective.options.context_probs must be probabilities of 0, 1, 2 ... context frames "
                              f"summing to 1 (got {list(self.context_probs)})")
        if self.sample_context_frames < 0:
            raise ConfigError("objective.options.sample_context_frames must be >= 0")

    @property
    def max_context(self) -> int:
        return len(self.context_probs) - 1

    def check_frames(self, num_frames: int) -> None:
        if self.max_context >= num_frames:
            raise ConfigError(f"prediction with up to {self.max_context} context frames needs clips of more than "
                              f"{self.max_context} frames (data.num_frames = {num_frames})")
        if self.sample_context_frames >= num_frames:
            raise ConfigError(f"objective.options.sample_context_frames ({self.sample_context_frames}) must be "
                              f"smaller than data.num_frames ({num_frames})")

    def num_context(self, key: jax.Array, batch_size: int) -> jax.Array:
        """``(B,)`` int32: the number of context frames of each sample, drawn from ``context_probs``."""
        logits = jnp.log(jnp.asarray(self.context_probs, jnp.float32))
        return jax.random.categorical(key, logits, shape=(batch_size,)).astype(jnp.int32)

    def context_mask(self, key, batch_size, num_frames):
        n = self.num_context(key, batch_size)
        return (jnp.arange(num_frames)[None, :] < n[:, None]).astype(jnp.float32)

    def sample_mask(self, batch_size, num_frames):
        row = (jnp.arange(num_frames) < self.sample_context_frames).astype(jnp.float32)
        return jnp.broadcast_to(row[None, :], (batch_size, num_frames))


@dataclasses.dataclass(frozen=True, eq=False)
class InterpolationObjective(ContextObjective):
    """Video LDM's interpolation model: clips of ``factor * (T - 1) + 1`` frames whose keyframes (positions 0,
    ``factor``, 2 ``factor`` ...) are the context (mask 1) and whose other frames are predicted; the loss is on the
    non-keyframes. With probability ``drop_context_prob`` a sample gets no context (all-zero mask, loss on every
    frame): the unconditional branch of context guidance."""

    drop_context_prob: float = 0.1
    factor: int = INTERPOLATION_FACTOR

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.drop_context_prob <= 1.0:
            raise ConfigError(f"objective.options.drop_context_prob must be in [0, 1] (got {self.drop_context_prob})")
        if self.factor < 2:
            raise ConfigError(f"objective.options.factor must be >= 2 (got {self.factor})")

    def check_frames(self, num_frames: int) -> None:
        check_interpolation_frames(num_frames, self.factor)

    def keyframes(self, num_frames: int) -> jax.Array:
        """``(F,)`` float32, 1 at the keyframe positions 0, factor, 2 factor, ..."""
        return (jnp.arange(num_frames) % self.factor == 0).astype(jnp.float32)

    def context_mask(self, key, batch_size, num_frames):
        keep = 1.0 - jax.random.bernoulli(key, self.drop_context_prob, (batch_size,)).astype(jnp.float32)
        return keep[:, None] * self.keyframes(num_frames)[None, :]

    def sample_mask(self, batch_size, num_frames):
        return jnp.broadcast_to(self.keyframes(num_frames)[None, :], (batch_size, num_frames))


def check_interpolation_frames(num_frames: int, factor: int = INTERPOLATION_FACTOR) -> None:
    """A ConfigError unless ``num_frames = factor * (T - 1) + 1`` with ``T >= 2`` keyframes."""
    if num_frames < factor + 1 or (num_frames - 1) % factor:
        good = ", ".join(str(factor * k + 1) for k in range(1, 5))
        raise ConfigError(f"interpolation clips must have {factor} * (T - 1) + 1 frames (T >= 2 keyframes: "
                          f"{good} ...); data.num_frames is {num_frames}")


# ================================================================================================ building

def add_context_conditioning(unet, context_conditioning: str, *, seed: int = 0):
    """``unet`` (a :class:`~vldm_jax.models.unet.VideoUNet`) with ``context_conditioning``: every parameter it
    has is kept where the new model has it (spatial and temporal layers: a key-frame model's); context modules
    it lacks are freshly initialised (zero-initialised outputs, so the result equals ``unet`` without context)."""
    from vldm_jax.models.roles import abstract_video_unet, flat_arrays, init_temporal, merge_parts

    if unet.config.context_conditioning == context_conditioning:
        return unet
    config = dataclasses.replace(unet.config, context_conditioning=context_conditioning)
    cls = type(unet)
    graphdef, abstract = abstract_video_unet.__wrapped__(cls, config, unet.dtype, None)
    wanted = {tuple(p) for p, _ in nnx.to_flat_state(abstract)}
    arrays = {p: a for p, a in flat_arrays(unet).items() if p in wanted}
    for p, a in init_temporal(cls, config, dtype=unet.dtype, seed=seed).items():
        arrays.setdefault(p, a)
    return merge_parts(graphdef, abstract, arrays, name="the pretrained video U-Net")


def load_temporal_arrays(unet, path: str):
    """``unet`` with the arrays of the temporal weights file ``path`` (``save_temporal``; e.g. the key-frame
    run's ``temporal.safetensors``) in place of its own; every array of the file must fit."""
    from vldm_jax.checkpoints.temporal import read_temporal
    from vldm_jax.models.roles import _join, flat_arrays, merge_parts

    arrays, _ = read_temporal(path)
    graphdef, state = nnx.split(unet)
    mine = flat_arrays(state)
    bad = [f"{_join(p)} {tuple(np.shape(a))}" for p, a in arrays.items()
           if p not in mine or tuple(np.shape(a)) != tuple(np.shape(mine[p]))]
    if bad:
        raise ConfigError(f"objective.options.init_temporal {path}: {len(bad)} array(s) do not fit the U-Net "
                          f"(e.g. {bad[0]}); the temporal options (model.temporal) must match the file's")
    mine.update(arrays)
    return merge_parts(graphdef, state, mine, name=f"temporal weights {path}")


def _build_context_setup(config, objective_cls, options_cls, where: str) -> Setup:
    from vldm_jax.train.objectives import build_setup

    options = parse_options(options_cls, config.objective.options, where)
    temporal = dict(config.model.temporal)
    conditioning = temporal.setdefault("context_conditioning", "temporal")
    if conditioning not in ("temporal", "concat"):
        raise ConfigError(f"objective {where} needs model.temporal.context_conditioning temporal (the paper's) or "
                          f"concat (SVD-style input channels), got {conditioning!r}")
    if options_cls is InterpolationOptions:
        check_interpolation_frames(config.data.num_frames, options.factor)
    base_config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, temporal=temporal),
        objective=dataclasses.replace(config.objective, name="temporal", options={}))
    base = build_setup(base_config)
    fields = {f.name: getattr(base.objective, f.name) for f in dataclasses.fields(TemporalObjective)}
    extra = {k: v for k, v in dataclasses.asdict(options).items() if k != "init_temporal"}
    objective = objective_cls(**fields, **extra)
    if options_cls is PredictionOptions:
        objective.check_frames(config.data.num_frames)
    seed = config.train.seed

    def init_models():
        models = base.init_models()
        unet = add_context_conditioning(models.unet, conditioning, seed=seed)
        if options.init_temporal:
            unet = load_temporal_arrays(unet, options.init_temporal)
        if unet is not models.unet:
            unet.set_remat(config.model.remat)
            models.unet = unet
        return models

    return Setup(objective, init_models, traceable=base.traceable and not options.init_temporal)


def build_prediction_setup(config) -> Setup:
    """``objective.name: prediction``: :class:`PredictionObjective` and its models (see the module docstring)."""
    return _build_context_setup(config, PredictionObjective, PredictionOptions, "prediction")


def build_interpolation_setup(config) -> Setup:
    """``objective.name: interpolation``: :class:`InterpolationObjective` and its models (module docstring)."""
    return _build_context_setup(config, InterpolationObjective, InterpolationOptions, "interpolation")
