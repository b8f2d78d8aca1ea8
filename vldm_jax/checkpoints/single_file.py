"""Original single-file Stable Diffusion 1.x / 2.x checkpoints (CompVis / Stability key names).

One file holds three networks under prefixes:

    model.diffusion_model.*     U-Net (``openaimodel.UNetModel``: input_blocks / middle_block / output_blocks)
    first_stage_model.*         KL autoencoder (encoder.down.N / decoder.up.N, numbered from the bottom)
    cond_stage_model.transformer.text_model.*   SD 1.x: a transformers CLIP text model (quick_gelu)
    cond_stage_model.model.*    SD 2.x: an OpenCLIP ViT-H text tower (gelu, fused q/k/v ``in_proj``)

:func:`split_original_checkpoint` renames each part to diffusers / transformers names with regex tables
(``re.fullmatch``, first match wins; the U-Net and VAE tables are generated for the number of levels and
layers because CompVis numbers blocks with a flat index), infers every size from tensor shapes, and returns
configs in the field names of diffusers' / transformers' ``config.json`` so the parts build through
:func:`vldm_jax.checkpoints.load.build_from_state_dict` like a diffusers folder would.

Conventions that cannot be read from shapes (documented choices, the same as diffusers makes):

* Heads: SD 1.x U-Nets use 8 heads in every block (diffusers' ``attention_head_dim=8``, which diffusers
  interprets as a head count); SD 2.x uses 64-dim heads (``attention_head_dim = channels // 64`` per block)
  and ``upcast_attention=True``. CLIP text heads are ``hidden_size // 64`` (ViT-L/14 and ViT-H/14 alike).
* SD 2.x conditions on OpenCLIP's *penultimate* layer followed by ``ln_final``. Like diffusers, we drop the
  last resblock and build a ``CLIPTextModel`` with ``num_hidden_layers = N - 1``: its ``last_hidden_state``
  (after ``final_layer_norm``) is exactly that context, so pipelines call it with ``clip_skip=0`` for both
  variants (:attr:`SingleFileComponents.clip_skip`). This assumes the file holds the whole tower (24 blocks
  for SD 2.x); a file already cut to 23 would lose one more layer.
* prediction_type: ``epsilon`` for SD 1.x. For SD 2.x there is nothing in the weights that tells 768-v
  (v-prediction) from 512-base (epsilon) checkpoints; as diffusers does, SD 2.x is ``v_prediction`` unless the
  checkpoint's ``global_step`` is 875000 (the SD 2.0 512-base release). SD 2.1 512-base files are not
  recognised (pass ``prediction_type="epsilon"``). ``global_step`` 110000 stays v-prediction: diffusers'
  older converter read that step as the SD 2.1 768-v release (which needs upcast attention).
  ``global_step`` is read from a ``.ckpt``'s top level or from a ``global_step`` tensor in the state dict.
* EMA: the weights under ``model.diffusion_model.`` are used; ``model_ema.*`` copies (full training
  checkpoints) are ignored, as diffusers does by default. Other keys outside the three prefixes
  (``betas``, ``alphas_cumprod``...) are ignored too; an unknown key *inside* a prefix is an error.
* ``sample_size``: 96 latents (768 px) for SD 2.x v-prediction, 64 (512 px) otherwise; VAE
  ``scaling_factor`` 0.18215; GroupNorm groups 32.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vldm_jax.checkpoints.convert import RenameTable, apply_rename
from vldm_jax.errors import CheckpointError, ConfigError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SD2_BASE_GLOBAL_STEP = 875000  # stabilityai/stable-diffusion-2-base 512-base-ema.ckpt (epsilon)
VAE_SCALING_FACTOR = 0.18215
_HEAD_DIM = 64


@dataclasses.dataclass
class SingleFileComponents:
    """The parts of an original SD checkpoint under diffusers / transformers names.

    State dicts hold numpy arrays in the file's dtype and torch layout (views of the memory map where
    possible); configs are plain dicts with diffusers ``config.json`` / transformers ``CLIPTextConfig`` fields.
    """

    variant: str  # "sd1" | "sd2"
    unet_config: dict[str, Any]
    unet_state_dict: dict[str, np.ndarray]
    vae_config: dict[str, Any]
    vae_state_dict: dict[str, np.ndarray]
    text_config: dict[str, Any]
    text_state_dict: dict[str, np.ndarray]
    scheduler_config: dict[str, Any]
    clip_skip: int = 0  # to pass to CLIPTextModel.encode; 0 for both variants (see the module docstring)
    text_layers_dropped: int = 0  # OpenCLIP blocks removed at conversion (1 for SD 2.x)
    global_step: int | None = None

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config["prediction_type"]


# ------------------------------------------------------------------------------------------- key tables

def time_stack_rename(block: str, *, with_embedding: bool) -> RenameTable:
    """Stability's temporal residual block (``<block>.time_stack.{in,out}_layers``) -> diffusers'
    ``<block>.temporal_res_block``. ``block`` is a regex with one group for the block's path; the U-Net's
    blocks carry a timestep projection (``emb_layers``), the temporal VAE decoder's do not."""
    rows = [("in_layers\\.0", "norm1"), ("in_layers\\.2", "conv1"), ("out_layers\\.0", "norm2"),
            ("out_layers\\.3", "conv2")]
    if with_embedding:
        rows.insert(2, ("emb_layers\\.1", "time_emb_proj"))
    return tuple((block + r"time_stack\." + src + r"\.(weight|bias)", r"\1.temporal_res_block." + dst + r".\2")
                 for src, dst in rows)


# U-Net resnet internals (CompVis ``ResBlock`` Sequential indices -> diffusers ``ResnetBlock2D``), applied after
# the structural table has placed the key under ``...resnets.N.``. Transformer blocks share their names.
UNET_RESNET_RENAME: RenameTable = (
    (r"(.+\.resnets\.\d+)\.in_layers\.0\.(weight|bias)", r"\1.norm1.\2"),
    (r"(.+\.resnets\.\d+)\.in_layers\.2\.(weight|bias)", r"\1.conv1.\2"),
    (r"(.+\.resnets\.\d+)\.emb_layers\.1\.(weight|bias)", r"\1.time_emb_proj.\2"),
    (r"(.+\.resnets\.\d+)\.out_layers\.0\.(weight|bias)", r"\1.norm2.\2"),
    (r"(.+\.resnets\.\d+)\.out_layers\.3\.(weight|bias)", r"\1.conv2.\2"),
    (r"(.+\.resnets\.\d+)\.skip_connection\.(weight|bias)", r"\1.conv_shortcut.\2"),
)


def unet_rename_table(num_levels: int, layers_per_block: int) -> RenameTable:
    """CompVis U-Net block indices -> diffusers block paths.

    ``input_blocks`` are numbered flat: 0 is ``conv_in``, then per level ``layers_per_block`` (resnet,
    attention) pairs and, except at the bottom level, one downsampler. ``output_blocks`` hold
    ``layers_per_block + 1`` (resnet, attention) pairs per level; a level's upsampler sits in its last entry,
    after the attention when there is one (slot 2) and in its place otherwise (slot 1).
    """
    per = layers_per_block + 1
    table: list[tuple[str, str | None]] = [
        (r"time_embed\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
        (r"time_embed\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
        (r"input_blocks\.0\.0\.(weight|bias)", r"conv_in.\1"),
        (r"out\.0\.(weight|bias)", r"conv_norm_out.\1"),
        (r"out\.2\.(weight|bias)", r"conv_out.\1"),
        (r"middle_block\.0\.(.+)", r"mid_block.resnets.0.\1"),
        (r"middle_block\.1\.(.+)", r"mid_block.attentions.0.\1"),
        (r"middle_block\.2\.(.+)", r"mid_block.resnets.1.\1"),
    ]
    for b in range(num_levels):
        for j in range(layers_per_block):
            i = 1 + b * per + j
            table += [(rf"input_blocks\.{i}\.0\.(.+)", rf"down_blocks.{b}.resnets.{j}.\1"),
                      (rf"input_blocks\.{i}\.1\.(.+)", rf"down_blocks.{b}.attentions.{j}.\1")]
        if b < num_levels - 1:
            table.append((rf"input_blocks\.{(b + 1) * per}\.0\.op\.(weight|bias)",
                          rf"down_blocks.{b}.downsamplers.0.conv.\1"))
    for b in range(num_levels):
        for j in range(per):
            i = b * per + j
            table.append((rf"output_blocks\.{i}\.0\.(.+)", rf"up_blocks.{b}.resnets.{j}.\1"))
            if j == per - 1 and b < num_levels - 1:
                table.append((rf"output_blocks\.{i}\.[12]\.conv\.(weight|bias)",
                              rf"up_blocks.{b}.upsamplers.0.conv.\1"))
            table.append((rf"output_blocks\.{i}\.1\.(.+)", rf"up_blocks.{b}.attentions.{j}.\1"))
    return tuple(table)


VAE_RESNET_RENAME: RenameTable = (
    (r"(.+\.resnets\.\d+)\.nin_shortcut\.(weight|bias)", r"\1.conv_shortcut.\2"),
)


def vae_rename_table(num_levels: int) -> RenameTable:
    """CompVis autoencoder -> diffusers ``AutoencoderKL``. The decoder's ``up.N`` counts from the lowest
    resolution up, diffusers' ``up_blocks`` from the top down: ``up.N`` is ``up_blocks[num_levels - 1 - N]``."""
    table: list[tuple[str, str | None]] = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2"),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", r"encoder.down_blocks.\1.resnets.\2.\3"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
        (r"(encoder|decoder)\.mid\.block_1\.(.+)", r"\1.mid_block.resnets.0.\2"),
        (r"(encoder|decoder)\.mid\.block_2\.(.+)", r"\1.mid_block.resnets.1.\2"),
        (r"(encoder|decoder)\.mid\.attn_1\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2"),
        (r"(encoder|decoder)\.mid\.attn_1\.([qkv])\.(weight|bias)", r"\1.mid_block.attentions.0.to_\2.\3"),
        (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.(weight|bias)", r"\1.mid_block.attentions.0.to_out.0.\2"),
        # Training checkpoints may carry the LPIPS / discriminator loss; it is not part of the model.
        (r"loss\..+", None),
    ]
    for n in range(num_levels):
        table += [(rf"decoder\.up\.{n}\.block\.(\d+)\.(.+)", rf"decoder.up_blocks.{num_levels - 1 - n}.resnets.\1.\2"),
                  (rf"decoder\.up\.{n}\.upsample\.conv\.(weight|bias)",
                   rf"decoder.up_blocks.{num_levels - 1 - n}.upsamplers.0.conv.\1")]
    return tuple(table)


# SD 1.x: the transformers model is stored whole; only the buffer goes (and very old files lack ``text_model.``).
CLIP_RENAME: RenameTable = (
    (r"(text_model\.)?embeddings\.position_ids", None),
    (r"text_model\.(.+)", r"text_model.\1"),
    (r"(embeddings|encoder|final_layer_norm)\.(.+)", r"text_model.\1.\2"),
)


def open_clip_rename_table(num_blocks: int) -> RenameTable:
    """OpenCLIP text tower -> transformers ``CLIPTextModel`` without the last of ``num_blocks`` resblocks.

    ``in_proj`` (q, k, v stacked on the output axis) becomes ``self_attn.qkv_proj``, split afterwards."""
    layer = r"transformer\.resblocks\.(\d+)\."
    to = r"text_model.encoder.layers.\1."
    return (
        (rf"transformer\.resblocks\.{num_blocks - 1}\..+", None),  # SD 2.x never runs the last block
        (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
        (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
        (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
        (layer + r"ln_1\.(weight|bias)", to + r"layer_norm1.\2"),
        (layer + r"ln_2\.(weight|bias)", to + r"layer_norm2.\2"),
        (layer + r"mlp\.c_fc\.(weight|bias)", to + r"mlp.fc1.\2"),
        (layer + r"mlp\.c_proj\.(weight|bias)", to + r"mlp.fc2.\2"),
        (layer + r"attn\.out_proj\.(weight|bias)", to + r"self_attn.out_proj.\2"),
        (layer + r"attn\.in_proj_(weight|bias)", to + r"self_attn.qkv_proj.\2"),
        # The contrastive head and the image tower (kept by some exports); an SD pipeline uses neither.
        (r"text_projection|logit_scale|attn_mask|visual\..+", None),
    )


# ------------------------------------------------------------------------------------------------ helpers

def _rename_strict(state_dict: Mapping[str, np.ndarray], prefix: str, table: RenameTable, inner: RenameTable,
                   what: str) -> dict[str, np.ndarray]:
    """Keys under ``prefix`` renamed by ``table`` (every key must match a rule) then by ``inner`` (optional)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for pattern, replacement in table:
            m = re.fullmatch(pattern, rest)
            if m:
                break
        else:
            unknown.append(key)
            continue
        if replacement is None:
            continue
        new = apply_rename(m.expand(replacement), inner)
        if new in out:
            raise CheckpointError(f"{what}: two checkpoint keys map to {new} (second: {key})")
        out[new] = value
    if unknown:
        more = f" ... and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        raise CheckpointError(f"{what}: unrecognised checkpoint keys {', '.join(unknown[:6])}{more}")
    return out


def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}


def _shape(sd: Mapping[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{what}: checkpoint lacks {key}")
    return tuple(np.shape(sd[key]))


# --------------------------------------------------------------------------------------------------- U-Net

def _unet_layout(keys: list[str]) -> tuple[int, int]:
    """(levels, layers per block) from the flat CompVis block indices."""
    n_in = len(_indices(keys, r"input_blocks\.(\d+)\."))
    n_out = len(_indices(keys, r"output_blocks\.(\d+)\."))
    levels = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    per = n_in // levels
    if per < 2 or n_in != levels * per or n_out != n_in:
        raise CheckpointError(f"U-Net: unrecognised block layout ({n_in} input blocks, {n_out} output blocks, "
                              f"{levels - 1} downsamplers)")
    return levels, per - 1


def _convert_unet(sd: Mapping[str, np.ndarray], variant: str, prediction_type: str):
    keys = [k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX)]
    if any(k.startswith("label_emb.") for k in keys):
        raise CheckpointError("U-Net: class-conditioned U-Nets (label_emb: SD x4 upscaler, unCLIP, SDXL) are not "
                              "supported by the SD 1.x / 2.x single-file loader")
    levels, layers = _unet_layout(keys)
    unet = _rename_strict(sd, UNET_PREFIX, unet_rename_table(levels, layers), UNET_RESNET_RENAME, "U-Net")

    channels = [_shape(unet, f"down_blocks.{b}.resnets.0.conv1.weight", "U-Net")[0] for b in range(levels)]
    conv_in = _shape(unet, "conv_in.weight", "U-Net")
    has_attn_down = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in unet) for b in range(levels)]
    has_attn_up = [any(k.startswith(f"up_blocks.{b}.attentions.") for k in unet) for b in range(levels)]
    to_k = sorted(k for k in unet if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise CheckpointError("U-Net: no cross-attention layers (attn2.to_k); not a text-conditioned SD U-Net")
    cross_attention_dim = _shape(unet, to_k[0], "U-Net")[1]
    proj_in = sorted(k for k in unet if k.endswith(".proj_in.weight"))
    use_linear_projection = len(_shape(unet, proj_in[0], "U-Net")) == 2
    depth = []
    for b in range(levels):
        blocks = _indices(unet, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depth.append(len(blocks) or 1)
    if variant == "sd2":
        heads: Any = [max(c // _HEAD_DIM, 1) for c in channels]
    else:
        heads = 8
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if variant == "sd2" and prediction_type == "v_prediction" else 64,
        "in_channels": conv_in[1],
        "out_channels": _shape(unet, "conv_out.weight", "U-Net")[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn_down],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in has_attn_up],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "attention_head_dim": heads,
        "dual_cross_attention": False,
        "use_linear_projection": use_linear_projection,
        "class_embed_type": None,
        "num_class_embeds": None,
        "upcast_attention": variant == "sd2",
        "resnet_time_scale_shift": "default",
    }
    time_dim = _shape(unet, "time_embedding.linear_1.weight", "U-Net")[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    return config, unet


# ------------------------------------------------------------------------------------------------------ VAE

def _convert_vae(sd: Mapping[str, np.ndarray], latent_size: int):
    keys = [k[len(VAE_PREFIX):] for k in sd if k.startswith(VAE_PREFIX)]
    levels = len(_indices(keys, r"encoder\.down\.(\d+)\."))
    if levels == 0 or len(_indices(keys, r"decoder\.up\.(\d+)\.")) != levels:
        raise CheckpointError("VAE: unrecognised layout (encoder.down.N / decoder.up.N levels do not match)")
    vae = _rename_strict(sd, VAE_PREFIX, vae_rename_table(levels), VAE_RESNET_RENAME, "VAE")
    for key in list(vae):
        # The original attention projections are 1x1 convs; diffusers stores them as linear layers.
        if re.fullmatch(r".+\.mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight", key) and vae[key].ndim > 2:
            vae[key] = vae[key].reshape(vae[key].shape[:2])
    channels = [_shape(vae, f"encoder.down_blocks.{n}.resnets.0.conv1.weight", "VAE")[0] for n in range(levels)]
    layers = len(_indices(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    latent = _shape(vae, "decoder.conv_in.weight", "VAE")[1]
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(vae, "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(vae, "decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": latent_size * 2 ** (levels - 1),  # pixels
        "scaling_factor": VAE_SCALING_FACTOR,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in vae),
    }
    return config, vae


# ----------------------------------------------------------------------------------------------------- text

def _split_qkv(text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in text.items():
        if ".self_attn.qkv_proj." not in key:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise CheckpointError(f"text encoder: fused in_proj of shape {value.shape} does not split in three")
        d = value.shape[0] // 3
        for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[key.replace("qkv_proj", name)] = value[n * d:(n + 1) * d]
    return out


def _convert_text(sd: Mapping[str, np.ndarray], variant: str):
    if variant == "sd2":
        keys = [k[len(OPENCLIP_PREFIX):] for k in sd if k.startswith(OPENCLIP_PREFIX)]
        blocks = len(_indices(keys, r"transformer\.resblocks\.(\d+)\."))
        if blocks < 2:
            raise CheckpointError(f"text encoder: OpenCLIP tower with {blocks} blocks; SD 2.x needs at least two")
        text = _split_qkv(_rename_strict(sd, OPENCLIP_PREFIX, open_clip_rename_table(blocks), (), "text encoder"))
        proj = sd.get(OPENCLIP_PREFIX + "text_projection")
        act, dropped = "gelu", 1
    else:
        text = _rename_strict(sd, CLIP_PREFIX, CLIP_RENAME, (), "text encoder")
        proj, act, dropped = None, "quick_gelu", 0
    vocab, hidden = _shape(text, "text_model.embeddings.token_embedding.weight", "text encoder")
    layers = len(_indices(text, r"text_model\.encoder\.layers\.(\d+)\."))
    if hidden % _HEAD_DIM:
        raise CheckpointError(f"text encoder: hidden size {hidden} is not a multiple of the {_HEAD_DIM}-dim heads "
                              "CLIP uses")
    config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(text, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
        "projection_dim": int(np.shape(proj)[1]) if proj is not None and np.ndim(proj) == 2 else hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // _HEAD_DIM,
        "max_position_embeddings": _shape(text, "text_model.embeddings.position_embedding.weight",
                                          "text encoder")[0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # The ids of the SD text_encoder/config.json files; with eos_token_id 2 pooling takes the largest id,
        # which is the end token of the CLIP vocabulary.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    return config, text, dropped


# -------------------------------------------------------------------------------------------------- public

def scheduler_config_for(prediction_type: str) -> dict[str, Any]:
    """The DDPM schedule SD 1.x / 2.x were trained with, as a diffusers ``DDIMScheduler`` config."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def detect_variant(state_dict: Mapping[str, Any]) -> str:
    """'sd1' (HF CLIP text under cond_stage_model.transformer) or 'sd2' (OpenCLIP under cond_stage_model.model)."""
    keys = list(state_dict)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError("this is an SDXL-style single file (conditioner.embedders.*); only SD 1.x / 2.x "
                              "single files are supported")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"not an original Stable Diffusion checkpoint: no U-Net weights ({UNET_PREFIX}*)")
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd1"
    raise CheckpointError("not a full Stable Diffusion checkpoint: no text encoder weights "
                          f"({CLIP_PREFIX}* or {OPENCLIP_PREFIX}*)")


def _global_step_of(state_dict: Mapping[str, Any], global_step: int | None) -> int | None:
    if global_step is not None:
        return int(global_step)
    value = state_dict.get("global_step")
    if value is None:
        return None
    try:
        return int(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return None


def split_original_checkpoint(state_dict: Mapping[str, Any], *, prediction_type: str | None = None,
                              global_step: int | None = None) -> SingleFileComponents:
    """Splits an original SD 1.x / 2.x state dict into diffusers / transformers components.

    ``state_dict``: flat key -> array (numpy or anything ``np.shape`` understands; arrays are not copied except
    where reshaped). ``prediction_type`` overrides the guess (see the module docstring); ``global_step`` is the
    Lightning training step when the caller read it from outside the state dict.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    variant = detect_variant(state_dict)
    if not any(k.startswith(VAE_PREFIX) for k in state_dict):
        raise CheckpointError(f"not a full Stable Diffusion checkpoint: no VAE weights ({VAE_PREFIX}*)")
    step = _global_step_of(state_dict, global_step)
    if prediction_type is None:
        if variant == "sd2":
            prediction_type = "epsilon" if step == SD2_BASE_GLOBAL_STEP else "v_prediction"
        else:
            prediction_type = "epsilon"
    unet_config, unet = _convert_unet(state_dict, variant, prediction_type)
    vae_config, vae = _convert_vae(state_dict, unet_config["sample_size"])
    text_config, text, dropped = _convert_text(state_dict, variant)
    if text_config["hidden_size"] != unet_config["cross_attention_dim"]:
        raise CheckpointError(f"text encoder width {text_config['hidden_size']} does not match the U-Net's "
                              f"cross_attention_dim {unet_config['cross_attention_dim']}")
    return SingleFileComponents(
        variant=variant, unet_config=unet_config, unet_state_dict=unet, vae_config=vae_config, vae_state_dict=vae,
        text_config=text_config, text_state_dict=text, scheduler_config=scheduler_config_for(prediction_type),
        clip_skip=0, text_layers_dropped=dropped, global_step=step)


def read_original_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False
                             ) -> tuple[dict[str, np.ndarray], int | None]:
    """(state dict, global_step or None) of a ``.safetensors`` file, or of a pickle when ``allow_pickle``."""
    from vldm_jax.checkpoints.load import PICKLE_SUFFIXES, read_pickle_with_step, read_weights

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and allow_pickle and path.is_file():
        return read_pickle_with_step(path, allow_pickle=True)
    return read_weights(path, allow_pickle=allow_pickle), None  # refuses pickles, names missing files


def load_single_file(path: str | os.PathLike, *, allow_pickle: bool = False,
                     prediction_type: str | None = None) -> SingleFileComponents:
    """Reads an original SD 1.x / 2.x checkpoint (``.safetensors``; ``.ckpt`` only with ``allow_pickle``) and
    splits it (see :func:`split_original_checkpoint`). Weights stay memory-mapped for safetensors."""
    state_dict, step = read_original_checkpoint(path, allow_pickle=allow_pickle)
    try:
        return split_original_checkpoint(state_dict, prediction_type=prediction_type, global_step=step)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def build_single_file_models(components: SingleFileComponents, *, dtype=None, param_dtype=None) -> dict[str, Any]:
    """NNX ``unet``, ``vae`` and ``text_encoder`` built from split components (compute ``dtype``, default f32)."""
    import jax.numpy as jnp

    from vldm_jax.checkpoints.load import build_from_state_dict

    dtype = jnp.float32 if dtype is None else dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    return {
        "unet": build_from_state_dict("UNet2DConditionModel", components.unet_config, components.unet_state_dict,
                                      name="single-file U-Net", **kw),
        "vae": build_from_state_dict("AutoencoderKL", components.vae_config, components.vae_state_dict,
                                     name="single-file VAE", **kw),
        "text_encoder": build_from_state_dict("CLIPTextModel", components.text_config, components.text_state_dict,
                                              name="single-file text encoder", **kw),
    }
