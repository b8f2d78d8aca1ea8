"""The video upsampler's training objective (Video LDM Sec. 3.4; the SD x4 upscaler's recipe with temporal layers).

Each high-res clip ``video (B, F, H, W, 3)`` in [-1, 1] is downsampled ×4 (antialiased) into its conditioning,
which is noise-augmented at a random level ``s ~ U{0..max_noise_level}`` per video by the low-res DDPM schedule;
``s`` is the U-Net's class label. The loss is the usual denoising loss on the high-res latents (VAE-encoded in the
step), on the main noise schedule, with the noised low-res frames concatenated to the noisy latents. Only the
temporal layers train by default (``model.trainable: temporal``); the spatial ones are the image upscaler's.

``objective.options`` (all optional):
  ``max_noise_level`` (350, diffusers' default; the pretrained folder's when set there), ``low_res_factor`` (4:
  must equal the VAE's downsampling, since the latents and the low-res frames share a grid),
  ``low_res_scheduler`` (a diffusers DDPM config dict; default the x4 upscaler's), ``text_dropout`` (0.0),
  ``sample_noise_level`` (20: the level of the sample GIFs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion import schedules
from vldm_jax.errors import ConfigError
from vldm_jax.nn.temporal import fold_frames, unfold_frames
from vldm_jax.train.objectives import (
    ObjectiveDefaults,
    Setup,
    VideoModels,
    _temporal_config,
    export_temporal,
    noise_schedule,
    parse_options,
    to_unit_range,
)

X4_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02,
                "prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "timestep_spacing": "leading"}
X4_LOW_RES_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
@dataclasses.dataclass(frozen=True)
class UpsamplerOptions:
    """``objective.options`` of ``upsampler``."""

    max_noise_level: int | None = None  # None: the pretrained pipeline's (350 for random models)
    low_res_factor: int = 4
    low_res_scheduler: dict | None = None  # None: the pretrained pipeline's low-res scheduler (x4's otherwise)
    text_dropout: float = 0.0
    sample_noise_level: int = 20


def downsample(video: jax.Array, factor: int) -> jax.Array:
    """``(B, F, H, W, C)`` -> ``(B, F, H/factor, W/factor, C)``, antialiased bicubic (the degradation the x4
    upscaler's conditioning models)."""
    b, f, h, w, c = video.shape
    return jax.image.resize(video, (b, f, h // factor, w // factor, c), method="cubic", antialias=True)


@dataclasses.dataclass(frozen=True, eq=False)
class UpsamplerObjective(ObjectiveDefaults):
    """Batch keys: ``video (B, F, H, W, 3)`` float in [-1, 1] (or uint8) with H, W multiples of
    ``low_res_factor``; ``input_ids (B, 77)`` (or ``caption`` strings, tokenized by :meth:`host_batch`)."""

    schedule: schedules.NoiseSchedule
    low_res_schedule: schedules.NoiseSchedule
    scheduler_config: Mapping[str, Any]
    scaling_factor: float
    max_noise_level: int = 350
    low_res_factor: int = 4
    text_dropout: float = 0.0
    tokenizer: Any = None
    null_ids: Any = None  # (S,) token ids of the empty prompt
    clip_skip: int = 0
    sample_noise_level: int = 20
    sample_scheduler: str = "ddim"
    sample_steps: int = 10
    sample_guidance: float = 1.0
    trained_module: str = "unet"

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        if "input_ids" not in batch and "caption" in batch:
            from vldm_jax.models.tokenizer import tokenize

            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                        for c in np.asarray(batch["caption"]).reshape(-1)]
            batch["input_ids"] = tokenize(self.tokenizer, captions, max_length=self.tokenizer.model_max_length)
        batch.pop("caption", None)
        missing = [k for k in ("video", "input_ids") if k not in batch]
        if missing:
            raise ConfigError(f"upsampler training batches lack {', '.join(missing)} (have: {', '.join(sorted(batch))})")
        h, w = np.shape(batch["video"])[2:4]
        if h % self.low_res_factor or w % self.low_res_factor:
            raise ConfigError(f"upsampler training frames must be multiples of {self.low_res_factor} (got {h}x{w})")
        return batch

    def conditioning(self, video, key, levels):
        """Low-res frames ``(B, F, H/4, W/4, 3)`` in [-1, 1] noised at ``levels (B,)``."""
        low = downsample(video, self.low_res_factor)
        noise = jax.random.normal(key, low.shape, jnp.float32)
        return schedules.add_noise(self.low_res_schedule, low, noise, levels)

    def _context(self, model, ids):
        return jax.lax.stop_gradient(model.text_encoder.encode(ids, clip_skip=self.clip_skip))

    def loss(self, model: VideoModels, batch, key):
        k_vae, k_noise, k_t, k_lvl, k_low, k_drop = jax.random.split(key, 6)
        video = to_unit_range(batch["video"])
        b, f = video.shape[:2]
        z = model.vae.encode(fold_frames(video)).sample(k_vae)
        x0 = jax.lax.stop_gradient(unfold_frames(z * self.scaling_factor, f).astype(jnp.float32))
        ids = batch["input_ids"]
        if self.text_dropout > 0:
            drop = jax.random.bernoulli(k_drop, self.text_dropout, (b,))
            ids = jnp.where(drop[:, None], jnp.asarray(self.null_ids, ids.dtype)[None], ids)
        context = self._context(model, ids)
        levels = jax.random.randint(k_lvl, (b,), 0, self.max_noise_level + 1)
        low = jax.lax.stop_gradient(self.conditioning(video, k_low, levels))
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        x_t = schedules.add_noise(self.schedule, x0, noise, t)
        target = schedules.training_target(self.schedule, x0, noise, t)
        pred = model.unet(jnp.concatenate([x_t, low.astype(x_t.dtype)], -1), t, context, class_labels=levels)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        return loss, {"noise_level": jnp.mean(levels.astype(jnp.float32))}

    def sample(self, model: VideoModels, batch, key):
        """The batch's clips upsampled from their own ×4-downsampled frames: ``(B, F, H, W, 3)`` in [0, 1]."""
        from vldm_jax.diffusion.samplers import make_sampler, sample
        from vldm_jax.pipelines.upscale import make_denoiser

        video = to_unit_range(batch["video"])
        b, f, h, w = video.shape[:4]
        levels = jnp.full((b,), self.sample_noise_level, jnp.int32)
        low = self.conditioning(video, jax.random.fold_in(key, 0), levels)
        context = self._context(model, batch["input_ids"])
        guided = self.sample_guidance > 1.0 and self.null_ids is not None
        uncontext = self._context(model, jnp.broadcast_to(jnp.asarray(self.null_ids)[None], batch["input_ids"].shape)
                                  ) if guided else context
        sampler = make_sampler(self.sample_scheduler, dict(self.scheduler_config), self.sample_steps)
        denoise = make_denoiser(model.unet, context, uncontext, low, levels, self.sample_guidance, guided=guided)
        shape = low.shape[:-1] + (model.vae.config.latent_channels,)
        latents = sample(denoise, sampler, jax.random.normal(jax.random.fold_in(key, 1), shape),
                         key=jax.random.fold_in(key, 2))
        frames = model.vae.decode(fold_frames(latents) / self.scaling_factor)
        return unfold_frames(jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0), f)

    def export(self, graphdef, state, workdir, data, say):
        """The trained temporal layers, ``workdir/temporal.safetensors``."""
        return export_temporal(graphdef, state, workdir, say)


def build_upsampler_setup(config) -> Setup:
    """Models and objective of upsampler training. ``model.pretrained``: an x4 upscaler folder / hub id (diffusers,
    or a video upsampler saved by :class:`~vldm_jax.pipelines.upscale.VideoUpscalePipeline`); its U-Net gets
    temporal layers (``model.temporal``) unless it has them. Null: random tiny models from ``model.unet``
    (``in_channels`` = latent channels + 3, ``num_class_embeds`` > max noise level), ``model.vae``,
    ``model.text_encoder``: a smoke test of the machinery."""
    from vldm_jax.models.tokenizer import load_tokenizer, tokenize
    from vldm_jax.models.unet import VideoUNet
    from vldm_jax.train.state import compute_dtype

    m, o = config.model, config.objective
    opts = parse_options(UpsamplerOptions, config.objective.options, "upsampler")
    dtype = compute_dtype(m.dtype)
    seed = config.train.seed
    temporal = _temporal_config(m.temporal)
    factor = opts.low_res_factor

    def objective_for(scheduler, low_res, vae_config, tokenizer, max_noise_level, clip_skip):
        sched = {**scheduler, **m.scheduler}
        if o.prediction_type:
            sched["prediction_type"] = o.prediction_type
        vae_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        if factor != vae_factor:
            raise ConfigError(f"objective.options.low_res_factor {factor} must equal the VAE's downsampling "
                              f"{vae_factor} (latents and low-res frames share a grid)")
        null = tokenize(tokenizer, [""], max_length=tokenizer.model_max_length)[0]
        return UpsamplerObjective(
            schedule=noise_schedule(sched), low_res_schedule=schedules.NoiseSchedule.from_config(dict(low_res)),
            scheduler_config=sched, scaling_factor=float(vae_config.scaling_factor),
            max_noise_level=int(max_noise_level), low_res_factor=factor, text_dropout=opts.text_dropout,
            tokenizer=tokenizer, null_ids=null, clip_skip=clip_skip,
            sample_noise_level=opts.sample_noise_level, sample_scheduler=o.sample_scheduler,
            sample_steps=o.sample_steps, sample_guidance=o.sample_guidance)

    def check_unet(unet_config, max_noise_level, latent_channels):
        if unet_config.in_channels != latent_channels + 3:
            raise ConfigError(f"model.unet.in_channels must be {latent_channels + 3} (latents + low-res RGB), "
                              f"got {unet_config.in_channels}")
        if unet_config.num_class_embeds is None or unet_config.num_class_embeds <= max_noise_level:
            raise ConfigError(f"model.unet.num_class_embeds must exceed the max noise level {max_noise_level}")

    if m.pretrained:
        from vldm_jax.checkpoints.pipeline_folder import load_upscaler_parts

        pipe = load_upscaler_parts(m.pretrained, dtype=dtype)
        max_level = opts.max_noise_level if opts.max_noise_level is not None else pipe["max_noise_level"]
        low_res = opts.low_res_scheduler or pipe["low_res_scheduler_config"]
        check_unet(pipe["unet"].config, max_level, pipe["vae"].config.latent_channels)
        objective = objective_for(pipe["scheduler_config"], low_res, pipe["vae"].config, pipe["tokenizer"], max_level,
                                  pipe["clip_skip"])

        def init_models():
            unet = pipe["unet"]
            if isinstance(unet, VideoUNet):
                unet.set_remat(m.remat)
            else:
                unet = VideoUNet.from_image_unet(unet, temporal, seed=seed, dtype=dtype, remat=m.remat)
            return VideoModels(unet, pipe["vae"], pipe["text_encoder"])

        return Setup(objective, init_models, traceable=False)

    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.unet import UNet2DConditionConfig, VideoUNetConfig

    if not (m.unet and m.vae and m.text_encoder):
        raise ConfigError("set model.pretrained (an x4 upscaler folder) or model.unet, model.vae and "
                          "model.text_encoder (random configs for a smoke test)")
    max_level = opts.max_noise_level if opts.max_noise_level is not None else 350
    unet_config = VideoUNetConfig.from_image_config(config_from_dict(UNet2DConditionConfig, m.unet), temporal)
    vae_config = config_from_dict(AutoencoderKLConfig, m.vae)
    text_config = CLIPTextConfig.from_dict(m.text_encoder)
    check_unet(unet_config, max_level, vae_config.latent_channels)
    tokenizer = load_tokenizer(None, pad_token="!")
    if text_config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.text_encoder.vocab_size {text_config.vocab_size} is smaller than the bundled CLIP "
                          f"tokenizer's {len(tokenizer)}")
    objective = objective_for(X4_SCHEDULER, opts.low_res_scheduler or X4_LOW_RES_SCHEDULER, vae_config, tokenizer,
                              max_level, 0)

    def init_models():
        rngs = nnx.Rngs(seed)
        return VideoModels(VideoUNet(unet_config, rngs=rngs, dtype=dtype, remat=m.remat),
                           AutoencoderKL(vae_config, rngs=rngs, dtype=dtype),
                           CLIPTextModel(text_config, rngs=rngs, dtype=dtype))

    return Setup(objective, init_models, traceable=True)
