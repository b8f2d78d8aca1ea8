"""Training configs: one YAML file per stage, loaded into typed dataclasses, with ``--set a.b=c`` overrides.

A YAML file has up to six sections, each a dataclass below (every field has a default, so a file only
says what differs)::

    model:     what is trained and what stays frozen (a pretrained folder, or tiny random models)
    data:      where batches come from (a video folder, moving shapes) and their shape
    objective: the loss (temporal fine-tuning: eps / v prediction, image mixing, VAE in the step or cached latents)
    optim:     AdamW, warm-up + cosine, gradient clipping, EMA
    mesh:      device mesh sizes, parameter sharding rules, multi-host initialisation
    train:     steps, seed, workdir, checkpoint / log / sample intervals

Unknown keys are errors that name the key (a typo must not silently train something else). Values are
coerced to the field's type, so ``--set optim.learning_rate=1e-4`` (a string to YAML 1.1) is a float.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from vldm_jax.errors import ConfigError


@dataclasses.dataclass
class ModelConfig:
    """What is trained. ``pretrained`` (a diffusers Stable Diffusion pipeline folder, single file or our
    converted folder) supplies the frozen image model; when null, random models are built from the ``unet``,
    ``vae`` and ``text_encoder`` dicts (diffusers config.json fields): a smoke-test setup, not a model."""

    pretrained: str | None = None
    # Build the real-size model of ``pretrained`` with random weights: the architecture from the folder's
    # config.json files (no weights read) or, for a hub id, from the bundled copy of the reference configs
    # (vldm_jax/assets/reference_configs; no network). For --compile-only and smoke runs at full size.
    random_init: bool = False
    unet: dict = dataclasses.field(default_factory=dict)
    vae: dict = dataclasses.field(default_factory=dict)
    text_encoder: dict = dataclasses.field(default_factory=dict)
    # diffusers scheduler config fields; merged over the pretrained model's scheduler_config.json.
    scheduler: dict = dataclasses.field(default_factory=dict)
    # Options of the video U-Net's from_image_unet (temporal layer placement, alpha init...).
    temporal: dict = dataclasses.field(default_factory=dict)
    # Compute dtype of the networks (parameters stay float32): float32 or bfloat16.
    dtype: str = "float32"
    # Rematerialisation of U-Net blocks in the backward pass: none, full (recomputed inside the backward pass; the
    # one that lowers the peak), checkpoint (jax.checkpoint per layer), dots_saveable.
    remat: str = "none"
    # Which U-Net parameters train: 'temporal' (Video LDM), 'all', or a regex searched in the dotted path.
    trainable: str = "temporal"
    # objective.name animatediff: motion modules to fine-tune (MotionAdapter folder or hub id, mm_sd_v15* file);
    # null trains new ones (zero-initialised proj_out: the video model starts as the image model).
    motion_adapter: str | None = None


@dataclasses.dataclass
class DataConfig:
    """Where batches come from (see :mod:`vldm_jax.data`). ``path`` (``--data``): a folder of videos,
    ``moving_shapes`` / ``moving_shapes:N``, a prepared TFDS dataset folder, or a ``vldm prepare`` array_record
    folder (it holds ``spec.json``; read by grain, no TensorFlow; ``height``/``width`` must match what it stores,
    ``num_frames`` may be fewer). The global batch is
    ``batch_size_per_device`` times the device count, so a config runs unchanged on any number of devices."""

    path: str | None = None
    num_frames: int = 8
    height: int = 64
    width: int = 64
    frame_stride: int = 1
    fps: float | None = None
    clips_per_video: int | None = None
    # Examples of the procedural moving-shapes dataset.
    num_examples: int = 1024
    batch_size_per_device: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 1024
    seed: int = 0
    # moving_shapes only: render the clips with numpy into host memory (worker processes) and batch them from
    # there; needs no TensorFlow (a GPU box with only JAX), and feeds a fast accelerator without a tf.data stage.
    in_memory: bool = False


@dataclasses.dataclass
class ObjectiveConfig:
    """The loss. ``name`` picks one of vldm_jax.train.objectives.OBJECTIVES."""

    name: str = "temporal"
    # Options of objectives built by their own module (objectives.SETUP_BUILDERS: vae, image, prediction,
    # interpolation, upsampler, animatediff, decoder); each documents and validates its keys.
    options: dict = dataclasses.field(default_factory=dict)
    # Override of the scheduler's prediction_type (epsilon, v_prediction, sample); null keeps the model's.
    prediction_type: str | None = None
    # Probability that a training video is treated as independent images (image_only_indicator = 1).
    image_ratio: float = 0.0
    # True: the frozen VAE encoder and text encoder run inside the step on `video` + `input_ids` (or `caption`)
    # batches. False: batches carry precomputed `latents` (scaled) and `encoder_hidden_states`.
    encode_in_step: bool = True
    # Sample the VAE posterior (True, as latent diffusion trains) or take its mean.
    sample_posterior: bool = True
    # Probability of training a sample with the empty prompt's context (keeps classifier-free guidance).
    text_dropout: float = 0.0
    # Offset noise strength (0 = off).
    noise_offset: float = 0.0
    # Fraction of clips whose timestep is drawn from the upper half of the schedule instead of all of it. At high
    # noise x_t no longer shows where things move, so only the conditioning (the text's direction) can; a
    # temporal stage spends more of its steps there. 0 = uniform timesteps (the usual training).
    high_noise_fraction: float = 0.0
    # Temporal stages: train the text encoder too (with encode_in_step), so that words the image stage could not
    # learn (a direction) can move the frozen spatial layers' features that the temporal layers mix. Exported beside
    # the temporal layers as workdir/text_encoder.
    train_text_encoder: bool = False
    # Sampler used for the sample GIFs.
    sample_scheduler: str = "ddim"
    sample_steps: int = 10
    sample_guidance: float = 1.0


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    # Cosine decay from the peak over this many steps after warm-up (null: to train.steps); 'constant' schedule
    # keeps the peak.
    schedule: str = "cosine"
    decay_steps: int | None = None
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_grad_norm: float | None = 1.0
    # EMA of the trainable parameters (0 disables it and its memory).
    ema_decay: float = 0.9999


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ``('data', 'fsdp', 'context', 'tensor')``: -1 fills with the remaining devices; ``context``
    splits each video's frames over devices (activations only; see vldm_jax.parallel.activations). Parameters are sharded by
    ``rules``: each ``[logical_axis, mesh_axis]`` (mesh_axis a name, a list of names or null) is tried in order
    on the parameter's logical axes (``out``, ``in`` of kernels, ``vocab`` of embeddings, ``channels`` of
    vectors, ``spatial`` of conv windows), skipping mesh axes already used or not dividing the dimension.
    Parameters with fewer than ``min_shard_size`` elements are replicated."""

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1
    rules: list = dataclasses.field(default_factory=lambda: [["out", "fsdp"], ["in", "fsdp"], ["vocab", "fsdp"]])
    min_shard_size: int = 2**14
    # Multi-host: 'auto' initialises jax.distributed when JAX_COORDINATOR_ADDRESS (or a cluster JAX knows)
    # says so; true forces it; false never.
    distributed: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class TrainLoopConfig:
    steps: int = 1000
    # Wall-clock budget in seconds for the steps of this run (0: none). When it runs out, training ends as at
    # the last step (checkpoint, export) and a later run with the same workdir resumes towards `steps`. The
    # learning-rate schedule still spans `steps`: pair a budget with optim.schedule=constant (and an EMA).
    max_seconds: float = 0.0
    seed: int = 0
    workdir: str | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Sample GIFs (and TensorBoard images) every this many steps; 0 = never.
    sample_every: int = 0
    tensorboard: bool = True
    progress: bool = True
    # jax_threefry_partitionable for the run (null: JAX's default). Both give sharding-invariant random numbers;
    # the partitionable one generates sharded arrays without communication but compiles slowly on CPUs.
    threefry_partitionable: bool | None = None
    # Keep compiled programs in workdir/cache/jax, so a resumed run skips recompiling (unless
    # JAX_COMPILATION_CACHE_DIR already names a cache).
    compilation_cache: bool = True


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)


# ------------------------------------------------------------------------------------------ typed building

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of options, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def build(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """The dataclass ``cls`` from a (nested) mapping; unknown keys raise a ConfigError that names them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known here: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=c'`` -> (['a', 'b'], value), the value read as YAML (``[1, 2]``, ``null``, ``true``...)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Sets each ``a.b.c=value`` in the nested dict ``data`` (copying what it changes)."""
    data = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a YAML file: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                data: Mapping[str, Any] | None = None) -> Config:
    """A :class:`Config` from a YAML file (or a dict ``data``), then ``--set`` style ``overrides``."""
    raw = read_yaml(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, overrides)
    config = build(Config, raw)
    validate(config)
    return config


def _moving_shapes_count(path) -> int | None:
    from vldm_jax.data.moving_shapes import parse_dataset_name

    return parse_dataset_name(str(path), 0)


def validate(config: Config) -> None:
    """Cross-field checks that a dataclass field type cannot express."""
    if config.train.steps < 0:
        raise ConfigError(f"train.steps must be >= 0 (got {config.train.steps})")
    if not 0.0 <= config.objective.high_noise_fraction <= 1.0:
        raise ConfigError(f"objective.high_noise_fraction must be in [0, 1] (got {config.objective.high_noise_fraction})")
    if config.objective.train_text_encoder and not config.objective.encode_in_step:
        raise ConfigError("objective.train_text_encoder needs objective.encode_in_step (the text encoder runs in the step)")
    if config.train.max_seconds < 0:
        raise ConfigError(f"train.max_seconds must be >= 0 (got {config.train.max_seconds})")
    if config.data.in_memory and config.data.path and _moving_shapes_count(config.data.path) is None:
        raise ConfigError(f"data.in_memory renders the procedural moving_shapes data only (data.path is "
                          f"{config.data.path!r})")
    if config.data.batch_size_per_device < 1:
        raise ConfigError(f"data.batch_size_per_device must be >= 1 (got {config.data.batch_size_per_device})")
    if config.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16 (got {config.model.dtype!r})")
    if not 0.0 <= config.objective.image_ratio <= 1.0:
        raise ConfigError(f"objective.image_ratio must be in [0, 1] (got {config.objective.image_ratio})")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (got {config.optim.ema_decay})")
    if config.optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule must be cosine or constant (got {config.optim.schedule!r})")
    if config.mesh.distributed not in ("auto", "true", "false", "True", "False"):
        raise ConfigError(f"mesh.distributed must be auto, true or false (got {config.mesh.distributed!r})")
    for rule in config.mesh.rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"mesh.rules entries are [logical_axis, mesh_axis]; got {rule!r}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1 (got {getattr(config.train, name)})")


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
