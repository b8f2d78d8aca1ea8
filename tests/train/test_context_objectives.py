"""Prediction and interpolation objectives: the masks they draw, a loss blind to the context frames, sampling
that keeps the context, configs that fail with one clear line, real steps of `vldm_jax.train.loop` on moving
shapes for both tiny configs, and a short overfit where the context measurably helps."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_vldm
from tests.train.tiny import classic_threefry  # noqa: F401  (module fixture: classic threefry)
from vldm_jax.errors import ConfigError
from vldm_jax.models.roles import is_temporal_path
from vldm_jax.train.config import load_config
from vldm_jax.train.context_objectives import (
    InterpolationObjective,
    PredictionObjective,
    build_interpolation_setup,
    build_prediction_setup,
    check_interpolation_frames,
    frame_weighted_loss,
)
from vldm_jax.train.objectives import VideoModels, noise_schedule

ROOT = Path(__file__).resolve().parents[2]
SCHED = tiny_vldm.SCHEDULER
B, H, W, C, S, D = 2, 8, 8, 4, 3, 16


def prediction(**kw):
    return PredictionObjective(schedule=noise_schedule(SCHED), scheduler_config=SCHED, encode_in_step=False,
                               sample_steps=2, **kw)


def interpolation(**kw):
    return InterpolationObjective(schedule=noise_schedule(SCHED), scheduler_config=SCHED, encode_in_step=False,
                                  sample_steps=2, **kw)


def latent_batch(f, b=B, seed=0):
    rng = np.random.default_rng(seed)
    return {"latents": jnp.asarray(rng.standard_normal((b, f, H, W, C)), jnp.float32),
            "encoder_hidden_states": jnp.asarray(rng.standard_normal((b, S, D)), jnp.float32)}


# ------------------------------------------------------------------------------------------------- masks

def test_prediction_masks_are_prefixes_drawn_with_the_configured_probabilities():
    probs = (0.2, 0.3, 0.5)
    obj = prediction(context_probs=probs)
    mask = np.asarray(obj.context_mask(jax.random.key(0), 20000, 5))
    n = mask.sum(axis=1).astype(int)
    # The context frames are the first n frames of the clip, nothing else.
    np.testing.assert_array_equal(mask, (np.arange(5)[None] < n[:, None]).astype(np.float32))
    freq = np.bincount(n, minlength=3) / n.size
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # Zero probability means never; the sample GIFs give the first sample_context_frames frames.
    assert np.asarray(prediction(context_probs=(0.0, 1.0)).context_mask(jax.random.key(1), 500, 4)).sum(1).min() == 1
    np.testing.assert_array_equal(np.asarray(prediction(sample_context_frames=1).sample_mask(2, 4)),
                                  [[1, 0, 0, 0]] * 2)


def test_interpolation_masks_are_the_keyframes_or_nothing():
    obj = interpolation(drop_context_prob=0.25)
    mask = np.asarray(obj.context_mask(jax.random.key(0), 20000, 9))
    keys = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1], np.float32)
    dropped = mask.sum(axis=1) == 0
    np.testing.assert_array_equal(mask[~dropped], np.broadcast_to(keys, mask[~dropped].shape))
    assert abs(dropped.mean() - 0.25) < 0.015
    np.testing.assert_array_equal(np.asarray(obj.sample_mask(3, 9)), np.broadcast_to(keys, (3, 9)))
    # The keyframe layout is the one the generation stage interpolates with.
    from vldm_jax.pipelines.stages import interpolation_layout

    np.testing.assert_array_equal(np.flatnonzero(keys), interpolation_layout(3))


@pytest.mark.parametrize("frames", [1, 2, 4, 6, 8, 12])
def test_interpolation_frame_counts_that_do_not_fit_are_config_errors(frames):
    with pytest.raises(ConfigError, match=r"4 \* \(T - 1\) \+ 1 frames"):
        check_interpolation_frames(frames)


def test_interpolation_frame_counts_that_fit():
    for frames in (5, 9, 13, 17):
        check_interpolation_frames(frames)


# -------------------------------------------------------------------------------------------------- loss

def _loss_and_grad_wrt_prediction(obj, f, key):
    """The objective's loss with a 'U-Net' whose output is the array ``delta``: ``(grad wrt delta, mask the
    objective gave the model, loss)``."""
    batch = latent_batch(f)

    def loss_of(delta):
        seen = {}

        def unet(x, t, text, *, image_only_indicator=None, context_latents=None, context_mask=None):
            seen["mask"] = context_mask
            seen["latents"] = context_latents
            return delta

        loss, _ = obj.loss(SimpleNamespace(unet=unet, vae=None, text_encoder=None), batch, key)
        return loss, (seen["mask"], seen["latents"])

    delta = jnp.zeros((B, f, H, W, C), jnp.float32)
    (loss, (mask, latents)), grad = jax.value_and_grad(loss_of, has_aux=True)(delta)
    return np.asarray(grad), np.asarray(mask), np.asarray(latents), batch


@pytest.mark.parametrize("make,f", [(lambda **k: prediction(context_probs=(0.0, 0.5, 0.5), **k), 4),
                                    (lambda **k: interpolation(drop_context_prob=0.0, **k), 9)])
def test_loss_ignores_the_model_output_on_context_frames(make, f):
    grad, mask, latents, batch = _loss_and_grad_wrt_prediction(make(), f, jax.random.key(3))
    assert mask.shape == (B, f) and mask.sum() > 0 and (1 - mask).sum() > 0
    per_frame = np.abs(grad).sum(axis=(2, 3, 4))
    assert np.all(per_frame[mask > 0.5] == 0.0)  # exactly: no gradient reaches the context frames' output
    assert np.all(per_frame[mask < 0.5] > 0.0)
    # The context latents given are the clean scaled latents (the model masks them itself).
    np.testing.assert_array_equal(latents, np.asarray(batch["latents"]))
    # loss_on_context: every frame counts.
    grad_all, _, _, _ = _loss_and_grad_wrt_prediction(make(loss_on_context=True), f, jax.random.key(3))
    assert np.all(np.abs(grad_all).sum(axis=(2, 3, 4)) > 0.0)


def test_unconditional_samples_take_the_loss_on_every_frame():
    grad, mask, _, _ = _loss_and_grad_wrt_prediction(interpolation(drop_context_prob=1.0), 5, jax.random.key(0))
    assert mask.sum() == 0 and np.all(np.abs(grad).sum(axis=(2, 3, 4)) > 0)


def test_context_noise_augmentation_changes_only_what_the_model_sees():
    _, mask, latents, batch = _loss_and_grad_wrt_prediction(prediction(context_noise_aug=0.5), 4, jax.random.key(0))
    diff = np.abs(latents - np.asarray(batch["latents"])).max(axis=(1, 2, 3, 4))
    assert np.all(diff > 0) and np.all(diff < 5)


def test_frame_weighted_loss_is_the_mean_over_weighted_frames():
    pred = jnp.zeros((1, 3, 2, 2, 1))
    target = jnp.asarray([1.0, 2.0, 3.0])[None, :, None, None, None] * jnp.ones((1, 3, 2, 2, 1))
    assert float(frame_weighted_loss(pred, target, jnp.asarray([[0.0, 1.0, 1.0]]))) == pytest.approx(6.5)
    assert float(frame_weighted_loss(pred, target, jnp.zeros((1, 3)))) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["temporal", "concat"])
def test_real_unet_gradients_reach_the_context_modules(conditioning):
    unet = tiny_vldm.video_unet(conditioning, seed=1)
    models = VideoModels(unet)
    obj = prediction(context_probs=(0.0, 0.0, 1.0))
    graphdef, params, rest = nnx.split(models, nnx.Param, ...)
    batch = latent_batch(4)

    def loss_fn(params):
        return obj.loss(nnx.merge(graphdef, params, rest), batch, jax.random.key(0))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    name = "temporal_context_encoder" if conditioning == "temporal" else "temporal_context_in"
    norms = {".".join(map(str, p)): float(jnp.abs(v.get_value()).sum()) for p, v in nnx.to_flat_state(grads)
             if name in map(str, p)}
    assert norms and any(v > 0 for v in norms.values()), norms


# ---------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", ["prediction", "interpolation"])
def test_generate_keeps_the_context_frames_and_predicts_the_rest(kind):
    unet = tiny_vldm.video_unet("temporal" if kind == "prediction" else "concat", seed=2)
    obj = prediction(sample_context_guidance=2.0) if kind == "prediction" else interpolation()
    f = 4 if kind == "prediction" else 5
    batch = latent_batch(f)
    mask = obj.sample_mask(B, f)
    out = jax.jit(lambda x0, text: obj.generate(VideoModels(unet), x0, text, mask, jax.random.key(0)))(
        batch["latents"], batch["encoder_hidden_states"])
    out, x0, m = np.asarray(out), np.asarray(batch["latents"]), np.asarray(mask)
    np.testing.assert_array_equal(out[m > 0.5], x0[m > 0.5])
    assert np.isfinite(out).all() and np.abs(out[m < 0.5] - x0[m < 0.5]).mean() > 0.1


# ------------------------------------------------------------------------------------------------ configs

# Smaller than the configs' defaults where it buys test time (one U-Net level, 16x16 frames, a one-level VAE).
SMALL = ["data.height=16", "data.width=16", "objective.sample_steps=2", "train.log_every=1",
         "model.vae.block_out_channels=[8]", "model.vae.norm_num_groups=4", "model.vae.mid_block_add_attention=false",
         "model.vae.down_block_types=[DownEncoderBlock2D]", "model.vae.up_block_types=[UpDecoderBlock2D]",
         "model.unet.block_out_channels=[16]", "model.unet.norm_num_groups=4", "model.unet.attention_head_dim=2",
         "model.unet.down_block_types=[CrossAttnDownBlock2D]", "model.unet.up_block_types=[CrossAttnUpBlock2D]",
         "model.unet.mid_block_type=null", "model.unet.cross_attention_dim=16", "model.text_encoder.hidden_size=16",
         "model.text_encoder.intermediate_size=32", "model.text_encoder.num_hidden_layers=1",
         "model.text_encoder.projection_dim=16", "model.temporal.relative_position_dim=8",
         "train.progress=false", "train.tensorboard=false", "train.compilation_cache=false"]


def config(name, *overrides):
    return load_config(ROOT / "configs" / f"{name}.yaml", overrides=[*SMALL, *overrides])


@pytest.mark.parametrize("name,conditioning", [("prediction_tiny", "temporal"), ("interpolation_tiny", "concat")])
def test_tiny_configs_build_their_objective_and_conditioning(name, conditioning):
    cfg = config(name)
    assert cfg.model.temporal["context_conditioning"] == conditioning
    setup = (build_prediction_setup if name.startswith("prediction") else build_interpolation_setup)(cfg)
    assert isinstance(setup.objective, PredictionObjective if name.startswith("prediction") else
                      InterpolationObjective)
    assert setup.objective.text_dropout == 0.1 and setup.objective.null_condition is not None
    unet = nnx.eval_shape(setup.init_models).unet
    assert unet.config.context_conditioning == conditioning
    # The switch the configs' headers name.
    other = "concat" if conditioning == "temporal" else "temporal"
    setup = (build_prediction_setup if name.startswith("prediction") else build_interpolation_setup)(
        config(name, f"model.temporal.context_conditioning={other}"))
    assert nnx.eval_shape(setup.init_models).unet.config.context_conditioning == other


@pytest.mark.parametrize("name,overrides,message", [
    ("interpolation_tiny", ["data.num_frames=8"], r"4 \* \(T - 1\) \+ 1 frames.*data.num_frames is 8"),
    ("prediction_tiny", ["data.num_frames=2"], "needs clips of more than 2 frames"),
    ("prediction_tiny", ["objective.options.context_prob=[0.5, 0.5]"], "unknown objective.options key 'context_prob'"),
    ("prediction_tiny", ["objective.options.context_probs=[0.5, 0.6]"], "summing to 1"),
    ("prediction_tiny", ["model.temporal.context_conditioning=none"], "context_conditioning temporal"),
    ("interpolation_tiny", ["objective.image_ratio=0.5"], "image_ratio must be 0"),
    ("interpolation_tiny", ["objective.options.drop_context_prob=2"], r"drop_context_prob must be in \[0, 1\]"),
])
def test_bad_configs_are_one_line_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        (build_prediction_setup if name.startswith("prediction") else build_interpolation_setup)(
            config(name, *overrides))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_key_frame_video_unet_is_the_start_of_the_context_model():
    """A pretrained video U-Net without context conditioning (the key-frame model) keeps every parameter;
    the added context modules start at zero output, so the model is unchanged."""
    from vldm_jax.train.context_objectives import add_context_conditioning

    keyframe = tiny_vldm.video_unet("none", seed=3)
    for conditioning in ("temporal", "concat"):
        unet = add_context_conditioning(keyframe, conditioning)
        assert unet.config.context_conditioning == conditioning
        old = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(keyframe))}
        new = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(unet))}
        assert set(old) < set(new)
        for p in old:
            np.testing.assert_array_equal(old[p], new[p])
        assert all(is_temporal_path(p) for p in set(new) - set(old))
        batch = latent_batch(4)
        t = jnp.asarray([500, 20])
        ref = nnx.jit(lambda m, x, c: m(x, t, c))(keyframe, batch["latents"], batch["encoder_hidden_states"])
        got = nnx.jit(lambda m, x, c: m(x, t, c, context_latents=x, context_mask=jnp.ones((B, 4))))(
            unet, batch["latents"], batch["encoder_hidden_states"])
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


# ---------------------------------------------------------------------------------------- training loop

def _flat(tree):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("name,module", [("prediction_tiny", "temporal_context_encoder"),
                                         ("interpolation_tiny", "temporal_context_in")])
def test_training_steps_through_the_loop(tmp_path, name, module):
    from vldm_jax.train.loop import train

    cfg = config(name, "data.path=moving_shapes:8", "data.num_examples=8", "data.shuffle_buffer=8",
                 "train.steps=3", "train.sample_every=3", "train.checkpoint_every=3", "optim.warmup_steps=0",
                 "optim.learning_rate=1e-3")
    snapshots = {}

    def keep(step, state):  # the loop donates the state to the next step: copy what we compare
        snapshots[step] = (_flat(jax.device_get(state.trainable)), _flat(jax.device_get(state.frozen)))

    result = train(cfg, workdir=tmp_path / "run", hooks=[keep], echo=lambda m: None)
    assert result.step == 3
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["skipped"] == 0 for r in rows) and "context_frames" in rows[0]
    (t1, f1), (t3, f3) = snapshots[1], snapshots[3]
    # What trains: the temporal layers and the context modules; every spatial weight is frozen, bit-identical.
    assert all(is_temporal_path(k) for k in t1) and all(not is_temporal_path(k) for k in f1 if k.startswith("unet"))
    assert any(module in k for k in t1)
    for k in f1:
        np.testing.assert_array_equal(f1[k], f3[k])
    changed = {k: not np.array_equal(t1[k], t3[k]) for k in t1}
    assert all(v for k, v in changed.items() if module in k), {k: v for k, v in changed.items() if module in k}
    assert sum(changed.values()) > 0.9 * len(changed), [k for k, v in changed.items() if not v]
    # A sample GIF: the clip beside a sample given its context frames, equal on those frames.
    from vldm_jax.io.video import read_video

    gifs = sorted((tmp_path / "run" / "samples").glob("step_0000003_*.gif"))
    assert gifs
    video, _ = read_video(gifs[0])
    assert video.shape[0] == cfg.data.num_frames and video.shape[2] == 2 * video.shape[1]
    np.testing.assert_array_equal(video[0, :, :16], video[0, :, 16:])  # the first frame is always given
    # The exported temporal layers carry the context modules.
    from vldm_jax.checkpoints.temporal import read_temporal

    arrays, temporal_config = read_temporal(tmp_path / "run" / "temporal.safetensors")
    assert any(module in ".".join(map(str, p)) for p in arrays)
    assert temporal_config["context_conditioning"] == cfg.model.temporal["context_conditioning"]


def test_train_text_encoder_trains_it_beside_the_temporal_layers_and_exports_it(tmp_path):
    """objective.train_text_encoder: the text encoder's weights train with the temporal layers (the spatial U-Net
    stays bit-identical) and are written as workdir/text_encoder, which loads as a CLIPTextModel."""
    from vldm_jax.checkpoints.load import load_model
    from vldm_jax.train.loop import train

    cfg = config("prediction_tiny", "data.path=moving_shapes:8", "data.in_memory=true", "train.steps=2",
                 "train.sample_every=0", "train.checkpoint_every=2", "optim.warmup_steps=0",
                 "optim.learning_rate=1e-2", "objective.train_text_encoder=true")
    snapshots = {}

    def keep(step, state):
        snapshots[step] = (_flat(jax.device_get(state.trainable)), _flat(jax.device_get(state.frozen)))

    train(cfg, workdir=tmp_path, hooks=[keep], echo=lambda m: None)
    (t1, f1), (t2, f2) = snapshots[1], snapshots[2]
    text = [k for k in t1 if k.startswith("text_encoder")]
    assert text and all(is_temporal_path(k) for k in t1 if k.startswith("unet"))
    assert not any(k.startswith("text_encoder") for k in f1)
    assert any(not np.array_equal(t1[k], t2[k]) for k in text)
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k])
    encoder = load_model(tmp_path / "text_encoder")
    ids = np.zeros((1, 77), np.int32)
    assert np.isfinite(np.asarray(encoder.encode(ids))).all()
    with pytest.raises(ConfigError, match="encode_in_step"):
        config("prediction_tiny", "objective.train_text_encoder=true", "objective.encode_in_step=false")


# ------------------------------------------------------------------------------------------------ overfit

@pytest.mark.slow
def test_context_conditioning_learns_to_use_the_context():
    """scripts/context_overfit.py, short: after 50 steps on clips whose first frame determines the rest, the
    loss on the other frames is clearly lower with the true context than with the context dropped (the script
    reports all four objective x conditioning pairs at 100 steps)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("context_overfit", ROOT / "scripts" / "context_overfit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    r = script.overfit("prediction", "temporal", steps=50, draws=16)
    assert r["with_context"] < 0.8 * r["without_context"], r
