"""vldm_jax: Video LDM ("Align your Latents") in JAX / Flax NNX.

The public surface: :func:`load_model`, :func:`jitted` (a loaded module's fast call), the pipelines (:class:`TextToVideoPipeline`, the Video LDM cascade, first)
and the errors. Heavy submodules are imported on first use so that ``import vldm_jax`` stays cheap.
"""

from __future__ import annotations

import importlib

from vldm_jax.errors import CheckpointError, ConfigError, UserError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "vldm_jax.checkpoints.load",
    "jitted": "vldm_jax.models.jitted",
    "TextToVideoPipeline": "vldm_jax.pipelines.text_to_video",
    "TextToImagePipeline": "vldm_jax.pipelines.text_to_image",
    "ImageToVideoPipeline": "vldm_jax.pipelines.image_to_video",
    "AnimateDiffPipeline": "vldm_jax.pipelines.animatediff",
}

__all__ = ["UserError", "CheckpointError", "ConfigError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vldm_jax' has no attribute {name!r}")
