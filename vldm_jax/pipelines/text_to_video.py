"""The Video LDM cascade: text -> keyframes -> interpolation (x4, x16) -> temporal decoder -> upsampler.

``TextToVideoPipeline`` holds the parts of a Video LDM (Blattmann et al. 2023):

* ``unet``: the key-frame video U-Net (text-conditioned temporal layers on a frozen image LDM);
* ``interpolator`` (optional): a video U-Net with context-frame conditioning that predicts the 3 frames
  between each pair of keyframes (T -> 4T - 3; applied twice for x16);
* ``predictor`` (optional): a video U-Net with context-frame conditioning that continues 1 or 2 given frames
  (:meth:`animate`: an image becomes a video; long videos by autoregressive rollout);
* ``vae``: the image autoencoder or the temporally fine-tuned decoder (decoded in chunks of frames);
* ``upsampler`` (optional): a :class:`~vldm_jax.pipelines.upscale.VideoUpscalePipeline` (x4 in space);
* ``text_encoder``, ``tokenizer``, ``scheduler_config`` (shared by every stage).

Every stage's sampling loop is compiled once per shape (:mod:`vldm_jax.pipelines.stages`); one progress bar
counts the denoising steps of all stages. Frames come back as float32 ``(B, F, H, W, 3)`` in [0, 1].

Longer than trained: the temporal layers are convolutional in time (3D convs; attention with relative frame
positions), so ``num_frames`` may exceed the training window (the paper's convolutional-in-time generation:
one sample, coherent, quality degrades slowly with length); :meth:`animate` with ``num_frames`` beyond the
predictor's window rolls out autoregressively (any length, but errors can accumulate).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.checkpoints.pipeline_folder import read_pipeline_folder
from vldm_jax.diffusion.samplers import SAMPLER_NAMES
from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.pipelines import stages
from vldm_jax.pipelines.common import denoising_bar, encode_prompts, fold_keys, initial_noise, sample_keys
from vldm_jax.pipelines.defaults import DECODE_CHUNK, SCHEDULER, VIDEO_LDM

INTERPOLATE_CHOICES = (1, 4, 16)
_MODEL_PARTS = ("unet", "interpolator", "predictor", "vae", "text_encoder")
CLASS_NAME = "VideoLDMPipeline"
# The bundled default model (moving shapes), shipped as package data.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default_model"


def default_checkpoint() -> Path:
    """The bundled Video LDM pipeline folder (what ``vldm generate`` uses without ``--checkpoint``)."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise UserError(f"no --checkpoint given and the bundled default model is not installed ({DEFAULT_MODEL})")
    return DEFAULT_MODEL


def _check_index(index: dict, path: Path) -> None:
    """The fields of a Video LDM ``model_index.json``, checked before any component loads."""
    for part in (*_MODEL_PARTS, "tokenizer", "scheduler", "upsampler"):
        entry = index.get(part)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2
                                      and all(isinstance(x, str) for x in entry)):
            raise CheckpointError(f"{path}: {part} must be null or [library, class] (got {entry!r})")
    clip_skip = index.get("_vldm_clip_skip", 0)
    if type(clip_skip) is not int or clip_skip < 0:
        raise CheckpointError(f"{path}: _vldm_clip_skip must be a non-negative integer (got {clip_skip!r})")
    if not isinstance(index.get("_vldm_defaults", {}), dict):
        raise CheckpointError(f"{path}: _vldm_defaults must be an object (got {index['_vldm_defaults']!r})")


class TextToVideoPipeline:
    """Video LDM text-to-video (and image animation, video interpolation) from a pipeline folder."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any], *, interpolator=None,
                 predictor=None, upsampler=None, clip_skip: int = 0, defaults: dict[str, Any] | None = None):
        self.unet, self.interpolator, self.predictor = unet, interpolator, predictor
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.upsampler = upsampler
        self.scheduler_config = dict(scheduler_config)
        self.clip_skip = clip_skip
        self.defaults = dict(defaults or {})
        self.codec = stages.LatentCodec(vae)
        self._text_graph, self._text_state = nnx.split(text_encoder)
        self._samplers = {name: stages.VideoSampler(m, self.scheduler_config)
                          for name, m in (("unet", unet), ("interpolator", interpolator), ("predictor", predictor))
                          if m is not None}
        for name in ("interpolator", "predictor"):
            m = getattr(self, name)
            if m is not None and getattr(m.config, "context_conditioning", "none") == "none":
                raise CheckpointError(f"the {name} needs a video U-Net with context_conditioning (got none)")

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, allow_pickle: bool = False, dtype=jnp.float32,
                        upsampler: bool = True) -> "TextToVideoPipeline":
        """A Video LDM pipeline folder (``model_index.json`` naming ``unet``, ``vae``, ``text_encoder``,
        ``tokenizer``, ``scheduler`` and optionally ``interpolator``, ``predictor``, ``upsampler``), or a hub id."""
        folder = read_pipeline_folder(path, what="a pipeline folder")
        _check_index(folder.index, folder.path / "model_index.json")
        folder.require(("unet", "vae", "text_encoder", "scheduler"))
        parts = folder.load_models(_MODEL_PARTS, allow_pickle=allow_pickle, dtype=dtype)
        up = None
        if upsampler and folder.index.get("upsampler") and (folder.path / "upsampler").is_dir():
            from vldm_jax.pipelines.upscale import VideoUpscalePipeline

            up = VideoUpscalePipeline.from_pretrained(folder.path / "upsampler", dtype=dtype)
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], folder.tokenizer(), folder.scheduler_config(),
                   interpolator=parts.get("interpolator"), predictor=parts.get("predictor"), upsampler=up,
                   clip_skip=folder.clip_skip, defaults=folder.index.get("_vldm_defaults", {}))

    def save_pretrained(self, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Writes the pipeline in our own format to a new folder, atomically (a network in two roles, such as the
        key-frame model that is also the prediction model, is stored once)."""
        from vldm_jax.checkpoints.pipeline_folder import write_pipeline_parts
        from vldm_jax.checkpoints.store import atomic_folder

        with atomic_folder(dst, overwrite=overwrite) as tmp:
            upsampler = None
            if self.upsampler is not None:
                self.upsampler.save_pretrained(tmp / "upsampler")
                upsampler = ["vldm_jax", type(self.upsampler).__name__]
            write_pipeline_parts(
                tmp, {"_class_name": CLASS_NAME, "_vldm_clip_skip": self.clip_skip, "_vldm_defaults": self.defaults,
                      "upsampler": upsampler},
                modules={name: getattr(self, name) for name in _MODEL_PARTS}, tokenizer=self.tokenizer,
                schedulers={"scheduler": self.scheduler_config})

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def vae_scale_factor(self) -> int:
        return self.codec.factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    def default(self, name: str, fallback=None):
        """The model folder's default for ``name``, else ``fallback``, else
        :data:`~vldm_jax.pipelines.defaults.VIDEO_LDM`'s."""
        if name in self.defaults:
            return self.defaults[name]
        return fallback if fallback is not None else VIDEO_LDM.get(name)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> context ``(B, 77, D)``."""
        return encode_prompts(self.tokenizer, self._text_graph, self._text_state, prompts, self.clip_skip)

    def _size(self, height, width) -> tuple[int, int]:
        f = self.vae_scale_factor
        sample = self.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        height = self.default("height", (sample or 8) * f) if height is None else height
        width = self.default("width", (sample or 8) * f) if width is None else width
        if height <= 0 or width <= 0 or height % f or width % f:
            raise UserError(f"height and width must be positive multiples of {f} (got {height}x{width})")
        return int(height), int(width)

    def _texts(self, prompts, negative_prompt, guided: bool):
        text = self.encode_prompt(prompts)
        if not guided:
            return text, None
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
        if len(negs) != len(prompts):
            raise UserError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
        return text, self.encode_prompt(negs)

    @staticmethod
    def _check_common(num_inference_steps: int, scheduler: str, interpolate: int) -> None:
        if num_inference_steps < 1:
            raise UserError(f"the number of steps must be at least 1 (got {num_inference_steps})")
        if scheduler not in SAMPLER_NAMES:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if interpolate not in INTERPOLATE_CHOICES:
            raise UserError(f"interpolate must be one of {', '.join(map(str, INTERPOLATE_CHOICES))} (got {interpolate})")

    def _interpolation_passes(self, interpolate: int) -> int:
        passes = {1: 0, 4: 1, 16: 2}[interpolate]
        if passes and self.interpolator is None:
            raise UserError("this pipeline has no interpolation model (interpolate must be 1)")
        return passes

    # ------------------------------------------------------------------------------------------ text -> video
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: str = SCHEDULER, interpolate: int | None = None, interpolation_steps: int | None = None,
                 interpolation_window: int | None = None, decode_chunk_size: int | None = DECODE_CHUNK,
                 upscale: bool = False, upscale_kwargs: dict | None = None, seed: int | Sequence[int] = 0,
                 latents=None, progress: bool = False, return_latents: bool = False, mesh=None,
                 rollout: int = 1, rollout_context: int = 1):
        """Text -> video frames ``(B, F_out, H, W, 3)`` in [0, 1].

        ``num_frames``: keyframes sampled by the key-frame model (default: the pipeline's); with ``interpolate``
        4 or 16 the output has ``4(F-1)+1`` or ``16(F-1)+1`` frames. ``latents``: the keyframes' starting noise
        ``(B, F, h, w, C)``. ``return_latents``: also return the final latents before decoding.
        ``seed``: one for every prompt (a prompt then gives the same video alone or among others, with the
        deterministic samplers) or one per prompt. ``mesh``: a :func:`vldm_jax.parallel.make_mesh` mesh: prompts
        over ``data``, frames over ``context``, the decoder's chunks over ``context``.
        ``rollout``: windows in all (1: key frames only). Windows 2..K are sampled by the prediction model, each
        continuing the newest ``rollout_context`` (1 or 2) key frames (:func:`stages.rollout`), so K windows give
        ``F + (K - 1)(W - rollout_context)`` key frames (``W`` the predictor's window, the pipeline's
        ``num_frames``) before interpolation. :func:`rollout_seams` gives the key frames where each window starts.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        interpolate = self.default("interpolate") if interpolate is None else interpolate
        if interpolation_window is None:
            interpolation_window = self.default("interpolation_window")
        steps = self.default("num_inference_steps") if num_inference_steps is None else num_inference_steps
        guidance = self.default("guidance_scale") if guidance_scale is None else guidance_scale
        interp_guidance = self.default("interpolation_guidance_scale", guidance)
        self._check_common(steps, scheduler, interpolate)
        if upscale and self.upsampler is None:  # before any work, not after the denoising
            raise UserError("this pipeline has no upsampler (drop upscale)")
        if num_frames is None:
            num_frames = self.default("num_frames", getattr(self.unet.config, "num_frames", 8))
        if num_frames < 1:
            raise UserError(f"num_frames must be at least 1 (got {num_frames})")
        passes = self._interpolation_passes(interpolate)
        if passes and num_frames < 2:
            raise UserError("interpolation needs at least 2 keyframes")
        window = self._rollout_window(rollout, rollout_context, num_frames)
        if upscale and self.upsampler is None:  # said before sampling, not after
            raise UserError("this pipeline has no upsampler (drop upscale)")
        height, width = self._size(height, width)
        f = self.vae_scale_factor
        shape = (len(prompts), num_frames, height // f, width // f, self.latent_channels)
        keys = sample_keys(seed, len(prompts))
        noise = initial_noise(latents, shape, fold_keys(keys, 0))
        text, null_text = self._texts(prompts, negative_prompt, guidance != 1.0 or interp_guidance != 1.0)
        interp_steps = steps if interpolation_steps is None else interpolation_steps
        total = rollout * steps + passes * interp_steps
        with denoising_bar(total, progress):
            frames_latents = self._samplers["unet"](noise, text, null_text, steps=steps, scheduler=scheduler,
                                                    guidance_scale=guidance, key=jax.random.fold_in(keys[0], 1),
                                                    progress=True, mesh=mesh)
            if rollout > 1:
                keyframes = num_frames + (rollout - 1) * (window - rollout_context)
                frames_latents = stages.rollout(
                    self._samplers["predictor"], frames_latents, keyframes, window, text, null_text,
                    num_context=rollout_context, key=fold_keys(keys, 50), steps=steps, scheduler=scheduler,
                    guidance_scale=guidance, progress=True, mesh=mesh)
            for p in range(passes):
                frames_latents = stages.interpolate(
                    self._samplers["interpolator"], frames_latents, text, null_text,
                    key=fold_keys(keys, 100 + p), window_keyframes=interpolation_window, steps=interp_steps,
                    scheduler=scheduler, guidance_scale=interp_guidance, progress=True, mesh=mesh)
            frames = np.asarray(self.codec.decode(frames_latents, chunk=decode_chunk_size, mesh=mesh), np.float32)
        if upscale:
            if self.upsampler is None:
                raise UserError("this pipeline has no upsampler (drop upscale)")
            seeds = np.broadcast_to(np.asarray(seed), (len(prompts),))
            frames = np.stack([self.upsampler(v, prompts[i], progress=progress, seed=int(seeds[i]), mesh=mesh,
                                              **(upscale_kwargs or {}))
                               for i, v in enumerate(frames)])
        return (frames, frames_latents) if return_latents else frames

    def _rollout_window(self, rollout: int, rollout_context: int, num_frames: int) -> int:
        """Checks ``rollout`` / ``rollout_context``; the prediction model's window (frames per call)."""
        if rollout < 1:
            raise UserError(f"rollout must be at least 1 window (got {rollout})")
        if rollout == 1:
            return num_frames
        if self.predictor is None:
            raise UserError("this pipeline has no prediction model (rollout must be 1)")
        window = self.default("num_frames", getattr(self.predictor.config, "num_frames", 8))
        if rollout_context not in (1, 2) or rollout_context >= window or rollout_context > num_frames:
            raise UserError(f"rollout_context must be 1 or 2 and below the window of {window} frames "
                            f"and the {num_frames} key frames (got {rollout_context})")
        return window

    def rollout_seams(self, num_frames: int | None = None, rollout: int = 1, rollout_context: int = 1) -> list[int]:
        """The key-frame indices where rollout windows 2..K start (their first new frame), for the judge."""
        num_frames = self.default("num_frames", 5) if num_frames is None else num_frames
        window = self._rollout_window(rollout, rollout_context, num_frames)
        return [num_frames + j * (window - rollout_context) for j in range(rollout - 1)]

    # ------------------------------------------------------------------------------------------ image -> video
    def animate(self, image, prompt: str = "", negative_prompt: str | None = None, *, num_frames: int | None = None,
                window: int | None = None, num_context: int = 1, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, context_guidance_scale: float = 1.0, scheduler: str = SCHEDULER,
                interpolate: int | None = None, decode_chunk_size: int | None = DECODE_CHUNK, upscale: bool = False,
                seed: int = 0, progress: bool = False, mesh=None) -> np.ndarray:
        """An image (``(H, W, 3)`` uint8 or float in [0, 1], or a list of 1-2 such frames) -> video
        ``(F, H, W, 3)`` in [0, 1] whose first frame is the image after a VAE round trip.

        ``window``: the predictor's frame count per call (default: the pipeline's ``num_frames``); more
        ``num_frames`` than that rolls out autoregressively, the newest ``num_context`` frames becoming the next
        window's context. ``mesh``: as for :meth:`__call__` (frames over ``context``)."""
        if self.predictor is None:
            raise UserError("this pipeline has no prediction model (cannot animate images)")
        if upscale and self.upsampler is None:
            raise UserError("this pipeline has no upsampler (drop upscale)")
        interpolate = self.default("interpolate") if interpolate is None else interpolate
        frames = [image] if np.asarray(image).ndim == 3 else list(image)
        if not 1 <= len(frames) <= 2:
            raise UserError(f"animate takes 1 or 2 context frames (got {len(frames)})")
        pixels = np.stack([_as_float_frame(fr) for fr in frames])[None]  # (1, Fc, H, W, 3)
        h, w = pixels.shape[2:4]
        self._size(h, w)
        steps = self.default("num_inference_steps") if num_inference_steps is None else num_inference_steps
        guidance = self.default("guidance_scale") if guidance_scale is None else guidance_scale
        interp_guidance = self.default("interpolation_guidance_scale", guidance)
        self._check_common(steps, scheduler, interpolate)
        window = window or self.default("num_frames", getattr(self.predictor.config, "num_frames", 8))
        num_frames = window if num_frames is None else num_frames
        if num_frames < len(frames):
            raise UserError(f"num_frames must be at least the {len(frames)} given frame(s) (got {num_frames})")
        n_ctx = max(num_context, len(frames))
        if not 0 < n_ctx < window:
            raise UserError(f"num_context must be between 1 and {window - 1} (got {num_context})")
        passes = self._interpolation_passes(interpolate)
        key = jax.random.key(seed)
        context = self.codec.encode(pixels)
        text, null_text = self._texts([prompt], negative_prompt, guidance != 1.0 or interp_guidance != 1.0)
        windows = 0
        have = context.shape[1]
        while have < num_frames:
            have += window - min(n_ctx, have)
            windows += 1
        total = windows * steps + passes * steps
        with denoising_bar(total, progress):
            latents = stages.rollout(self._samplers["predictor"], context, num_frames, window, text, null_text,
                                     num_context=n_ctx, key=jax.random.fold_in(key, 1), steps=steps,
                                     scheduler=scheduler, guidance_scale=guidance,
                                     context_guidance_scale=context_guidance_scale, progress=True, mesh=mesh)
            for p in range(passes):
                latents = stages.interpolate(self._samplers["interpolator"], latents, text, null_text,
                                             key=jax.random.fold_in(key, 100 + p), steps=steps, scheduler=scheduler,
                                             window_keyframes=self.default("interpolation_window"),
                                             guidance_scale=interp_guidance, progress=True, mesh=mesh)
            video = np.asarray(self.codec.decode(latents, chunk=decode_chunk_size, mesh=mesh), np.float32)[0]
        if upscale:
            if self.upsampler is None:
                raise UserError("this pipeline has no upsampler (drop upscale)")
            video = self.upsampler(video, prompt, progress=progress, seed=seed, mesh=mesh)
        return video

    # ------------------------------------------------------------------------------------------ video -> video
    def interpolate_video(self, video, prompt: str = "", *, factor: int = 4, num_inference_steps: int | None = None,
                          guidance_scale: float | None = None, scheduler: str = SCHEDULER,
                          window_keyframes: int | None = None, decode_chunk_size: int | None = DECODE_CHUNK,
                          seed: int = 0, progress: bool = False, mesh=None) -> np.ndarray:
        """Any video ``(F, H, W, 3)`` (uint8 or float [0, 1]) -> ``(factor (F-1) + 1, H, W, 3)``: encode, insert the
        frames between each pair with the interpolation model (``factor`` 4, or 16 = twice), decode. The input
        frames come back after a VAE round trip. ``mesh``: as for :meth:`__call__`."""
        if factor not in (4, 16):
            raise UserError(f"the interpolation factor must be 4 or 16 (got {factor})")
        passes = self._interpolation_passes(factor)
        frames = np.stack([_as_float_frame(fr) for fr in video])[None]
        if frames.shape[1] < 2:
            raise UserError("interpolation needs a video of at least 2 frames")
        self._size(frames.shape[2], frames.shape[3])
        steps = self.default("num_inference_steps") if num_inference_steps is None else num_inference_steps
        guidance = self.default("guidance_scale") if guidance_scale is None else guidance_scale
        interp_guidance = (self.default("interpolation_guidance_scale", guidance) if guidance_scale is None
                           else guidance_scale)
        self._check_common(steps, scheduler, factor)
        window = window_keyframes or self.default("interpolation_window")
        key = jax.random.key(seed)
        latents = self.codec.encode(frames)
        text, null_text = self._texts([prompt], None, guidance != 1.0 or interp_guidance != 1.0)
        with denoising_bar(passes * steps, progress):
            for p in range(passes):
                latents = stages.interpolate(self._samplers["interpolator"], latents, text, null_text,
                                             key=jax.random.fold_in(key, p), window_keyframes=window, steps=steps,
                                             scheduler=scheduler, guidance_scale=interp_guidance, progress=True,
                                             mesh=mesh)
            return np.asarray(self.codec.decode(latents, chunk=decode_chunk_size, mesh=mesh), np.float32)[0]


def _as_float_frame(frame) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise UserError(f"expected an RGB frame (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)
