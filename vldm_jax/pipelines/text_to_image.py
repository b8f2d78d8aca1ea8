"""Text-to-image latent diffusion (Stable Diffusion 1.x / 2.x): numpy in, numpy out.

The whole generation after text encoding (the sampling loop over ``lax.scan`` with batched
classifier-free guidance, then the VAE decode) is one jitted function of the split NNX states,
compiled once per (sampler, shapes) and reused across prompts and seeds.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion.guidance import text_guided_denoiser
from vldm_jax.diffusion.samplers import SAMPLER_NAMES, make_sampler, sample
from vldm_jax.errors import UserError
from vldm_jax.parallel.activations import activation_mesh, place_inputs, place_state
from vldm_jax.pipelines import defaults
from vldm_jax.pipelines.common import advance, denoising_bar, encode_prompts, initial_noise

SCHEDULERS = SAMPLER_NAMES


def _split(module):
    graphdef, state = nnx.split(module)
    return graphdef, state


@functools.partial(jax.jit, static_argnames=("unet_graph", "vae_graph", "guided", "progress", "mesh"))
def _generate(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, noise, guidance_scale,
              key, scaling_factor, guided: bool, progress: bool, mesh=None):
    with activation_mesh(mesh):
        return _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, noise,
                              guidance_scale, key, scaling_factor, guided, progress)


def _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, noise,
                   guidance_scale, key, scaling_factor, guided: bool, progress: bool):
    unet = nnx.merge(unet_graph, unet_state)
    vae = nnx.merge(vae_graph, vae_state)

    denoise = text_guided_denoiser(unet, context, uncontext, guidance_scale, guided)

    latents = sample(denoise, sampler, noise, key=key, progress=advance if progress else None)
    images = vae.decode(latents / scaling_factor)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


class TextToImagePipeline:
    """Stable Diffusion text-to-image.

    ``pipe(prompt, ...)`` returns float32 images ``(B, H, W, 3)`` in [0, 1]. Build it with
    :meth:`from_pretrained` (diffusers folder, single ``.safetensors`` file, converted folder, hub id).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any], *, clip_skip: int = 0):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.clip_skip = clip_skip
        self._unet_graph, self._unet_state = _split(unet)
        self._vae_graph, self._vae_state = _split(vae)
        self._text_graph, self._text_state = _split(text_encoder)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        allow_pickle: bool = False, prediction_type: str | None = None, dtype=jnp.float32):
        """Loads a diffusers pipeline folder (``model_index.json``), our converted folder, an original
        single-file SD 1.x/2.x checkpoint (``.safetensors``; ``.ckpt`` with ``allow_pickle``), or a hub id.

        ``tokenizer``: tokenizer folder for single files (default: the bundled CLIP vocabulary).
        ``prediction_type``: override for single files whose weights cannot tell (SD 2.x 512 vs 768-v).
        """
        from vldm_jax.checkpoints.pipeline_folder import load_stable_diffusion

        parts = load_stable_diffusion(path, tokenizer=tokenizer, allow_pickle=allow_pickle,
                                      prediction_type=prediction_type, dtype=dtype)
        return cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config,
                   clip_skip=parts.clip_skip)

    def save_pretrained(self, dst: str | os.PathLike) -> None:
        """Writes our own format (converted weights + configs, tokenizer, scheduler) atomically to a new folder."""
        from vldm_jax.checkpoints.pipeline_folder import write_pipeline_parts
        from vldm_jax.checkpoints.store import atomic_folder

        with atomic_folder(dst) as tmp:
            write_pipeline_parts(tmp, {"_class_name": "TextToImagePipeline", "_vldm_clip_skip": self.clip_skip},
                                 modules={"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
                                 tokenizer=self.tokenizer, schedulers={"scheduler": self.scheduler_config})

    # ------------------------------------------------------------------------------------------ running
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> U-Net context ``(B, 77, D)``."""
        return encode_prompts(self.tokenizer, self._text_graph, self._text_state, prompts, self.clip_skip)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = defaults.IMAGE_STEPS,
                 guidance_scale: float = defaults.IMAGE_GUIDANCE, scheduler: str = defaults.SCHEDULER, seed: int = 0,
                 latents=None, num_images_per_prompt: int = 1, eta: float = 0.0, progress: bool = False,
                 mesh=None) -> np.ndarray:
        """Prompts -> images ``(B, H, W, 3)`` in [0, 1]. ``mesh``: a :mod:`vldm_jax.parallel` mesh, the images
        split over ``data``/``fsdp`` (parameters over ``fsdp``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        b = len(prompts)
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {f} (got {height}x{width})")
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        shape = (b, height // f, width // f, self.unet.config.in_channels)
        key = jax.random.key(seed)
        noise_key, sample_key = jax.random.split(key)
        noise = initial_noise(latents, shape, noise_key)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(prompts)
        if guided:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * len(prompts) if isinstance(neg, str) else [n for n in neg for _ in range(num_images_per_prompt)]
            if len(negs) != b:
                raise UserError(f"got {len(negs)} negative prompts for {b} prompts")
            uncontext = self.encode_prompt(negs)
        else:
            uncontext = context
        options = {"eta": eta} if scheduler == "ddim" else {}
        sampler = make_sampler(scheduler, self.scheduler_config, num_inference_steps, **options)
        unet_state, vae_state = self._unet_state, self._vae_state
        if mesh is not None and mesh.devices.size > 1:
            unet_state, vae_state = place_state(unet_state, mesh), place_state(vae_state, mesh)
            context, uncontext, noise = place_inputs(mesh, context, uncontext, noise)
        else:
            mesh = None
        with denoising_bar(num_inference_steps, progress):
            images = _generate(self._unet_graph, unet_state, self._vae_graph, vae_state, sampler, context,
                               uncontext, noise, jnp.float32(guidance_scale), sample_key,
                               jnp.float32(self.vae.config.scaling_factor), guided=guided, progress=progress,
                               mesh=mesh)
            return np.asarray(images, dtype=np.float32)
