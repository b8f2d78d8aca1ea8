"""Property tests of the JSON configs a user hands us: a component's config.json (diffusers/transformers) and
our vldm_config.json, a pipeline's model_index.json, scheduler_config.json. Every malformed one ends in a
UserError naming the file; none reaches a traceback or builds a model sized by a claim."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.hardening._hyp import examples, outcome
from vldm_jax.checkpoints.load import load_model
from vldm_jax.checkpoints.safetensors_io import write_safetensors
from vldm_jax.diffusion.samplers import make_sampler
from vldm_jax.errors import UserError
from vldm_jax.models.config import read_config_file
from vldm_jax.pipelines.text_to_video import DEFAULT_MODEL

TINY = {
    "AutoencoderKL": dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=16,
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    "CLIPTextModel": dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                          max_position_embeddings=8, vocab_size=50),
    "UNet2DConditionModel": dict(sample_size=8, block_out_channels=[8, 16], layers_per_block=1,
                                 cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
                                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
}
odd = (st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([0, -1, 10**6, 2**63]) | st.floats()
       | st.text(max_size=5) | st.lists(st.integers(-2, 20), max_size=4) | st.dictionaries(st.text(max_size=3),
                                                                                         st.integers(), max_size=2))


def _check(fn, path):
    try:
        fn()
    except UserError as e:
        assert str(path.name) in str(e) or str(path.parent.name) in str(e), e
        outcome(e, path.parent)
        return
    raise AssertionError("a malformed config was accepted")


@pytest.fixture(scope="module")
def component(tmp_path_factory):
    folder = tmp_path_factory.mktemp("component")
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", {"unused": np.zeros(1, np.float32)})
    return folder


@examples(45)
@given(st.sampled_from(sorted(TINY)), st.data())
@example("AutoencoderKL", None)
def test_component_config(component, cls, data):
    config = {"_class_name": cls, **TINY[cls]}
    if data is not None:
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from([*config, "_class_name", "architectures"]))
            config[key] = data.draw(odd)
    (component / "config.json").write_text(json.dumps(config))
    # The weights never fit (one unused tensor), so the only acceptable end is a UserError: either the config is
    # refused, or a model is built abstractly and the weights are found not to fit it.
    _check(lambda: load_model(component), component / "config.json")


@examples(30)
@given(st.binary(max_size=40) | st.sampled_from([b"[]", b"1", b'"x"', b"null", b"\xff", b"[" * 5000]))
def test_config_file_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(raw)
    _check(lambda: read_config_file(path), path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "vae"
    shutil.copytree(DEFAULT_MODEL / "vae", folder)
    return folder


@examples(25)
@given(st.data())
def test_vldm_config(converted, data):
    meta = json.loads((DEFAULT_MODEL / "vae" / "vldm_config.json").read_text())
    where = data.draw(st.sampled_from(["format", "version", "_class_name", "config", "config.block_out_channels",
                                       "config.latent_channels", "config.norm_num_groups", "config.layers_per_block"]))
    node, key = (meta["config"], where.split(".")[1]) if "." in where else (meta, where)
    node[key] = data.draw(odd)
    (converted / "vldm_config.json").write_text(json.dumps(meta))
    try:
        load_model(converted)
    except UserError as e:
        assert "vae" in str(e), e
        outcome(e, converted)
        return
    outcome()


@examples(40)
@given(st.sampled_from(["ddim", "dpm++", "euler"]), st.dictionaries(
    st.sampled_from(["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                     "timestep_spacing", "steps_offset", "trained_betas", "clip_sample", "set_alpha_to_one",
                     "algorithm_type", "solver_order", "use_karras_sigmas", "rescale_betas_zero_snr"]), odd,
    max_size=3), st.integers(-1, 60))
def test_scheduler_config(name, config, steps):
    try:
        sampler = make_sampler(name, config, steps)
    except UserError as e:
        outcome(e)
        return
    outcome()
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(sampler) if hasattr(x, "shape")]
    assert all(x.size < 10**6 for x in leaves)


@pytest.fixture(scope="module")
def pipeline_copy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "model"
    folder.mkdir()
    for child in DEFAULT_MODEL.iterdir():  # links: the weights are not copied
        (folder / child.name).symlink_to(child)
    (folder / "model_index.json").unlink()
    return folder


@examples(5)
@given(st.data())
@example(None)
def test_model_index(pipeline_copy, data):
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    index = json.loads((DEFAULT_MODEL / "model_index.json").read_text())
    if data is None:
        index = []
    else:
        key = data.draw(st.sampled_from(["_vldm_clip_skip", "_vldm_defaults", "unet", "vae", "text_encoder",
                                         "scheduler", "predictor", "interpolator"]))
        index[key] = data.draw(odd)
    (pipeline_copy / "model_index.json").write_text(json.dumps(index))
    try:
        TextToVideoPipeline.from_pretrained(pipeline_copy, upsampler=False)
    except UserError as e:
        assert "model" in str(e), e
        outcome(e, pipeline_copy)
        return
    outcome()
