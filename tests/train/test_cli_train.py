"""`vldm train` end to end on a folder of videos with a corrupt one: trains, names the skipped file, writes
metrics, TensorBoard logs and sample GIFs, and resumes when run again in the same workdir."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_temporal.yaml"
# Smaller than the config's defaults where it buys test time (fewer layers compile faster; frames, size, sampler).
SMALL = ["data.height=16", "data.width=16", "data.num_frames=2", "objective.sample_steps=2",
         "train.sample_every=2", "train.log_every=1", "train.checkpoint_every=2",
         "model.vae.block_out_channels=[8]", "model.vae.norm_num_groups=4", "model.vae.mid_block_add_attention=false",
         "model.vae.down_block_types=[DownEncoderBlock2D]", "model.vae.up_block_types=[UpDecoderBlock2D]",
         "model.unet.block_out_channels=[16]", "model.unet.norm_num_groups=4", "model.unet.attention_head_dim=2",
         "model.unet.down_block_types=[CrossAttnDownBlock2D]", "model.unet.up_block_types=[CrossAttnUpBlock2D]",
         "model.unet.mid_block_type=null", "model.unet.cross_attention_dim=16", "model.text_encoder.hidden_size=16",
         "model.text_encoder.intermediate_size=32", "model.text_encoder.num_hidden_layers=1",
         "model.text_encoder.projection_dim=16", "model.temporal.relative_position_dim=8"]


def vldm(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    from vldm_jax.io.video import write_video

    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.gif", "b.mp4", "c.gif"]):
        frames = np.zeros((6, 32, 32, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        for t in range(6):
            frames[t, :, 4 * t:4 * t + 4] = 255
        write_video(root / name, frames, fps=8)
    (root / "broken.mp4").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (root / "captions.csv").write_text("file,caption\na.gif,a bar moving right\n")
    return root


def test_config_errors_are_one_line(tmp_path):
    rc, _, err = vldm("train", CONFIG, "--workdir", tmp_path / "w", "--set", "optim.learnin_rate=1")
    assert rc == 2 and err.strip().count("\n") == 0 and "optim.learnin_rate" in err, err
    rc, _, err = vldm("train", CONFIG, "--workdir", tmp_path / "w")
    assert rc == 2 and "--data" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_train_from_a_video_folder_and_resume(tmp_path, video_folder):
    workdir = tmp_path / "run"
    rc, _, err = vldm("train", CONFIG, "--data", video_folder, "--workdir", workdir, "--steps", 2,
                      *[a for s in SMALL for a in ("--set", s)])
    assert rc == 0, err[-4000:]
    assert "broken.mp4" in err and "skipped" in err
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"loss", "grad_norm", "learning_rate", "skipped"} <= set(rows[0])
    assert {"steps_per_sec", "samples_per_sec"} <= set(rows[1])
    assert list((workdir / "samples").glob("step_0000002_*.gif"))
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / "config.yaml").exists() and (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "temporal.safetensors").is_file()  # the EMA temporal layers, for vldm convert --temporal

    rc, _, err = vldm("train", CONFIG, "--data", video_folder, "--workdir", workdir, "--steps", 3,
                      *[a for s in SMALL for a in ("--set", s)])
    assert rc == 0, err[-4000:]
    assert "resuming from step 2" in err
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_too_few_examples_for_the_devices_says_what_to_set(tmp_path):
    import os

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", "train", str(CONFIG), "--data", "moving_shapes:4",
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.batch_size_per_device" in last and "8 device(s)" in last
