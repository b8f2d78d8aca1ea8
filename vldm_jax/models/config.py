"""Model configs: frozen dataclasses whose field names are those of the diffusers/transformers config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

from vldm_jax.errors import ConfigError

T = TypeVar("T")
MAX_LAYERS = 1000


def _freeze(value: Any) -> Any:
    # JSON lists become tuples so configs stay hashable (they are static arguments of jitted functions).
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], *, strict: bool = False) -> T:
    """Builds the dataclass ``cls`` from a config dict.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are metadata and ignored.
    Other unknown keys are ignored unless ``strict``: reference configs carry many fields that do
    not change the forward pass (``dropout``, ``use_return_dict``...).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if not k.startswith("_") and k not in names)
    if strict and unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {unknown}")
    kwargs = {k: _freeze(v) for k, v in data.items() if k in names}
    for k, v in kwargs.items():
        # A layer count is built as that many modules: a file claiming a million would hang the (abstract) build.
        if "layers" in k and any(type(n) is int and n > MAX_LAYERS for n in (v if isinstance(v, tuple) else (v,))):
            raise ConfigError(f"{cls.__name__}: {k}={v} is not a plausible layer count (at most {MAX_LAYERS})")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - message is what matters
        raise ConfigError(f"{cls.__name__}: {e}") from None


def config_to_dict(config: Any, class_name: str | None = None) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    if class_name:
        data = {"_class_name": class_name, **data}
    return data


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a JSON object (got {type(data).__name__})")
    return data
