"""The temporal layers alone: a small safetensors file, and video U-Nets assembled from it.

The file holds every temporal parameter of a video U-Net under our NNX paths (dotted,
``down_blocks.0.resnets.1.temporal_res_block.conv1.kernel``) in NNX layout, and the video config in
its metadata. With any compatible image U-Net (SD 1.x base or a DreamBooth fine-tune of it) it makes a
video U-Net: the paper's transfer of temporal layers to personalised image models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.models.config import config_to_dict
from vldm_jax.models.roles import _join, _split_key, flat_arrays, merge_parts, temporal_filter

FORMAT = "vldm_jax.temporal"
VERSION = "1"


def save_temporal(module: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes the temporal parameters of the video U-Net ``module`` to ``path`` (``.safetensors``).

    The file is written under a temporary name in the same folder and renamed into place, so a killed
    write never leaves a truncated file under ``path``.
    """
    from vldm_jax.checkpoints.safetensors_io import write_safetensors
    from vldm_jax.models.unet import VideoUNet

    if not isinstance(module, VideoUNet):
        raise UserError(f"save_temporal needs a video U-Net, got {type(module).__name__}")
    path = Path(path).absolute()
    if path.suffix != ".safetensors":
        raise UserError(f"temporal weights are written as .safetensors, got {path.name}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name")
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist")
    arrays = {_join(p): np.ascontiguousarray(np.asarray(a)) for p, a in flat_arrays(module, temporal_filter).items()}
    meta = {"format": FORMAT, "version": VERSION, "class_name": type(module).__name__,
            "config": json.dumps(config_to_dict(module.config))}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write_safetensors(tmp, arrays, meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_temporal(path: str | os.PathLike) -> tuple[dict[tuple, np.ndarray], dict]:
    """``(NNX path -> array, video config dict)`` of a file written by :func:`save_temporal`."""
    from safetensors import safe_open

    from vldm_jax.checkpoints.safetensors_io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"temporal weights file not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path} is not a safetensors file: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vldm_jax temporal weights file (written by save_temporal)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported temporal weights version {meta.get('version')}")
    try:
        config = json.loads(meta.get("config", ""))
    except (json.JSONDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the video config in its metadata is not a JSON object")
    arrays = {_split_key(k): v for k, v in read_safetensors(path).items()}
    return arrays, config


def load_temporal(module_or_path, path: str | os.PathLike, *, seed: int = 0) -> nnx.Module:
    """A video U-Net from the temporal file ``path`` and ``module_or_path``:

    * a video U-Net (or a folder holding one): a copy with its temporal parameters replaced (the
      temporal configs must agree);
    * an image U-Net, or a folder holding one (``load_model`` folder, or a pipeline folder's ``unet/``):
      the image weights as spatial layers plus the file's temporal layers (DreamBooth transfer).

    A temporal file that does not fit the U-Net is a CheckpointError naming the offending keys.
    """
    from vldm_jax.checkpoints.load import config_errors_name
    from vldm_jax.models.unet import TemporalConfig, VideoUNet

    arrays, config = read_temporal(path)
    with config_errors_name(path, "temporal config"):
        temporal = TemporalConfig.from_stored(config)
    if not isinstance(module_or_path, nnx.Module):
        from vldm_jax.checkpoints.pipeline_folder import load_component

        module_or_path = load_component(module_or_path, "unet")
    if isinstance(module_or_path, VideoUNet):
        video = module_or_path
        if video.config.temporal != temporal:
            raise CheckpointError(f"{path}: temporal layers were made with {temporal}, the U-Net has "
                                  f"{video.config.temporal}")
    else:
        video = VideoUNet.from_image_unet(module_or_path, temporal, seed=seed)
    graphdef, state = nnx.split(video)
    merged = flat_arrays(state)
    for p in [p for p in merged if temporal_filter(p)]:
        del merged[p]
    merged.update(arrays)
    return merge_parts(graphdef, state, merged, name=f"temporal weights {Path(path).name}")
