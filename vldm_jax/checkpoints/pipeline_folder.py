"""Pipeline folders (``model_index.json`` + one sub-folder per part): the one reader and the one writer.

A pipeline folder is a diffusers one (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` ...) or
ours (the same layout, each part in our own format, :mod:`vldm_jax.checkpoints.store`). Every pipeline's
``from_pretrained``, the CLI's choice of pipeline and the trainers read folders through :func:`read_pipeline_folder`;
every ``save_pretrained`` writes them through :func:`write_pipeline_parts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp

from vldm_jax.checkpoints.load import load_model, resolve_path
from vldm_jax.errors import CheckpointError
from vldm_jax.models.config import read_config_file
from vldm_jax.models.tokenizer import load_tokenizer

INDEX = "model_index.json"
_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "model.safetensors",
                 "*.safetensors.index.json", "*-of-*.safetensors")
# Only what a Stable Diffusion pipeline reads: no fp16/EMA variants, no root-level single files, no safety checker,
# no pickles.
SD_HUB_PATTERNS = [INDEX, "scheduler/*.json", "tokenizer/*"] + [
    f"{part}/{name}" for part in ("unet", "vae", "text_encoder") for name in _WEIGHT_FILES]
UPSCALER_HUB_PATTERNS = [INDEX, "scheduler/*.json", "low_res_scheduler/*.json", "tokenizer/*"] + [
    f"{part}/{name}" for part in ("unet", "vae", "text_encoder")
    for name in (*_WEIGHT_FILES, "vldm_config.json", "params.safetensors")]
DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' StableDiffusionUpscalePipeline default (model_index.json)


class PipelineFolder:
    """A pipeline folder and its parsed ``model_index.json``."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = Path(path)
        self.index = index

    @property
    def class_name(self) -> str | None:
        return self.index.get("_class_name")

    @property
    def clip_skip(self) -> int:
        return int(self.index.get("_vldm_clip_skip", 0))

    def has(self, part: str) -> bool:
        """The index names ``part`` (not null) and its sub-folder exists."""
        return self.index.get(part) is not None and (self.path / part).is_dir()

    def require(self, parts: Iterable[str], what: str = "") -> None:
        """A CheckpointError naming the first of ``parts`` that is missing (``what``: e.g. " (not an x4 upscaler)")."""
        for part in parts:
            if not self.has(part):
                raise CheckpointError(f"{self.path}: pipeline has no {part}/ component{what}")

    def load(self, part: str, **kwargs) -> Any:
        """The module in ``part/`` (:func:`~vldm_jax.checkpoints.load.load_model` keyword arguments)."""
        return load_model(self.path / part, **kwargs)

    def load_models(self, parts: Iterable[str], **kwargs) -> dict[str, Any]:
        """The modules of those ``parts`` the folder has; a part whose index entry is ``["alias", other]`` (one
        network in two roles, written once) is the same module object as ``other``."""
        parts = list(parts)
        models = {}
        for part in parts:
            if not self._alias(part) and self.has(part):
                models[part] = self.load(part, **kwargs)
        for part in parts:
            entry = self._alias(part)
            if entry:
                if len(entry) != 2 or entry[1] not in models:
                    raise CheckpointError(f"{self.path}: {INDEX}: {part} is an alias of a missing part {entry}")
                models[part] = models[entry[1]]
        return models

    def _alias(self, part: str) -> list | None:
        entry = self.index.get(part)
        return entry if isinstance(entry, list) and entry[:1] == ["alias"] else None

    def tokenizer(self, override: str | os.PathLike | None = None, **kwargs):
        """The CLIP tokenizer of ``override`` or of ``tokenizer/`` (the bundled vocabulary when there is none)."""
        if override is not None:
            return load_tokenizer(override, **kwargs)
        return load_tokenizer(self.path / "tokenizer" if (self.path / "tokenizer").is_dir() else None, **kwargs)

    def scheduler_config(self, part: str = "scheduler") -> dict[str, Any]:
        return read_config_file(self.path / part / "scheduler_config.json")

    def config(self, relative: str) -> dict[str, Any] | None:
        """A JSON file of the folder (e.g. ``feature_extractor/preprocessor_config.json``), None when absent."""
        p = self.path / relative
        return read_config_file(p) if p.exists() else None


def read_pipeline_folder(path: str | os.PathLike, *, allow_patterns: list[str] | None = None,
                         what: str = "a diffusers pipeline folder") -> PipelineFolder:
    """A pipeline folder (local, or a hub id fetched with ``allow_patterns``); CheckpointError when it has no
    ``model_index.json`` (``what`` names what was expected)."""
    folder = resolve_path(path, allow_patterns=allow_patterns)
    if not (folder / INDEX).exists():
        raise CheckpointError(f"{folder}: no {INDEX} (not {what})")
    return PipelineFolder(folder, read_config_file(folder / INDEX))


def pipeline_class_name(path: str | os.PathLike) -> str | None:
    """The ``_class_name`` of a local pipeline folder; None for anything else (a file, a hub id, no or a broken
    index). Never raises: callers route on it."""
    index = Path(path) / INDEX
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def component_folder(path: str | os.PathLike, part: str) -> Path:
    """``path/part`` when ``path`` is a pipeline folder with that part, else ``path`` (a component folder)."""
    p = Path(path)
    if (p / INDEX).exists() and (p / part).is_dir():
        return p / part
    return p


def load_component(path: str | os.PathLike, part: str, **kwargs) -> Any:
    """The module of a component folder, or of a pipeline folder's ``part/`` (:func:`component_folder`)."""
    return load_model(component_folder(path, part), **kwargs)


# ------------------------------------------------------------------------------------------ Stable Diffusion

@dataclasses.dataclass
class StableDiffusionParts:
    """What a Stable Diffusion (1.x / 2.x) checkpoint holds, loaded."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    clip_skip: int = 0


def load_stable_diffusion(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                          allow_pickle: bool = False, prediction_type: str | None = None,
                          dtype=jnp.float32) -> StableDiffusionParts:
    """A diffusers pipeline folder, our converted folder, an original single-file SD 1.x/2.x checkpoint
    (``.safetensors``; ``.ckpt`` with ``allow_pickle``), or a hub id.

    ``tokenizer``: a tokenizer folder overriding the checkpoint's (single files: default the bundled vocabulary).
    ``prediction_type``: the scheduler's, overriding the checkpoint's (single files whose weights cannot tell SD 2.x
    512 from 768-v).
    """
    p = Path(path)
    if p.is_file():
        from vldm_jax.checkpoints.single_file import build_single_file_models, load_single_file

        parts = load_single_file(p, allow_pickle=allow_pickle, prediction_type=prediction_type)
        models = build_single_file_models(parts, dtype=dtype)
        # SD 2.x (OpenCLIP) pads with "!", SD 1.x with the end token; a user's tokenizer folder knows its own.
        pad = None if tokenizer is not None else ("!" if parts.variant == "sd2" else None)
        return StableDiffusionParts(models["unet"], models["vae"], models["text_encoder"],
                                    load_tokenizer(tokenizer, pad_token=pad), parts.scheduler_config,
                                    clip_skip=parts.clip_skip)
    if not p.exists() and str(path).endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")):
        raise CheckpointError(f"checkpoint file not found: {path}")
    folder = read_pipeline_folder(path, allow_patterns=SD_HUB_PATTERNS)
    folder.require(("unet", "vae", "text_encoder", "scheduler"))
    kw = dict(allow_pickle=allow_pickle, dtype=dtype)
    scheduler_config = folder.scheduler_config()
    if prediction_type:
        scheduler_config["prediction_type"] = prediction_type
    return StableDiffusionParts(folder.load("unet", **kw), folder.load("vae", **kw), folder.load("text_encoder", **kw),
                                folder.tokenizer(tokenizer), scheduler_config, clip_skip=folder.clip_skip)


def load_upscaler_parts(path: str | os.PathLike, *, dtype=jnp.float32) -> dict[str, Any]:
    """The parts of a diffusers ``StableDiffusionUpscalePipeline`` folder (or hub id, or ours): ``unet``, ``vae``,
    ``text_encoder``, ``tokenizer``, ``scheduler_config``, ``low_res_scheduler_config``, ``max_noise_level``,
    ``clip_skip`` (the upscale pipelines' constructor arguments)."""
    if Path(path).is_file():
        raise CheckpointError(f"{path}: the upscaler loads from a pipeline folder ({INDEX}) or hub id")
    folder = read_pipeline_folder(path, allow_patterns=UPSCALER_HUB_PATTERNS)
    folder.require(("unet", "vae", "text_encoder", "scheduler", "low_res_scheduler"), " (not an x4 upscaler)")
    parts: dict[str, Any] = folder.load_models(("unet", "vae", "text_encoder"), dtype=dtype)
    parts["tokenizer"] = folder.tokenizer()
    parts["scheduler_config"] = folder.scheduler_config()
    parts["low_res_scheduler_config"] = folder.scheduler_config("low_res_scheduler")
    parts["max_noise_level"] = int(folder.index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
    parts["clip_skip"] = folder.clip_skip
    return parts


# ------------------------------------------------------------------------------------------------ writing

def write_pipeline_parts(folder, index: dict, *, modules: dict, tokenizer=None, schedulers: dict | None = None) -> None:
    """Writes a pipeline folder's parts in our own format into ``folder`` (a fresh temporary folder of
    :func:`vldm_jax.checkpoints.store.atomic_folder`) and its ``model_index.json``.

    ``index``: the pipeline's own entries (``_class_name``, options); ``modules``: part name -> module, or None for
    an absent part; one module object named twice is written once, the second name an ``["alias", first]`` entry;
    ``schedulers``: part name -> scheduler config dict."""
    from vldm_jax.checkpoints.store import save_module

    folder = Path(folder)
    index = {**index, "_vldm_format": 1}
    written: dict[int, str] = {}
    for name, module in modules.items():
        if module is None:
            index[name] = None
        elif id(module) in written:
            index[name] = ["alias", written[id(module)]]
        else:
            written[id(module)] = name
            (folder / name).mkdir()
            save_module(module, folder / name)
            index[name] = ["vldm_jax", type(module).__name__]
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    for name, config in (schedulers or {}).items():
        (folder / name).mkdir()
        with open(folder / name / "scheduler_config.json", "w") as f:
            json.dump(config, f, indent=1)
        index[name] = ["vldm_jax", "SchedulerConfig"]
    write_index(folder, index)


def write_index(folder, index: dict[str, Any]) -> None:
    """(Re)writes ``folder/model_index.json`` (``folder``: a temporary folder being written, see
    :func:`write_pipeline_parts`)."""
    with open(Path(folder) / INDEX, "w") as f:
        json.dump(index, f, indent=1)
