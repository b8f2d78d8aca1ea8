"""Every other pipeline with a mesh, in a subprocess with 8 simulated CPU devices: Stable Video Diffusion (frames
over context, guidance on), text-to-image (images over data) and the video upsampler (frames over context), each
against its single-device result. Prints one ``RESULT {json}`` line.

    python tests/parallel/_pipelines_worker.py TMPDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", False)

import numpy as np  # noqa: E402

from vldm_jax.parallel import mesh_from_sizes  # noqa: E402


def main(tmp: Path) -> None:
    from tests.helpers import tiny_svd
    from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder
    from tests.helpers.tiny_upscaler import make_tiny_upscaler_folder
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline
    from vldm_jax.pipelines.upscale import VideoUpscalePipeline

    out = {}
    svd = tiny_svd.Case("a", tmp / "svd").pipe
    image = tiny_svd.make_image()
    kw = dict(height=32, width=48, num_frames=4, num_inference_steps=2, max_guidance_scale=3.0, seed=0)
    ref = svd(image, **kw)
    out["svd_context2"] = float(np.abs(svd(image, mesh=mesh_from_sizes({"context": 2}), **kw) - ref).max())

    sd = TextToImagePipeline.from_pretrained(make_tiny_sd_pipeline_folder(tmp / "sd"))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, seed=0, height=32, width=32)
    ref = sd(["a cat", "a dog"], **kw)
    out["txt2img_data2"] = float(np.abs(sd(["a cat", "a dog"], mesh=mesh_from_sizes({"data": 2}), **kw) - ref).max())

    up = VideoUpscalePipeline.from_pretrained(make_tiny_upscaler_folder(tmp / "x4"))
    video = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, seed=0, progress=False)
    ref = up(video, "a video", **kw)
    out["upscale_context2"] = float(np.abs(up(video, "a video", mesh=mesh_from_sizes({"context": 2}), **kw)
                                           - ref).max())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
