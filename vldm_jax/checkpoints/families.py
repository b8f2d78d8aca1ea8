"""The model families a checkpoint may hold: class name (``_class_name`` / ``architectures[0]`` of a config, or
our own format's) -> where its module, config class and rename table live. Read by the loaders
(:mod:`vldm_jax.checkpoints.load`) and by our own format (:mod:`vldm_jax.checkpoints.store`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vldm_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model family lives: module path, config class, model class(es), rename table name."""

    module: str
    config_cls: str
    model_cls: str
    rename: str  # attribute of vldm_jax.checkpoints.convert
    config_key: str | None = None  # nested config key (transformers full-model configs)


# class name in config.json -> family. Imported lazily so that loading one family does not import all.
FAMILIES: dict[str, Family] = {
    "UNet2DConditionModel": Family("vldm_jax.models.unet", "UNet2DConditionConfig", "UNet2DConditionModel", "UNET_RENAME"),
    # Stable Video Diffusion U-Net: diffusers names match ours; our video U-Net made from an SD U-Net
    # (VideoUNet) only comes from our own format, so it needs no rename table either.
    "UNetSpatioTemporalConditionModel": Family("vldm_jax.models.unet", "UNetSpatioTemporalConditionConfig",
                                               "UNetSpatioTemporalConditionModel", "UNET_RENAME"),
    "VideoUNet": Family("vldm_jax.models.unet", "VideoUNetConfig", "VideoUNet", "UNET_RENAME"),
    "AutoencoderKL": Family("vldm_jax.models.autoencoder", "AutoencoderKLConfig", "AutoencoderKL", "VAE_RENAME"),
    # Same module names as the image VAE's (plus the temporal layers), and the same legacy attention names.
    "AutoencoderKLTemporalDecoder": Family("vldm_jax.models.autoencoder", "AutoencoderKLTemporalDecoderConfig",
                                           "AutoencoderKLTemporalDecoder", "VAE_RENAME"),
    "CLIPTextModel": Family("vldm_jax.models.clip", "CLIPTextConfig", "CLIPTextModel", "CLIP_TEXT_RENAME"),
    "CLIPTextModelWithProjection": Family("vldm_jax.models.clip", "CLIPTextConfig", "CLIPTextModelWithProjection",
                                          "CLIP_TEXT_RENAME"),
    "CLIPVisionModel": Family("vldm_jax.models.clip", "CLIPVisionConfig", "CLIPVisionModel", "CLIP_VISION_RENAME",
                              config_key="vision_config"),
    "CLIPVisionModelWithProjection": Family("vldm_jax.models.clip", "CLIPVisionConfig",
                                            "CLIPVisionModelWithProjection", "CLIP_VISION_RENAME",
                                            config_key="vision_config"),
}


def register_family(class_name: str, family: Family) -> None:
    FAMILIES[class_name] = family


def family_of(class_name: str | None, where: Any) -> Family:
    if class_name not in FAMILIES:
        raise CheckpointError(f"{where}: unsupported model class {class_name!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[class_name]
