"""FID Inception weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow FID graph in
torchvision's ``Inception3`` names), as safetensors or, with ``allow_pickle``, the ``.pth`` itself.

The names are ours (models/inception.py); the table renames BatchNorm's running statistics, drops its step
counter, and maps the block-indexed names of pytorch-fid's ``InceptionV3`` wrapper (``blocks.2.3.branch3x3``:
a state dict saved from that wrapper) onto the torchvision names. A ``module.`` prefix is stripped. The wrapper
has no ``fc``: such a file loads with a zero ``fc`` (features only; :func:`load_inception` says so with
``has_logits``).

A folder may hold the weights and an ``inception_config.json`` (InceptionConfig fields, e.g. a narrow test
network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vldm_jax.checkpoints.convert import RenameTable, build_module
from vldm_jax.checkpoints.load import PICKLE_SUFFIXES, read_weights
from vldm_jax.errors import CheckpointError
from vldm_jax.models.inception import FIDInceptionV3, InceptionConfig

CONFIG_NAME = "inception_config.json"
# pytorch-fid's InceptionV3.blocks: block 0 = 1a, 2a, 2b, pool; 1 = 3b, 4a, pool; 2 = 5b..6e; 3 = 7a..7c, pool.
_WRAPPER_BLOCKS = {
    0: ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    1: ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    2: ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    3: ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
}
INCEPTION_RENAME: RenameTable = (
    (r"(.*)\.bn\.running_mean", r"\1.bn.mean"),
    (r"(.*)\.bn\.running_var", r"\1.bn.var"),
    (r"(.*)\.bn\.num_batches_tracked", None),
    (r"AuxLogits\..*", None),  # torchvision's auxiliary head (aux_logits=True files); the FID graph has none
)


def _unwrap(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
        names = _WRAPPER_BLOCKS.get(int(parts[1]), ())
        if int(parts[2]) < len(names):
            return ".".join([names[int(parts[2])], *parts[3:]])
    return key


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"Inception weights not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one Inception weights file (.safetensors or .pth), found "
                              f"{[p.name for p in files] or 'none'}")
    return files[0]


def load_inception(path: str | os.PathLike, *, allow_pickle: bool = False, config: InceptionConfig | None = None,
                   dtype=None) -> FIDInceptionV3:
    """FID Inception with the weights of ``path`` (a weights file, or a folder with one and an optional
    inception_config.json). ``model.has_logits`` is False when the file had no ``fc``."""
    path = Path(path)
    if config is None:
        cfg_file = (path if path.is_dir() else path.parent) / CONFIG_NAME
        config = InceptionConfig.from_dict(json.loads(cfg_file.read_text())) if cfg_file.exists() else InceptionConfig()
    state_dict = read_weights(_weights_file(path), allow_pickle=allow_pickle)
    state_dict = {_unwrap(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    has_logits = "fc.weight" in state_dict
    if not has_logits:
        d = FIDInceptionV3.feature_dim_of(config)
        state_dict["fc.weight"] = np.zeros((config.num_classes, d), np.float32)
        state_dict["fc.bias"] = np.zeros((config.num_classes,), np.float32)
    model = build_module(lambda rngs: FIDInceptionV3(config, rngs=rngs), state_dict, rename=INCEPTION_RENAME,
                         name="Inception", dtype=dtype)
    model.has_logits = has_logits
    return model
