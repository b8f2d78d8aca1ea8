"""Original single-file Stable Video Diffusion checkpoints (Stability ``sgm`` key names), e.g.
``svd.safetensors`` / ``svd_xt.safetensors``.

One file holds four networks under prefixes:

    model.diffusion_model.*                          the video U-Net (sgm ``VideoUNet``)
    conditioner.embedders.0.open_clip.model.visual.* the image encoder (OpenCLIP ViT-H/14 vision tower)
    first_stage_model.*                              the temporal VAE (decoder; see temporal_vae_single_file)
    conditioner.embedders.3.encoder.*                the VAE encoder + quant_conv that encodes the conditioning frame

U-Net (``sgm.modules.diffusionmodules.video_model``): the block layout of the SD U-Net (flat ``input_blocks``
/ ``middle_block`` / ``output_blocks``, the same tables as :mod:`vldm_jax.checkpoints.single_file`); inside a
block a ``VideoResBlock`` is the 2D ``ResBlock`` (diffusers' ``spatial_res_block``) plus ``time_stack`` (a 3D
``ResBlock``: ``temporal_res_block``) and ``time_mixer.mix_factor``; a ``SpatialVideoTransformer`` is the spatial
transformer plus ``time_stack.N`` (diffusers' ``temporal_transformer_blocks.N``), ``time_pos_embed.{0,2}``
(``time_pos_embed.linear_{1,2}``) and ``time_mixer.mix_factor``; ``label_emb.0.{0,2}`` embeds the added time
ids (diffusers' ``add_embedding.linear_{1,2}``).

Image encoder (OpenCLIP ``VisionTransformer``): ``conv1`` (patch embedding), ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj`` (stored ``(width, embed)``: ``x @ proj``) -> transformers
``CLIPVisionModelWithProjection``. The rest of the OpenCLIP model kept in the file (text-tower remnants:
``token_embedding``, ``ln_final``, ``logit_scale``...) is ignored.

Conventions that cannot be read from shapes:

* U-Net heads are 64 channels wide (sgm's ``num_head_channels: 64``; diffusers' SVD config ``(5, 10, 20, 20)``).
* OpenCLIP vision heads: 16 for every OpenCLIP ViT (L/14 and H/14 have 64- and 80-wide heads, g and bigG 88 and
  104) except ViT-B (width 768: 12 heads). GELU is exact; LayerNorm eps 1e-5.
* The added time ids are three (fps, motion bucket, noise augmentation): ``addition_time_embed_dim`` is the
  ``label_emb`` input width / 3.
* ``num_frames`` (only a default of the pipeline): 25 when the file name contains ``xt``, else 14, unless given.
* The scheduler is SVD's ``EulerDiscreteScheduler`` (:data:`SVD_SCHEDULER_CONFIG`), the U-Net ``sample_size`` 96
  latents (diffusers' SVD config), the VAE's 768 px and ``scaling_factor`` 0.18215.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vldm_jax.checkpoints.convert import RenameTable
from vldm_jax.checkpoints.single_file import (
    _indices,
    _rename_strict,
    _shape,
    _split_qkv,
    _unet_layout,
    read_original_checkpoint,
    time_stack_rename,
    unet_rename_table,
)
from vldm_jax.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
OPENCLIP_ROOT = "conditioner.embedders.0.open_clip.model."
VISION_PREFIX = OPENCLIP_ROOT + "visual."

UNET_HEAD_DIM = 64
UNET_SAMPLE_SIZE = 96
NUM_TIME_IDS = 3

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json
SVD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "interpolation_type": "linear",
    "prediction_type": "v_prediction",
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}


# ------------------------------------------------------------------------------------------------ tables

_RES = r"(.+\.resnets\.\d+)\."
_ATT = r"(.+\.attentions\.\d+)\."

# Applied after the block table has placed a key under ``...resnets.N.`` / ``...attentions.N.``.
SVD_UNET_INNER_RENAME: RenameTable = (
    *time_stack_rename(_RES, with_embedding=True),
    (_RES + r"time_mixer\.mix_factor", r"\1.time_mixer.mix_factor"),
    (_RES + r"in_layers\.0\.(weight|bias)", r"\1.spatial_res_block.norm1.\2"),
    (_RES + r"in_layers\.2\.(weight|bias)", r"\1.spatial_res_block.conv1.\2"),
    (_RES + r"emb_layers\.1\.(weight|bias)", r"\1.spatial_res_block.time_emb_proj.\2"),
    (_RES + r"out_layers\.0\.(weight|bias)", r"\1.spatial_res_block.norm2.\2"),
    (_RES + r"out_layers\.3\.(weight|bias)", r"\1.spatial_res_block.conv2.\2"),
    (_RES + r"skip_connection\.(weight|bias)", r"\1.spatial_res_block.conv_shortcut.\2"),
    (_ATT + r"time_stack\.(\d+)\.(.+)", r"\1.temporal_transformer_blocks.\2.\3"),
    (_ATT + r"time_pos_embed\.0\.(weight|bias)", r"\1.time_pos_embed.linear_1.\2"),
    (_ATT + r"time_pos_embed\.2\.(weight|bias)", r"\1.time_pos_embed.linear_2.\2"),
)

SVD_UNET_TOP_RENAME: RenameTable = (
    (r"label_emb\.0\.0\.(weight|bias)", r"add_embedding.linear_1.\1"),
    (r"label_emb\.0\.2\.(weight|bias)", r"add_embedding.linear_2.\1"),
)

_BLOCK = r"transformer\.resblocks\.(\d+)\."
_LAYER = r"vision_model.encoder.layers.\1."
OPENCLIP_VISION_RENAME: RenameTable = (
    (r"conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"class_embedding", "vision_model.embeddings.class_embedding"),
    (r"positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"proj", "visual_projection.weight"),  # transposed after renaming
    (_BLOCK + r"ln_1\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
    (_BLOCK + r"ln_2\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
    (_BLOCK + r"attn\.in_proj_(weight|bias)", _LAYER + r"self_attn.qkv_proj.\2"),
    (_BLOCK + r"attn\.out_proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
    (_BLOCK + r"mlp\.c_fc\.(weight|bias)", _LAYER + r"mlp.fc1.\2"),
    (_BLOCK + r"mlp\.c_proj\.(weight|bias)", _LAYER + r"mlp.fc2.\2"),
)


def svd_unet_rename_table(num_levels: int, layers_per_block: int) -> RenameTable:
    """sgm ``VideoUNet`` -> diffusers ``UNetSpatioTemporalConditionModel`` (before :data:`SVD_UNET_INNER_RENAME`)."""
    return SVD_UNET_TOP_RENAME + tuple(unet_rename_table(num_levels, layers_per_block))


def openclip_vision_heads(width: int) -> int:
    """Attention heads of an OpenCLIP ViT vision tower of ``width`` (see the module docstring)."""
    return 12 if width == 768 else 16


# -------------------------------------------------------------------------------------------- components

@dataclasses.dataclass
class SVDComponents:
    """The parts of an original SVD checkpoint under diffusers / transformers names (numpy arrays in the file's
    dtype and torch layout; configs with diffusers / transformers ``config.json`` fields)."""

    unet_config: dict[str, Any]
    unet_state_dict: dict[str, np.ndarray]
    vae_config: dict[str, Any]
    vae_state_dict: dict[str, np.ndarray]
    image_encoder_config: dict[str, Any]
    image_encoder_state_dict: dict[str, np.ndarray]
    scheduler_config: dict[str, Any]


def _convert_unet(sd: Mapping[str, np.ndarray], num_frames: int, head_dim: int):
    keys = [k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX)]
    if not any(".time_stack." in k for k in keys):
        raise CheckpointError("U-Net: no temporal layers (time_stack); not a Stable Video Diffusion U-Net")
    if "label_emb.0.0.weight" not in keys:
        raise CheckpointError("U-Net: no added-time-id embedding (label_emb.0.0); not a Stable Video Diffusion U-Net")
    levels, layers = _unet_layout(keys)
    unet = _rename_strict(sd, UNET_PREFIX, svd_unet_rename_table(levels, layers), SVD_UNET_INNER_RENAME, "U-Net")
    channels = [_shape(unet, f"down_blocks.{b}.resnets.0.spatial_res_block.conv1.weight", "U-Net")[0]
                for b in range(levels)]
    has_attn_down = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in unet) for b in range(levels)]
    has_attn_up = [any(k.startswith(f"up_blocks.{b}.attentions.") for k in unet) for b in range(levels)]
    to_k = sorted(k for k in unet if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    if not to_k:
        raise CheckpointError("U-Net: no cross-attention layers (attn2.to_k)")
    depth = []
    for b in range(levels):
        blocks = _indices(unet, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depth.append(len(blocks) or 1)
    adm = _shape(unet, "add_embedding.linear_1.weight", "U-Net")[1]
    if adm % NUM_TIME_IDS:
        raise CheckpointError(f"U-Net: added-time-id embedding width {adm} is not {NUM_TIME_IDS} sinusoids")
    config = {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "sample_size": UNET_SAMPLE_SIZE,
        "in_channels": _shape(unet, "conv_in.weight", "U-Net")[1],
        "out_channels": _shape(unet, "conv_out.weight", "U-Net")[0],
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal"
                             for a in has_attn_down],
        "up_block_types": ["CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in has_attn_up],
        "block_out_channels": channels,
        "addition_time_embed_dim": adm // NUM_TIME_IDS,
        "projection_class_embeddings_input_dim": adm,
        "layers_per_block": layers,
        "cross_attention_dim": _shape(unet, to_k[0], "U-Net")[1],
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "num_attention_heads": [max(c // head_dim, 1) for c in channels],
        "num_frames": num_frames,
    }
    return config, unet


def _convert_image_encoder(sd: Mapping[str, np.ndarray]):
    enc = _rename_strict(sd, VISION_PREFIX, OPENCLIP_VISION_RENAME, (), "image encoder")
    enc = _split_qkv(enc)
    if "visual_projection.weight" in enc:
        enc["visual_projection.weight"] = np.asarray(enc["visual_projection.weight"]).T
    width = _shape(enc, "vision_model.embeddings.class_embedding", "image encoder")[0]
    patch = _shape(enc, "vision_model.embeddings.patch_embedding.weight", "image encoder")
    n_pos = _shape(enc, "vision_model.embeddings.position_embedding.weight", "image encoder")[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1 or patch[2] != patch[3]:
        raise CheckpointError(f"image encoder: {n_pos} positions / patch {patch[2:]} is not a square ViT")
    heads = openclip_vision_heads(width)
    if width % heads:
        raise CheckpointError(f"image encoder: width {width} does not split into {heads} heads")
    config = {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": _shape(enc, "vision_model.encoder.layers.0.mlp.fc1.weight", "image encoder")[0],
        "projection_dim": _shape(enc, "visual_projection.weight", "image encoder")[0],
        "num_hidden_layers": len(_indices(enc, r"vision_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": heads,
        "num_channels": patch[1],
        "image_size": grid * patch[2],
        "patch_size": patch[2],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    return config, enc


def split_svd_checkpoint(state_dict: Mapping[str, Any], *, num_frames: int = 14,
                         unet_head_dim: int = UNET_HEAD_DIM) -> SVDComponents:
    """Splits an original SVD state dict into diffusers / transformers components (see the module docstring)."""
    from vldm_jax.checkpoints.temporal_vae_single_file import split_temporal_vae_single_file

    keys = list(state_dict)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"not a Stable Video Diffusion checkpoint: no U-Net weights ({UNET_PREFIX}*)")
    if not any(k.startswith(VISION_PREFIX) for k in keys):
        raise CheckpointError(f"not a Stable Video Diffusion checkpoint: no image encoder weights ({VISION_PREFIX}*)")
    unet_config, unet = _convert_unet(state_dict, num_frames, unet_head_dim)
    image_config, image = _convert_image_encoder(state_dict)
    try:
        vae_config, vae = split_temporal_vae_single_file(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"VAE: {e}") from None
    if image_config["projection_dim"] != unet_config["cross_attention_dim"]:
        raise CheckpointError(f"image encoder embedding width {image_config['projection_dim']} does not match the "
                              f"U-Net's cross_attention_dim {unet_config['cross_attention_dim']}")
    return SVDComponents(unet_config=unet_config, unet_state_dict=unet, vae_config=vae_config, vae_state_dict=vae,
                         image_encoder_config=image_config, image_encoder_state_dict=image,
                         scheduler_config=dict(SVD_SCHEDULER_CONFIG))


def default_num_frames(path: str | os.PathLike) -> int:
    """SVD-XT (25 frames) when the file name says ``xt``, else SVD (14)."""
    return 25 if "xt" in Path(path).name.lower() else 14


def load_svd_single_file(path: str | os.PathLike, *, allow_pickle: bool = False,
                         num_frames: int | None = None) -> SVDComponents:
    """Reads an original SVD checkpoint (``.safetensors``; pickles only with ``allow_pickle``) and splits it."""
    state_dict, _ = read_original_checkpoint(path, allow_pickle=allow_pickle)
    try:
        return split_svd_checkpoint(state_dict, num_frames=num_frames or default_num_frames(path))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def build_svd_models(components: SVDComponents, *, dtype=None, param_dtype=None) -> dict[str, Any]:
    """NNX ``unet``, ``vae`` and ``image_encoder`` from split components (compute ``dtype``, default float32)."""
    import jax.numpy as jnp

    from vldm_jax.checkpoints.load import build_from_state_dict

    kw = dict(dtype=jnp.float32 if dtype is None else dtype, param_dtype=param_dtype)
    return {
        "unet": build_from_state_dict("UNetSpatioTemporalConditionModel", components.unet_config,
                                      components.unet_state_dict, name="single-file U-Net", **kw),
        "vae": build_from_state_dict("AutoencoderKLTemporalDecoder", components.vae_config,
                                     components.vae_state_dict, name="single-file VAE", **kw),
        "image_encoder": build_from_state_dict("CLIPVisionModelWithProjection", components.image_encoder_config,
                                               components.image_encoder_state_dict,
                                               name="single-file image encoder", **kw),
    }
