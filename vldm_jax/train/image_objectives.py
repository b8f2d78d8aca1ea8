"""Training from scratch: the image stages of a latent diffusion model (``objective.name`` ``vae`` and ``image``).

These build the first half of a small Video LDM (the bundled moving-shapes model, ``scripts/train_default_model.sh``):

``vae`` (:func:`build_vae_setup`)
    An :class:`~vldm_jax.models.autoencoder.AutoencoderKL` (``model.vae`` config) trained on single frames::

        L = l1 · mean(w·|x - x̂|) + l2 · mean(w·(x - x̂)²) + grad · mean(w·|∇x - ∇x̂|) + kl · KL / n_pixels

    ``w`` = 1 + ``foreground_weight`` on pixels near the object (a 3x3-dilated mask of non-black target pixels):
    the moving shapes cover ~4 % of a frame, and an unweighted loss spends its capacity on black background.
    ``∇`` are horizontal and vertical finite differences (a perceptual-free edge term for sharp outlines); the KL
    is the LDM one (sum over latents, divided by the pixel count so the weight reads like LDM's ``kl_weight``).
    At the end the latent std is measured on training frames and ``scaling_factor = 1 / std`` goes into the saved
    config: the diffusion model then sees latents of unit scale. With ``trainable: decoder`` (and
    ``model.pretrained``) only the decoder fine-tunes, on latents with extra noise (``latent_noise``), with the
    encoder, the latent space and the scaling factor unchanged: a decoder that tolerates a sampler's latent errors.

``image`` (:func:`build_image_setup`)
    An image LDM: a standard :class:`~vldm_jax.models.unet.UNet2DConditionModel` (``model.unet``) on the latents of
    the frozen trained VAE (``model.pretrained``: its folder, or a pipeline folder's), trained jointly with a
    :class:`~vldm_jax.models.clip.CLIPTextModel` from scratch (``model.text_encoder``; the bundled CLIP tokenizer),
    epsilon (or v) prediction on the scheduler of ``model.scheduler``, with text dropout so classifier-free
    guidance works. Frames of video batches ``(B, F, H, W, 3)`` are independent images (captions repeated).
    With ``objective.options.init_from`` (a pipeline folder: an earlier export, a diffusers Stable Diffusion
    folder, or a hub id of one) the U-Net and text encoder start from that pipeline's weights instead: a finished
    run continues with a new schedule, or Stable Diffusion fine-tunes on the frames (diffusers'
    ``train_text_to_image``).

Each setup's objective has ``export(models, workdir, data, say)``, which the loop calls after the last step with
the final (EMA when kept) weights: ``vae`` writes ``workdir/export/vae`` (our converted format, loadable by
``load_model``), ``image`` writes ``workdir/export/pipeline`` (a :class:`TextToImagePipeline` folder), which is
``model.pretrained`` of the next stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.diffusion import schedules
from vldm_jax.errors import ConfigError
from vldm_jax.nn.temporal import fold_frames
from vldm_jax.train.objectives import ObjectiveDefaults, Setup, parse_options, to_unit_range, trained_models_on_host


def _images(batch) -> jax.Array:
    """``video`` ``(B, F, H, W, 3)`` (or ``image`` ``(B, H, W, 3)``) -> images ``(N, H, W, 3)`` in [-1, 1]."""
    if "video" in batch:
        return fold_frames(to_unit_range(batch["video"]))
    return to_unit_range(batch["image"])


def _path_filter(modules: tuple[str, ...]):
    def keep(path, value) -> bool:
        return isinstance(value, nnx.Param) and len(path) > 0 and path[0] in modules

    return keep


class _ExportedStage(ObjectiveDefaults):
    """A stage trained from scratch: its export (``workdir/export``) is written after the last step, and again by a
    finished run that lacks it."""

    def exported(self, workdir: Path) -> bool:
        return (workdir / "export").exists()


# ================================================================================================== VAE

@dataclasses.dataclass(frozen=True)
class VAEOptions:
    """``objective.options`` of the ``vae`` objective."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    gradient_weight: float = 0.5
    kl_weight: float = 1e-6
    foreground_weight: float = 4.0
    # Target pixels brighter than this (in [-1, 1]; -1 is black) count as foreground.
    foreground_threshold: float = -0.8
    sample_posterior: bool = True
    # Batches of training data whose posterior samples give the latent std (scaling_factor = 1 / std).
    std_batches: int = 8
    # "all", or "decoder": fine-tune the decoder (and post_quant_conv) of model.pretrained with the encoder
    # frozen, so the latent space (and the LDM trained on it) stays valid; the scaling_factor is kept.
    trainable: str = "all"
    # Extra Gaussian noise on the latents the decoder sees, std drawn per image from U(0, latent_noise) (raw
    # latent units): a decoder that has seen only near-exact posterior samples turns a diffusion sampler's
    # small latent errors into coloured texture; this teaches it to map nearby latents to clean frames.
    latent_noise: float = 0.0

    def __post_init__(self):
        if self.trainable not in ("all", "decoder"):
            raise ConfigError(f"objective.options.trainable must be all or decoder (got {self.trainable!r})")


class VAEModels(nnx.Module):
    def __init__(self, vae: nnx.Module):
        self.vae = vae


def _foreground_weights(x, options: VAEOptions) -> jax.Array:
    """``(N, H, W, 1)``: 1 on background, 1 + foreground_weight on and next to non-black target pixels."""
    fg = (jnp.max(x, axis=-1, keepdims=True) > options.foreground_threshold).astype(jnp.float32)
    fg = jax.lax.reduce_window(fg, 0.0, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    return 1.0 + options.foreground_weight * fg


def _gradients(x):
    return x[:, 1:, :, :] - x[:, :-1, :, :], x[:, :, 1:, :] - x[:, :, :-1, :]


def vae_reconstruction_loss(x, rec, options: VAEOptions) -> tuple[jax.Array, dict]:
    """Weighted L1 (+ L2) + edge term for images ``(N, H, W, 3)`` in [-1, 1]; ``(loss, metrics)``."""
    x = x.astype(jnp.float32)
    rec = rec.astype(jnp.float32)
    w = _foreground_weights(x, options)
    wn = w / jnp.mean(w)
    err = rec - x
    l1 = jnp.mean(wn * jnp.abs(err))
    l2 = jnp.mean(wn * jnp.square(err))
    (gx_h, gx_w), (gr_h, gr_w) = _gradients(x), _gradients(rec)
    grad = 0.5 * (jnp.mean(wn[:, 1:] * jnp.abs(gr_h - gx_h)) + jnp.mean(wn[:, :, 1:] * jnp.abs(gr_w - gx_w)))
    loss = options.l1_weight * l1 + options.l2_weight * l2 + options.gradient_weight * grad
    return loss, {"l1": l1, "l2": l2, "edge": grad, "mae": jnp.mean(jnp.abs(err))}


@dataclasses.dataclass(frozen=True, eq=False)
class VAEObjective(_ExportedStage):
    """Autoencoder training on single frames; batches carry ``video`` ``(B, F, H, W, 3)`` or ``image``."""

    options: VAEOptions = VAEOptions()
    trained_module: str = "vae"

    def trainable_filter(self, trainable: str):
        """``objective.options.trainable`` decides (``model.trainable`` does not apply)."""
        if self.options.trainable == "all":
            return _path_filter(("vae",))

        def keep(path, value) -> bool:
            return (isinstance(value, nnx.Param) and len(path) > 1 and path[0] == "vae"
                    and path[1] in ("decoder", "post_quant_conv"))

        return keep

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k in ("video", "image")}
        if not out:
            raise ConfigError(f"vae training batches need 'video' or 'image' (have: {', '.join(sorted(batch))})")
        return out

    def loss(self, model: VAEModels, batch, key):
        x = _images(batch)
        k_post, k_sigma, k_noise = jax.random.split(key, 3)
        posterior = model.vae.encode(x)
        z = posterior.sample(k_post) if self.options.sample_posterior else posterior.mode()
        if self.options.trainable == "decoder":
            z = jax.lax.stop_gradient(z)
        if self.options.latent_noise > 0:
            sigma = jax.random.uniform(k_sigma, (z.shape[0], 1, 1, 1), maxval=self.options.latent_noise)
            z = z + sigma * jax.random.normal(k_noise, z.shape, z.dtype)
        rec = model.vae.decode(z)
        rec_loss, metrics = vae_reconstruction_loss(x, rec, self.options)
        kl = jnp.mean(posterior.kl()) / float(np.prod(x.shape[1:]))
        metrics.update(kl=kl, latent_std=jnp.std(z), latent_mean=jnp.mean(z))
        return rec_loss + self.options.kl_weight * kl, metrics

    def sample(self, model: VAEModels, batch, key):
        """Input and reconstruction side by side: ``(N, 1, H, 2W, 3)`` in [0, 1]."""
        x = _images(batch)[:4]
        rec = model.vae.decode(model.vae.encode(x).mode())
        both = jnp.concatenate([x, rec.astype(jnp.float32)], axis=2)
        return jnp.clip(both / 2 + 0.5, 0.0, 1.0)[:, None]

    def latent_std(self, vae, batches) -> tuple[float, float]:
        """``(std, mean)`` of posterior samples over ``batches`` (numpy dicts), as SD measured its 0.18215."""
        graphdef, state = nnx.split(vae)

        @jax.jit
        def latents(state, images, key):
            model = nnx.merge(graphdef, state)
            return model.encode(images).sample(key)

        total, total_sq, n = 0.0, 0.0, 0
        for i, batch in enumerate(batches):
            images = np.asarray(_images({k: jnp.asarray(v) for k, v in self.host_batch(batch).items()}))
            z = np.asarray(latents(state, images, jax.random.key(i)), np.float64)
            total, total_sq, n = total + z.sum(), total_sq + np.square(z).sum(), n + z.size
        mean = total / n
        return float(np.sqrt(max(total_sq / n - mean * mean, 1e-12))), float(mean)

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path:
        """Writes ``workdir/export/vae`` with ``scaling_factor = 1 / latent std`` measured on ``data``."""
        from vldm_jax.checkpoints.store import atomic_folder, save_module

        vae = trained_models_on_host(graphdef, state).vae
        dst = Path(workdir) / "export" / "vae"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.options.trainable == "decoder":
            note = f"encoder unchanged: scaling_factor {vae.config.scaling_factor:.4f} kept"
        else:
            batches = [next(data) for _ in range(max(1, self.options.std_batches))]
            std, mean = self.latent_std(vae, batches)
            vae.config = dataclasses.replace(vae.config, scaling_factor=float(1.0 / std))
            note = f"latent std {std:.4f}, mean {mean:+.4f}: scaling_factor {1.0 / std:.4f}"
        with atomic_folder(dst, overwrite=True) as tmp:
            save_module(vae, tmp)
        say(f"wrote the VAE to {dst} ({note})")
        return dst


def build_vae_setup(config) -> Setup:
    """``objective.name: vae``: a random :class:`AutoencoderKL` from ``model.vae`` (or the weights of
    ``model.pretrained``, a VAE folder, to continue from), trained whole."""
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.train.state import compute_dtype

    m = config.model
    options = parse_options(VAEOptions, config.objective.options, "vae")
    objective = VAEObjective(options)
    dtype = compute_dtype(m.dtype)
    if m.pretrained:
        from vldm_jax.checkpoints.load import load_model

        vae = load_model(m.pretrained, dtype=dtype)
        return Setup(objective, lambda: VAEModels(vae), traceable=False)
    if not m.vae:
        raise ConfigError("objective vae needs model.vae (an AutoencoderKL config) or model.pretrained")
    vae_config = config_from_dict(AutoencoderKLConfig, m.vae)
    seed = config.train.seed
    return Setup(objective, lambda: VAEModels(AutoencoderKL(vae_config, rngs=nnx.Rngs(seed), dtype=dtype)))


# ============================================================================================ image LDM

@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """``objective.options`` of the ``image`` objective."""

    # Probability of training an image with the empty prompt (classifier-free guidance).
    text_dropout: float = 0.1
    train_text_encoder: bool = True
    sample_posterior: bool = True
    # Min-SNR-gamma loss weighting (diffusers' --snr_gamma; 5 in the paper); 0 = the plain MSE.
    snr_gamma: float = 0.0
    # Sample images every train.sample_every steps.
    sample_scheduler: str = "ddim"
    sample_steps: int = 20
    sample_guidance: float = 3.0
    # A text-to-image pipeline folder (this objective's export/pipeline, a diffusers Stable Diffusion folder) or hub
    # id whose U-Net and text encoder the run starts from instead of random weights: fine-tuning, or continuing a
    # finished run with a new optimiser and schedule. model.unet / model.text_encoder may then be left out; given,
    # they must match the pipeline's.
    init_from: str = ""


class ImageModels(nnx.Module):
    """``unet`` (trained), ``text_encoder`` (trained with ``train_text_encoder``), ``vae`` (frozen)."""

    def __init__(self, unet: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder


@dataclasses.dataclass(frozen=True, eq=False)
class ImageObjective(_ExportedStage):
    """Text-to-image latent diffusion on single frames.

    Batches: ``video`` ``(B, F, H, W, 3)`` in [-1, 1] (every frame an image) or ``image`` ``(B, H, W, 3)``, and
    ``input_ids`` ``(B, 77)`` (or ``caption`` strings, tokenized by :meth:`host_batch`).
    """

    schedule: schedules.NoiseSchedule
    scheduler_config: Mapping[str, Any]
    tokenizer: Any
    null_ids: np.ndarray
    scaling_factor: float
    shift_factor: float = 0.0
    options: ImageOptions = ImageOptions()
    trained_module: str = "unet"

    def trainable_filter(self, trainable: str):
        """The U-Net, and the text encoder with ``train_text_encoder`` (``model.trainable`` does not apply)."""
        return _path_filter(("unet", "text_encoder") if self.options.train_text_encoder else ("unet",))

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vldm_jax.models.tokenizer import tokenize

        out = {k: v for k, v in batch.items() if k in ("video", "image", "input_ids")}
        if "input_ids" not in out:
            if "caption" not in batch:
                raise ConfigError(f"image LDM batches need captions or input_ids (have: {', '.join(sorted(batch))})")
            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                        for c in np.asarray(batch["caption"]).reshape(-1)]
            out["input_ids"] = tokenize(self.tokenizer, captions, max_length=self.tokenizer.model_max_length)
        if "video" not in out and "image" not in out:
            raise ConfigError(f"image LDM batches need 'video' or 'image' (have: {', '.join(sorted(batch))})")
        return out

    def _ids_per_image(self, batch):
        ids = batch["input_ids"].astype(jnp.int32)
        if "video" in batch:
            ids = jnp.repeat(ids, batch["video"].shape[1], axis=0)  # fold_frames order: (b0 f0, b0 f1, ...)
        return ids

    def latents(self, model: ImageModels, images, key):
        posterior = model.vae.encode(images)
        z = posterior.sample(key) if self.options.sample_posterior else posterior.mode()
        return jax.lax.stop_gradient((z.astype(jnp.float32) - self.shift_factor) * self.scaling_factor)

    def loss(self, model: ImageModels, batch, key):
        k_vae, k_noise, k_t, k_drop = jax.random.split(key, 4)
        x0 = self.latents(model, _images(batch), k_vae)
        n = x0.shape[0]
        ids = self._ids_per_image(batch)
        if self.options.text_dropout > 0:
            drop = jax.random.bernoulli(k_drop, self.options.text_dropout, (n,))
            ids = jnp.where(drop[:, None], jnp.asarray(self.null_ids, jnp.int32)[None], ids)
        context = model.text_encoder.encode(ids)
        if not self.options.train_text_encoder:
            context = jax.lax.stop_gradient(context)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        t = jax.random.randint(k_t, (n,), 0, self.schedule.num_train_timesteps)
        x_t = schedules.add_noise(self.schedule, x0, noise, t)
        target = schedules.training_target(self.schedule, x0, noise, t)
        pred = model.unet(x_t, t, context)
        err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
        if self.options.snr_gamma > 0:
            loss = jnp.mean(schedules.min_snr_weight(self.schedule, t, self.options.snr_gamma) * err)
        else:
            loss = jnp.mean(err)
        return loss, {"latent_std": jnp.std(x0), "mse": jnp.mean(err)}

    def generate(self, model: ImageModels, ids, noise, key, *, guidance: float, steps: int,
                 scheduler: str = "ddim"):
        """Images ``(N, H, W, 3)`` in [0, 1] for token ids ``(N, 77)`` from ``noise`` ``(N, h, w, C)``."""
        from vldm_jax.diffusion.guidance import classifier_free_guidance
        from vldm_jax.diffusion.samplers import make_sampler, sample

        n = ids.shape[0]
        context = model.text_encoder.encode(ids)
        uncontext = model.text_encoder.encode(jnp.broadcast_to(jnp.asarray(self.null_ids, jnp.int32)[None],
                                                               ids.shape))
        sampler = make_sampler(scheduler, dict(self.scheduler_config), steps)

        def denoise(x, t):
            if guidance > 1.0:
                return classifier_free_guidance(lambda xx, tt, c: model.unet(xx, tt, c), x, t, context, uncontext,
                                                guidance)
            return model.unet(x, jnp.broadcast_to(t, (n,)), context)

        latents = sample(denoise, sampler, noise, key=key)
        images = model.vae.decode(latents / self.scaling_factor + self.shift_factor)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def sample(self, model: ImageModels, batch, key):
        """Images for the first (up to 4) captions of the batch, guided: ``(N, 1, H, W, 3)`` in [0, 1]."""
        ids = batch["input_ids"][:4].astype(jnp.int32)
        x = _images(batch)
        f = model.vae.config.downscale_factor
        shape = (ids.shape[0], x.shape[1] // f, x.shape[2] // f, model.unet.config.in_channels)
        noise = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32)
        o = self.options
        images = self.generate(model, ids, noise, jax.random.fold_in(key, 2), guidance=o.sample_guidance,
                               steps=o.sample_steps, scheduler=o.sample_scheduler)
        return images[:, None]

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path:
        """Writes ``workdir/export/pipeline``: a :class:`TextToImagePipeline` folder (U-Net, VAE, text encoder,
        tokenizer, scheduler)."""
        from vldm_jax.pipelines.text_to_image import TextToImagePipeline

        models = trained_models_on_host(graphdef, state)
        pipe = TextToImagePipeline(models.unet, models.vae, models.text_encoder, self.tokenizer,
                                   dict(self.scheduler_config))
        dst = Path(workdir) / "export" / "pipeline"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        pipe.save_pretrained(dst)
        say(f"wrote the text-to-image pipeline to {dst}")
        return dst


DEFAULT_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                     "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
                     "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                     "timestep_spacing": "leading"}


def _load_vae(path: str, dtype):
    from vldm_jax.checkpoints.pipeline_folder import load_component

    vae = load_component(path, "vae", dtype=dtype)
    if not hasattr(vae, "encode") or not hasattr(vae.config, "scaling_factor"):
        raise ConfigError(f"model.pretrained {path} is not an autoencoder (a VAE folder or a pipeline folder)")
    return vae


def _init_parts(folder: str, dtype):
    """The U-Net and text encoder of ``objective.options.init_from``: a pipeline folder (ours, or a diffusers one
    such as Stable Diffusion's) or a hub id of one."""
    from vldm_jax.checkpoints.pipeline_folder import read_pipeline_folder
    from vldm_jax.errors import CheckpointError
    from vldm_jax.models.clip import CLIPTextModel
    from vldm_jax.models.unet import UNet2DConditionModel

    try:
        p = read_pipeline_folder(folder, allow_patterns=["model_index.json", "unet/*", "text_encoder/*"],
                                 what="a pipeline folder with unet/ and text_encoder/")
    except CheckpointError as e:
        raise ConfigError(f"objective.options.init_from: {e}") from None
    if not (p.has("unet") and p.has("text_encoder")):
        raise ConfigError(f"objective.options.init_from {folder}: not a pipeline folder with unet/ and "
                          "text_encoder/ (an image stage's export/pipeline)")
    unet = p.load("unet", dtype=dtype)
    text = p.load("text_encoder", dtype=dtype)
    if not isinstance(unet, UNet2DConditionModel) or not isinstance(text, CLIPTextModel):
        raise ConfigError(f"objective.options.init_from {folder}: needs a UNet2DConditionModel and a CLIPTextModel "
                          f"(found {type(unet).__name__} and {type(text).__name__})")
    return unet, text


def _stage_config(build: Callable[[Mapping[str, Any]], Any], given, loaded, where: str):
    """``build(given)``, the stage config's dict as a config dataclass, or the ``loaded`` model's config when there
    is none; both given, they must agree field by field."""
    if not given:
        if loaded is None:
            raise ConfigError(f"objective image needs {where} (or objective.options.init_from, a pipeline folder "
                              "to start from)")
        return loaded
    built = build(given)
    if loaded is not None and built != loaded:
        diff = [f.name for f in dataclasses.fields(built) if getattr(built, f.name) != getattr(loaded, f.name)]
        raise ConfigError(f"{where} differs from objective.options.init_from's in {', '.join(diff)}; leave "
                          f"{where} out to use the pipeline's")
    return built


def build_image_setup(config) -> Setup:
    """``objective.name: image``: a random U-Net (``model.unet``) and text encoder (``model.text_encoder``), or
    those of ``objective.options.init_from``, on the frozen VAE of ``model.pretrained``."""
    from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.tokenizer import load_tokenizer, tokenize
    from vldm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from vldm_jax.train.state import compute_dtype

    m = config.model
    options = parse_options(ImageOptions, config.objective.options, "image")
    if not m.pretrained:
        raise ConfigError("objective image needs model.pretrained: the trained VAE's folder (objective vae's "
                          "export/vae) or a pipeline folder whose vae/ to use")
    dtype = compute_dtype(m.dtype)
    vae = _load_vae(m.pretrained, dtype)
    start = _init_parts(options.init_from, dtype) if options.init_from else None
    unet_config = _stage_config(lambda d: config_from_dict(UNet2DConditionConfig, d), m.unet,
                                start and start[0].config, "model.unet")
    text_config = _stage_config(CLIPTextConfig.from_dict, m.text_encoder, start and start[1].config,
                                "model.text_encoder")
    tokenizer = load_tokenizer(None)
    if text_config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.text_encoder.vocab_size {text_config.vocab_size} is smaller than the bundled CLIP "
                          f"tokenizer's {len(tokenizer)}")
    cross = unet_config.cross_attention_dim
    if (cross if isinstance(cross, int) else cross[0]) != text_config.hidden_size:
        raise ConfigError(f"model.unet.cross_attention_dim {cross} must equal model.text_encoder.hidden_size "
                          f"{text_config.hidden_size}")
    if unet_config.in_channels != vae.config.latent_channels:
        raise ConfigError(f"model.unet.in_channels {unet_config.in_channels} must equal the VAE's latent_channels "
                          f"{vae.config.latent_channels}")
    scheduler = {**DEFAULT_SCHEDULER, **m.scheduler}
    if config.objective.prediction_type:
        scheduler["prediction_type"] = config.objective.prediction_type
    schedule = schedules.NoiseSchedule.from_config(scheduler)
    null_ids = tokenize(tokenizer, [""], max_length=tokenizer.model_max_length)[0]
    objective = ImageObjective(schedule=schedule, scheduler_config=scheduler, tokenizer=tokenizer,
                               null_ids=null_ids, scaling_factor=float(vae.config.scaling_factor),
                               shift_factor=float(vae.config.shift_factor or 0.0), options=options)
    seed = config.train.seed

    def init_models():
        if start is not None:
            return ImageModels(start[0], vae, start[1])
        rngs = nnx.Rngs(seed)
        unet = UNet2DConditionModel(unet_config, rngs=rngs, dtype=dtype)
        text = CLIPTextModel(text_config, rngs=rngs, dtype=dtype)
        return ImageModels(unet, vae, text)

    return Setup(objective, init_models, traceable=False)
