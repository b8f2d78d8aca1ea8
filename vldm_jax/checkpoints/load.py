"""``load_model``: a diffusers/transformers component folder, a weights file or a hub id -> NNX module.

Dispatch is on ``_class_name`` (diffusers) or ``architectures[0]`` (transformers) of ``config.json``.
Weights are read zero-copy from safetensors (memory-mapped) and written once into their place in the target
layout (checkpoints/placement.py; ``VLDM_LOAD_TIMING=1`` prints where the time went); pickle files are refused unless the
caller passes ``allow_pickle=True`` and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.checkpoints.families import config_errors_name, family_of
from vldm_jax.checkpoints.placement import LoadTiming
from vldm_jax.checkpoints.safetensors_io import read_safetensors
from vldm_jax.errors import CheckpointError
from vldm_jax.models.config import config_from_dict, read_config_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


# ----------------------------------------------------------------------------------------------- weights

def read_pickle_with_step(path: str | os.PathLike, *, allow_pickle: bool = False
                          ) -> tuple[dict[str, np.ndarray], int | None]:
    """(state dict, Lightning ``global_step`` or None) of a pickle checkpoint, read with ``weights_only``."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle checkpoint, which can run code when loaded; refused. "
            "Convert it to safetensors, or pass allow_pickle=True / --allow-pickle if you trust it")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading the pickle checkpoint {path} needs PyTorch (pip install torch)") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types; the message is what a user needs
        raise CheckpointError(f"cannot read pickle checkpoint {path}: {str(e).splitlines()[0]}") from None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict")
    sd = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor)}
    if isinstance(step, torch.Tensor):
        step = int(step.item())
    return sd, step if isinstance(step, int) else None


def read_pickle(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    return read_pickle_with_step(path, allow_pickle=allow_pickle)[0]


def read_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads one weights file (safetensors, or pickle when allowed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle=allow_pickle)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, or .bin/.ckpt with --allow-pickle)")


def find_folder_weights(folder: Path, *, allow_pickle: bool = False, variant: str | None = None) -> dict[str, np.ndarray]:
    """Weights of a component folder: single safetensors, sharded safetensors (index json), or pickle."""
    names = list(SAFETENSORS_NAMES)
    if variant:
        names = [n.replace(".safetensors", f".{variant}.safetensors") for n in names] + names
    for name in names:
        if (folder / name).exists():
            return read_safetensors(folder / name)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(folder / shard))
        return out
    for name in PICKLE_NAMES:
        if (folder / name).exists():
            return read_pickle(folder / name, allow_pickle=allow_pickle)
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return read_safetensors(shards[0])
    raise CheckpointError(f"no weights found in {folder} (expected {SAFETENSORS_NAMES[0]} or {SAFETENSORS_NAMES[1]})")


# ------------------------------------------------------------------------------------------------ hub ids

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_path(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """A local path as is; ``owner/name`` that is not a local path is fetched through huggingface_hub."""
    path = Path(path_or_id)
    if path.exists():
        return path / subfolder if subfolder else path
    if _HUB_ID.match(str(path_or_id)):
        try:
            from huggingface_hub import snapshot_download
            local = snapshot_download(str(path_or_id), allow_patterns=allow_patterns)
        except Exception as e:  # offline, missing repo, gated repo...
            raise CheckpointError(f"cannot fetch {path_or_id} from the Hugging Face hub: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        return Path(local) / subfolder if subfolder else Path(local)
    raise CheckpointError(f"not found: {path_or_id} (neither a local path nor a hub id)")


# ------------------------------------------------------------------------------------------------- models

def class_name_of(config: Mapping[str, Any]) -> str | None:
    if "_class_name" in config:
        return config["_class_name"]
    archs = config.get("architectures") or []
    return archs[0] if isinstance(archs, list) and archs else None


def build_from_state_dict(class_name: str, config: Mapping[str, Any] | Any, state_dict: Mapping[str, np.ndarray],
                          *, dtype=jnp.float32, param_dtype=None, name: str | None = None, rename=None,
                          timing=None) -> nnx.Module:
    """Builds ``class_name`` with ``config`` (dict or config dataclass) and fills it from a torch state dict."""
    from vldm_jax.checkpoints import convert

    fam = family_of(class_name, name or class_name)
    mod = importlib.import_module(fam.module)
    config_cls = getattr(mod, fam.config_cls)
    model_cls = getattr(mod, fam.model_cls)
    if isinstance(config, Mapping):
        if fam.config_key and fam.config_key in config:
            config = config[fam.config_key]
        config = config_from_dict(config_cls, dict(config))
    table = getattr(convert, fam.rename) if rename is None else rename
    return convert.build_module(lambda rngs: model_cls(config, rngs=rngs, dtype=dtype), state_dict,
                                rename=table, name=name or class_name, dtype=param_dtype, timing=timing)


def load_model(path: str | os.PathLike, *, subfolder: str | None = None, allow_pickle: bool = False,
               dtype=jnp.float32, param_dtype=None, variant: str | None = None) -> nnx.Module:
    """Loads one component: a diffusers/transformers folder (``config.json`` + weights), our own
    converted folder (``vldm_config.json``), or a hub id. Returns the NNX module with its weights;
    the config dataclass is ``module.config``.

    Calling the module directly runs it eagerly, op by op (a U-Net about 2x slower than under ``jax.jit``);
    ``vldm_jax.jitted(module)`` (or ``method="decode"``...) gives the same outputs compiled once per shape.
    """
    folder = resolve_path(path, subfolder=subfolder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file; load_model takes a component folder "
                              "(single-file checkpoints load through the pipelines' from_pretrained)")
    if (folder / "vldm_config.json").exists():
        from vldm_jax.checkpoints.store import load_converted
        return load_converted(folder, dtype=dtype)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no config.json (not a diffusers/transformers component folder)")
    config = read_config_file(config_path)
    cls = class_name_of(config)
    family_of(cls, config_path)
    timing = LoadTiming(str(folder))
    with timing.phase("read"):
        state_dict = find_folder_weights(folder, allow_pickle=allow_pickle, variant=variant)
    with config_errors_name(config_path, cls):
        return build_from_state_dict(cls, config, state_dict, dtype=dtype, param_dtype=param_dtype, name=str(folder),
                                     timing=timing)
