"""Our own weight format: a folder with ``vldm_config.json`` (class name + config) and ``params.safetensors``
holding the NNX state under its own paths, already in NNX layout and 64-byte aligned.

Loading it skips key mapping and transposes, and on CPU the arrays alias the memory-mapped file
without a copy (a lazy load: pages are read when first used): that is what makes ``vldm convert`` worth running once (an orbax checkpoint of the
same weights restored no faster than converting the diffusers file again, see docs/checkpoints.md;
orbax stays the format of training checkpoints, which need sharded, async, multi-host saves).
Every write goes to a temporary sibling folder that is renamed into place at the end, so a killed
write never leaves a half-written model under the name.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.checkpoints.convert import abstract_module, merge_arrays
from vldm_jax.checkpoints.families import FAMILIES, config_errors_name, family_of
from vldm_jax.checkpoints.placement import LoadTiming
from vldm_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from vldm_jax.errors import CheckpointError, ConfigError, UserError
from vldm_jax.io.files import replace_folder
from vldm_jax.models.config import config_from_dict, config_to_dict, read_config_file

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, *, overwrite: bool = False):
    """Yields a temporary folder next to ``dst``; on success it replaces ``dst``, on failure it is removed."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; choose another destination")
    if not dst.parent.exists():
        raise UserError(f"folder {dst.parent} does not exist")
    from vldm_jax.io.video import remove_stale_temporaries

    for kind in ("partial", "old"):  # what writers killed before us left behind
        remove_stale_temporaries(dst.parent, f".{dst.name}.{kind}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    try:
        yield tmp
        replace_folder(tmp, dst)
    except OSError as e:  # a full disk or quota while writing: one line, the partial folder removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def class_name_of_module(module: nnx.Module) -> str:
    for name, fam in FAMILIES.items():
        if type(module).__name__ == fam.model_cls and type(module).__module__ == fam.module:
            return name
    raise CheckpointError(f"cannot save a {type(module).__name__}: not a registered model family")


def state_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's variables as ``{"a.0.b.kernel": array}`` (our own paths, NNX layout)."""
    _, state = nnx.split(module)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def save_module(module: nnx.Module, folder: str | os.PathLike) -> None:
    """Writes ``module`` (which must carry ``.config``) into an existing empty ``folder``."""
    folder = Path(folder)
    meta = {"format": "vldm_jax", "version": FORMAT_VERSION, "_class_name": class_name_of_module(module),
            "config": config_to_dict(module.config)}
    write_safetensors(folder / "params.safetensors", state_arrays(module))
    with open(folder / "vldm_config.json", "w") as f:
        json.dump(meta, f, indent=1)


def load_converted(folder: str | os.PathLike, *, dtype=jnp.float32) -> nnx.Module:
    """Loads a folder written by :func:`save_module`."""
    folder = Path(folder)
    timing = LoadTiming(str(folder))
    meta = read_config_file(folder / "vldm_config.json")
    if meta.get("format") != "vldm_jax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: unknown vldm_jax format {meta.get('format')} v{meta.get('version')}")
    fam = family_of(meta.get("_class_name"), folder)
    mod = importlib.import_module(fam.module)
    with config_errors_name(folder / "vldm_config.json", meta.get("_class_name")):
        if not isinstance(meta.get("config"), dict):
            raise ConfigError("'config' is not a JSON object")
        config = config_from_dict(getattr(mod, fam.config_cls), meta["config"])
        model_cls = getattr(mod, fam.model_cls)
        with timing.phase("build"):
            graphdef, abstract_state = abstract_module(lambda rngs: model_cls(config, rngs=rngs, dtype=dtype))
    with timing.phase("read"):
        stored = read_safetensors(folder / "params.safetensors")
    arrays, problems = {}, []
    for path, var in nnx.to_flat_state(abstract_state):
        key = ".".join(map(str, path))
        if key not in stored:
            problems.append(f"missing {key}")
        elif tuple(stored[key].shape) != tuple(var.get_value().shape):
            problems.append(f"mis-shaped {key} {tuple(stored[key].shape)}")
        else:
            arrays[tuple(path)] = stored.pop(key)
    problems += [f"unexpected {k}" for k in stored]
    if problems:
        raise CheckpointError(f"{folder}: weights do not fit the model: {', '.join(problems[:6])}")
    module = merge_arrays(graphdef, abstract_state, arrays, timing=timing)
    timing.finish()
    return module
