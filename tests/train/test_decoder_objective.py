"""Decoder fine-tuning with a plain jitted step: what trains, what stays bit-identical, the warm-up switch,
the adaptive weight, and that a short run lowers the reconstruction loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers.random_params import random_model
from vldm_jax.errors import ConfigError
from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, AutoencoderKLTemporalDecoder
from vldm_jax.models.discriminator import PatchDiscriminator3D, PatchDiscriminator3DConfig
from vldm_jax.train.decoder_objective import (
    DecoderFinetuneModels,
    DecoderObjective,
    DecoderObjectiveConfig,
    decoder_losses,
    lpips_distance,
    make_decoder_finetune_step,
    trainable_filter,
)

WARMUP = 6  # reconstruction-only steps before the discriminator switches on


def moving_squares(b=2, f=4, size=16, seed=0):
    """Clips in [-1, 1]: a coloured square drifting one pixel per frame over a dark background."""
    rng = np.random.default_rng(seed)
    video = np.full((b, f, size, size, 3), -0.8, np.float32)
    for i in range(b):
        colour = rng.uniform(-0.2, 1.0, 3)
        y0, x0 = rng.integers(0, size // 2, 2)
        for t in range(f):
            video[i, t, y0 + t:y0 + t + 6, x0 + t // 2:x0 + t // 2 + 6] = colour
    return jnp.asarray(video)


def toy_features(x):
    """A fixed two-layer 'feature network' for the perceptual term."""
    w = jax.random.normal(jax.random.key(0), (3, 8))
    h1 = jnp.tanh(x @ w)
    h2 = jax.lax.reduce_window(h1, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return [h1, h2]


def build_models(with_disc=True):
    image = random_model(lambda: AutoencoderKL(AutoencoderKLConfig(block_out_channels=(32,), sample_size=16),
                                               rngs=nnx.Rngs(0)), seed=1)
    vae = AutoencoderKLTemporalDecoder.from_image_vae(image, rngs=nnx.Rngs(2))
    disc = None
    if with_disc:
        disc = random_model(lambda: PatchDiscriminator3D(PatchDiscriminator3DConfig(base_channels=32, num_layers=2),
                                                         rngs=nnx.Rngs(0)), seed=3)
    return DecoderFinetuneModels(vae, disc)


def flat(state):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def run(models, config, steps, perceptual=None, lr=2e-3, start=0):
    graphdef, trainable, frozen = nnx.split(models, trainable_filter(config.trainable), ...)
    tx = optax.adam(lr, b1=0.5, b2=0.9)
    opt = tx.init(trainable)
    step_fn = jax.jit(make_decoder_finetune_step(graphdef, tx, config, perceptual))
    video = moving_squares()
    history = []
    for s in range(start, start + steps):
        trainable, opt, m = step_fn(trainable, frozen, opt, video, jnp.asarray(s), jax.random.key(s))
        history.append({k: np.asarray(v) for k, v in m.items()})
    return graphdef, trainable, frozen, history, step_fn, opt


@pytest.fixture(scope="module")
def temporal_run():
    """Temporal layers only, with the perceptual term; WARMUP reconstruction steps then 3 GAN steps."""
    models = build_models()
    before = flat(nnx.state(models))
    config = DecoderObjectiveConfig(trainable="temporal", disc_start=WARMUP, sample_posterior=False,
                                    perceptual_weight=0.5)
    graphdef, trainable, frozen, history, step_fn, opt = run(models, config, WARMUP, lpips_distance(toy_features))
    after_warmup = flat(trainable)
    video = moving_squares()
    for s in range(WARMUP, WARMUP + 3):
        trainable, opt, m = step_fn(trainable, frozen, opt, video, jnp.asarray(s), jax.random.key(s))
        history.append({k: np.asarray(v) for k, v in m.items()})
    return dict(before=before, after_warmup=after_warmup, trainable=flat(trainable), frozen=flat(frozen),
                history=history, graphdef=graphdef, models=models, config=config,
                state=(trainable, frozen))


def test_temporal_only_trains_temporal_layers(temporal_run):
    before, trainable, frozen = temporal_run["before"], temporal_run["trainable"], temporal_run["frozen"]
    decoder_keys = [k for k in trainable if k.startswith("vae.")]
    assert decoder_keys and all(k.startswith("vae.decoder.") for k in decoder_keys)
    assert all("temporal" in k or "time_" in k for k in decoder_keys)
    # Gradients reached every trainable decoder parameter (the 3D blocks' first convs only once their zeroed
    # last convs have moved).
    unchanged = [k for k in decoder_keys if np.array_equal(trainable[k], before[k])]
    assert not unchanged, unchanged
    # Encoder, quant_conv and the spatial decoder: bit-identical, and no trainable copy of them exists.
    assert any(k.startswith("vae.encoder.") for k in frozen)
    assert any(".spatial_res_block." in k for k in frozen) and "vae.decoder.conv_out.kernel" in frozen
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_warmup_then_adversarial(temporal_run):
    h = temporal_run["history"]
    for m in h[:WARMUP]:
        assert float(m["disc_factor"]) == 0.0 and float(m["d_loss"]) == 0.0
        np.testing.assert_allclose(m["loss"], m["rec_loss"], rtol=1e-6)
    # The discriminator cannot move while its loss is switched off, and moves after.
    disc = [k for k in temporal_run["trainable"] if k.startswith("discriminator.")]
    assert all(np.array_equal(temporal_run["after_warmup"][k], temporal_run["before"][k]) for k in disc)
    assert any(not np.array_equal(temporal_run["trainable"][k], temporal_run["before"][k]) for k in disc)
    for m in h[WARMUP:]:
        assert float(m["disc_factor"]) == 1.0
        assert np.isfinite(m["d_weight"]) and 0.0 < float(m["d_weight"]) < 1e4 * 0.5
        assert float(m["loss"]) != pytest.approx(float(m["rec_loss"]))
        assert float(m["perceptual"]) > 0
    for m in h:
        assert all(np.all(np.isfinite(v)) for v in m.values())
    print("d_weight per GAN step:", [float(m["d_weight"]) for m in h[WARMUP:]])


def test_short_finetune_lowers_reconstruction_loss(temporal_run):
    rec = [float(m["rec_loss"]) for m in temporal_run["history"][:WARMUP]]
    print("reconstruction loss during warm-up:", [round(v, 4) for v in rec])
    assert rec[-1] < rec[0]


def test_adaptive_weight_matches_brute_force(temporal_run):
    """λ = disc_weight · ‖∇_W L_rec‖ / (‖∇_W L_g‖ + 1e-4) at W = decoder.time_conv_out.kernel, with the
    gradients taken through the whole model."""
    graphdef, config = temporal_run["graphdef"], temporal_run["config"]
    trainable, frozen = temporal_run["state"]
    video = moving_squares()
    step = jnp.asarray(WARMUP + 3)
    perceptual = lpips_distance(toy_features)

    @jax.jit
    def both(trainable, frozen):
        def parts(kernel):
            t = jax.tree.map(lambda x: x, trainable)
            t["vae"]["decoder"]["time_conv_out"]["kernel"].set_value(kernel)
            models = nnx.merge(graphdef, t, frozen)
            _, m = decoder_losses(models, video, step, jax.random.key(0), config, perceptual)
            return m["rec_loss"], m["g_loss"], m["d_weight"]

        kernel = trainable["vae"]["decoder"]["time_conv_out"]["kernel"].get_value()
        g_rec = jax.grad(lambda k: parts(k)[0])(kernel)
        g_g = jax.grad(lambda k: parts(k)[1])(kernel)
        return jnp.linalg.norm(g_rec), jnp.linalg.norm(g_g), parts(kernel)[2]

    n_rec, n_g, d_weight = both(trainable, frozen)
    expected = config.disc_weight * n_rec / (n_g + 1e-4)
    print(f"adaptive weight {float(d_weight):.4f}, brute force {float(expected):.4f}")
    np.testing.assert_allclose(d_weight, expected, rtol=1e-4)


def test_whole_decoder_without_discriminator():
    """trainable='decoder': spatial decoder weights (and post_quant_conv) train; the encoder and quant_conv do
    not. No discriminator: reconstruction only."""
    models = build_models(with_disc=False)
    before = flat(nnx.state(models))
    config = DecoderObjectiveConfig(trainable="decoder")
    _, trainable, frozen, history, _, _ = run(models, config, 2)
    trainable = flat(trainable)
    assert "vae.decoder.up_blocks.0.resnets.0.spatial_res_block.conv1.kernel" in trainable
    assert "vae.decoder.time_conv_out.kernel" in trainable and "vae.post_quant_conv.kernel" in trainable
    assert not any(k.startswith(("vae.encoder.", "vae.quant_conv.")) for k in trainable)
    assert not np.array_equal(trainable["vae.decoder.conv_in.kernel"], before["vae.decoder.conv_in.kernel"])
    for k, v in flat(frozen).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert float(history[0]["g_loss"]) == 0.0 and np.isfinite(history[-1]["rec_loss"])


def test_lpips_distance():
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
    y = x.at[1].add(0.5)
    d = lpips_distance(toy_features)(x, y)
    assert d.shape == (3,) and float(d[0]) == 0.0 and float(d[1]) > 0
    weighted = lpips_distance(toy_features, [jnp.zeros(8), jnp.ones(8)])(x, y)
    assert 0 < float(weighted[1]) < float(d[1])


def test_objective_interface():
    models = build_models()
    objective = DecoderObjective(DecoderObjectiveConfig(disc_start=10))
    with pytest.raises(ConfigError, match="video"):
        objective.host_batch({"latents": np.zeros(1)})
    graphdef, state = nnx.split(models)
    video = jax.ShapeDtypeStruct((1, 3, 16, 16, 3), jnp.float32)

    def loss(state, batch):
        return objective.loss(nnx.merge(graphdef, state), batch, jax.random.key(0))

    out, metrics = jax.eval_shape(loss, state, {"video": video, "step": jax.ShapeDtypeStruct((), jnp.int32)})
    assert out.shape == () and "d_weight" in metrics and "reconstruction" not in metrics
    with pytest.raises(ConfigError, match="global step"):
        jax.eval_shape(loss, state, {"video": video})
    sample = jax.eval_shape(lambda s, v: objective.sample(nnx.merge(graphdef, s), {"video": v}, None), state, video)
    assert sample.shape == (1, 3, 16, 16, 3)
    with pytest.raises(ConfigError):
        DecoderObjectiveConfig(trainable="encoder")
