"""Tiny random AnimateDiff motion adapters (diffusers ``MotionAdapter``) for the tiny SD 1.x U-Net of
:mod:`tests.helpers.tiny_sd`, saved with ``save_pretrained``, and diffusers' AnimateDiff pipeline over them.

Two adapter configs: ``v1`` (no mid-block module, window 32, 8 heads) and ``v2`` (a mid-block module, window 24,
4 heads, two transformer layers per down-block module)."""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTERS = {
    "v1": dict(block_out_channels=(32, 32, 64), motion_layers_per_block=1, motion_num_attention_heads=8,
               motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False),
    "v2": dict(block_out_channels=(32, 32, 64), motion_layers_per_block=1, motion_num_attention_heads=4,
               motion_norm_num_groups=32, motion_max_seq_length=24, use_motion_mid_block=True,
               motion_transformer_layers_per_block=2),
}


def tiny_adapter(name: str, seed: int = 0):
    from diffusers import MotionAdapter

    torch.manual_seed(seed + 7)
    adapter = MotionAdapter(**ADAPTERS[name])
    g = torch.Generator().manual_seed(seed + 70)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but perturb so swapped keys show
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return adapter.eval()


def make_adapter_folder(tmp_path, name: str, seed: int = 0) -> Path:
    folder = Path(tmp_path) / f"adapter_{name}"
    tiny_adapter(name, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def diffusers_animatediff(sd_folder, adapter_folder, scheduler=None):
    """diffusers ``AnimateDiffPipeline`` from a saved SD folder and a saved MotionAdapter folder (float32, CPU)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter.from_pretrained(adapter_folder)
    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    pipe = AnimateDiffPipeline.from_pretrained(sd_folder, motion_adapter=adapter, safety_checker=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_to_original(state_dict, max_seq_length: int):
    """diffusers MotionAdapter keys -> the original AnimateDiff layout (``mm_sd_v15*``), by inverting the renames
    of diffusers' ``convert_animatediff_checkpoint_to_diffusers`` (plain string surgery, independent of
    ``vldm_jax.checkpoints.animatediff``). The original files store the sinusoidal table under both attentions."""
    import math
    import re

    out = {}
    for key, value in state_dict.items():
        if key.endswith(".pos_embed.pe"):
            continue
        head, rest = re.fullmatch(r"(.*?motion_modules\.\d+)\.(.*)", key).groups()
        for new, old in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                         (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1.")):
            rest = ("." + rest).replace(new, old)[1:]
        out[f"{head}.temporal_transformer.{rest}"] = value.clone()
        m = re.fullmatch(r"(transformer_blocks\.\d+)\.norms\.0\.weight", rest)
        if m:
            dim = value.shape[0]
            pos = torch.arange(max_seq_length).unsqueeze(1)
            div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
            pe = torch.zeros(1, max_seq_length, dim)
            pe[0, :, 0::2] = torch.sin(pos * div)
            pe[0, :, 1::2] = torch.cos(pos * div)
            for i in (0, 1):
                out[f"{head}.temporal_transformer.{m.group(1)}.attention_blocks.{i}.pos_encoder.pe"] = pe.clone()
    return out
