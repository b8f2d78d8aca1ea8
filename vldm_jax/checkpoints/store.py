"""Our own weight format: a folder with ``vldm_config.json`` (class name + config) and an orbax checkpoint.

Loading it skips key mapping and transposes (the arrays are already in NNX layout), which is what
makes ``vldm convert`` worth running once. Every write goes to a temporary sibling folder that is
renamed into place at the end, so a killed write never leaves a half-written model under the name.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.models.config import config_from_dict, config_to_dict

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, *, overwrite: bool = False):
    """Yields a temporary folder next to ``dst``; on success it replaces ``dst``, on failure it is removed."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; choose another destination")
    if not dst.parent.exists():
        raise UserError(f"folder {dst.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def class_name_of_module(module: nnx.Module) -> str:
    from vldm_jax.checkpoints.load import FAMILIES

    for name, fam in FAMILIES.items():
        if type(module).__name__ == fam.model_cls and type(module).__module__ == fam.module:
            return name
    raise CheckpointError(f"cannot save a {type(module).__name__}: not a registered model family")


def save_module(module: nnx.Module, folder: str | os.PathLike) -> None:
    """Writes ``module`` (which must carry ``.config``) into an existing empty ``folder``."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    meta = {"format": "vldm_jax", "version": FORMAT_VERSION, "_class_name": class_name_of_module(module),
            "config": config_to_dict(module.config)}
    _, state = nnx.split(module)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / "params", nnx.to_pure_dict(state))
        ckptr.wait_until_finished()
    with open(folder / "vldm_config.json", "w") as f:
        json.dump(meta, f, indent=1)


def load_converted(folder: str | os.PathLike, *, dtype=jnp.float32) -> nnx.Module:
    """Loads a folder written by :func:`save_module`."""
    import orbax.checkpoint as ocp

    from vldm_jax.checkpoints.load import family_of

    folder = Path(folder).absolute()
    with open(folder / "vldm_config.json") as f:
        meta = json.load(f)
    if meta.get("format") != "vldm_jax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: unknown vldm_jax format {meta.get('format')} v{meta.get('version')}")
    fam = family_of(meta["_class_name"], folder)
    mod = importlib.import_module(fam.module)
    config = config_from_dict(getattr(mod, fam.config_cls), meta["config"])
    model_cls = getattr(mod, fam.model_cls)
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(folder / "params", target)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot restore weights: {str(e).splitlines()[0]}") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
