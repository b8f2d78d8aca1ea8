"""``load_model``: a diffusers/transformers component folder, a weights file or a hub id -> NNX module.

Dispatch is on ``_class_name`` (diffusers) or ``architectures[0]`` (transformers) of ``config.json``.
Weights are read zero-copy from safetensors (memory-mapped); pickle files are refused unless the
caller passes ``allow_pickle=True`` and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError, ConfigError
from vldm_jax.models.config import config_from_dict, read_config_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


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


# ----------------------------------------------------------------------------------------------- weights

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


ALIGN = 64


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes a standard ``.safetensors`` file laid out for zero-copy loading: the data section starts
    64-byte aligned and tensors go largest first, so every tensor whose size is a multiple of 64 bytes
    (all large ones) stays aligned. Not atomic by itself: callers write inside a temporary folder."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    order = sorted(arrays, key=lambda k: (-np.asarray(arrays[k]).nbytes, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        a = np.asarray(arrays[k])
        if a.dtype not in names:
            raise CheckpointError(f"cannot store {k}: dtype {a.dtype} has no safetensors name")
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the format allows trailing spaces in the header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            f.write(np.ascontiguousarray(arrays[k]).tobytes(order="C"))


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {what}")


def _tensor_layout(path: Path, key: str, info: Any, data_size: int) -> tuple[Any, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field checked against the data section's real
    size before anything is mapped (a header may claim any size; nothing is allocated for a claim)."""
    if not isinstance(info, dict):
        raise _bad(path, f"entry {key!r} is not an object")
    dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(path, f"tensor {key!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, f"tensor {key!r} has bad data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise _bad(path, f"tensor {key!r} lies outside the file (bytes {start}..{end} of {data_size})")
    nbytes = int(np.dtype(dtype).itemsize) * math.prod(shape)  # Python ints: no overflow
    if nbytes != end - start:
        raise CheckpointError(f"{path}: tensor {key!r} has inconsistent size ({shape} {info['dtype']} is {nbytes} "
                              f"bytes, its offsets span {end - start})")
    return dtype, tuple(shape), start, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file as numpy views of a private memory map (no copy, any dtype incl. bf16).

    The header is checked as the reference reader checks it before any tensor is touched: JSON object of
    entries with a known dtype, a shape and offsets that lie inside the file, sizes that agree, and offsets that
    tile the data section without holes or overlaps. Anything else is a CheckpointError naming the file."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot open weights file {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n > size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
        except _DuplicateKey as e:
            raise _bad(path, f"duplicate key {e.args[0]!r} in the header") from None
        if not isinstance(header, dict):
            raise _bad(path, "the header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise _bad(path, "__metadata__ is not a mapping of strings")
        data_size = size - 8 - n
        layout = {key: _tensor_layout(path, key, info, data_size) for key, info in header.items()}
        spans = sorted((start, end, key) for key, (_, _, start, end) in layout.items())
        cursor = 0
        for start, end, key in spans:
            if start != cursor:
                raise _bad(path, f"tensor {key!r} starts at byte {start}, expected {cursor} (hole or overlap)")
            cursor = end
        if cursor != data_size:
            raise _bad(path, f"the tensors cover {cursor} of the {data_size} data bytes")
        # Copy-on-write: arrays may alias the mapping zero-copy (JAX on CPU does for 64-byte aligned data),
        # and a private mapping keeps any later in-place write away from the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    out = {}
    for key, (dtype, shape, start, end) in layout.items():
        count = math.prod(shape)
        if count == 0:  # may sit at the very end of the file, where no buffer offset is valid
            out[key] = np.zeros(shape, dtype)
        else:
            out[key] = np.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start).reshape(shape)
    return out


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


def family_of(class_name: str | None, where: Any) -> Family:
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise CheckpointError(f"{where}: unsupported model class {class_name!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[class_name]


def build_from_state_dict(class_name: str, config: Mapping[str, Any] | Any, state_dict: Mapping[str, np.ndarray],
                          *, dtype=jnp.float32, param_dtype=None, name: str | None = None, rename=None) -> nnx.Module:
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
                                rename=table, name=name or class_name, dtype=param_dtype)


def load_model(path: str | os.PathLike, *, subfolder: str | None = None, allow_pickle: bool = False,
               dtype=jnp.float32, param_dtype=None, variant: str | None = None) -> nnx.Module:
    """Loads one component: a diffusers/transformers folder (``config.json`` + weights), our own
    converted folder (``vldm_config.json``), or a hub id. Returns the NNX module with its weights;
    the config dataclass is ``module.config``.
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
    state_dict = find_folder_weights(folder, allow_pickle=allow_pickle, variant=variant)
    with config_errors_name(config_path, cls):
        return build_from_state_dict(cls, config, state_dict, dtype=dtype, param_dtype=param_dtype, name=str(folder))


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
