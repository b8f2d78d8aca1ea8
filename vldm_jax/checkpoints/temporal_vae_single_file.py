"""Stability single-file temporal VAEs (``sgm`` ``VideoDecoder`` naming) -> diffusers
``AutoencoderKLTemporalDecoder`` names, then our model.

Three layouts are recognised:

* a bare temporal VAE: ``encoder.*``, ``decoder.*``, ``quant_conv.*`` (``post_quant_conv.*`` when present);
* a full SVD checkpoint: the decoder under ``first_stage_model.decoder.``, the encoder and ``quant_conv`` under
  ``conditioner.embedders.3.encoder.`` (SVD's first stage has no ``quant_conv``; its conditioning encoder,
  which holds the same encoder weights, has one). Every other key (U-Net, image encoder...) is ignored;
* everything under ``first_stage_model.`` (a temporal VAE inside another full checkpoint).

Key names (``sgm.modules.autoencoding.temporal_ae``): the decoder's ``up.N`` counts from the lowest
resolution, diffusers' ``up_blocks`` from the top; a ``VideoResBlock`` is the 2D ``ResnetBlock``
(``norm1, conv1, norm2, conv2, nin_shortcut``) plus ``time_stack`` (an openaimodel ``ResBlock`` with
``in_layers.{0,2}`` / ``out_layers.{0,3}`` = norm1, conv1 / norm2, conv2) and ``mix_factor``; ``conv_out`` is an
``AE3DConv`` whose ``time_mix_conv`` is diffusers' ``decoder.time_conv_out``; the mid attention is
``mid.attn_1.{norm, q, k, v, proj_out}`` stored as 1x1 convs.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from vldm_jax.checkpoints.convert import RenameTable
from vldm_jax.checkpoints.single_file import (
    VAE_RESNET_RENAME,
    VAE_SCALING_FACTOR,
    _indices,
    _rename_strict,
    _shape,
    time_stack_rename,
    vae_rename_table,
)
from vldm_jax.errors import CheckpointError

SVD_DECODER_PREFIX = "first_stage_model."
SVD_ENCODER_PREFIX = "conditioner.embedders.3.encoder."
SVD_SAMPLE_SIZE = 768  # pixels; not stored in the weights (diffusers' SVD vae/config.json)

_DECODER_RESNET = r"(decoder\.(?:up_blocks\.\d+|mid_block)\.resnets\.\d+)\."

# Applied after the level table: the decoder's residual blocks split into their spatial and temporal halves.
TEMPORAL_RESNET_RENAME: RenameTable = (
    *time_stack_rename(_DECODER_RESNET, with_embedding=False),
    (_DECODER_RESNET + r"mix_factor", r"\1.time_mixer.mix_factor"),
    (_DECODER_RESNET + r"nin_shortcut\.(weight|bias)", r"\1.spatial_res_block.conv_shortcut.\2"),
    (_DECODER_RESNET + r"(norm1|norm2|conv1|conv2)\.(weight|bias)", r"\1.spatial_res_block.\2.\3"),
    *VAE_RESNET_RENAME,  # the encoder's blocks
)


def temporal_vae_rename_table(num_levels: int, mid_layers: int) -> RenameTable:
    """sgm temporal VAE -> diffusers ``AutoencoderKLTemporalDecoder`` (before :data:`TEMPORAL_RESNET_RENAME`)."""
    table: list[tuple[str, str | None]] = [
        (r"decoder\.conv_out\.time_mix_conv\.(weight|bias)", r"decoder.time_conv_out.\1"),
    ]
    # sgm numbers the mid resnets block_1, block_2, ...; the image table covers the first two.
    table += [(rf"decoder\.mid\.block_{i + 1}\.(.+)", rf"decoder.mid_block.resnets.{i}.\1")
              for i in range(2, mid_layers)]
    return tuple(table) + tuple(vae_rename_table(num_levels))


def _select(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The temporal VAE's keys without their prefix (see the module docstring for the layouts)."""
    keys = list(state_dict)
    svd = (any(k.startswith(SVD_ENCODER_PREFIX + "encoder.") for k in keys)
           and any(k.startswith(SVD_DECODER_PREFIX + "decoder.") for k in keys))
    if svd:
        out = {k[len(SVD_DECODER_PREFIX):]: v for k, v in state_dict.items()
               if k.startswith(SVD_DECODER_PREFIX + "decoder.")}
        out.update({k[len(SVD_ENCODER_PREFIX):]: v for k, v in state_dict.items()
                    if k.startswith((SVD_ENCODER_PREFIX + "encoder.", SVD_ENCODER_PREFIX + "quant_conv."))})
        return out
    if any(k.startswith(SVD_DECODER_PREFIX + "decoder.") for k in keys):
        return {k[len(SVD_DECODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SVD_DECODER_PREFIX)}
    return dict(state_dict)


def split_temporal_vae_single_file(state_dict: Mapping[str, Any], *, sample_size: int = SVD_SAMPLE_SIZE
                                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(diffusers ``config.json`` dict, diffusers-named state dict) of a single-file temporal VAE.

    Arrays keep the file's dtype and torch layout; the attention's 1x1-conv weights become linear weights,
    as diffusers stores them. Sizes are read from tensor shapes.
    """
    sd = _select(state_dict)
    if not any(".time_stack." in k for k in sd) or "decoder.conv_out.time_mix_conv.weight" not in sd:
        raise CheckpointError("temporal VAE: no temporal decoder found (expected decoder.up.N.block.M.time_stack.* "
                              "and decoder.conv_out.time_mix_conv.*)")
    levels = len(_indices(sd, r"encoder\.down\.(\d+)\."))
    if levels == 0 or len(_indices(sd, r"decoder\.up\.(\d+)\.")) != levels:
        raise CheckpointError("temporal VAE: unrecognised layout (encoder.down.N / decoder.up.N levels do not match)")
    mid_layers = len(_indices(sd, r"decoder\.mid\.block_(\d+)\."))
    table = temporal_vae_rename_table(levels, mid_layers)
    vae = _rename_strict(sd, "", table, TEMPORAL_RESNET_RENAME, "temporal VAE")
    for key in list(vae):
        if re.fullmatch(r".+\.mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight", key) and vae[key].ndim > 2:
            vae[key] = vae[key].reshape(vae[key].shape[:2])
    channels = [_shape(vae, f"encoder.down_blocks.{n}.resnets.0.conv1.weight", "temporal VAE")[0]
                for n in range(levels)]
    layers = len(_indices(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKLTemporalDecoder",
        "in_channels": _shape(vae, "encoder.conv_in.weight", "temporal VAE")[1],
        "out_channels": _shape(vae, "decoder.conv_out.weight", "temporal VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": _shape(vae, "decoder.conv_in.weight", "temporal VAE")[1],
        "sample_size": sample_size,
        "scaling_factor": VAE_SCALING_FACTOR,
        "force_upcast": True,
    }
    # Our extra fields, only where the file departs from the diffusers architecture.
    if "quant_conv.weight" not in vae:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" in vae:
        config["use_post_quant_conv"] = True
    if not any(".mid_block.attentions." in k for k in vae):
        config["mid_block_add_attention"] = False
    if mid_layers != layers:
        config["mid_block_num_layers"] = mid_layers
    return config, vae


def load_temporal_vae_single_file(source: str | os.PathLike | Mapping[str, Any], *, allow_pickle: bool = False,
                                  dtype=None, param_dtype=None, sample_size: int = SVD_SAMPLE_SIZE):
    """A single-file temporal VAE (a path to ``.safetensors`` / allowed pickle, or a loaded state dict) ->
    :class:`vldm_jax.models.autoencoder.AutoencoderKLTemporalDecoder` with its weights."""
    import jax.numpy as jnp

    from vldm_jax.checkpoints.load import build_from_state_dict, read_weights

    state_dict = source if isinstance(source, Mapping) else read_weights(source, allow_pickle=allow_pickle)
    config, vae = split_temporal_vae_single_file(state_dict, sample_size=sample_size)
    return build_from_state_dict("AutoencoderKLTemporalDecoder", config, vae, dtype=dtype or jnp.float32,
                                 param_dtype=param_dtype, name="single-file temporal VAE")
