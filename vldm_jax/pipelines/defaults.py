"""The pipelines' defaults in one place: the pipelines' keyword arguments and the command line's options read them.

The reference pipelines' values where there is one (diffusers' ``StableDiffusionPipeline``,
``StableVideoDiffusionPipeline``, ``StableDiffusionUpscalePipeline``); a Video LDM model folder may carry its own
(``model_index.json``'s ``_vldm_defaults``), which take the place of :data:`VIDEO_LDM`.
"""

from __future__ import annotations

SCHEDULER = "ddim"
DECODE_CHUNK = 8  # frames decoded at a time (Video LDM, and the command line's SVD)

# Stable Diffusion text-to-image.
IMAGE_STEPS = 50
IMAGE_GUIDANCE = 7.5

# Stable Video Diffusion image-to-video.
SVD_STEPS = 25
SVD_MIN_GUIDANCE = 1.0
SVD_MAX_GUIDANCE = 3.0
SVD_FPS = 7
SVD_MOTION_BUCKET = 127
SVD_NOISE_AUG = 0.02
SVD_HEIGHT, SVD_WIDTH = 576, 1024  # landscape; a portrait image gets the transpose on the command line

# x4 upscaler (images: diffusers' 75 steps) and the video upsampler (20: every tile of every frame runs them).
UPSCALE_STEPS = 75
VIDEO_UPSCALE_STEPS = 20
UPSCALE_GUIDANCE = 9.0
UPSCALE_NOISE_LEVEL = 20

# Video LDM, unless the model folder says otherwise.
VIDEO_LDM = {"num_inference_steps": 25, "guidance_scale": 7.5, "interpolate": 1, "interpolation_window": None,
             "fps": 8}
