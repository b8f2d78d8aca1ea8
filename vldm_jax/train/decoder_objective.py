"""Video LDM's decoder fine-tuning: make the temporal decoder consistent over frames without moving the
latent space (Blattmann et al. 2023, Sec. 3.1.1 and App.).

The encoder (and ``quant_conv``) stays frozen; the decoder's temporal layers (or the whole decoder) train
against the LDM autoencoder recipe (taming ``VQLPIPSWithDiscriminator`` / LDM ``LPIPSWithDiscriminator``):

    L_G = L1(x, x̂) + w_p · perceptual(x, x̂)          (perceptual only when a distance is given)
          + λ · f(step) · (-mean D(x̂))                  (generator hinge term)
    L_D = f(step) · (mean relu(1 - D(x)) + mean relu(1 + D(x̂))) / 2

with ``f(step) = disc_factor`` once ``step >= disc_start`` (0 before: the warm-up trains reconstruction only)
and the adaptive weight ``λ = disc_weight · clip(‖∇_W L_rec‖ / (‖∇_W g‖ + 1e-4), 0, max)`` taken at the
decoder's last layer ``W`` (``decoder.time_conv_out.kernel``, as sgm's ``VideoDecoder.get_last_layer``),
without gradient. ``D`` is :class:`vldm_jax.models.discriminator.PatchDiscriminator3D` on whole clips.

Both players train from one loss: the generator term sees the discriminator's parameters through
``stop_gradient`` and the discriminator term sees ``stop_gradient`` of the decoded frames, so one backward
pass gives each its own gradient (the single-loss interface of :mod:`vldm_jax.train.objectives`). The
models live in a :class:`DecoderFinetuneModels` container (``vae``, ``discriminator``); :func:`trainable_filter`
picks what trains.

``objective.name: decoder`` in a ``vldm train`` config (:func:`build_decoder_setup`): ``model.pretrained`` (a Stable
Diffusion pipeline folder, single file or hub id, or a VAE folder) gives the VAE; an image VAE becomes a temporal
decoder by :meth:`~vldm_jax.models.autoencoder.AutoencoderKLTemporalDecoder.from_image_vae` (spatial weights copied,
temporal layers at the identity), a temporal one is fine-tuned as it is. Without it (or with ``model.random_init``)
the temporal VAE of the ``model.vae`` dict (an ``AutoencoderKL`` config) is built at random. ``model.trainable``:
``temporal`` (Video LDM) or ``decoder``. ``objective.options`` (:class:`DecoderOptions`): the loss weights and the
discriminator. Batches carry ``video`` clips (uint8 from the data pipeline); the run writes the fine-tuned temporal
VAE to ``workdir/export/vae`` (our format, :func:`vldm_jax.load_model` reads it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.models.autoencoder import is_temporal_path
from vldm_jax.models.discriminator import hinge_d_loss, hinge_g_loss
from vldm_jax.nn.temporal import fold_frames, unfold_frames
from vldm_jax.train.objectives import (
    ObjectiveDefaults,
    Setup,
    exportable_here,
    parse_options,
    trained_models_on_host,
)

TRAINABLE_SETS = ("temporal", "decoder")

# A perceptual distance: (images (N, H, W, 3), images (N, H, W, 3)) in [-1, 1] -> per-image distance (N,).
Perceptual = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DecoderObjectiveConfig:
    """Weights of the decoder fine-tuning loss (defaults: the LDM KL-autoencoder recipe)."""

    trainable: str = "temporal"  # "temporal": the decoder's temporal layers; "decoder": the whole decoder
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0  # used only when a perceptual distance is given
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 0  # steps of reconstruction-only warm-up
    adaptive_weight_max: float = 1e4
    sample_posterior: bool = True

    def __post_init__(self):
        if self.trainable not in TRAINABLE_SETS:
            raise ConfigError(f"decoder objective: trainable {self.trainable!r} is not one of {TRAINABLE_SETS}")


class DecoderFinetuneModels(nnx.Module):
    """``vae`` (an :class:`~vldm_jax.models.autoencoder.AutoencoderKLTemporalDecoder`) and ``discriminator``
    (a :class:`~vldm_jax.models.discriminator.PatchDiscriminator3D`, or None for reconstruction only)."""

    def __init__(self, vae: nnx.Module, discriminator: nnx.Module | None = None):
        self.vae = vae
        self.discriminator = discriminator


def trainable_filter(trainable: str = "temporal", *, train_discriminator: bool = True):
    """An NNX filter ``(path, variable) -> bool`` over a :class:`DecoderFinetuneModels` container.

    ``temporal``: the decoder's temporal layers (paths with ``temporal`` / ``time_``); ``decoder``: the whole
    decoder and ``post_quant_conv``. The encoder and ``quant_conv`` never train (the latent space stays put);
    the discriminator's parameters train with ``train_discriminator``.
    """
    if trainable not in TRAINABLE_SETS:
        raise ConfigError(f"decoder objective: trainable {trainable!r} is not one of {TRAINABLE_SETS}")

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        path = tuple(path)
        if path[0] == "discriminator":
            return train_discriminator
        if path[0] != "vae" or len(path) < 2:
            return False
        if trainable == "temporal":
            return path[1] == "decoder" and is_temporal_path(path[2:])
        return path[1] in ("decoder", "post_quant_conv")

    return keep


# ------------------------------------------------------------------------------------------------ pieces

def lpips_distance(features: Callable[[jax.Array], Sequence[jax.Array]],
                   weights: Sequence[Any] | None = None, eps: float = 1e-10) -> Perceptual:
    """An LPIPS-style distance from a feature network the user provides (e.g. VGG16 with LPIPS' linear
    layers, converted to JAX).

    ``features(images (N, H, W, 3) in [-1, 1]) -> [(N, h_l, w_l, C_l), ...]``; ``weights``: per-layer
    non-negative channel weights ``(C_l,)`` (LPIPS' ``lin`` layers), default all ones. Per layer, features
    are unit-normalised over channels, their squared difference weighted over channels and averaged over
    positions; layers are summed. Returns ``(N,)``.
    """
    def distance(x, y):
        total = 0.0
        for layer, (a, b) in enumerate(zip(features(x), features(y))):
            a = a.astype(jnp.float32)
            b = b.astype(jnp.float32)
            a = a / (jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True)) + eps)
            b = b / (jnp.sqrt(jnp.sum(jnp.square(b), axis=-1, keepdims=True)) + eps)
            w = jnp.ones(a.shape[-1]) if weights is None else jnp.asarray(weights[layer], jnp.float32)
            total = total + jnp.mean(jnp.sum(w * jnp.square(a - b), axis=-1), axis=(1, 2))
        return total

    return distance


def reconstruction_loss(x, rec, config: DecoderObjectiveConfig, perceptual: Perceptual | None = None):
    """``(loss, l1, perceptual)`` scalars for clips ``(B, F, H, W, C)``; perceptual is 0 without a distance."""
    err = jnp.abs(x.astype(jnp.float32) - rec.astype(jnp.float32))
    l1 = jnp.mean(err)
    p = jnp.zeros((), jnp.float32)
    if perceptual is not None:
        p = jnp.mean(perceptual(fold_frames(x), fold_frames(rec)).astype(jnp.float32))
    return config.l1_weight * l1 + config.perceptual_weight * p, l1, p


def disc_factor_at(step, config: DecoderObjectiveConfig) -> jax.Array:
    """``disc_factor`` from ``disc_start`` on, 0 during the warm-up."""
    return jnp.where(jnp.asarray(step) >= config.disc_start, config.disc_factor, 0.0).astype(jnp.float32)


def adaptive_weight(rec_grad_norm, g_grad_norm, config: DecoderObjectiveConfig) -> jax.Array:
    """``disc_weight * clip(rec / (g + 1e-4), 0, adaptive_weight_max)``: the GAN term's gradient at the last
    layer is scaled to the reconstruction's, whatever their magnitudes."""
    ratio = rec_grad_norm / (g_grad_norm + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, config.adaptive_weight_max) * config.disc_weight)


def _frozen(module: nnx.Module) -> nnx.Module:
    """The same module with its parameters behind ``stop_gradient`` (the other player, seen as a constant)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


# ------------------------------------------------------------------------------------------------ losses

def decoder_losses(models: DecoderFinetuneModels, video, step, key, config: DecoderObjectiveConfig,
                   perceptual: Perceptual | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The single loss of both players and its metrics.

    video: clips ``(B, F, H, W, 3)`` in [-1, 1]; step: the global step (scalar, may be traced); key: PRNG key
    of the posterior sample. Metrics (float32 scalars): ``loss``, ``rec_loss``, ``l1``, ``perceptual``,
    ``g_loss``, ``d_loss``, ``d_weight``, ``disc_factor``, ``logits_real``, ``logits_fake``; and ``reconstruction``
    ``(B, F, H, W, 3)`` (without gradient) under the key ``"reconstruction"``.
    """
    vae = models.vae
    x = video.astype(jnp.float32)
    b, f = x.shape[:2]
    # Frozen encoder: the latents are constants of the step (no backward pass through the encoder).
    posterior = vae.encode(x)
    z = posterior.sample(key) if config.sample_posterior else posterior.mode()
    z = fold_frames(jax.lax.stop_gradient(z).astype(vae.dtype))
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    decoder = vae.decoder
    h = decoder.features(z, num_frames=f, image_only_indicator=jnp.zeros((b, f), vae.dtype))

    # The last layer is applied from an explicit kernel so that the adaptive weight can differentiate there.
    last_def, last_kernel, last_rest = nnx.split(decoder.time_conv_out, lambda p, v: p[-1] == "kernel", ...)

    def frames(kernel_state, h):
        return nnx.merge(last_def, kernel_state, last_rest)(unfold_frames(h, f))

    rec = frames(last_kernel, h)
    rec_loss, l1, p = reconstruction_loss(x, rec, config, perceptual)
    zero = jnp.zeros((), jnp.float32)
    metrics = dict(rec_loss=rec_loss, l1=l1, perceptual=p)
    if models.discriminator is None:
        metrics.update(g_loss=zero, d_loss=zero, d_weight=zero, disc_factor=zero, logits_real=zero,
                       logits_fake=zero, loss=rec_loss)
        return rec_loss, {**metrics, "reconstruction": jax.lax.stop_gradient(rec)}

    factor = disc_factor_at(step, config)
    judge = _frozen(models.discriminator)  # the generator may not move the discriminator
    g_loss = hinge_g_loss(judge(rec))

    # ‖∇_W‖ of both terms at the last layer: only that layer is re-run, on constant features.
    kernel_c, h_c = jax.lax.stop_gradient(last_kernel), jax.lax.stop_gradient(h)
    rec_grad = jax.grad(lambda k: reconstruction_loss(x, frames(k, h_c), config, perceptual)[0])(kernel_c)
    g_grad = jax.grad(lambda k: hinge_g_loss(judge(frames(k, h_c))))(kernel_c)
    d_weight = adaptive_weight(optax.global_norm(rec_grad), optax.global_norm(g_grad), config)
    gen_loss = rec_loss + d_weight * factor * g_loss

    # The discriminator's term, on frames that carry no gradient back to the decoder.
    logits_real = models.discriminator(x)
    logits_fake = models.discriminator(jax.lax.stop_gradient(rec))
    d_loss = factor * hinge_d_loss(logits_real, logits_fake)

    loss = gen_loss + d_loss
    metrics.update(loss=loss, g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, disc_factor=factor,
                   logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    return loss, {**metrics, "reconstruction": jax.lax.stop_gradient(rec)}


def discriminator_loss(discriminator: nnx.Module, real, fake, step, config: DecoderObjectiveConfig) -> jax.Array:
    """The discriminator's hinge loss alone (``fake`` without gradient), switched on at ``disc_start``."""
    logits_real = discriminator(real)
    logits_fake = discriminator(jax.lax.stop_gradient(fake))
    return disc_factor_at(step, config) * hinge_d_loss(logits_real, logits_fake)


# ----------------------------------------------------------------------------------- objective / step

@dataclasses.dataclass(frozen=True, eq=False)
class DecoderObjective(ObjectiveDefaults):
    """The decoder fine-tuning loss behind the training loop's objective interface
    (:mod:`vldm_jax.train.objectives`): batches carry ``video`` ``(B, F, H, W, 3)`` (float in [-1, 1] or
    uint8) and the global ``step`` (int32 scalar) that times the discriminator's warm-up."""

    config: DecoderObjectiveConfig = DecoderObjectiveConfig()
    perceptual: Perceptual | None = None
    trained_module: str = "vae"

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Only ``video`` enters the step (captions and indicators of the data pipeline are not used)."""
        if "video" not in batch:
            raise ConfigError(f"decoder fine-tuning batches need 'video' (have: {', '.join(sorted(batch))})")
        return {"video": batch["video"]}

    def trainable_filter(self, trainable: str):
        """``model.trainable`` (``temporal`` or ``decoder``) of the VAE's decoder, and the discriminator (the
        module-level :func:`trainable_filter`)."""
        return trainable_filter(trainable)

    def export(self, graphdef, state, workdir: Path, data, say: Callable[[str], None]) -> Path | None:
        """Writes the fine-tuned (EMA when kept) temporal VAE to ``workdir/export/vae``: the decoder stage of a
        video pipeline (``load_model`` reads it); the discriminator is not kept."""
        from vldm_jax.checkpoints.store import atomic_folder, save_module

        if not exportable_here(state):
            return None
        vae = trained_models_on_host(graphdef, state).vae
        dst = Path(workdir) / "export" / "vae"
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(dst, overwrite=True) as tmp:
            save_module(vae, tmp)
        say(f"wrote the {'EMA ' if state.ema is not None else ''}temporal VAE to {dst}")
        return dst

    def exported(self, workdir: Path) -> bool:
        return (Path(workdir) / "export" / "vae").exists()

    def loss(self, model: DecoderFinetuneModels, batch, key):
        video = batch["video"]
        if video.dtype == jnp.uint8:
            video = video.astype(jnp.float32) / 127.5 - 1.0
        if "step" not in batch:
            if self.config.disc_start > 0 and model.discriminator is not None:
                raise ConfigError("decoder objective: disc_start needs the global step in the batch ('step')")
            step = jnp.asarray(self.config.disc_start)
        else:
            step = batch["step"]
        loss, metrics = decoder_losses(model, video, step, key, self.config, self.perceptual)
        metrics.pop("reconstruction")
        return loss, metrics

    def sample(self, model: DecoderFinetuneModels, batch, key):
        """Reconstructions of the batch's clips ``(B, F, H, W, 3)`` in [0, 1]."""
        video = batch["video"]
        if video.dtype == jnp.uint8:
            video = video.astype(jnp.float32) / 127.5 - 1.0
        rec = model.vae.decode(model.vae.encode(video).mode())
        return jnp.clip(rec.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def make_decoder_finetune_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                               config: DecoderObjectiveConfig, perceptual: Perceptual | None = None):
    """A plain training step for :class:`DecoderFinetuneModels` split by :func:`trainable_filter`:
    ``step_fn(trainable, frozen, opt_state, video, step, key) -> (trainable, opt_state, metrics)``.
    Pure; ``jax.jit`` it (donating ``trainable`` and ``opt_state`` if you like). ``frozen`` is returned by
    nobody: it never changes."""

    def step_fn(trainable, frozen, opt_state, video, step, key):
        def objective(trainable):
            models = nnx.merge(graphdef, trainable, frozen)
            return decoder_losses(models, video, step, key, config, perceptual)

        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return trainable, opt_state, metrics

    return step_fn


# ------------------------------------------------------------------------------------------- vldm train

@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """``objective.options`` of ``decoder``: the weights of :class:`DecoderObjectiveConfig` and the discriminator."""

    l1_weight: float = 1.0
    # The repository has no perceptual network (LPIPS needs VGG16 and its linear layers, not bundled or converted
    # here), so this must stay 0; :func:`lpips_distance` takes one for callers of decoder_losses that have it.
    perceptual_weight: float = 0.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 0
    adaptive_weight_max: float = 1e4
    # False: reconstruction only (no discriminator in the models).
    discriminator: bool = True
    # PatchDiscriminator3DConfig fields (base_channels, num_layers, temporal_kernel, norm_num_groups...).
    discriminator_config: dict = dataclasses.field(default_factory=dict)


def load_video_vae(pretrained: str, *, dtype, seed: int = 0) -> nnx.Module:
    """The temporal VAE fine-tuned from ``pretrained``: a pipeline folder's ``vae/`` (only that part of a hub id
    is fetched), a single-file Stable Diffusion checkpoint's VAE, or a VAE folder. An image ``AutoencoderKL``
    becomes an :class:`AutoencoderKLTemporalDecoder` at the identity (temporal 3D convs' first kernels drawn from
    ``seed``); a temporal one (SVD's, an earlier export of this objective) is returned as it is."""
    from vldm_jax.checkpoints.pipeline_folder import INDEX, load_component, load_stable_diffusion, read_pipeline_folder
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLTemporalDecoder

    path = Path(pretrained)
    if path.is_file():
        vae = load_stable_diffusion(path, dtype=dtype).vae
    elif path.exists():
        vae = load_component(path, "vae", dtype=dtype)
    else:  # a hub id of a pipeline: its vae/ only
        files = ("config.json", "diffusion_pytorch_model.safetensors", "vldm_config.json", "params.safetensors")
        folder = read_pipeline_folder(pretrained, allow_patterns=[INDEX] + [f"vae/{f}" for f in files])
        folder.require(("vae",))
        vae = folder.load("vae", dtype=dtype)
    if isinstance(vae, AutoencoderKLTemporalDecoder):
        return vae
    if isinstance(vae, AutoencoderKL):
        return AutoencoderKLTemporalDecoder.from_image_vae(vae, rngs=nnx.Rngs(seed))
    raise ConfigError(f"model.pretrained {pretrained}: its VAE is a {type(vae).__name__}, not a KL autoencoder")


def build_decoder_setup(config) -> Setup:
    """``objective.name: decoder``: Video LDM's temporal-decoder fine-tuning (see the module docstring).

    ``model.pretrained`` set: the VAE is loaded on the host (:func:`load_video_vae`; not traceable). Null: a random
    :class:`AutoencoderKLTemporalDecoder` with the encoder and spatial decoder of the ``model.vae`` dict (an
    ``AutoencoderKL`` config; ``model.random_init`` fills it from ``model.pretrained``'s config.json) and its
    temporal layers at the identity, built under ``jax.jit`` (traceable, for ``--compile-only``). The discriminator
    (:class:`PatchDiscriminator3D`, ``objective.options.discriminator_config``) is always new.
    """
    from vldm_jax.models.autoencoder import (
        AutoencoderKLConfig,
        AutoencoderKLTemporalDecoder,
        AutoencoderKLTemporalDecoderConfig,
    )
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.discriminator import PatchDiscriminator3D, PatchDiscriminator3DConfig
    from vldm_jax.train.state import compute_dtype

    m, o = config.model, config.objective
    opts = parse_options(DecoderOptions, o.options, "decoder")
    if m.trainable not in TRAINABLE_SETS:
        raise ConfigError(f"objective decoder: model.trainable must be one of {', '.join(TRAINABLE_SETS)} "
                          f"(the encoder stays frozen), got {m.trainable!r}")
    if opts.perceptual_weight:
        raise ConfigError("objective decoder: no perceptual network in vldm_jax (LPIPS' VGG16 is not bundled); "
                          "set objective.options.perceptual_weight=0")
    if m.remat not in ("none", "full"):
        raise ConfigError(f"objective decoder: model.remat is none or full for the temporal VAE (full recomputes "
                          f"each spatio-temporal residual block in the backward pass), got {m.remat!r}")
    remat = m.remat == "full"
    if not o.encode_in_step:
        raise ConfigError("objective decoder encodes the clips in the step (batches carry video); "
                          "objective.encode_in_step=false is not supported")
    disc_config = None
    if opts.discriminator:
        disc_config = config_from_dict(PatchDiscriminator3DConfig, dict(opts.discriminator_config), strict=True)
    loss_config = DecoderObjectiveConfig(
        trainable=m.trainable, l1_weight=opts.l1_weight, perceptual_weight=opts.perceptual_weight,
        disc_weight=opts.disc_weight, disc_factor=opts.disc_factor, disc_start=opts.disc_start,
        adaptive_weight_max=opts.adaptive_weight_max, sample_posterior=o.sample_posterior)
    objective = DecoderObjective(loss_config)
    dtype = compute_dtype(m.dtype)
    seed = config.train.seed

    def discriminator(rngs):
        return PatchDiscriminator3D(disc_config, rngs=rngs, dtype=dtype) if disc_config is not None else None

    if m.pretrained:
        vae = load_video_vae(m.pretrained, dtype=dtype, seed=seed)
        vae.decoder.set_remat(remat)
        return Setup(objective, lambda: DecoderFinetuneModels(vae, discriminator(nnx.Rngs(seed + 1))),
                     traceable=False)

    if not m.vae:
        raise ConfigError("objective decoder needs model.pretrained (a Stable Diffusion folder, file or hub id, or a "
                          "VAE folder) or model.vae (an AutoencoderKL config for random weights)")
    vae_config = AutoencoderKLTemporalDecoderConfig.from_image_config(config_from_dict(AutoencoderKLConfig, m.vae))

    def init_models():
        rngs = nnx.Rngs(seed)
        vae = AutoencoderKLTemporalDecoder(vae_config, rngs=rngs, dtype=dtype)
        vae.decoder.init_temporal_as_identity()
        vae.decoder.set_remat(remat)
        return DecoderFinetuneModels(vae, discriminator(rngs))

    return Setup(objective, init_models, traceable=True)
