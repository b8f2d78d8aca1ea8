"""×4 super-resolution: the Stable Diffusion x4 upscaler (images) and the Video LDM video upsampler.

The upscaler (diffusers ``StableDiffusionUpscalePipeline``) denoises latents at the *low-res* image's
resolution; its VAE has three levels (factor 4), so the decoded image is four times larger. The U-Net's
input is the scaled latents concatenated with the low-res image (RGB in [-1, 1]) after *noise augmentation*:
the low-res image is noised by the ``low_res_scheduler`` (DDPM) at ``noise_level`` (an int timestep in
``[0, max_noise_level]``), and that level is the U-Net's ``class_labels`` (an embedding added to the
timestep embedding). Classifier-free guidance is on the text prompt.

:class:`UpscalePipeline` is that image pipeline (parity with diffusers). :class:`VideoUpscalePipeline` is the
paper's video upsampler: the same network made a :class:`~vldm_jax.models.unet.VideoUNet` (temporal layers
after the spatial ones, zero-initialised: fresh, it is the image upscaler frame by frame), run on a whole clip
with each frame's low-res frame concatenated.

**Tiling.** With ``tile_size`` the latent (= low-res) plane is covered by overlapping ``tile_size`` squares; at
every sampling step the U-Net runs on all tiles (fixed tile shape, so one compile; ``tile_batch`` tiles at a
time through ``lax.scan``) and the predictions are blended with weights that ramp linearly across the overlap
(MultiDiffusion, Bar-Tal et al. 2023). Tile edges on the border of the image keep weight 1, so one tile that
covers everything gives exactly the untiled result. The samplers' steps are linear in the model output, so
blending outputs equals blending per-tile steps. Decoding runs ``decode_chunk`` frames at a time.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.checkpoints.pipeline_folder import DEFAULT_MAX_NOISE_LEVEL, load_upscaler_parts
from vldm_jax.diffusion import schedules
from vldm_jax.diffusion.guidance import classifier_free_guidance
from vldm_jax.diffusion.samplers import SAMPLER_NAMES, make_sampler, sample
from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.parallel.activations import activation_mesh, place_inputs, place_state
from vldm_jax.pipelines import defaults
from vldm_jax.pipelines.common import advance, denoising_bar, encode_prompts, initial_noise

SCHEDULERS = SAMPLER_NAMES


# ------------------------------------------------------------------------------------------------- tiling

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)`` with at least ``overlap`` shared pixels
    (the last tile ends at ``length``)."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(tile: int, start: int, length: int, overlap: int) -> np.ndarray:
    w = np.ones(tile, np.float32)
    if overlap <= 0:
        return w
    ramp = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
    if start > 0:  # left edge inside the image: fade in
        w[:overlap] = np.minimum(w[:overlap], ramp)
    if start + tile < length:  # right edge inside the image: fade out
        w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w


def tile_layout(height: int, width: int, tile_size: int, overlap: int):
    """``(tile_h, tile_w)``, ``starts (T, 2)`` int32 and blend ``weights (T, tile_h, tile_w)`` float32 for a
    ``height x width`` latent plane. Weights ramp over ``overlap`` pixels at tile edges inside the plane and
    are 1 on edges that lie on the plane's border."""
    th, tw = min(tile_size, height), min(tile_size, width)
    ys, xs = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    starts = np.array([(y, x) for y in ys for x in xs], np.int32)
    weights = np.stack([_ramp(th, y, height, min(overlap, th - 1))[:, None]
                        * _ramp(tw, x, width, min(overlap, tw - 1))[None, :] for y, x in starts])
    return (th, tw), starts, weights


def _slice_tile(a, start, shape):
    """``a[..., y:y+th, x:x+tw, :]`` with a traced ``start (2,)``."""
    nd = a.ndim
    idx = [0] * (nd - 3) + [start[0], start[1], 0]
    size = tuple(a.shape[:nd - 3]) + (shape[0], shape[1], a.shape[-1])
    return jax.lax.dynamic_slice(a, idx, size)


def tiled_apply(fn, x, cond_image, starts, weights, tile_shape, tile_batch: int):
    """MultiDiffusion blend of ``fn`` over spatial tiles.

    ``fn(x_tiles, cond_tiles, k)`` maps ``k`` tiles folded into the batch axis (tile-major: ``(k*B, ...)``) to
    predictions of the same shape as ``x_tiles``. ``x``: ``(B, [F,] h, w, C)``; ``cond_image``: the same with
    its own channels; ``starts (T, 2)``; ``weights (T, th, tw)``; tiles go ``tile_batch`` at a time (``T`` is
    padded with zero-weight copies of the first tile)."""
    t = starts.shape[0]
    k = max(1, min(tile_batch, t))
    pad = (-t) % k
    if pad:
        starts = jnp.concatenate([starts, jnp.repeat(starts[:1], pad, 0)])
        weights = jnp.concatenate([weights, jnp.zeros((pad,) + weights.shape[1:], weights.dtype)])
    starts = starts.reshape(-1, k, 2)
    weights = weights.reshape((-1, k) + weights.shape[1:])
    b = x.shape[0]
    lead = (1,) * (x.ndim - 3)  # broadcast a (th, tw) weight over (B, [F,]) and channels

    def body(carry, chunk):
        acc, norm = carry
        st, wt = chunk
        xt = jnp.concatenate([_slice_tile(x, st[i], tile_shape) for i in range(k)])
        ct = jnp.concatenate([_slice_tile(cond_image, st[i], tile_shape) for i in range(k)])
        out = fn(xt, ct, k).astype(jnp.float32)
        for i in range(k):
            w = wt[i].reshape(lead + tile_shape + (1,))
            piece = out[i * b:(i + 1) * b] * w
            idx = [0] * (x.ndim - 3) + [st[i][0], st[i][1], 0]
            acc = jax.lax.dynamic_update_slice(acc, _slice_tile(acc, st[i], tile_shape) + piece, idx)
            nidx = [st[i][0], st[i][1]]
            norm = jax.lax.dynamic_update_slice(norm, jax.lax.dynamic_slice(norm, nidx, tile_shape) + wt[i], nidx)
        return (acc, norm), None

    acc = jnp.zeros(x.shape, jnp.float32)
    norm = jnp.zeros(x.shape[-3:-1], jnp.float32)
    (acc, norm), _ = jax.lax.scan(body, (acc, norm), (starts, weights))
    return (acc / norm[..., None]).astype(x.dtype)


# ---------------------------------------------------------------------------------------- compiled parts

def _unet_output(unet, x, t, cond):
    """The upscaler U-Net on latents ``x (N, [F,] h, w, 4)`` with ``cond`` = context, low-res image, labels."""
    inp = jnp.concatenate([x, cond["image"].astype(x.dtype)], axis=-1)
    return unet(inp, t, cond["context"], class_labels=cond["labels"])


def make_denoiser(unet, context, uncontext, image, labels, guidance_scale, *, guided: bool, tiling=None):
    """``denoise(x, t)`` for :func:`~vldm_jax.diffusion.samplers.sample`: the upscaler U-Net with the low-res
    conditioning ``image`` (same leading and spatial dims as ``x``), noise-level ``labels (B,)``, text guidance,
    and (``tiling = (starts, weights, tile_shape, tile_batch)``) MultiDiffusion tiling."""

    def guided_fn(x, img, k, t):
        tile = lambda a: jnp.tile(a, (k,) + (1,) * (a.ndim - 1))  # noqa: E731  (tile-major batch)
        cond = {"context": tile(context), "image": img, "labels": tile(labels)}
        if not guided:
            return _unet_output(unet, x, t, cond)
        uncond = {"context": tile(uncontext), "image": img, "labels": tile(labels)}
        return classifier_free_guidance(lambda xx, tt, c: _unet_output(unet, xx, tt, c), x, t, cond, uncond,
                                        guidance_scale)

    def denoise(x, t):
        fn = functools.partial(guided_fn, t=t)
        if tiling is None:
            return fn(x, image, 1)
        starts, weights, tile_shape, tile_batch = tiling
        return tiled_apply(fn, x, image, starts, weights, tile_shape, tile_batch)

    return denoise


@functools.partial(jax.jit, static_argnames=("unet_graph", "vae_graph", "guided", "tile_shape", "tile_batch",
                                             "decode_chunk", "progress", "mesh"))
def _generate(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, image, labels, noise,
              guidance_scale, key, scaling_factor, starts, weights, *, guided: bool, tile_shape, tile_batch: int,
              decode_chunk: int, progress: bool, mesh=None):
    """Latents ``noise (B, [F,] h, w, 4)`` -> images ``(B, [F,] 4h, 4w, 3)`` in [0, 1]; traced under ``mesh``."""
    with activation_mesh(mesh):
        return _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, image,
                              labels, noise, guidance_scale, key, scaling_factor, starts, weights, guided=guided,
                              tile_shape=tile_shape, tile_batch=tile_batch, decode_chunk=decode_chunk,
                              progress=progress)


def _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, context, uncontext, image, labels, noise,
                   guidance_scale, key, scaling_factor, starts, weights, *, guided: bool, tile_shape, tile_batch: int,
                   decode_chunk: int, progress: bool):
    unet = nnx.merge(unet_graph, unet_state)
    vae = nnx.merge(vae_graph, vae_state)
    tiling = None if tile_shape is None else (starts, weights, tile_shape, tile_batch)
    denoise = make_denoiser(unet, context, uncontext, image, labels, guidance_scale, guided=guided, tiling=tiling)
    latents = sample(denoise, sampler, noise, key=key, progress=advance if progress else None)
    lead = latents.shape[:-3]
    flat = latents.reshape((-1,) + latents.shape[-3:]) / scaling_factor
    # Frame chunks bound the decoder's activation memory (the decode of big frames dominates it).
    frames = jax.lax.map(lambda z: vae.decode(z[None])[0], flat, batch_size=min(decode_chunk, flat.shape[0]))
    frames = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return frames.reshape(lead + frames.shape[1:])


# ------------------------------------------------------------------------------------------------ pipelines

def _as_unit_float(images: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"{name} must be uint8 or float in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float32)
    if a.size and (not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3):
        raise UserError(f"{name} values must lie in [0, 1] (got [{a.min():.3g}, {a.max():.3g}])")
    return np.clip(a, 0.0, 1.0)


class UpscalePipeline:
    """Stable Diffusion x4 upscaler on images (diffusers ``StableDiffusionUpscalePipeline``).

    ``pipe(image, prompt)`` -> float32 ``(B, 4H, 4W, 3)`` in [0, 1], ``image`` ``(B, H, W, 3)`` or ``(H, W, 3)``,
    uint8 or float in [0, 1].
    """

    video = False

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any],
                 low_res_scheduler_config: dict[str, Any], *, max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL,
                 clip_skip: int = 0):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.low_res_scheduler_config = dict(low_res_scheduler_config)
        self.max_noise_level = int(max_noise_level)
        self.clip_skip = clip_skip
        self.low_res_schedule = schedules.NoiseSchedule.from_config(self.low_res_scheduler_config)
        self._check_components()
        self._unet_graph, self._unet_state = nnx.split(unet)
        self._vae_graph, self._vae_state = nnx.split(vae)
        self._text_graph, self._text_state = nnx.split(text_encoder)

    def _check_components(self):
        c = self.unet.config
        latent = self.vae.config.latent_channels
        if c.in_channels != latent + 3:
            raise CheckpointError(f"not an upscaler: the U-Net takes {c.in_channels} channels, expected "
                                  f"{latent} latent + 3 image channels")
        if c.num_class_embeds is None:
            raise CheckpointError("not an upscaler: the U-Net has no noise-level embedding (num_class_embeds)")
        if self.max_noise_level >= c.num_class_embeds:
            raise CheckpointError(f"max_noise_level {self.max_noise_level} does not fit the U-Net's "
                                  f"{c.num_class_embeds} noise-level embeddings")

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32) -> "UpscalePipeline":
        """A diffusers ``StableDiffusionUpscalePipeline`` folder (e.g. stabilityai/stable-diffusion-x4-upscaler,
        also as a hub id) or a folder written by :meth:`save_pretrained`."""
        parts = load_upscaler_parts(path, dtype=dtype)
        from vldm_jax.models.unet import VideoUNet

        if isinstance(parts["unet"], VideoUNet):
            raise CheckpointError(f"{path} holds a video upsampler; load it with VideoUpscalePipeline")
        return cls(**parts)

    def save_pretrained(self, dst: str | os.PathLike) -> None:
        """Writes our own format (converted weights + configs, tokenizer, both schedulers) atomically."""
        from vldm_jax.checkpoints.pipeline_folder import write_pipeline_parts
        from vldm_jax.checkpoints.store import atomic_folder

        with atomic_folder(dst) as tmp:
            write_pipeline_parts(
                tmp, {"_class_name": type(self).__name__, "_vldm_clip_skip": self.clip_skip,
                      "max_noise_level": self.max_noise_level},
                modules={"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
                tokenizer=self.tokenizer,
                schedulers={"scheduler": self.scheduler_config, "low_res_scheduler": self.low_res_scheduler_config})

    # ------------------------------------------------------------------------------------------ running
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_factor(self) -> int:
        """Tile sizes must be multiples of this (the U-Net's total downsampling)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        return encode_prompts(self.tokenizer, self._text_graph, self._text_state, prompts, self.clip_skip)

    def noise_augment(self, image, noise_level: int, noise) -> jax.Array:
        """The low-res conditioning: ``image`` in [-1, 1] noised by the low-res scheduler at ``noise_level``."""
        return schedules.add_noise(self.low_res_schedule, jnp.asarray(image, jnp.float32), noise,
                                   jnp.int32(noise_level))

    def _check_args(self, *, noise_level, num_inference_steps, scheduler, tile_size, tile_overlap, tile_batch,
                    decode_chunk):
        if not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level <= self.max_noise_level:
            raise UserError(f"noise_level must be an integer in [0, {self.max_noise_level}] (got {noise_level})")
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if tile_size is not None:
            f = self.unet_factor
            if tile_size < f or tile_size % f:
                raise UserError(f"tile size must be a positive multiple of {f} low-res pixels (got {tile_size})")
            if tile_overlap is not None and not 0 <= tile_overlap <= tile_size // 2:
                raise UserError(f"tile overlap must be in [0, {tile_size // 2}] (got {tile_overlap})")
        if tile_batch < 1 or decode_chunk < 1:
            raise UserError("tile_batch and decode_chunk must be at least 1")

    def _run(self, images: np.ndarray, prompts: list[str], negative_prompt, *, num_inference_steps, guidance_scale,
             noise_level, scheduler, seed, latents, low_res_noise, eta, tile_size, tile_overlap, tile_batch,
             decode_chunk, progress, mesh=None):
        """``images (B, [F,] H, W, 3)`` in [0, 1] -> ``(B, [F,] 4H, 4W, 3)``."""
        self._check_args(noise_level=noise_level, num_inference_steps=num_inference_steps, scheduler=scheduler,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_batch=tile_batch,
                         decode_chunk=decode_chunk)
        b = images.shape[0]
        h, w = images.shape[-3:-1]
        key = jax.random.key(seed)
        k_img, k_lat, k_sample = jax.random.split(key, 3)
        image = jnp.asarray(images * 2.0 - 1.0)
        if low_res_noise is None:
            low_res_noise = jax.random.normal(k_img, image.shape, jnp.float32)
        elif tuple(np.shape(low_res_noise)) != tuple(image.shape):
            raise UserError(f"low_res_noise must have shape {tuple(image.shape)}")
        image = self.noise_augment(image, int(noise_level), jnp.asarray(low_res_noise, jnp.float32))
        shape = images.shape[:-1] + (self.vae.config.latent_channels,)
        noise = initial_noise(latents, shape, k_lat)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(prompts)
        if guided:
            neg = "" if negative_prompt is None else negative_prompt
            negs = [neg] * b if isinstance(neg, str) else list(neg)
            if len(negs) != b:
                raise UserError(f"got {len(negs)} negative prompts for {b} inputs")
            uncontext = self.encode_prompt(negs)
        else:
            uncontext = context
        labels = jnp.full((b,), int(noise_level), jnp.int32)
        if tile_size is None:
            tile_shape, starts, weights = None, np.zeros((1, 2), np.int32), np.ones((1, 1, 1), np.float32)
        else:
            overlap = tile_size // 4 if tile_overlap is None else tile_overlap
            tile_shape, starts, weights = tile_layout(h, w, tile_size, overlap)
        options = {"eta": eta} if scheduler == "ddim" else {}
        sampler = make_sampler(scheduler, self.scheduler_config, num_inference_steps, **options)
        unet_state, vae_state = self._unet_state, self._vae_state
        if mesh is not None and mesh.devices.size > 1:
            unet_state, vae_state = place_state(unet_state, mesh), place_state(vae_state, mesh)
            context, uncontext, image, labels, noise = place_inputs(mesh, context, uncontext, image, labels, noise)
        else:
            mesh = None
        with denoising_bar(num_inference_steps, progress):
            out = _generate(self._unet_graph, unet_state, self._vae_graph, vae_state, sampler, context,
                            uncontext, image, labels, noise, jnp.float32(guidance_scale), k_sample,
                            jnp.float32(self.vae.config.scaling_factor), jnp.asarray(starts), jnp.asarray(weights),
                            guided=guided, tile_shape=tile_shape, tile_batch=int(tile_batch),
                            decode_chunk=int(decode_chunk), progress=progress, mesh=mesh)
            return np.asarray(out, np.float32)

    def __call__(self, image, prompt: str | Sequence[str] = "", negative_prompt: str | Sequence[str] | None = None,
                 *, num_inference_steps: int = defaults.UPSCALE_STEPS,
                 guidance_scale: float = defaults.UPSCALE_GUIDANCE, noise_level: int = defaults.UPSCALE_NOISE_LEVEL,
                 scheduler: str = defaults.SCHEDULER, seed: int = 0, latents=None, low_res_noise=None, eta: float = 0.0,
                 tile_size: int | None = None, tile_overlap: int | None = None, tile_batch: int = 4,
                 decode_chunk: int = 1, progress: bool = False, mesh=None) -> np.ndarray:
        """``latents`` ``(B, H, W, 4)`` and ``low_res_noise`` ``(B, H, W, 3)`` replace the draws from ``seed``
        (diffusers draws the low-res noise first, then the latents). ``mesh``: images over ``data``/``fsdp``."""
        images = _as_unit_float(image, "image")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"image must be (H, W, 3) or (B, H, W, 3), got shape {images.shape}")
        prompts = [prompt] * images.shape[0] if isinstance(prompt, str) else list(prompt)
        if len(prompts) != images.shape[0]:
            raise UserError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        return self._run(images, prompts, negative_prompt, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, noise_level=noise_level, scheduler=scheduler, seed=seed,
                         latents=latents, low_res_noise=low_res_noise, eta=eta, tile_size=tile_size,
                         tile_overlap=tile_overlap, tile_batch=tile_batch, decode_chunk=decode_chunk,
                         progress=progress, mesh=mesh)


class VideoUpscalePipeline(UpscalePipeline):
    """The Video LDM video upsampler: the x4 upscaler with temporal layers (a :class:`VideoUNet`).

    ``pipe(video (F, H, W, 3), prompt)`` -> float32 ``(F, 4H, 4W, 3)`` in [0, 1]. Build it from an image upscaler
    with :meth:`from_image_upscaler` (fresh temporal layers: frame by frame the image upscaler), or load a
    trained one with :meth:`from_pretrained`.
    """

    video = True

    def _check_components(self):
        from vldm_jax.models.unet import VideoUNet

        if not isinstance(self.unet, VideoUNet):
            raise CheckpointError(f"the video upsampler needs a video U-Net, got {type(self.unet).__name__} "
                                  "(use VideoUpscalePipeline.from_image_upscaler)")
        super()._check_components()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, temporal=None,
                        seed: int = 0) -> "VideoUpscalePipeline":
        """A folder written by :meth:`save_pretrained` (its U-Net is a video U-Net). An image upscaler folder
        (diffusers, or a hub id) also loads: its U-Net gets fresh temporal layers (``temporal``: a
        :class:`~vldm_jax.models.unet.TemporalConfig` or dict; default the paper's), as in
        :meth:`from_image_upscaler`."""
        parts = load_upscaler_parts(path, dtype=dtype)
        parts["unet"] = _video_unet(parts["unet"], temporal, seed)
        return cls(**parts)

    @classmethod
    def from_image_upscaler(cls, path_or_pipeline, temporal=None, *, seed: int = 0,
                            dtype=jnp.float32) -> "VideoUpscalePipeline":
        """The paper's construction from an image upscaler (an :class:`UpscalePipeline`, or a folder / hub id it
        loads from): the same weights with temporal layers inserted, zero-initialised at their outputs."""
        image = (path_or_pipeline if isinstance(path_or_pipeline, UpscalePipeline)
                 else UpscalePipeline.from_pretrained(path_or_pipeline, dtype=dtype))
        return cls(_video_unet(image.unet, temporal, seed), image.vae, image.text_encoder, image.tokenizer,
                   image.scheduler_config, image.low_res_scheduler_config, max_noise_level=image.max_noise_level,
                   clip_skip=image.clip_skip)

    def __call__(self, video, prompt: str = "", negative_prompt: str | None = None, *,
                 num_inference_steps: int = defaults.VIDEO_UPSCALE_STEPS,
                 guidance_scale: float = defaults.UPSCALE_GUIDANCE, noise_level: int = defaults.UPSCALE_NOISE_LEVEL,
                 tile_size: int | None = None, tile_overlap: int | None = None, tile_batch: int = 4, decode_chunk: int = 1,
                 scheduler: str = defaults.SCHEDULER,
                 seed: int = 0, latents=None, low_res_noise=None, eta: float = 0.0,
                 progress: bool = True, mesh=None) -> np.ndarray:
        """``video``: ``(F, H, W, 3)`` uint8 or float in [0, 1]. ``tile_size`` / ``tile_overlap``: in low-res
        (input) pixels; ``tile_size`` a multiple of :attr:`unet_factor` (None: the whole frame at once), the
        overlap at most half a tile (default a quarter). ``tile_batch``: tiles per U-Net call;
        ``decode_chunk``: frames per VAE decode call. ``latents (1, F, H, W, 4)`` / ``low_res_noise
        (1, F, H, W, 3)`` replace the draws from ``seed``. ``mesh``: frames over ``context``. Returns
        ``(F, 4H, 4W, 3)`` float32 in [0, 1]."""
        frames = _as_unit_float(video, "video")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise UserError(f"video must be (F, H, W, 3), got shape {frames.shape}")
        if not isinstance(prompt, str):
            raise UserError("the video upsampler takes one prompt")
        out = self._run(frames[None], [prompt], negative_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, noise_level=noise_level, scheduler=scheduler, seed=seed,
                        latents=latents, low_res_noise=low_res_noise, eta=eta, tile_size=tile_size,
                        tile_overlap=tile_overlap, tile_batch=tile_batch, decode_chunk=decode_chunk,
                        progress=progress, mesh=mesh)
        return out[0]


def _video_unet(unet, temporal, seed: int):
    from vldm_jax.models.unet import VideoUNet

    if isinstance(unet, VideoUNet):
        return unet
    return VideoUNet.from_image_unet(unet, temporal, seed=seed)
