"""Decoder fine-tuning as an objective of ``vldm train`` (``objective.name: decoder``, configs/decoder_tiny.yaml):
the real loop on rendered moving-shapes clips changes only the decoder's temporal layers and the discriminator
(the encoder stays bit-identical) and exports the temporal VAE; the step lowers for ``--compile-only``; the paper
config builds abstractly; a pretrained image VAE becomes a temporal decoder at the identity; bad options are one-line
ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.tiny import classic_threefry  # noqa: F401  (module fixture)
from vldm_jax.errors import ConfigError
from vldm_jax.models.autoencoder import AutoencoderKLTemporalDecoder, is_temporal_path
from vldm_jax.train.config import load_config
from vldm_jax.train.decoder_objective import DecoderObjective
from vldm_jax.train.objectives import build_setup

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "decoder_tiny.yaml"
PAPER = ROOT / "configs" / "paper" / "t2v_decoder.yaml"
# Smaller than the smoke config where it buys test time; disc_start 1: step 0 reconstruction only, then the GAN.
SMALL = ["data.path=moving_shapes:4", "data.in_memory=true", "data.height=16", "data.width=16", "data.num_frames=3",
         "data.batch_size_per_device=2", "model.vae.block_out_channels=[8,8]", "model.vae.norm_num_groups=4",
         "model.vae.mid_block_add_attention=false", "objective.options.disc_start=1",
         "objective.options.discriminator_config={base_channels: 8, num_layers: 2, norm_num_groups: 4}",
         "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.sample_every=0",
         "train.progress=false", "train.tensorboard=false", "train.compilation_cache=false",
         "optim.learning_rate=1e-2", "optim.warmup_steps=0", "optim.ema_decay=0.0", "mesh.min_shard_size=0"]


def _flat(tree):
    """``{'vae.encoder.conv_in.kernel': array}`` (NNX's ``.value`` leaf names dropped)."""
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(tree):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[name.removesuffix(".value")] = np.asarray(v)
    return out


def test_train_changes_only_temporal_decoder_and_discriminator(tmp_path):
    from vldm_jax.checkpoints.load import load_model
    from vldm_jax.train.loop import train

    config = load_config(CONFIG, SMALL)
    setup = build_setup(config)
    assert isinstance(setup.objective, DecoderObjective) and setup.traceable
    result = train(config, setup=setup, workdir=tmp_path / "run", echo=lambda m: None)
    assert result.step == 3
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "rec_loss", "g_loss", "d_loss", "d_weight")), rows
    assert rows[0]["disc_factor"] == 0.0 and rows[0]["d_loss"] == 0.0  # warm-up: reconstruction only
    assert rows[-1]["disc_factor"] == 1.0 and rows[-1]["d_loss"] > 0 and rows[-1]["d_weight"] > 0

    trained, frozen = _flat(result.state.trainable), _flat(result.state.frozen)
    vae_trained = [k for k in trained if k.startswith("vae.")]
    assert vae_trained and all(k.startswith("vae.decoder.") and is_temporal_path(tuple(k.split(".")))
                               for k in vae_trained)
    assert any(k.startswith("discriminator.") for k in trained)
    assert any(k.startswith("vae.encoder.") for k in frozen) and "vae.decoder.conv_out.kernel" in frozen
    # Against a fresh init (the setup is pure: same seed, same values): the encoder and everything frozen are
    # bit-identical; temporal layers and discriminator moved.
    init = _flat(nnx.state(setup.init_models()))
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, init[k], err_msg=k)
    assert any(np.abs(trained[k] - init[k]).max() > 0 for k in vae_trained)
    assert any(np.abs(v - init[k]).max() > 0 for k, v in trained.items() if k.startswith("discriminator."))

    vae = load_model(tmp_path / "run" / "export" / "vae")
    assert isinstance(vae, AutoencoderKLTemporalDecoder)
    exported = _flat(nnx.state(vae))
    np.testing.assert_array_equal(exported["encoder.conv_in.kernel"], init["vae.encoder.conv_in.kernel"])
    np.testing.assert_array_equal(exported["decoder.time_conv_out.kernel"], trained["vae.decoder.time_conv_out.kernel"])


def test_compile_only_lowers_the_decoder_step():
    """The compile-only path (abstract arrays) and the trainer's (real arrays) lower to the same program."""
    from tests.train.test_compile_only import lower_both_ways

    built, state = lower_both_ways(load_config(CONFIG, SMALL))
    assert set(built.batch) == {"video"}
    assert built.batch["video"].shape[1:] == (3, 16, 16, 3) and built.batch["video"].dtype == np.uint8
    assert built.params["params_trainable"] == sum(x.size for x in jax.tree.leaves(state.trainable))
    assert 0 < built.params["params_trainable"] < built.params["params_total"]


def test_paper_config_builds_abstractly():
    """configs/paper/t2v_decoder.yaml with random_init: SD 1.5's VAE architecture (bundled config.json) as a temporal
    VAE, shapes only."""
    from vldm_jax.models.discriminator import PatchDiscriminator3D

    config = load_config(PAPER, ["model.random_init=true"])
    assert config.objective.name == "decoder" and (config.data.height, config.data.width) == (320, 512)
    setup = build_setup(config)
    assert setup.traceable
    models = nnx.eval_shape(setup.init_models)
    assert isinstance(models.vae, AutoencoderKLTemporalDecoder)
    assert isinstance(models.discriminator, PatchDiscriminator3D)
    _, trainable, frozen = nnx.split(models, setup.objective.trainable_filter(config.model.trainable), ...)
    count = lambda s: sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(s))  # noqa: E731
    n_train, n_frozen = count(trainable), count(frozen)
    vae_total = count(nnx.state(models.vae))
    # SD 1.5's image VAE is 83.65 M parameters; the temporal layers add to its decoder.
    assert 83_000_000 < n_frozen < vae_total < 200_000_000 and n_train > 0
    print(f"t2v_decoder: VAE {vae_total:,} ({vae_total - n_frozen:,} temporal), trainable with the discriminator "
          f"{n_train:,}")


def test_pretrained_vae_becomes_a_temporal_decoder(tmp_path):
    """model.pretrained: an image VAE folder, or a pipeline folder's vae/, turns into a temporal VAE at the identity
    with the image VAE's weights; a temporal VAE folder (an earlier export) is fine-tuned as it is."""
    import json

    from vldm_jax.checkpoints.store import save_module
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

    image = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                              mid_block_add_attention=False), rngs=nnx.Rngs(3))
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    save_module(image, tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["x", "y"]}))
    image_weights = _flat(nnx.state(image))
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        setup = build_setup(load_config(CONFIG, [f"model.pretrained={folder}"]))
        assert not setup.traceable
        models = setup.init_models()
        assert isinstance(models.vae, AutoencoderKLTemporalDecoder)
        video = _flat(nnx.state(models.vae))
        np.testing.assert_array_equal(video["encoder.conv_in.kernel"], image_weights["encoder.conv_in.kernel"])
        np.testing.assert_array_equal(video["decoder.up_blocks.0.resnets.0.spatial_res_block.conv1.kernel"],
                                      image_weights["decoder.up_blocks.0.resnets.0.conv1.kernel"])
        assert not np.any(video["decoder.mid_block.resnets.0.temporal_res_block.conv2.kernel"])  # identity start
    (tmp_path / "temporal_vae").mkdir()
    save_module(models.vae, tmp_path / "temporal_vae")
    again = build_setup(load_config(CONFIG, [f"model.pretrained={tmp_path / 'temporal_vae'}"])).init_models()
    assert isinstance(again.vae, AutoencoderKLTemporalDecoder)
    np.testing.assert_array_equal(_flat(nnx.state(again.vae))["decoder.time_conv_out.kernel"],
                                  video["decoder.time_conv_out.kernel"])


@pytest.mark.parametrize("override, match", [
    (["model.trainable=all"], "model.trainable must be one of temporal, decoder"),
    (["objective.options.perceptual_weight=1"], "no perceptual network"),
    (["objective.options.disc_strat=3"], "disc_strat"),
    (["objective.options.discriminator_config={base_chanels: 8}"], "base_chanels"),
    (["model.remat=checkpoint"], "model.remat is none or full"),
    (["model.vae={}"], "model.pretrained"),
])
def test_bad_options_are_one_line_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_setup(load_config(CONFIG, override))
    assert "\n" not in str(e.value)
