"""The model families a checkpoint may hold: class name (``_class_name`` / ``architectures[0]`` of a config, or
our own format's) -> where its module, config class and rename table live. Read by the loaders
(:mod:`vldm_jax.checkpoints.load`) and by our own format (:mod:`vldm_jax.checkpoints.store`)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from vldm_jax.errors import CheckpointError, ConfigError


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
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise CheckpointError(f"{where}: unsupported model class {class_name!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[class_name]


# What building a module from a config that does not describe one raises (a zero, a null, a string where a size
# belongs): the file is at fault, not the code, and the user gets one line naming it.
_BUILD_ERRORS = (TypeError, ValueError, ZeroDivisionError, KeyError, IndexError, AttributeError, OverflowError)


@contextlib.contextmanager
def config_errors_name(config_path: Any, class_name: Any):
    """Turns errors of building ``class_name`` from the config in ``config_path`` into one-line ConfigErrors
    that name the file (weights that do not fit stay CheckpointErrors, which name the folder)."""
    try:
        yield
    except CheckpointError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    except _BUILD_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{config_path}: the config does not describe a valid {class_name} "
                          f"({type(e).__name__}: {msg})") from None
