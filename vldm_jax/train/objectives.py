"""Training objectives: one loss per Video LDM stage, all behind one declared interface, :class:`Objective`.

What the training loop calls (:class:`ObjectiveDefaults` gives the members an objective may leave out):

``trained_module: str``
    The attribute of the models container whose parameters may train (``'unet'``; ``'vae'``...).
``host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]``
    Host-side preparation of one process's batch before it becomes global device arrays: tokenizing
    ``caption`` strings into ``input_ids``, dtype casts. Strings never enter the compiled step.
``loss(model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array) -> (loss, metrics)``
    Traced inside the jitted step. ``model`` is the merged models container (trainable and frozen
    parameters), ``batch`` the global batch plus ``step`` (int32 scalar: updates before this one, for
    schedules such as a discriminator warm-up), ``key`` this step's PRNG key. ``loss`` is a float32
    scalar, ``metrics`` a dict of float32 scalars logged beside it. Gradients flow only into the trainable
    parameters; frozen networks called here (VAE, text encoder) are constants.
``sample(model, batch, key) -> videos (B, F, H, W, 3) in [0, 1] | None``
    Traced; what the loop writes as sample GIFs every ``train.sample_every`` steps (None: nothing to show).
``trainable_filter(trainable: str) -> filter``
    An NNX filter ``(path, variable) -> bool`` over the whole container: what trains. By default
    ``model.trainable`` (``trainable``) applied to ``trained_module``, plus the whole text encoder when the
    objective trains it (``train_text_encoder``); every other variable is frozen.
``export(graphdef, state, workdir, data, say) -> Path | None``
    Writes what the next stage or a pipeline loads (process 0 only, after the last step): the temporal layers
    (``workdir/temporal.safetensors``), a VAE, a text-to-image pipeline...; ``exported(workdir)`` says whether a
    finished run, run again, still has to write it.

A two-player loss (decoder GAN) fits the single-loss interface by stopping gradients: the generator term
sees the discriminator through ``stop_gradient`` of its parameters and the discriminator term sees
``stop_gradient`` of the generated frames, so one backward pass gives each player its own gradient.

:class:`TemporalObjective` is the Video LDM temporal fine-tuning loss (Blattmann et al. 2023, Sec. 3.1): the
image LDM's denoising loss on video clips, per-video timestep, epsilon or v target on the image model's noise
schedule, with only the temporal layers trained. Image batches are mixed in through ``image_only_indicator``:
such samples run the U-Net as the image model (alpha = 1 in every AlphaBlender).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion import schedules
from vldm_jax.errors import ConfigError
from vldm_jax.nn.temporal import fold_frames, unfold_frames

Filter = Callable[[tuple, Any], bool]


class Objective(Protocol):
    """The interface of a training objective (the module docstring describes each member)."""

    trained_module: str

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict]: ...

    def sample(self, model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array | None: ...

    def trainable_filter(self, trainable: str) -> Filter: ...

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path | None: ...

    def exported(self, workdir: Path) -> bool: ...


class ObjectiveDefaults:
    """The members an :class:`Objective` may leave out: no samples; ``model.trainable`` applied to
    ``trained_module`` trains (and the whole text encoder with ``train_text_encoder``); nothing to export."""

    train_text_encoder = False

    def sample(self, model, batch, key) -> jax.Array | None:
        return None

    def trainable_filter(self, trainable: str) -> Filter:
        from vldm_jax.train import state as statelib

        keep = statelib.trainable_filter(trainable, self.trained_module)
        if not self.train_text_encoder:
            return keep
        text = statelib.trainable_filter("all", "text_encoder")
        return lambda path, value: keep(path, value) or text(path, value)

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path | None:
        return None

    def exported(self, workdir: Path) -> bool:
        return True


def exportable_here(state) -> bool:
    """Whether this process holds the whole trained state, so it can write an export (a multi-host run's arrays are
    spread over hosts; its checkpoints hold them)."""
    return jax.process_count() == 1 and all(x.is_fully_addressable for x in jax.tree.leaves(state.trainable))


def trained_models_on_host(graphdef, state):
    """The trained models on the host, with the EMA weights when the run keeps them: what an export writes."""
    params = state.ema if state.ema is not None else state.trainable
    return nnx.merge(graphdef, jax.device_get(params), jax.device_get(state.frozen))


def export_temporal(graphdef, state, workdir: Path, say: Callable[[str], None]) -> Path | None:
    """Writes the trained temporal layers (EMA when kept) as ``workdir/temporal.safetensors``: with any compatible
    image model they make a video model (``vldm convert SRC DST --temporal FILE``). With a trained text encoder
    (``objective.train_text_encoder``) also ``workdir/text_encoder``, which the next stages and the pipeline need."""
    from vldm_jax.models.unet import VideoUNet

    if not exportable_here(state):
        return None
    models = trained_models_on_host(graphdef, state)
    unet = getattr(models, "unet", None)
    if not isinstance(unet, VideoUNet):
        return None
    from vldm_jax.checkpoints.temporal import save_temporal

    path = save_temporal(unet, workdir / "temporal.safetensors", overwrite=True)
    say(f"wrote the {'EMA ' if state.ema is not None else ''}temporal layers to {path}")
    if getattr(models, "text_encoder", None) is not None and "text_encoder" in dict(state.trainable):
        from vldm_jax.checkpoints.store import atomic_folder, save_module

        with atomic_folder(workdir / "text_encoder", overwrite=True) as tmp:
            save_module(models.text_encoder, tmp)
        say(f"wrote the trained text encoder to {workdir / 'text_encoder'}")
    return path


def parse_options(cls, options: Mapping[str, Any] | None, where: str):
    """The options dataclass ``cls`` from the ``objective.options`` dict of objective ``where``: each value coerced
    to its field's type (from the default, or the annotation when the default is None); unknown keys and bad values
    are ConfigErrors naming them."""
    options = dict(options or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise ConfigError(f"unknown objective.options key {unknown[0]!r} for objective {where!r} "
                          f"(known: {', '.join(names)})")
    defaults = cls()
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce_option(k, v, getattr(defaults, k), hints.get(k), where) for k, v in options.items()})


_EXAMPLES = {bool: False, int: 0, float: 0.0, str: "", dict: {}, tuple: ()}


def _coerce_option(name: str, value: Any, default: Any, hint: Any, where: str):
    if default is None:
        if value is None:
            return None
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = typing.get_origin(kinds[0]) or kinds[0] if kinds else str
        default = _EXAMPLES.get(kind, "")
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, (bool, int)):
            return bool(value)
        raise ConfigError(f"objective.options.{name} must be true or false for objective {where!r} (got {value!r})")
    try:
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
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


class VideoModels(nnx.Module):
    """The networks of a video LDM training run: ``unet`` (a video U-Net, partly trained), ``vae`` and
    ``text_encoder`` (frozen; None when batches carry precomputed latents and text embeddings)."""

    def __init__(self, unet: nnx.Module, vae: nnx.Module | None = None, text_encoder: nnx.Module | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder


def to_unit_range(video: jax.Array) -> jax.Array:
    """uint8 frames [0, 255] -> float32 [-1, 1]; float frames are taken to be in [-1, 1] already (what
    :mod:`vldm_jax.data` yields)."""
    if video.dtype == jnp.uint8:
        return video.astype(jnp.float32) / 127.5 - 1.0
    return video.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class TemporalObjective(ObjectiveDefaults):
    """Video LDM temporal fine-tuning.

    Batch keys, with ``encode_in_step`` (the frozen VAE and text encoder run inside the step):
      ``video`` ``(B, F, H, W, 3)`` float in [-1, 1] (or uint8); ``input_ids`` ``(B, 77)`` int32 (or
      ``caption`` strings, tokenized by :meth:`host_batch`).
    Without it (a cache of precomputed features):
      ``latents`` ``(B, F, h, w, C)`` already multiplied by the VAE scaling factor;
      ``encoder_hidden_states`` ``(B, S, D)``.
    Optional: ``image_only_indicator`` ``(B, F)`` (1: the frames are unrelated images; the loss still applies,
    the temporal layers are bypassed for them). When absent, each sample is taken as a set of images with
    probability ``image_ratio``.

    The video U-Net is called as ``unet(x (B, F, h, w, C), t (B,), context (B, S, D),
    image_only_indicator=(B, F))``.
    """

    schedule: schedules.NoiseSchedule
    scheduler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    encode_in_step: bool = True
    sample_posterior: bool = True
    image_ratio: float = 0.0
    text_dropout: float = 0.0
    noise_offset: float = 0.0
    high_noise_fraction: float = 0.0
    train_text_encoder: bool = False
    clip_skip: int = 0
    tokenizer: Any = None
    # Token ids (S,) of the empty prompt (encode_in_step) or its context (S, D) (precomputed), for text dropout
    # and guided samples.
    null_condition: Any = None
    sample_scheduler: str = "ddim"
    sample_steps: int = 10
    sample_guidance: float = 1.0
    trained_module: str = "unet"

    def __post_init__(self):
        if self.text_dropout > 0 and self.null_condition is None:
            raise ConfigError("objective.text_dropout needs the empty prompt's ids or context (null_condition)")

    # ------------------------------------------------------------------------------------------- host side
    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("video", "input_ids") if self.encode_in_step else ("latents", "encoder_hidden_states")

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        if self.encode_in_step and "input_ids" not in batch and "caption" in batch:
            if self.tokenizer is None:
                raise ConfigError("batches carry captions but the objective has no tokenizer")
            from vldm_jax.models.tokenizer import tokenize

            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                        for c in np.asarray(batch["caption"]).reshape(-1)]
            batch["input_ids"] = tokenize(self.tokenizer, captions, max_length=self.tokenizer.model_max_length)
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise ConfigError(f"training batches lack {', '.join(missing)} (have: {', '.join(sorted(batch))}); "
                              f"objective.encode_in_step={self.encode_in_step}")
        return batch

    # ------------------------------------------------------------------------------------------ in the step
    def latents_and_context(self, model: VideoModels, batch, key):
        """Clean scaled latents ``(B, F, h, w, C)`` float32 and context ``(B, S, D)``."""
        if self.encode_in_step:
            video = batch["video"]
            frames = video.shape[1]
            posterior = model.vae.encode(fold_frames(to_unit_range(video)))
            z = posterior.sample(key) if self.sample_posterior else posterior.mode()
            latents = unfold_frames((z - self.shift_factor) * self.scaling_factor, frames)
            context = model.text_encoder.encode(batch["input_ids"], clip_skip=self.clip_skip)
        else:
            latents = batch["latents"].astype(jnp.float32)
            context = batch["encoder_hidden_states"]
        if not self.train_text_encoder:
            context = jax.lax.stop_gradient(context)
        return jax.lax.stop_gradient(latents), context

    def null_context(self, model: VideoModels, batch_size: int):
        null = jnp.asarray(self.null_condition)
        if self.encode_in_step:
            ctx = model.text_encoder.encode(null[None].astype(jnp.int32), clip_skip=self.clip_skip)
        else:
            ctx = null[None]
        return jnp.broadcast_to(ctx, (batch_size,) + ctx.shape[1:])

    def image_only(self, batch, key, batch_size: int, frames: int):
        """The ``(B, F)`` image-only indicator as bool."""
        if self.image_ratio > 0:
            flags = jax.random.bernoulli(key, self.image_ratio, (batch_size,))
        else:
            flags = jnp.zeros((batch_size,), bool)
        flags = jnp.broadcast_to(flags[:, None], (batch_size, frames))
        if "image_only_indicator" in batch:
            flags = flags | (batch["image_only_indicator"] > 0.5)
        return flags

    def sample_timesteps(self, key, b: int):
        """``(B,)`` integer timesteps: uniform, except that a ``high_noise_fraction`` of the clips draw from the upper
        half of the schedule."""
        n = self.schedule.num_train_timesteps
        t = jax.random.randint(key, (b,), 0, n)
        if self.high_noise_fraction > 0:
            k_high, k_pick = jax.random.split(jax.random.fold_in(key, 1))
            high = jax.random.randint(k_high, (b,), n // 2, n)
            t = jnp.where(jax.random.bernoulli(k_pick, self.high_noise_fraction, (b,)), high, t)
        return t

    def noised(self, model: VideoModels, batch, key):
        """One step's diffusion inputs: clean latents ``x0`` ``(B, F, h, w, C)``, the text context (with text
        dropout applied), the timesteps ``t`` ``(B,)``, the noised latents ``x_t`` and the denoiser's target."""
        k_vae, k_noise, k_t, k_drop, k_off = jax.random.split(key, 5)
        x0, context = self.latents_and_context(model, batch, k_vae)
        b = x0.shape[0]
        if self.text_dropout > 0:
            drop = jax.random.bernoulli(k_drop, self.text_dropout, (b,))
            context = jnp.where(drop[:, None, None], self.null_context(model, b).astype(context.dtype), context)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        if self.noise_offset:
            # Per-video, per-channel offset (shared by all frames and pixels).
            noise = noise + self.noise_offset * jax.random.normal(k_off, (b, 1, 1, 1, x0.shape[-1]))
        t = self.sample_timesteps(k_t, b)
        x_t = schedules.add_noise(self.schedule, x0, noise, t)
        target = schedules.training_target(self.schedule, x0, noise, t)
        return x0, context, t, x_t, target

    def loss(self, model: VideoModels, batch, key):
        k_step, k_img = jax.random.split(key)
        x0, context, t, x_t, target = self.noised(model, batch, k_step)
        b, f = x0.shape[:2]
        indicator = self.image_only(batch, k_img, b, f)
        pred = model.unet(x_t, t, context, image_only_indicator=indicator.astype(x_t.dtype))
        err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
        loss = jnp.mean(err)
        metrics = {"image_fraction": jnp.mean(indicator.astype(jnp.float32))}
        return loss, metrics

    def sample(self, model: VideoModels, batch, key):
        """Videos from the batch's captions (or cached contexts): ``(B, F, H, W, 3)`` in [0, 1], or None without a
        VAE to decode them."""
        from vldm_jax.diffusion.samplers import make_sampler, sample

        if model.vae is None:
            return None
        x0, context = self.latents_and_context(model, batch, key)
        b, f = x0.shape[:2]
        sampler = make_sampler(self.sample_scheduler, dict(self.scheduler_config), self.sample_steps)
        indicator = jnp.zeros((b, f), x0.dtype)
        guided = self.sample_guidance > 1.0 and self.null_condition is not None
        uncontext = self.null_context(model, b).astype(context.dtype) if guided else None

        def denoise(x, t):
            tt = jnp.broadcast_to(t, (b,))
            if not guided:
                return model.unet(x, tt, context, image_only_indicator=indicator)
            both = model.unet(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]),
                              jnp.concatenate([uncontext, context]),
                              image_only_indicator=jnp.concatenate([indicator, indicator]))
            u, c = jnp.split(both, 2)
            return u + self.sample_guidance * (c - u)

        noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
        latents = sample(denoise, sampler, noise, key=jax.random.fold_in(key, 2))
        images = model.vae.decode(fold_frames(latents) / self.scaling_factor + self.shift_factor)
        return unfold_frames(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0), f)

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path | None:
        return export_temporal(graphdef, state, workdir, say)


# ------------------------------------------------------------------------------------------------ building

def noise_schedule(scheduler_config: Mapping[str, Any], prediction_type: str | None = None
                   ) -> schedules.NoiseSchedule:
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return schedules.NoiseSchedule.from_config(dict(scheduler_config), **overrides)


def make_temporal_objective(objective_cfg, scheduler_config: Mapping[str, Any], *, vae_config=None,
                            tokenizer=None, clip_skip: int = 0, null_context=None) -> TemporalObjective:
    """A :class:`TemporalObjective` from the ``objective`` config section and the image model's parts."""
    cfg = objective_cfg
    sched = dict(scheduler_config)
    if cfg.prediction_type:
        sched["prediction_type"] = cfg.prediction_type
    null = None
    if cfg.encode_in_step and tokenizer is not None:
        from vldm_jax.models.tokenizer import tokenize

        null = tokenize(tokenizer, [""], max_length=tokenizer.model_max_length)[0]
    elif not cfg.encode_in_step:
        null = null_context
    scaling = getattr(vae_config, "scaling_factor", 0.18215) if vae_config is not None else 0.18215
    shift = getattr(vae_config, "shift_factor", None) if vae_config is not None else None
    return TemporalObjective(
        schedule=noise_schedule(sched), scheduler_config=sched, scaling_factor=float(scaling),
        shift_factor=float(shift or 0.0), encode_in_step=cfg.encode_in_step, sample_posterior=cfg.sample_posterior,
        image_ratio=cfg.image_ratio, text_dropout=cfg.text_dropout, noise_offset=cfg.noise_offset,
        high_noise_fraction=cfg.high_noise_fraction, train_text_encoder=cfg.train_text_encoder,
        clip_skip=clip_skip, tokenizer=tokenizer, null_condition=null, sample_scheduler=cfg.sample_scheduler,
        sample_steps=cfg.sample_steps, sample_guidance=cfg.sample_guidance)


OBJECTIVES: dict[str, Callable[..., Objective]] = {"temporal": make_temporal_objective}

# Objectives whose whole setup (models and loss) lives in its own module: name -> "module:function", imported
# only when chosen. Each function takes the Config and returns a Setup.
SETUP_BUILDERS: dict[str, str] = {
    "vae": "vldm_jax.train.image_objectives:build_vae_setup",
    "image": "vldm_jax.train.image_objectives:build_image_setup",
    "prediction": "vldm_jax.train.context_objectives:build_prediction_setup",
    "interpolation": "vldm_jax.train.context_objectives:build_interpolation_setup",
    "upsampler": "vldm_jax.train.upsampler_objective:build_upsampler_setup",
    "animatediff": "vldm_jax.train.animatediff_objective:build_animatediff_setup",
    "decoder": "vldm_jax.train.decoder_objective:build_decoder_setup",
}


@dataclasses.dataclass
class Setup:
    """What a run trains: the objective and how to make its models.

    ``init_models()`` returns the models container (an ``nnx.Module``). With ``traceable`` it is pure
    (random init from a seeded ``nnx.Rngs``) and runs under ``jax.jit`` with sharded outputs, so no device
    ever holds the whole model; otherwise (weights read from files) it runs on the host and the arrays are
    then placed with the same shardings.
    """

    objective: Objective
    init_models: Callable[[], nnx.Module]
    traceable: bool = True


def _temporal_config(options: Mapping[str, Any]):
    from vldm_jax.models.unet import TemporalConfig

    try:
        return TemporalConfig.paper(**dict(options))
    except TypeError as e:
        raise ConfigError(f"model.temporal: {e} (fields: {', '.join(TemporalConfig.fields())})") from None


# Hub ids whose reference configs are bundled (vldm_jax/assets/reference_configs/<folder>).
REFERENCE_CONFIGS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "benjamin-paine/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-x4-upscaler": "stable-diffusion-x4-upscaler",
}
_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
          "scheduler": "scheduler_config.json"}


def reference_configs(pretrained: str) -> dict[str, dict]:
    """``{unet, vae, text_encoder, scheduler}`` config dicts of a pipeline folder (its config.json files only) or of
    a hub id with a bundled copy (:data:`REFERENCE_CONFIGS`)."""
    import json
    from importlib import resources

    folder = Path(pretrained)
    if not folder.is_dir():
        name = REFERENCE_CONFIGS.get(str(pretrained).strip("/"))
        if name is None:
            raise ConfigError(f"model.random_init: {pretrained!r} is neither a pipeline folder nor a hub id with "
                              f"bundled configs ({', '.join(REFERENCE_CONFIGS)}); set model.unet/vae/text_encoder")
        folder = Path(str(resources.files("vldm_jax") / "assets" / "reference_configs" / name))
    out = {}
    for part, file in _PARTS.items():
        path = folder / part / file
        if path.is_file():
            out[part] = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if "unet" not in out:
        raise ConfigError(f"model.random_init: {folder} has no unet/config.json")
    return out


def resolve_random_init(config):
    """``config`` unchanged, or with ``model.random_init``: ``model.pretrained`` replaced by its architecture (the
    ``model.unet`` / ``vae`` / ``text_encoder`` / ``scheduler`` dicts, each entry set in the config winning), so the
    setup builders take their random path at the real size; the step is the same as with loaded weights."""
    m = config.model
    if not m.random_init or not m.pretrained:
        return config
    if m.motion_adapter:
        raise ConfigError("model.random_init builds new motion modules; unset model.motion_adapter")
    ref = reference_configs(m.pretrained)
    parts = {k: {**ref.get(k, {}), **getattr(m, k)} for k in ("unet", "vae", "text_encoder", "scheduler")}
    arch = [k for k in ("architectures", "torch_dtype", "transformers_version") if k in parts["text_encoder"]]
    for k in arch:
        parts["text_encoder"].pop(k)
    return dataclasses.replace(config, model=dataclasses.replace(m, pretrained=None, **parts))


def build_setup(config) -> Setup:
    """The temporal fine-tuning setup of a :class:`~vldm_jax.train.config.Config`.

    ``model.pretrained`` set: the image model (diffusers folder, single file or converted folder) is loaded on the
    host and its U-Net becomes a video U-Net by :meth:`VideoUNet.from_image_unet` (spatial weights copied,
    temporal layers new); an already temporal U-Net is used as is. Otherwise random models are built from the
    ``model.unet`` / ``vae`` / ``text_encoder`` dicts: a smoke test of the machinery, not a useful model.
    """
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.unet import UNet2DConditionConfig, VideoUNet, VideoUNetConfig
    from vldm_jax.train.state import compute_dtype

    config = resolve_random_init(config)
    m, o = config.model, config.objective
    if o.name in SETUP_BUILDERS:
        import importlib

        module, function = SETUP_BUILDERS[o.name].split(":")
        return getattr(importlib.import_module(module), function)(config)
    if o.name not in OBJECTIVES:
        raise ConfigError(f"objective.name {o.name!r} is not one of {', '.join([*OBJECTIVES, *SETUP_BUILDERS])}")
    dtype = compute_dtype(m.dtype)
    seed = config.train.seed
    temporal = _temporal_config(m.temporal)
    keep_vae = o.encode_in_step or config.train.sample_every > 0

    if m.pretrained:
        from vldm_jax.checkpoints.pipeline_folder import load_stable_diffusion
        from vldm_jax.pipelines.common import encode_prompts

        pipe = load_stable_diffusion(m.pretrained, dtype=dtype)
        scheduler = {**pipe.scheduler_config, **m.scheduler}
        null_context = None
        if not o.encode_in_step:
            text_graph, text_state = nnx.split(pipe.text_encoder)
            null_context = np.asarray(encode_prompts(pipe.tokenizer, text_graph, text_state, [""], pipe.clip_skip)[0])
        objective = make_temporal_objective(o, scheduler, vae_config=pipe.vae.config, tokenizer=pipe.tokenizer,
                                            clip_skip=pipe.clip_skip, null_context=null_context)

        def init_models():
            unet = pipe.unet
            if not isinstance(unet, VideoUNet):
                unet = VideoUNet.from_image_unet(unet, temporal, seed=seed, dtype=dtype, remat=m.remat)
            else:
                unet.set_remat(m.remat)
            return VideoModels(unet, pipe.vae if keep_vae else None,
                               pipe.text_encoder if o.encode_in_step else None)

        return Setup(objective, init_models, traceable=False)

    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from vldm_jax.models.tokenizer import load_tokenizer

    if not m.unet:
        raise ConfigError("set model.pretrained (a Stable Diffusion folder or file) or model.unet (a random U-Net "
                          "config for a smoke test)")
    if o.encode_in_step and not (m.vae and m.text_encoder):
        raise ConfigError("random models with objective.encode_in_step need model.vae and model.text_encoder configs")
    unet_config = VideoUNetConfig.from_image_config(config_from_dict(UNet2DConditionConfig, m.unet), temporal)
    vae_config = config_from_dict(AutoencoderKLConfig, m.vae) if m.vae else None
    text_config = CLIPTextConfig.from_dict(m.text_encoder) if m.text_encoder else None
    tokenizer = load_tokenizer(None) if o.encode_in_step else None
    if tokenizer is not None and text_config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.text_encoder.vocab_size {text_config.vocab_size} is smaller than the bundled CLIP "
                          f"tokenizer's {len(tokenizer)}")
    scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **m.scheduler}
    objective = make_temporal_objective(o, scheduler, vae_config=vae_config, tokenizer=tokenizer)

    def init_models():
        rngs = nnx.Rngs(seed)
        unet = VideoUNet(unet_config, rngs=rngs, dtype=dtype, remat=m.remat)
        vae = AutoencoderKL(vae_config, rngs=rngs, dtype=dtype) if keep_vae and vae_config else None
        text = CLIPTextModel(text_config, rngs=rngs, dtype=dtype) if o.encode_in_step else None
        return VideoModels(unet, vae, text)

    return Setup(objective, init_models, traceable=True)
