"""AnimateDiff motion modules in and out: diffusers ``MotionAdapter`` folders (or hub ids), diffusers
``UNetMotionModel`` folders, and the original single files (``mm_sd_v15*.ckpt`` / ``.safetensors``, v1/v2/v3).

A motion adapter holds only the motion modules; the spatial part of the video U-Net is any SD 1.x image U-Net
we load (the paper's transfer to personalised models). Our video U-Net keeps diffusers' names
(``down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q``), so a MotionAdapter state dict maps by the
generic key rule; the original layout differs by the renames in :data:`ORIGINAL_TO_DIFFUSERS` (and back, for
export, :data:`DIFFUSERS_TO_ORIGINAL`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError, ConfigError, UserError

ADAPTER_CLASS = "MotionAdapter"
MOTION_UNET_CLASS = "UNetMotionModel"

# diffusers MotionAdapter config fields (and defaults) that our TemporalConfig mirrors.
ADAPTER_DEFAULTS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1,
    "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
    "conv_in_channels": None,
}

# Original AnimateDiff key pieces -> diffusers' (applied in order to every key). ``pos_encoder.pe`` sits under
# each of the two attentions in the original files (the same table twice); it is kept once, as ``pos_embed.pe``.
ORIGINAL_TO_DIFFUSERS = (
    (r"(.*)\.attention_blocks\.0\.pos_encoder\.pe", r"\1.pos_embed.pe"),
    (r"(.*)\.attention_blocks\.1\.pos_encoder\.pe", None),
)
_ORIGINAL_PIECES = ((".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
                    (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
                    (".temporal_transformer", ""))


def original_to_diffusers_key(key: str) -> str | None:
    """``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight``
    -> ``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight`` (None: a duplicate dropped)."""
    for pattern, replacement in ORIGINAL_TO_DIFFUSERS:
        m = re.fullmatch(pattern, key)
        if m:
            if replacement is None:
                return None
            key = m.expand(replacement)
            break
    for old, new in _ORIGINAL_PIECES:
        key = key.replace(old, new)
    return key


def diffusers_to_original_key(key: str) -> list[str]:
    """The inverse of :func:`original_to_diffusers_key`: the original key(s) of a diffusers adapter key
    (``pos_embed.pe`` goes to both attentions' ``pos_encoder.pe``)."""
    m = re.fullmatch(r"(.*motion_modules\.\d+)\.(.*)", key)
    if not m:
        raise CheckpointError(f"not a motion-module key: {key}")
    head, rest = m.group(1) + ".temporal_transformer", m.group(2)
    pe = re.fullmatch(r"(transformer_blocks\.\d+)\.pos_embed\.pe", rest)
    if pe:
        return [f"{head}.{pe.group(1)}.attention_blocks.{i}.pos_encoder.pe" for i in (0, 1)]
    for new, old in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                     (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1.")):
        rest = rest.replace(new, old)
    return [f"{head}.{rest}"]


# ------------------------------------------------------------------------------------------ reading adapters

@dataclasses.dataclass
class MotionAdapterWeights:
    """A motion adapter: its diffusers config (``MotionAdapter`` fields) and diffusers-keyed numpy arrays."""

    config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    source: str


def _is_adapter_key(key: str) -> bool:
    return ".motion_modules." in key


def infer_adapter_config(state_dict: Mapping[str, np.ndarray], where: str) -> dict[str, Any]:
    """A MotionAdapter config from diffusers-keyed weights (the original files carry none): channels per block
    from each block's first ``norm``, module and transformer-layer counts from the keys, the window from ``pe``.
    Heads cannot be read off the weights: AnimateDiff always uses 8."""
    channels, layers, tlayers = {}, {}, {}
    mid_modules, mid_tlayers, max_len = set(), set(), None
    for key, value in state_dict.items():
        m = re.match(r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.(.*)", key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            layers.setdefault(i, set()).add(j)
            if m.group(3) == "norm.weight" and j == 0:
                channels[i] = int(value.shape[0])
            t = re.match(r"transformer_blocks\.(\d+)\.", m.group(3))
            if t:
                tlayers.setdefault(i, set()).add(int(t.group(1)))
        m = re.match(r"mid_block\.motion_modules\.(\d+)\.(.*)", key)
        if m:
            mid_modules.add(int(m.group(1)))
            t = re.match(r"transformer_blocks\.(\d+)\.", m.group(2))
            if t:
                mid_tlayers.add(int(t.group(1)))
        if key.endswith("pos_embed.pe"):
            max_len = int(value.shape[1])
    if not channels or sorted(channels) != list(range(len(channels))):
        raise CheckpointError(f"{where}: no motion modules found (expected down_blocks.N.motion_modules.M keys)")
    n = len(channels)
    per_block = [len(layers[i]) for i in range(n)]
    per_block_t = [len(tlayers.get(i, ())) for i in range(n)]
    return {
        **ADAPTER_DEFAULTS,
        "block_out_channels": tuple(channels[i] for i in range(n)),
        "motion_layers_per_block": per_block[0] if len(set(per_block)) == 1 else tuple(per_block),
        "motion_transformer_layers_per_block": per_block_t[0] if len(set(per_block_t)) == 1 else tuple(per_block_t),
        "motion_mid_block_layers_per_block": max(len(mid_modules), 1),
        "motion_transformer_layers_per_mid_block": max(len(mid_tlayers), 1),
        "use_motion_mid_block": bool(mid_modules),
        "motion_max_seq_length": max_len or 32,
    }


def read_original_motion_module(path: str | os.PathLike, *, allow_pickle: bool = False) -> MotionAdapterWeights:
    """An original AnimateDiff motion-module file (``mm_sd_v15.ckpt``, ``mm_sd_v15_v2.ckpt``,
    ``v3_sd15_mm.ckpt`` or their ``.safetensors``) -> diffusers-keyed weights and an inferred config.
    Pickled files need ``allow_pickle`` (then read with ``weights_only``)."""
    from vldm_jax.checkpoints.load import read_weights

    path = Path(path)
    raw = read_weights(path, allow_pickle=allow_pickle)
    raw = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    foreign = [k for k in raw if not _is_adapter_key(k)]
    if foreign:
        raise CheckpointError(f"{path}: not an AnimateDiff motion-module file (unexpected key {foreign[0]})")
    state = {}
    for key, value in raw.items():
        new = original_to_diffusers_key(key)
        if new is not None:
            state[new] = np.asarray(value)
    return MotionAdapterWeights(infer_adapter_config(state, str(path)), state, str(path))


def is_temporal_file(path) -> bool:
    """True for a temporal weights file of ours (``save_temporal``; training's ``workdir/temporal.safetensors``)."""
    from safetensors import safe_open

    from vldm_jax.checkpoints.temporal import FORMAT

    if Path(path).suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file: the reader that follows names the problem
        return False


def read_motion_adapter(path_or_id: str | os.PathLike, *, allow_pickle: bool = False) -> MotionAdapterWeights:
    """A motion adapter from a diffusers ``MotionAdapter`` folder (``config.json`` + weights), a hub id of one,
    an original single file (see :func:`read_original_motion_module`), or our temporal weights file with motion
    modules (what training writes: ``workdir/temporal.safetensors``, or the workdir itself)."""
    from vldm_jax.checkpoints.load import find_folder_weights, resolve_path
    from vldm_jax.models.config import read_config_file

    p = Path(path_or_id)
    if p.is_dir() and (p / "temporal.safetensors").is_file() and not (p / "config.json").exists():
        p = p / "temporal.safetensors"  # a training workdir
    if p.is_file():
        if is_temporal_file(p):
            return motion_adapter_from_temporal_file(p)
        return read_original_motion_module(p, allow_pickle=allow_pickle)
    if not p.exists() and str(path_or_id).endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")):
        raise CheckpointError(f"motion adapter file not found: {path_or_id}")
    folder = resolve_path(path_or_id, allow_patterns=["config.json", "*.safetensors"])
    if (folder / "motion_adapter" / "config.json").exists():  # a saved AnimateDiff pipeline folder
        folder = folder / "motion_adapter"
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json (not a diffusers MotionAdapter folder)")
    config = read_config_file(folder / "config.json")
    if config.get("_class_name") != ADAPTER_CLASS:
        raise CheckpointError(f"{folder}: a {config.get('_class_name')!r} folder, not a {ADAPTER_CLASS}")
    state = {k: np.asarray(v) for k, v in find_folder_weights(folder, allow_pickle=allow_pickle).items()}
    config = {**ADAPTER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    return MotionAdapterWeights(config, state, str(folder))


# --------------------------------------------------------------------------------------- the video U-Net

def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def motion_temporal_config(adapter_config: Mapping[str, Any]):
    """Our :class:`~vldm_jax.models.unet.TemporalConfig` for a MotionAdapter config."""
    from vldm_jax.models.unet import TemporalConfig

    c = adapter_config
    mid = _tuple(c.get("motion_transformer_layers_per_mid_block", 1))
    if isinstance(mid, tuple):
        if len(set(mid)) != 1:
            raise ConfigError("per-layer motion_transformer_layers_per_mid_block is not supported")
        mid = mid[0]
    return TemporalConfig(temporal_layer_type="motion_module",
                          motion_num_attention_heads=_tuple(c.get("motion_num_attention_heads", 8)),
                          motion_max_seq_length=int(c.get("motion_max_seq_length", 32)),
                          use_motion_mid_block=bool(c.get("use_motion_mid_block", True)),
                          motion_transformer_layers_per_block=_tuple(c.get("motion_transformer_layers_per_block", 1)),
                          motion_transformer_layers_per_mid_block=int(mid))


def check_compatible(unet_config, adapter_config: Mapping[str, Any], where: str = "motion adapter") -> None:
    """A CheckpointError (one line) when the adapter does not fit the image U-Net's config."""
    from vldm_jax.models.unet import VideoUNetConfig

    c = adapter_config
    if c.get("conv_in_channels"):
        raise CheckpointError(f"{where}: adapters with their own conv_in (PIA, conv_in_channels) are not supported")
    image_blocks = tuple(unet_config.block_out_channels)
    adapter_blocks = tuple(c["block_out_channels"])
    if isinstance(unet_config, VideoUNetConfig) and unet_config.temporal_layer_type != "motion_module":
        raise CheckpointError(f"{where}: the U-Net already has Video LDM temporal layers")
    cross = unet_config.cross_attention_dim
    cross = cross[0] if isinstance(cross, tuple) else cross
    if adapter_blocks == (320, 640, 1280, 1280) and (cross != 768 or len(image_blocks) != 4):
        family = {1024: "SD 2.x", 2048: "SDXL"}.get(cross, f"cross_attention_dim {cross}")
        raise CheckpointError(f"{where} is for SD 1.x U-Nets (cross_attention_dim 768), the U-Net is {family}")
    if image_blocks != adapter_blocks:
        raise CheckpointError(f"{where} has block channels {adapter_blocks}, the U-Net {image_blocks}")
    layers = unet_config.per_block("layers_per_block")
    adapter_layers = c.get("motion_layers_per_block", 2)
    adapter_layers = tuple(adapter_layers) if isinstance(adapter_layers, (list, tuple)) else \
        (adapter_layers,) * len(adapter_blocks)
    if tuple(layers) != adapter_layers:
        raise CheckpointError(f"{where} has {adapter_layers} motion modules per block, the U-Net "
                              f"{tuple(layers)} layers per block")
    heads = c.get("motion_num_attention_heads", 8)
    for ch, h in zip(adapter_blocks, (tuple(heads) if isinstance(heads, (list, tuple)) else
                                      (heads,) * len(adapter_blocks))):
        if ch % h:
            raise CheckpointError(f"{where}: {ch} channels do not divide into {h} motion heads")


def _fill_positions(state: dict[str, np.ndarray], abstract_temporal) -> dict[str, np.ndarray]:
    """Adds the sinusoidal ``pos_embed.pe`` tables an adapter saved without them (they are a fixed function of
    the config; older diffusers versions did not save them)."""
    from vldm_jax.nn.temporal import sinusoidal_positions

    out = dict(state)
    for path, var in nnx.to_flat_state(abstract_temporal):
        if tuple(path[-2:]) == ("pos_embed", "pe"):
            key = ".".join(map(str, path))
            if key not in out:
                shape = var.get_value().shape
                out[key] = np.asarray(sinusoidal_positions(shape[1], shape[2]))
    return out


def animatediff_unet(image_unet: nnx.Module, adapter: MotionAdapterWeights, *, dtype=None) -> nnx.Module:
    """The video U-Net with AnimateDiff motion modules: ``image_unet``'s weights as the spatial layers (the same
    names) and the adapter's motion modules. Missing, unexpected or mis-shaped keys are named."""
    from vldm_jax.checkpoints.convert import UNET_RENAME, convert_state_dict
    from vldm_jax.models.roles import abstract_video_unet, flat_arrays, merge_parts, temporal_filter
    from vldm_jax.models.unet import UNet2DConditionModel, VideoUNet, VideoUNetConfig

    if type(image_unet) is not UNet2DConditionModel:
        raise CheckpointError(f"motion modules go into an SD image U-Net, got {type(image_unet).__name__}")
    check_compatible(image_unet.config, adapter.config, f"motion adapter {adapter.source}")
    config = VideoUNetConfig.from_image_config(image_unet.config, motion_temporal_config(adapter.config))
    dtype = image_unet.dtype if dtype is None else dtype
    graphdef, abstract = abstract_video_unet(VideoUNet, config, dtype)
    abstract_temporal = abstract.filter(temporal_filter)
    state = _fill_positions(adapter.state_dict, abstract_temporal)
    temporal = convert_state_dict(state, abstract_temporal, rename=UNET_RENAME,
                                  name=f"motion adapter {adapter.source}")
    arrays = flat_arrays(image_unet)
    arrays.update(temporal)
    return merge_parts(graphdef, abstract, arrays, name=f"motion adapter {adapter.source}")


def motion_unet_config(config: Mapping[str, Any]):
    """Our ``VideoUNetConfig`` for a diffusers ``UNetMotionModel`` config.json."""
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.unet import UNet2DConditionConfig, VideoUNetConfig

    c = dict(config)
    for unsupported in ("addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if c.get(unsupported) is not None:
            raise ConfigError(f"UNetMotionModel: {unsupported}={c[unsupported]!r} is not supported")
    rename = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
              "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D"}
    image = {k: v for k, v in c.items() if k in {f.name for f in dataclasses.fields(UNet2DConditionConfig)}}
    image["down_block_types"] = [rename.get(t, t) for t in c["down_block_types"]]
    image["up_block_types"] = [rename.get(t, t) for t in c["up_block_types"]]
    # UNetMotionModel's num_attention_heads is the head count (SD's legacy attention_head_dim).
    image["attention_head_dim"] = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    image["num_attention_heads"] = None
    image_config = config_from_dict(UNet2DConditionConfig, image)
    if c.get("mid_block_layers", 1) != 1:
        raise ConfigError("UNetMotionModel: mid_block_layers other than 1 is not supported")
    temporal = motion_temporal_config({
        "motion_num_attention_heads": c.get("motion_num_attention_heads", 8),
        "motion_max_seq_length": c.get("motion_max_seq_length", 32),
        "use_motion_mid_block": c.get("use_motion_mid_block", True),
        "motion_transformer_layers_per_block": c.get("temporal_transformer_layers_per_block", 1),
        "motion_transformer_layers_per_mid_block": c.get("temporal_transformer_layers_per_mid_block", 1) or 1})
    return VideoUNetConfig.from_image_config(image_config, temporal)


def load_motion_unet(folder: str | os.PathLike, *, allow_pickle: bool = False, dtype=None) -> nnx.Module:
    """A diffusers ``UNetMotionModel`` folder (``config.json`` + weights) -> our video U-Net."""
    import jax.numpy as jnp

    from vldm_jax.checkpoints.convert import UNET_RENAME, build_module
    from vldm_jax.checkpoints.load import find_folder_weights
    from vldm_jax.models.config import read_config_file
    from vldm_jax.models.unet import VideoUNet

    folder = Path(folder)
    raw = read_config_file(folder / "config.json")
    if raw.get("_class_name") != MOTION_UNET_CLASS:
        raise CheckpointError(f"{folder}: not a {MOTION_UNET_CLASS} folder")
    config = motion_unet_config(raw)
    state = find_folder_weights(folder, allow_pickle=allow_pickle)
    dtype = jnp.float32 if dtype is None else dtype
    from vldm_jax.checkpoints.convert import abstract_module

    _, abstract = abstract_module(lambda rngs: VideoUNet(config, rngs=rngs, dtype=dtype))
    state = _fill_positions({k: np.asarray(v) for k, v in state.items()}, abstract)
    return build_module(lambda rngs: VideoUNet(config, rngs=rngs, dtype=dtype), state, rename=UNET_RENAME,
                        name=str(folder))


def image_unet_of(video_unet):
    """The image U-Net whose weights are ``video_unet``'s spatial layers (AnimateDiff: the same names)."""
    from vldm_jax.checkpoints.convert import abstract_module
    from vldm_jax.models.roles import flat_arrays, merge_parts, spatial_filter
    from vldm_jax.models.unet import UNet2DConditionModel

    config = video_unet.config.image_config()
    graphdef, abstract = abstract_module(lambda rngs: UNet2DConditionModel(config, rngs=rngs,
                                                                           dtype=video_unet.dtype))
    return merge_parts(graphdef, abstract, flat_arrays(video_unet, spatial_filter), name="U-Net")


# ------------------------------------------------------------------------------------------------- export

def adapter_config_of(config) -> dict[str, Any]:
    """The diffusers MotionAdapter config.json of a video U-Net config with motion modules."""
    c = config
    if getattr(c, "temporal_layer_type", None) != "motion_module":
        raise UserError("no AnimateDiff motion modules here (temporal_layer_type is not motion_module)")
    listed = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {
        "_class_name": ADAPTER_CLASS,
        "block_out_channels": list(c.block_out_channels),
        "motion_layers_per_block": listed(c.layers_per_block),
        "motion_transformer_layers_per_block": listed(c.motion_transformer_layers_per_block),
        "motion_mid_block_layers_per_block": 1,
        "motion_transformer_layers_per_mid_block": c.motion_transformer_layers_per_mid_block,
        "motion_num_attention_heads": listed(c.motion_num_attention_heads),
        "motion_norm_num_groups": c.norm_num_groups,
        "motion_max_seq_length": c.motion_max_seq_length,
        "use_motion_mid_block": bool(c.use_motion_mid_block and c.mid_block_type is not None),
        "conv_in_channels": None,
    }


def adapter_state_dict(arrays: Mapping[tuple, Any]) -> dict[str, np.ndarray]:
    """Motion-module arrays (NNX path -> array) as a diffusers-keyed torch-layout state dict."""
    from vldm_jax.models.roles import _join

    out = {}
    for path, value in arrays.items():
        if "motion_modules" not in path:
            raise CheckpointError(f"not a motion-module parameter: {_join(path)}")
        a = np.asarray(value, np.float32)
        leaf = path[-1]
        if leaf == "kernel":
            a, key = a.T, _join(path[:-1]) + ".weight"  # every motion-module kernel is a linear layer
        elif leaf == "scale":
            key = _join(path[:-1]) + ".weight"
        else:
            key = _join(path)
        out[key] = np.ascontiguousarray(a)
    return out


def motion_adapter_of(video_unet) -> MotionAdapterWeights:
    """The motion modules of a video U-Net as a diffusers MotionAdapter (config + state dict)."""
    from vldm_jax.models.roles import flat_arrays, temporal_filter

    return MotionAdapterWeights(adapter_config_of(video_unet.config),
                                adapter_state_dict(flat_arrays(video_unet, temporal_filter)), "video U-Net")


def motion_adapter_from_temporal_file(path: str | os.PathLike) -> MotionAdapterWeights:
    """The motion modules of a temporal weights file (``save_temporal``; what training writes as
    ``workdir/temporal.safetensors``) as a diffusers MotionAdapter."""
    from vldm_jax.checkpoints.temporal import read_temporal
    from vldm_jax.models.config import config_from_dict
    from vldm_jax.models.unet import VideoUNetConfig

    arrays, config = read_temporal(path)
    video_config = config_from_dict(VideoUNetConfig, config)
    return MotionAdapterWeights(adapter_config_of(video_config), adapter_state_dict(arrays), str(path))


def save_motion_adapter(adapter: MotionAdapterWeights, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes a diffusers MotionAdapter folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    atomically: built under a temporary name beside ``dst``, then renamed."""
    from vldm_jax.checkpoints.safetensors_io import write_safetensors
    from vldm_jax.checkpoints.store import atomic_folder

    dst = Path(dst)
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        write_safetensors(Path(tmp) / "diffusion_pytorch_model.safetensors", adapter.state_dict, {"format": "pt"})
        with open(Path(tmp) / "config.json", "w") as f:
            json.dump({**adapter.config, "_class_name": ADAPTER_CLASS}, f, indent=1)
    return dst


def save_original_motion_module(adapter: MotionAdapterWeights, path: str | os.PathLike) -> Path:
    """Writes the motion modules in the original AnimateDiff single-file layout (``.safetensors``)."""
    from vldm_jax.checkpoints.safetensors_io import write_safetensors

    out = {}
    for key, value in adapter.state_dict.items():
        for original in diffusers_to_original_key(key):
            out[original] = np.ascontiguousarray(value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write_safetensors(tmp, out)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
