"""The from-scratch image stages (objective vae, objective image) through the real training loop: tiny models on
rendered moving-shapes frames, their exports loading where the next stage needs them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.tiny import classic_threefry  # noqa: F401  (module fixture)
from vldm_jax.checkpoints.load import load_model
from vldm_jax.data.moving_shapes import example
from vldm_jax.errors import ConfigError
from vldm_jax.train.config import load_config
from vldm_jax.train.loop import ArrayBatches, train

SIZE = 32

TINY_VAE = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 4, "sample_size": SIZE}
TINY_UNET = {"sample_size": SIZE // 2, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 16,
             "attention_head_dim": 2, "norm_num_groups": 8}
TINY_TEXT = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "num_hidden_layers": 1, "projection_dim": 16}


def shapes_arrays(n: int = 24, frames: int = 2) -> dict[str, np.ndarray]:
    exs = [example(i, seed=3, num_frames=frames, size=SIZE) for i in range(n)]
    return {"video": np.stack([e["video"] for e in exs]), "caption": np.asarray([e["caption"] for e in exs])}


def stage_config(objective: str, options: dict, model: dict, steps: int, **train_overrides):
    data = {
        "model": {"trainable": "all", **model},
        "data": {"batch_size_per_device": 4},
        "objective": {"name": objective, "options": options},
        "optim": {"learning_rate": 2e-3, "warmup_steps": 0, "weight_decay": 0.0, "ema_decay": 0.9},
        "mesh": {"min_shard_size": 0},
        "train": {"steps": steps, "log_every": 1, "checkpoint_every": 5, "keep_checkpoints": 2, "progress": False,
                  "tensorboard": False, "compilation_cache": False, "threefry_partitionable": False,
                  **train_overrides},
    }
    return load_config(data=data)


@pytest.fixture(scope="module")
def arrays():
    return shapes_arrays()


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, arrays):
    workdir = tmp_path_factory.mktemp("vae")
    config = stage_config("vae", {"std_batches": 2, "foreground_weight": 4.0}, {"vae": TINY_VAE}, steps=12,
                          sample_every=12)
    result = train(config, data=ArrayBatches(arrays, 4, seed=0), workdir=workdir, echo=lambda m: None)
    return workdir, result


def test_vae_trains_and_exports_with_measured_scale(vae_run, arrays):
    workdir, result = vae_run
    losses = [r["loss"] for r in result.metrics]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert {"l1", "edge", "kl", "latent_std"} <= set(result.metrics[0])
    folder = workdir / "export" / "vae"
    vae = load_model(folder)
    assert vae.config.block_out_channels == (8, 16)
    # scaling_factor = 1 / std of posterior samples of training frames: scaled latents have unit std.
    x = jnp.asarray(arrays["video"][:8].reshape((-1, SIZE, SIZE, 3)), jnp.float32) / 127.5 - 1
    z = vae.encode(x).sample(jax.random.key(0)) * vae.config.scaling_factor
    assert 0.7 < float(jnp.std(z)) < 1.4
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    assert (workdir / "checkpoints" / "12").is_dir()
    assert len(list((workdir / "samples").glob("*.gif"))) == 4


def test_vae_resume_does_not_export_again(vae_run, arrays):
    workdir, _ = vae_run
    stamp = (workdir / "export" / "vae" / "params.safetensors").stat().st_mtime_ns
    config = stage_config("vae", {"std_batches": 2}, {"vae": TINY_VAE}, steps=12)
    result = train(config, data=ArrayBatches(arrays, 4, seed=0), workdir=workdir, echo=lambda m: None)
    assert result.resumed and result.start_step == result.step == 12
    assert (workdir / "export" / "vae" / "params.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, vae_run, arrays):
    vae_dir = vae_run[0] / "export" / "vae"
    workdir = tmp_path_factory.mktemp("image")
    model = {"pretrained": str(vae_dir), "unet": TINY_UNET, "text_encoder": TINY_TEXT}
    config = stage_config("image", {"text_dropout": 0.2, "sample_steps": 2}, model, steps=6, sample_every=6)
    result = train(config, data=ArrayBatches(arrays, 4, seed=0), workdir=workdir, echo=lambda m: None)
    return workdir, result, vae_dir


def test_image_ldm_trains_unet_and_text_encoder_with_frozen_vae(image_run):
    workdir, result, vae_dir = image_run
    assert [r["step"] for r in result.metrics] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in result.metrics)
    state = result.state
    trained = {p[0] for p, _ in jax.tree_util.tree_flatten_with_path(state.trainable)[0]}
    names = {str(getattr(k, "key", k)) for k in trained}
    assert names == {"unet", "text_encoder"}, names
    frozen = jax.tree_util.tree_flatten_with_path(state.frozen)[0]
    assert frozen and {str(getattr(p[0], "key", p[0])) for p, _ in frozen} == {"vae"}
    assert len(list((workdir / "samples").glob("*.gif"))) == 4


def test_image_export_is_a_pipeline_the_next_stages_load(image_run):
    from vldm_jax.models.unet import TemporalConfig, VideoUNet
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    workdir, _, vae_dir = image_run
    folder = workdir / "export" / "pipeline"
    pipe = TextToImagePipeline.from_pretrained(folder)
    vae_cfg = json.loads((vae_dir / "vldm_config.json").read_text())["config"]
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_cfg["scaling_factor"])
    assert pipe.text_encoder.config.hidden_size == 16
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    images = pipe(["a red circle moving right", "a blue square moving up"], num_inference_steps=2,
                  guidance_scale=2.0)
    assert images.shape == (2, SIZE, SIZE, 3) and np.all(np.isfinite(images))
    video_unet = VideoUNet.from_image_unet(pipe.unet, TemporalConfig.paper(relative_position_dim=8))
    x = jnp.zeros((1, 2, SIZE // 2, SIZE // 2, 4))
    ctx = pipe.encode_prompt(["a red circle moving right"])
    out = video_unet(x, jnp.zeros((1,), jnp.int32), ctx)
    ref = pipe.unet(x[0], jnp.zeros((2,), jnp.int32), jnp.concatenate([ctx, ctx]))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref), atol=1e-4)


def test_image_ldm_continues_from_a_pipeline(tmp_path, image_run, arrays):
    """objective.options.init_from starts the U-Net and text encoder from an exported pipeline (its configs when
    model.unet / model.text_encoder are left out), trains on from there, and refuses a model config that differs."""
    from flax import nnx

    from vldm_jax.pipelines.text_to_image import TextToImagePipeline
    from vldm_jax.train.objectives import build_setup

    workdir, _, vae_dir = image_run
    folder = workdir / "export" / "pipeline"
    before = TextToImagePipeline.from_pretrained(folder)
    options = {"init_from": str(folder), "train_text_encoder": False}
    setup = build_setup(stage_config("image", options, {"pretrained": str(vae_dir)}, steps=1))
    start = setup.init_models()
    for mine, theirs in ((start.unet, before.unet), (start.text_encoder, before.text_encoder)):
        a, b = jax.tree.leaves(nnx.state(mine, nnx.Param)), jax.tree.leaves(nnx.state(theirs, nnx.Param))
        assert len(a) == len(b) > 0
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))

    config = stage_config("image", options, {"pretrained": str(vae_dir), "unet": TINY_UNET}, steps=2)
    result = train(config, data=ArrayBatches(arrays, 4, seed=1), workdir=tmp_path, echo=lambda m: None)
    names = {str(getattr(p[0], "key", p[0])) for p, _ in jax.tree_util.tree_flatten_with_path(result.state.trainable)[0]}
    assert names == {"unet"}
    after = TextToImagePipeline.from_pretrained(tmp_path / "export" / "pipeline")
    ta, tb = (jax.tree.leaves(nnx.state(m.text_encoder, nnx.Param)) for m in (after, before))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ta, tb))
    ua, ub = (jax.tree.leaves(nnx.state(m.unet, nnx.Param)) for m in (after, before))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ua, ub))

    with pytest.raises(ConfigError, match="model.unet differs from objective.options.init_from's in block_out_channels"):
        build_setup(stage_config("image", options, {"pretrained": str(vae_dir),
                                                    "unet": {**TINY_UNET, "block_out_channels": [16, 16]}}, steps=1))
    with pytest.raises(ConfigError, match="not a pipeline folder"):
        build_setup(stage_config("image", {"init_from": str(vae_dir)}, {"pretrained": str(vae_dir)}, steps=1))
    with pytest.raises(ConfigError, match="needs model.unet"):
        build_setup(stage_config("image", {}, {"pretrained": str(vae_dir), "text_encoder": TINY_TEXT}, steps=1))


def test_image_ldm_fine_tunes_a_diffusers_stable_diffusion_folder(tmp_path, arrays):
    """init_from (and model.pretrained) may be a diffusers StableDiffusionPipeline folder: the run starts from its
    U-Net and text encoder, whose outputs match the PyTorch modules, and fine-tunes the U-Net on our frames."""
    import torch
    from diffusers import StableDiffusionPipeline
    from flax import nnx

    from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder
    from vldm_jax.train.objectives import build_setup

    folder = make_tiny_sd_pipeline_folder(tmp_path / "sd")
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    options = {"init_from": str(folder), "train_text_encoder": False}
    config = stage_config("image", options, {"pretrained": str(folder)}, steps=2)
    start = build_setup(config).init_models()
    rng = np.random.default_rng(0)
    sample_size = start.unet.config.sample_size
    x = rng.standard_normal((1, sample_size, sample_size, start.unet.config.in_channels)).astype(np.float32)
    ids = np.asarray(ref.tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids)
    with torch.no_grad():
        ctx_ref = ref.text_encoder(torch.from_numpy(ids))[0]
        out_ref = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), 500, ctx_ref).sample.permute(0, 2, 3, 1).numpy()
    ctx = start.text_encoder(jnp.asarray(ids))[0]
    np.testing.assert_allclose(np.asarray(ctx), ctx_ref.numpy(), atol=1e-4)
    out = start.unet(jnp.asarray(x), jnp.asarray([500]), ctx)
    np.testing.assert_allclose(np.asarray(out), out_ref, atol=1e-4)

    small = {"video": arrays["video"][:8], "caption": arrays["caption"][:8]}
    result = train(config, data=ArrayBatches(small, 4, seed=0), workdir=tmp_path / "run", echo=lambda m: None)
    assert [r["step"] for r in result.metrics] == [1, 2] and all(np.isfinite(r["loss"]) for r in result.metrics)
    tuned = load_model(tmp_path / "run" / "export" / "pipeline" / "unet")
    a, b = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (tuned, start.unet))
    assert len(a) == len(b) and not all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


def test_setup_errors_name_the_problem(vae_run):
    vae_dir = str(vae_run[0] / "export" / "vae")
    from vldm_jax.train.objectives import build_setup

    with pytest.raises(ConfigError, match="unknown objective.options key 'l3_weight'"):
        build_setup(stage_config("vae", {"l3_weight": 1.0}, {"vae": TINY_VAE}, steps=1))
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_setup(stage_config("image", {}, {"unet": TINY_UNET, "text_encoder": TINY_TEXT}, steps=1))
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        build_setup(stage_config("image", {}, {"pretrained": vae_dir, "unet": {**TINY_UNET, "cross_attention_dim": 8},
                                               "text_encoder": TINY_TEXT}, steps=1))
    with pytest.raises(ConfigError, match="vocab_size"):
        build_setup(stage_config("image", {}, {"pretrained": vae_dir, "unet": TINY_UNET,
                                               "text_encoder": {**TINY_TEXT, "vocab_size": 100}}, steps=1))


def test_decoder_finetune_keeps_the_latent_space(tmp_path, vae_run, arrays):
    vae_dir = vae_run[0] / "export" / "vae"
    before = load_model(vae_dir)
    config = stage_config("vae", {"trainable": "decoder", "latent_noise": 0.5}, {"pretrained": str(vae_dir)},
                          steps=3)
    result = train(config, data=ArrayBatches(arrays, 4, seed=0), workdir=tmp_path, echo=lambda m: None)
    trained = {".".join(str(getattr(k, "key", k)) for k in p[:2])
               for p, _ in jax.tree_util.tree_flatten_with_path(result.state.trainable)[0]}
    assert trained == {"vae.decoder", "vae.post_quant_conv"}, trained
    after = load_model(tmp_path / "export" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    x = jnp.asarray(arrays["video"][:2, 0], jnp.float32) / 127.5 - 1
    np.testing.assert_array_equal(np.asarray(after.encode(x).mean), np.asarray(before.encode(x).mean))
    assert not np.allclose(np.asarray(after.decode(before.encode(x).mean)),
                           np.asarray(before.decode(before.encode(x).mean)))
    from vldm_jax.train.objectives import build_setup

    with pytest.raises(ConfigError, match="trainable must be all or decoder"):
        build_setup(stage_config("vae", {"trainable": "encoder"}, {"vae": TINY_VAE}, steps=1))
    with pytest.raises(ConfigError, match="sample_posterior must be true or false"):
        build_setup(stage_config("vae", {"sample_posterior": "maybe"}, {"vae": TINY_VAE}, steps=1))


def test_in_memory_shapes_and_time_budget_end_like_the_last_step(tmp_path):
    """data.in_memory renders moving shapes with numpy (no TensorFlow) and train.max_seconds ends the run early,
    as at its last step: a checkpoint at the step reached and the export; a second run resumes towards `steps`."""
    notes = []
    config = stage_config("vae", {"std_batches": 1}, {"vae": TINY_VAE}, steps=500, max_seconds=1e-3)
    config.data.path, config.data.in_memory, config.data.num_frames = "moving_shapes:12", True, 2
    config.data.height = config.data.width = SIZE
    config.data.seed = 3
    result = train(config, workdir=tmp_path, echo=notes.append)
    assert result.step == 1 < config.train.steps and not result.preempted
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert (tmp_path / "export" / "vae" / "params.safetensors").is_file()
    assert any("rendered 12 moving-shapes clips" in n for n in notes)
    assert any("max_seconds" in n and "step 1 of 500" in n for n in notes)
    assert not (tmp_path / "cache" / "tfds").exists()
    config.train.max_seconds, config.train.steps = 0.0, 3
    again = train(config, workdir=tmp_path, echo=notes.append)
    assert again.resumed and again.start_step == 1 and again.step == 3


def test_render_arrays_matches_the_dataset_examples():
    from vldm_jax.data.moving_shapes import render_arrays

    arrays = render_arrays(10, seed=3, num_frames=2, size=SIZE, workers=2)
    assert arrays["video"].shape == (10, 2, SIZE, SIZE, 3) and arrays["video"].dtype == np.uint8
    expected = shapes_arrays(10)
    np.testing.assert_array_equal(arrays["video"], expected["video"])
    assert list(arrays["caption"]) == list(expected["caption"])


def test_in_memory_needs_moving_shapes():
    from vldm_jax.errors import UserError

    with pytest.raises(ConfigError, match="in_memory"):
        load_config(data={"data": {"path": "/some/videos", "in_memory": True}})
    with pytest.raises(ConfigError, match="in_memory"):
        load_config(data={"data": {"path": "moving_shapesX", "in_memory": True}})
    with pytest.raises(UserError, match="moving_shapes:N"):
        load_config(data={"data": {"path": "moving_shapes:many", "in_memory": True}})
