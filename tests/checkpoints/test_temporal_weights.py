"""The temporal layers as their own small file: save, load, transfer onto another image U-Net
(DreamBooth-style), and ``vldm convert SRC DST --temporal FILE``."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import vldm_jax  # noqa: E402
from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder, tiny_unet  # noqa: E402
from vldm_jax.checkpoints.pipeline_folder import load_component  # noqa: E402
from vldm_jax.checkpoints.safetensors_io import write_safetensors  # noqa: E402
from vldm_jax.checkpoints.temporal import load_temporal, read_temporal, save_temporal  # noqa: E402
from vldm_jax.errors import CheckpointError, UserError  # noqa: E402
from vldm_jax.models.roles import CountingRngs, is_temporal_path, replace_spatial  # noqa: E402
from vldm_jax.models.unet import TemporalConfig, VideoUNet, VideoUNetConfig  # noqa: E402


def _flat(module):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def _perturb_temporal(video, seed):
    """Trained-looking temporal layers: random values instead of the identity initialisation."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(video)
    flat = [(p, v.replace(v.get_value() + jnp.asarray(0.1 * rng.standard_normal(v.get_value().shape), jnp.float32))
             if is_temporal_path(p) else v) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class Files:
    def __init__(self, tmp):
        self.tmp = tmp
        self.pipeline = make_tiny_sd_pipeline_folder(tmp, "sd1")
        self.dreambooth = tmp / "dreambooth_unet"  # same architecture, other weights
        tiny_unet("sd1", seed=7).save_pretrained(self.dreambooth, safe_serialization=True)
        # A pipeline folder works as the image source: its unet/ is used.
        self.video = _perturb_temporal(VideoUNet.from_image_unet(load_component(self.pipeline, "unet")), seed=0)
        self.file = save_temporal(self.video, tmp / "temporal.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("temporal_weights"))


def test_file_holds_only_temporal_parameters(files):
    arrays, config = read_temporal(files.file)
    video = _flat(files.video)
    assert set(arrays) == {p for p in video if is_temporal_path(p)}
    assert all(np.array_equal(arrays[p], video[p]) for p in arrays)
    assert config["frame_position_encoding"] == "relative"
    n_temporal = sum(a.size for a in arrays.values())
    assert files.file.stat().st_size < 4 * n_temporal + 64 * 1024
    assert not list(files.tmp.glob(".*partial*"))


def test_dreambooth_transfer(files):
    video = load_temporal(files.dreambooth, files.file)  # image U-Net folder + temporal file
    expected = replace_spatial(files.video, vldm_jax.load_model(files.dreambooth))
    got, want = _flat(video), _flat(expected)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[p], want[p]) for p in got)
    image = _flat(vldm_jax.load_model(files.dreambooth))
    assert np.array_equal(got[("down_blocks", 0, "resnets", 0, "spatial_res_block", "conv1", "kernel")],
                          image[("down_blocks", 0, "resnets", 0, "conv1", "kernel")])


def test_reload_onto_a_video_unet(files):
    fresh = VideoUNet.from_image_unet(load_component(files.pipeline, "unet"))
    loaded = _flat(load_temporal(fresh, files.file))
    assert all(np.array_equal(loaded[p], a) for p, a in _flat(files.video).items())


def test_refuses_mismatched_layers(files, tmp_path):
    # Only the configs are compared before anything is built, so shapes suffice for the video U-Net.
    config = VideoUNetConfig.from_image_config(files.video.config.image_config(),
                                               TemporalConfig(frame_position_encoding="absolute"))
    absolute = nnx.eval_shape(lambda: VideoUNet(config, rngs=CountingRngs(0)))
    with pytest.raises(CheckpointError, match="temporal layers were made with"):
        load_temporal(absolute, files.file)
    # A file whose layers do not fit (one missing, one of another width): the offending keys are named.
    from safetensors import safe_open

    with safe_open(str(files.file), "np") as f:
        meta = f.metadata()
    arrays = {".".join(map(str, p)): a for p, a in read_temporal(files.file)[0].items()}
    del arrays["up_blocks.1.resnets.0.temporal_res_block.norm1.scale"]
    arrays["mid_block.resnets.0.temporal_res_block.conv1.bias"] = np.zeros(7, np.float32)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, arrays, meta)
    with pytest.raises(CheckpointError, match=r"missing: up_blocks\.1\.resnets\.0\.temporal_res_block\.norm1\.scale"
                                              r".*mis-shaped: mid_block\.resnets\.0\.temporal_res_block\.conv1\.bias"):
        load_temporal(files.dreambooth, bad)


def test_save_is_safe(files, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        save_temporal(files.video, files.file)
    save_temporal(files.video, files.file, overwrite=True)
    with pytest.raises(UserError, match="video U-Net"):
        save_temporal(vldm_jax.load_model(files.dreambooth), tmp_path / "x.safetensors")
    bogus = tmp_path / "bogus.safetensors"
    write_safetensors(bogus, {"w": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="not a vldm_jax temporal weights file"):
        read_temporal(bogus)


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_cli_convert_with_temporal(files):
    dst = files.tmp / "video_pipeline"
    rc, err = _cli("convert", str(files.pipeline), str(dst), "--temporal", str(files.file))
    assert rc == 0, err
    unet = vldm_jax.load_model(dst / "unet")
    assert isinstance(unet, VideoUNet)
    expected = _flat(load_temporal(vldm_jax.load_model(files.pipeline / "unet"), files.file))
    got = _flat(unet)
    assert got.keys() == expected.keys() and all(np.array_equal(got[p], expected[p]) for p in got)
    index = json.loads((dst / "model_index.json").read_text())
    assert index["unet"] == ["vldm_jax", "VideoUNet"] and index["_class_name"] == "TextToVideoPipeline"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert (dst / part).is_dir()
    assert not list(files.tmp.glob(".video_pipeline*"))


def test_cli_bad_temporal_file(files):
    dst = files.tmp / "never_written"
    rc, err = _cli("convert", str(files.pipeline), str(dst), "--temporal", str(files.tmp / "missing.safetensors"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "missing.safetensors" in lines[0] and "Traceback" not in err
    assert not dst.exists()
