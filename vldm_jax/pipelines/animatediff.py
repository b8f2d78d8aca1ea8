"""Text-to-video with AnimateDiff motion modules on any Stable Diffusion 1.x model, with diffusers'
``AnimateDiffPipeline`` semantics: numpy in, numpy out.

The spatial part is whatever SD 1.x checkpoint we load (diffusers folder, single file, hub id: the
personalisation); the motion modules come from a MotionAdapter folder / hub id or an original single file.
Sampling (batched classifier-free guidance inside one ``lax.scan``) is one jitted function of the split states,
compiled once per (sampler, shapes); the VAE decode is chunked over frames.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion.guidance import text_guided_denoiser
from vldm_jax.diffusion.samplers import SAMPLER_NAMES, make_sampler, sample
from vldm_jax.errors import UserError
from vldm_jax.pipelines.common import advance, denoising_bar, encode_prompts, initial_noise

SCHEDULERS = SAMPLER_NAMES


@functools.partial(jax.jit, static_argnames=("unet_graph", "guided", "progress"))
def _denoise_video(unet_graph, unet_state, sampler, context, uncontext, noise, guidance_scale, key, step_noise,
                   guided: bool, progress: bool):
    unet = nnx.merge(unet_graph, unet_state)

    denoise = text_guided_denoiser(unet, context, uncontext, guidance_scale, guided)

    return sample(denoise, sampler, noise, key=key, variance_noise=step_noise,
                  progress=advance if progress else None)


class AnimateDiffPipeline:
    """AnimateDiff text-to-video. ``pipe(prompt, ...)`` returns float32 frames ``(B, F, H, W, 3)`` in [0, 1].

    Build it with :meth:`from_pretrained`: ``AnimateDiffPipeline.from_pretrained(sd, motion_adapter=adapter)``.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any], *, clip_skip: int = 0):
        from vldm_jax.pipelines.stages import LatentCodec

        if getattr(unet.config, "temporal_layer_type", None) != "motion_module":
            raise UserError("AnimateDiffPipeline needs a U-Net with AnimateDiff motion modules")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.clip_skip = clip_skip
        self._unet_graph, self._unet_state = nnx.split(unet)
        self._text_graph, self._text_state = nnx.split(text_encoder)
        self.codec = LatentCodec(vae)
        self.free_noise: dict | None = None

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, motion_adapter: str | os.PathLike | None = None,
                        tokenizer: str | os.PathLike | None = None, allow_pickle: bool = False,
                        lora: Sequence = (), dtype=jnp.float32) -> "AnimateDiffPipeline":
        """``path``: an SD 1.x checkpoint (diffusers folder, single file, hub id) or a saved diffusers
        AnimateDiff pipeline folder (its ``unet/`` a ``UNetMotionModel``); ``motion_adapter``: a MotionAdapter
        folder or hub id, or an original ``mm_sd_v15*`` file (needed unless the U-Net already has motion
        modules). ``lora``: ``(file, scale)`` pairs fused into the weights at load."""
        from vldm_jax.checkpoints.animatediff import animatediff_unet, read_motion_adapter
        from vldm_jax.models.config import read_config_file
        from vldm_jax.pipelines.text_to_image import TextToImagePipeline

        p = Path(path)
        unet_cfg = p / "unet" / "config.json"
        if unet_cfg.exists() and read_config_file(unet_cfg).get("_class_name") == "UNetMotionModel":
            return cls._from_motion_pipeline_folder(p, motion_adapter=motion_adapter, tokenizer=tokenizer,
                                                    allow_pickle=allow_pickle, lora=lora, dtype=dtype)
        if motion_adapter is None:
            raise UserError("AnimateDiff needs a motion adapter (motion_adapter=folder, hub id or mm_sd_v15 file)")
        adapter = read_motion_adapter(motion_adapter, allow_pickle=allow_pickle)
        image = TextToImagePipeline.from_pretrained(path, tokenizer=tokenizer, allow_pickle=allow_pickle, dtype=dtype)
        unet = animatediff_unet(image.unet, adapter)
        pipe = cls(unet, image.vae, image.text_encoder, image.tokenizer, image.scheduler_config,
                   clip_skip=image.clip_skip)
        return pipe._with_lora(lora)

    @classmethod
    def _from_motion_pipeline_folder(cls, folder: Path, *, motion_adapter, tokenizer, allow_pickle, lora, dtype):
        from vldm_jax.checkpoints.animatediff import (
            animatediff_unet,
            image_unet_of,
            load_motion_unet,
            read_motion_adapter,
        )
        from vldm_jax.checkpoints.load import load_model
        from vldm_jax.models.config import read_config_file
        from vldm_jax.models.tokenizer import load_tokenizer

        unet = load_motion_unet(folder / "unet", allow_pickle=allow_pickle, dtype=dtype)
        if motion_adapter is not None:  # swap in another adapter's motion modules
            image_unet = image_unet_of(unet)
            unet = animatediff_unet(image_unet, read_motion_adapter(motion_adapter, allow_pickle=allow_pickle))
        vae = load_model(folder / "vae", allow_pickle=allow_pickle, dtype=dtype)
        text = load_model(folder / "text_encoder", allow_pickle=allow_pickle, dtype=dtype)
        tok_dir = tokenizer if tokenizer is not None else (folder / "tokenizer" if (folder / "tokenizer").is_dir()
                                                           else None)
        scheduler_config = read_config_file(folder / "scheduler" / "scheduler_config.json")
        return cls(unet, vae, text, load_tokenizer(tok_dir), scheduler_config)._with_lora(lora)

    def _with_lora(self, lora: Sequence) -> "AnimateDiffPipeline":
        if not lora:
            return self
        from vldm_jax.checkpoints.lora import fuse_loras

        unet, text = fuse_loras(self.unet, self.text_encoder, lora)
        return type(self)(unet, self.vae, text, self.tokenizer, self.scheduler_config, clip_skip=self.clip_skip)

    # --------------------------------------------------------------------------------------- FreeNoise
    def enable_free_noise(self, context_length: int | None = 16, context_stride: int = 4,
                          weighting_scheme: str = "pyramid", noise_type: str = "shuffle_context") -> None:
        """Long videos: the motion modules see sliding windows of ``context_length`` frames every
        ``context_stride`` frames, their outputs blended per frame by ``weighting_scheme`` (``flat``,
        ``pyramid``, ``delayed_reverse_sawtooth``); the initial noise is rescheduled (``noise_type``:
        ``shuffle_context``, ``repeat_context`` or ``random``) so windows share noise (diffusers'
        ``enable_free_noise`` semantics)."""
        from vldm_jax.nn.temporal import set_free_noise
        from vldm_jax.pipelines.free_noise import check_free_noise_options

        context_length = context_length or self.unet.config.motion_max_seq_length
        check_free_noise_options(context_length, context_stride, weighting_scheme, noise_type,
                                 self.unet.config.motion_max_seq_length)
        self.free_noise = dict(context_length=context_length, context_stride=context_stride,
                               weighting_scheme=weighting_scheme, noise_type=noise_type)
        set_free_noise(self.unet, (context_length, context_stride, weighting_scheme))
        self._unet_graph, self._unet_state = nnx.split(self.unet)

    def disable_free_noise(self) -> None:
        from vldm_jax.nn.temporal import set_free_noise

        self.free_noise = None
        set_free_noise(self.unet, None)
        self._unet_graph, self._unet_state = nnx.split(self.unet)

    # ------------------------------------------------------------------------------------------ running
    @property
    def vae_scale_factor(self) -> int:
        return self.codec.factor

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> U-Net context ``(B, 77, D)``."""
        return encode_prompts(self.tokenizer, self._text_graph, self._text_state, prompts, self.clip_skip)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_frames: int = 16, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, scheduler: str = "ddim",
                 seed: int = 0, latents=None, decode_chunk_size: int = 16, eta: float = 0.0,
                 step_noise=None, progress: bool = False, return_latents: bool = False) -> np.ndarray:
        """Frames ``(B, F, H, W, 3)`` float32 in [0, 1] (with ``return_latents``, the final latents
        ``(B, F, h, w, 4)``). ``latents``: optional unit-variance initial noise ``(B, F, h, w, 4)`` (with
        FreeNoise used as given, as diffusers does). ``step_noise``: for stochastic samplers (``lcm``, DDIM with
        ``eta``), the fresh noise of every step ``(num_inference_steps, B, F, h, w, 4)`` instead of drawing it from
        ``seed`` (to reproduce another implementation's run)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise UserError(f"num_frames must be a positive number of frames (got {num_frames})")
        if height % f or width % f or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {f} (got {height}x{width})")
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        if decode_chunk_size < 1:
            raise UserError(f"decode_chunk_size must be at least 1 (got {decode_chunk_size})")
        window = self.unet.config.motion_max_seq_length
        if self.free_noise is None and num_frames > window:
            raise UserError(f"{num_frames} frames exceed the motion modules' window of {window}; "
                            "call enable_free_noise() for longer videos")
        if self.free_noise is not None and num_frames < self.free_noise["context_length"]:
            raise UserError(f"FreeNoise needs at least context_length={self.free_noise['context_length']} frames "
                            f"(got {num_frames})")
        shape = (b, int(num_frames), height // f, width // f, self.unet.config.in_channels)
        noise_key, sample_key = jax.random.split(jax.random.key(seed))
        if self.free_noise is not None and latents is None:
            from vldm_jax.pipelines.free_noise import reschedule_noise

            fn = self.free_noise
            noise = reschedule_noise(noise_key, shape, fn["context_length"], fn["context_stride"], fn["noise_type"])
        else:
            noise = initial_noise(latents, shape, noise_key)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(prompts)
        if guided:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * b if isinstance(neg, str) else list(neg)
            if len(negs) != b:
                raise UserError(f"got {len(negs)} negative prompts for {b} prompts")
            uncontext = self.encode_prompt(negs)
        else:
            uncontext = context
        options = {"eta": eta} if scheduler == "ddim" else {}
        sampler = make_sampler(scheduler, self.scheduler_config, num_inference_steps, **options)
        if step_noise is not None:
            step_noise = jnp.asarray(step_noise, jnp.float32)
            if step_noise.shape != (num_inference_steps, *shape):
                raise UserError(f"step_noise must have shape {(num_inference_steps, *shape)} "
                                f"(got {tuple(step_noise.shape)})")
            if not sampler.is_stochastic:
                step_noise = None
        with denoising_bar(num_inference_steps, progress):
            out = _denoise_video(self._unet_graph, self._unet_state, sampler, context, uncontext, noise,
                                 jnp.float32(guidance_scale), sample_key, step_noise, guided=guided,
                                 progress=progress)
        if return_latents:
            return np.asarray(out, np.float32)
        return np.asarray(self.codec.decode(out, chunk=int(decode_chunk_size)), np.float32)
