"""Our trainer trains AnimateDiff motion modules (spatial layers frozen) into a tiny SD 1.x model; the run's
temporal file exports (``vldm convert --to diffusers-motion-adapter``) to a MotionAdapter folder that diffusers
loads and runs to the same frames as our pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tiny_animatediff import diffusers_animatediff
from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder


@pytest.mark.slow
def test_train_export_and_diffusers_frames(tmp_path, capsys):
    from flax import nnx

    from vldm_jax.cli import main
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline
    from vldm_jax.train.config import load_config
    from vldm_jax.train.loop import train

    sd = make_tiny_sd_pipeline_folder(tmp_path)
    config = load_config("configs/animatediff_tiny.yaml", [
        f"model.pretrained={sd}", "data.path=moving_shapes:4", "data.height=16", "data.width=16",
        "data.num_frames=4", "train.steps=2", "train.checkpoint_every=2", "train.log_every=1"])
    result = train(config, workdir=tmp_path / "run")
    assert result.step == 2 and np.isfinite(result.metrics[-1]["loss"])
    adapter = tmp_path / "adapter"
    rc = main(["convert", str(tmp_path / "run" / "temporal.safetensors"), str(adapter),
               "--to", "diffusers-motion-adapter"])
    assert rc == 0, capsys.readouterr().err
    ref = diffusers_animatediff(sd, adapter)
    trained = max(float(m.proj_out.weight.abs().max()) for b in ref.unet.down_blocks for m in b.motion_modules)
    assert trained > 0  # proj_out starts at zero: the modules moved
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 8, 4)).astype(np.float32)
    want = ref("a cat", num_frames=8, height=16, width=16, num_inference_steps=2, output_type="np",
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3))).frames
    pipe = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=adapter)
    got = pipe("a cat", num_frames=8, height=16, width=16, num_inference_steps=2, latents=noise)
    assert np.abs(got - np.asarray(want)).max() < 2e-3
    # only the motion modules trained (the role filter): every trainable path is a motion-module path
    trainable = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(result.state.trainable)]
    assert trainable and all("motion_modules" in p for p in trainable)
    # the training workdir itself loads as a motion adapter
    again = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=tmp_path / "run")
    assert again.unet.config == pipe.unet.config
