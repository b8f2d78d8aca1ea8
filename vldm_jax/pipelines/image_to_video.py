"""Image-to-video with Stable Video Diffusion (SVD / SVD-XT) weights: numpy in, numpy out.

The conditioning follows diffusers' ``StableVideoDiffusionPipeline`` exactly:

* the CLIP image embedding of the input image, after diffusers' Gaussian-antialiased bicubic resize to the
  encoder's 224 px and CLIP normalisation (:func:`clip_pixels`); the unconditional branch gets zeros;
* the VAE latent (posterior mode, *not* multiplied by ``scaling_factor``) of the image resized to the output
  size (Lanczos, :func:`vae_pixels`) with ``noise_aug_strength`` times Gaussian noise added to its pixels,
  concatenated on the channel axis to every frame's noisy latent; zeros in the unconditional branch;
* added time ids ``[fps - 1, motion_bucket_id, noise_aug_strength]``;
* classifier-free guidance with a per-frame scale rising linearly from ``min_guidance_scale`` (first frame) to
  ``max_guidance_scale`` (last frame), one batched U-Net call for both branches;
* EDM Euler sampling (the checkpoint's ``EulerDiscreteScheduler`` config: Karras sigmas between ``sigma_min`` and
  ``sigma_max``, v-prediction, continuous timesteps ``0.25 ln sigma``), initial noise scaled by the scheduler's
  ``init_noise_sigma``;
* latents divided by ``scaling_factor`` and decoded by the temporal decoder ``decode_chunk_size`` frames at a time.

The sampling loop and the decode are one jitted function of the split NNX states (compiled once per shape).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.checkpoints.pipeline_folder import read_pipeline_folder
from vldm_jax.diffusion.guidance import classifier_free_guidance, per_frame_scales
from vldm_jax.diffusion.samplers import make_sampler, sample
from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.parallel.activations import activation_mesh, place_inputs, place_state
from vldm_jax.pipelines import defaults
from vldm_jax.pipelines.common import advance, denoising_bar, initial_noise

# OpenAI CLIP's normalisation (SVD's feature_extractor/preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PARTS = ("unet", "vae", "image_encoder")
_WEIGHT_NAMES = ("config.json", "diffusion_pytorch_model.safetensors", "model.safetensors",
                 "*.safetensors.index.json", "*-of-*.safetensors")


def hub_patterns(variant: str | None = None) -> list[str]:
    """What the pipeline reads from a hub repository: one weights variant, no pickles (SVD-XT's float32 and
    fp16 weights are 9 GB and 4.5 GB: fetching a variant must not fetch the other)."""
    names = ["config.json", f"*.{variant}.safetensors", f"*.{variant}.json"] if variant else list(_WEIGHT_NAMES)
    return (["model_index.json", "scheduler/*.json", "feature_extractor/*.json"]
            + [f"{part}/{name}" for part in _PARTS for name in names])


# ------------------------------------------------------------------------------------------ preprocessing

def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    # float32 throughout, as diffusers builds it from a float32 tensor
    x = np.arange(size, dtype=np.float32) - np.float32(size // 2)
    if size % 2 == 0:
        x = x + np.float32(0.5)
    g = np.exp(-(x * x) / np.float32(2.0 * np.float32(sigma) ** 2)).astype(np.float32)
    return g / g.sum(dtype=np.float32)


def _filter_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlation with ``kernel`` along ``axis`` with reflect padding (torch's ``mode="reflect"``)."""
    k = len(kernel)
    front = (k - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (front, k - 1 - front)
    xp = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += w * np.take(xp, np.arange(i, i + n), axis=axis)
    return out


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """Keys' cubic convolution weights (torch's A = -0.75) of the taps at offsets -1, 0, 1, 2."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of torch's bicubic interpolation with ``align_corners=True`` along one axis
    (taps beyond the border are clamped to it, as torch does)."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    src = scale * np.arange(n_out, dtype=np.float32)
    i0 = np.minimum(np.floor(src), n_in - 1).astype(np.int64)
    t = np.clip(src - i0, 0.0, 1.0).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    for k, w in zip(range(-1, 3), _cubic_weights(t)):
        np.add.at(m, (np.arange(n_out), np.clip(i0 + k, 0, n_in - 1)), w)
    return m.astype(np.float32)


def resize_with_antialiasing(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """diffusers' ``_resize_with_antialiasing`` (the SVD image encoder's resize), channels-last.

    image: ``(H, W, C)`` float32 -> ``(size[0], size[1], C)``: a separable Gaussian blur with
    ``sigma = max((factor - 1) / 2, 0.001)`` per axis (odd kernel of at least 3 taps, reflect padding), then
    bicubic interpolation with ``align_corners=True``.
    """
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    factors = (h / size[0], w / size[1])
    sigmas = (max((factors[0] - 1.0) / 2.0, 0.001), max((factors[1] - 1.0) / 2.0, 0.001))
    ks = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    blurred = _filter_axis(image, _gaussian_kernel(ks[1], sigmas[1]), axis=1)
    blurred = _filter_axis(blurred, _gaussian_kernel(ks[0], sigmas[0]), axis=0)
    my, mx = _bicubic_matrix(h, size[0]), _bicubic_matrix(w, size[1])
    return np.einsum("oh,hwc,pw->opc", my, blurred, mx, optimize=True).astype(np.float32)


def clip_pixels(images: Sequence[np.ndarray], size: tuple[int, int] = (224, 224), mean=CLIP_MEAN,
                std=CLIP_STD) -> np.ndarray:
    """The image encoder's input, as diffusers' SVD ``_encode_image`` makes it.

    images: uint8 ``(H, W, 3)`` arrays (any sizes) -> float32 ``(B, size[0], size[1], 3)``: scaled to [-1, 1],
    antialiased-resized, back to [0, 1], then ``(x - mean) / std``.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = []
    for img in images:
        x = np.asarray(img).astype(np.float32) / np.float32(255.0)
        x = resize_with_antialiasing(x * np.float32(2.0) - np.float32(1.0), size)
        x = (x + np.float32(1.0)) / np.float32(2.0)
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)


def vae_pixels(images: Sequence[Any], height: int, width: int) -> np.ndarray:
    """The image the VAE encodes, as diffusers' ``VideoProcessor.preprocess``: PIL images resized to
    ``(height, width)`` with Lanczos, scaled to [-1, 1]. Returns float32 ``(B, height, width, 3)``."""
    from PIL import Image

    out = []
    for img in images:
        if img.size != (width, height):
            img = img.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        x = np.asarray(img).astype(np.float32) / np.float32(255.0)
        out.append(np.float32(2.0) * x - np.float32(1.0))
    return np.stack(out).astype(np.float32)


def as_pil_images(image: Any) -> list:
    """A PIL image, a uint8 ``(H, W, 3)`` array, or a list of them -> RGB PIL images."""
    from PIL import Image

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise UserError("image: got an empty list")
    out = []
    for img in items:
        if isinstance(img, Image.Image):
            out.append(img if img.mode == "RGB" else img.convert("RGB"))
            continue
        if not isinstance(img, np.ndarray):
            raise UserError(f"image must be a PIL image or a uint8 numpy array (H, W, 3), got {type(img).__name__}")
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise UserError(f"image array must be uint8 (H, W, 3), got {img.dtype} {tuple(img.shape)}")
        out.append(Image.fromarray(img, mode="RGB"))
    return out


def image_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The Gaussian noise added to the conditioning image (noise augmentation), ``shape`` float32."""
    return jax.random.normal(key, shape, jnp.float32)


# ------------------------------------------------------------------------------------------ compiled parts

@functools.partial(jax.jit, static_argnames=("graph",))
def _image_embeddings(graph, state, pixels):
    return nnx.merge(graph, state)(pixels).image_embeds


@functools.partial(jax.jit, static_argnames=("graph",))
def _image_latents(graph, state, pixels):
    return nnx.merge(graph, state).encode(pixels).mode()


@functools.partial(jax.jit, static_argnames=("unet_graph", "vae_graph", "guided", "decode_chunk_size", "mesh"))
def _generate(unet_graph, unet_state, vae_graph, vae_state, sampler, noise, image_embeds, image_latents,
              added_time_ids, scales, scaling_factor, guided: bool, decode_chunk_size: int | None, mesh=None):
    """noise ``(B, F, h, w, C)``; image_embeds ``(B, 1, D)``; image_latents ``(B, h, w, C)``; added_time_ids
    ``(B, 3)``; scales ``(F,)`` -> frames ``(B, F, H, W, 3)`` in [0, 1]. Traced under ``mesh`` (frames over
    ``context``, videos over ``data``)."""
    with activation_mesh(mesh):
        return _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, noise, image_embeds,
                              image_latents, added_time_ids, scales, scaling_factor, guided, decode_chunk_size)


def _generate_body(unet_graph, unet_state, vae_graph, vae_state, sampler, noise, image_embeds, image_latents,
                   added_time_ids, scales, scaling_factor, guided: bool, decode_chunk_size: int | None):
    unet = nnx.merge(unet_graph, unet_state)
    vae = nnx.merge(vae_graph, vae_state)
    frames = noise.shape[1]
    latents_cond = jnp.broadcast_to(image_latents[:, None], (image_latents.shape[0], frames) + image_latents.shape[1:])
    cond = (image_embeds, latents_cond.astype(noise.dtype), added_time_ids)
    # diffusers' unconditional branch: zero image embedding, zero image latents, the same time ids.
    uncond = (jnp.zeros_like(cond[0]), jnp.zeros_like(cond[1]), added_time_ids)

    def model_fn(x, t, c):
        embeds, lat, ids = c
        return unet(jnp.concatenate([x, lat], axis=-1), t, encoder_hidden_states=embeds, added_time_ids=ids)

    def denoise(x, t):
        if guided:
            return classifier_free_guidance(model_fn, x, t, cond, uncond, scales)
        return model_fn(x, t, cond)

    # The step callback is always compiled in (a no-op without a bar), so a progress bar costs no recompilation.
    latents = sample(denoise, sampler, noise, progress=advance)
    video = vae.decode(latents / scaling_factor, decode_chunk_size=decode_chunk_size)
    return jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ pipeline

class ImageToVideoPipeline:
    """Stable Video Diffusion image-to-video.

    ``pipe(image, ...)`` returns float32 videos ``(B, F, H, W, 3)`` in [0, 1]. Build it with
    :meth:`from_pretrained` (a diffusers SVD folder, an original single-file SVD checkpoint, or a hub id).
    """

    def __init__(self, unet, vae, image_encoder, scheduler_config: dict[str, Any], *,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.scheduler_config = dict(scheduler_config)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self._unet_graph, self._unet_state = nnx.split(unet)
        self._vae_graph, self._vae_state = nnx.split(vae)
        self._image_graph, self._image_state = nnx.split(image_encoder)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, allow_pickle: bool = False, variant: str | None = None,
                        dtype=jnp.float32, param_dtype=None, num_frames: int | None = None):
        """Loads a diffusers SVD pipeline folder (``model_index.json`` with ``unet``, ``vae``,
        ``image_encoder``, ``feature_extractor``, ``scheduler``), an original single-file SVD checkpoint
        (``.safetensors``; ``.ckpt`` with ``allow_pickle``), or a hub id (e.g.
        ``stabilityai/stable-video-diffusion-img2vid-xt``).

        ``dtype``: compute dtype (``jnp.bfloat16`` on accelerators); ``param_dtype``: parameter dtype (default
        float32; bfloat16 halves the weights' memory). ``variant``: a weights variant of a folder (``"fp16"``).
        ``num_frames``: the default frame count of single files (their weights do not tell SVD's 14 from
        SVD-XT's 25).
        """
        p = Path(path)
        if p.is_file():
            return cls._from_single_file(p, allow_pickle=allow_pickle, dtype=dtype, param_dtype=param_dtype,
                                         num_frames=num_frames)
        if not p.exists() and str(path).endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")):
            raise CheckpointError(f"checkpoint file not found: {path}")
        folder = read_pipeline_folder(path, allow_patterns=hub_patterns(variant))
        folder.require((*_PARTS, "scheduler"), " (not a Stable Video Diffusion pipeline)")
        kw = dict(allow_pickle=allow_pickle, dtype=dtype, param_dtype=param_dtype, variant=variant)
        unet = folder.load("unet", **kw)
        vae = folder.load("vae", **kw)
        image_encoder = folder.load("image_encoder", **kw)
        for name, module, cls_name in (("unet", unet, "UNetSpatioTemporalConditionModel"),
                                       ("vae", vae, "AutoencoderKLTemporalDecoder"),
                                       ("image_encoder", image_encoder, "CLIPVisionModelWithProjection")):
            if type(module).__name__ != cls_name:
                raise CheckpointError(f"{folder.path}/{name}: expected a {cls_name}, got {type(module).__name__}")
        mean, std = CLIP_MEAN, CLIP_STD
        fe_config = folder.config("feature_extractor/preprocessor_config.json")
        if fe_config is not None:
            mean, std = fe_config.get("image_mean", mean), fe_config.get("image_std", std)
        return cls(unet, vae, image_encoder, folder.scheduler_config(), image_mean=mean, image_std=std)

    @classmethod
    def _from_single_file(cls, path: Path, *, allow_pickle, dtype, param_dtype, num_frames):
        from vldm_jax.checkpoints.svd_single_file import build_svd_models, load_svd_single_file

        parts = load_svd_single_file(path, allow_pickle=allow_pickle, num_frames=num_frames)
        models = build_svd_models(parts, dtype=dtype, param_dtype=param_dtype)
        return cls(models["unet"], models["vae"], models["image_encoder"], parts.scheduler_config)

    # ------------------------------------------------------------------------------------------ running
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_image(self, images: Sequence[np.ndarray]) -> jax.Array:
        """uint8 ``(H, W, 3)`` images -> CLIP image embeddings ``(B, 1, D)`` (the U-Net's context)."""
        size = self.image_encoder.config.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pixels = clip_pixels(images, size, self.image_mean, self.image_std)
        return _image_embeddings(self._image_graph, self._image_state, jnp.asarray(pixels))[:, None]

    def encode_image_latents(self, pixels: np.ndarray, noise_aug_strength: float, key: jax.Array) -> jax.Array:
        """VAE pixels ``(B, H, W, 3)`` in [-1, 1] -> noise-augmented conditioning latents ``(B, h, w, C)``: the
        posterior mode of ``pixels + noise_aug_strength * noise``, not scaled by ``scaling_factor``."""
        x = jnp.asarray(pixels, jnp.float32)
        x = x + jnp.float32(noise_aug_strength) * image_noise(key, x.shape)
        return _image_latents(self._vae_graph, self._vae_state, x)

    def __call__(self, image, *, height: int = defaults.SVD_HEIGHT, width: int = defaults.SVD_WIDTH,
                 num_frames: int | None = None, num_inference_steps: int = defaults.SVD_STEPS,
                 min_guidance_scale: float = defaults.SVD_MIN_GUIDANCE,
                 max_guidance_scale: float = defaults.SVD_MAX_GUIDANCE, fps: int = defaults.SVD_FPS,
                 motion_bucket_id: int = defaults.SVD_MOTION_BUCKET, noise_aug_strength: float = defaults.SVD_NOISE_AUG,
                 decode_chunk_size: int | None = None, seed: int = 0, latents=None,
                 progress: bool = False, mesh=None) -> np.ndarray:
        """Animates ``image`` (a PIL image, a uint8 ``(H, W, 3)`` array, or a list of them: one video each).

        Returns float32 ``(B, F, height, width, 3)`` in [0, 1]. ``num_frames`` defaults to the U-Net's
        ``num_frames`` (14 for SVD, 25 for SVD-XT); ``decode_chunk_size`` (default: all frames at once) bounds
        the decoder's memory; ``latents``: optional initial noise ``(B, F, height/8, width/8, 4)`` (unit
        variance, channels-last; scaled by the scheduler's ``init_noise_sigma`` here, as diffusers does).
        ``seed`` draws the initial noise (unless given) and the noise augmentation of the image.
        ``mesh``: a :mod:`vldm_jax.parallel` mesh: images over ``data``, frames over ``context``.
        """
        f = self.vae_scale_factor
        num_frames = int(self.unet.config.num_frames if num_frames is None else num_frames)
        if num_frames < 1:
            raise UserError(f"num_frames must be at least 1 (got {num_frames})")
        if height <= 0 or width <= 0 or height % 8 or width % 8 or height % f or width % f:
            raise UserError(f"height and width must be positive multiples of {max(8, f)} (got {height}x{width})")
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        if decode_chunk_size is not None and decode_chunk_size < 1:
            raise UserError(f"decode_chunk_size must be at least 1 (got {decode_chunk_size})")
        if not math.isfinite(noise_aug_strength) or noise_aug_strength < 0:
            raise UserError(f"noise_aug_strength must be a non-negative number (got {noise_aug_strength})")
        images = as_pil_images(image)
        b = len(images)
        shape = (b, num_frames, height // f, width // f, self.vae.config.latent_channels)
        expected_in = 2 * shape[-1]
        if self.unet.config.in_channels != expected_in:
            raise CheckpointError(f"the U-Net takes {self.unet.config.in_channels} input channels; an image-to-video "
                                  f"U-Net for this VAE takes {expected_in} (noise + image latents)")

        noise_key, aug_key = jax.random.split(jax.random.key(seed))
        noise = initial_noise(latents, shape, noise_key)

        guided = max(min_guidance_scale, max_guidance_scale) > 1.0
        image_embeds = self.encode_image([np.asarray(img) for img in images])
        image_latents = self.encode_image_latents(vae_pixels(images, height, width), noise_aug_strength, aug_key)
        added_time_ids = jnp.asarray([[fps - 1, motion_bucket_id, noise_aug_strength]] * b, jnp.float32)
        scales = per_frame_scales(min_guidance_scale, max_guidance_scale, num_frames)
        sampler = make_sampler("euler", self.scheduler_config, num_inference_steps)
        # As diffusers: chunks run over the B*F frames flattened (the temporal decoder's decode does the same).
        chunk = None if decode_chunk_size is None else int(decode_chunk_size)

        unet_state, vae_state = self._unet_state, self._vae_state
        if mesh is not None and mesh.devices.size > 1:
            unet_state, vae_state = place_state(unet_state, mesh), place_state(vae_state, mesh)
            noise, image_embeds, image_latents, added_time_ids = place_inputs(
                mesh, noise, image_embeds, image_latents, added_time_ids)
        else:
            mesh = None
        with denoising_bar(num_inference_steps, progress):
            video = _generate(self._unet_graph, unet_state, self._vae_graph, vae_state, sampler, noise,
                              image_embeds, image_latents, added_time_ids, scales,
                              jnp.float32(self.vae.config.scaling_factor), guided=guided, decode_chunk_size=chunk,
                              mesh=mesh)
            return np.asarray(video, dtype=np.float32)
