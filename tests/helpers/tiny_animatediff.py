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


def _ldm_name(path: str) -> str:
    """diffusers module path of the tiny SD1 U-Net (3 levels, 1 layer per block) -> kohya's LDM-layout name,
    by ``tests.helpers.tiny_sd.unet_to_original`` (independent of vldm_jax's tables)."""
    from tests.helpers.tiny_sd import SD1_UNET, unet_to_original

    (key,) = unet_to_original({path + ".weight": torch.zeros(1)}, SD1_UNET)
    return "lora_unet_" + key[: -len(".weight")].replace(".", "_")


def image_lora(unet, text_encoder, rank: int = 4, seed: int = 0, layout: str = "kohya"):
    """A random SD image LoRA on some attention, projection and feed-forward layers of the U-Net and the text
    encoder: ``kohya`` (``lora_unet_down_blocks_*``, ``lora_te_*``, ``alpha``), ``kohya_ldm`` (the U-Net names in the
    original LDM layout, ``lora_unet_input_blocks_*``) or ``peft`` (``unet.*.lora_A.weight``, no alpha)."""
    g = torch.Generator().manual_seed(seed + 11)
    sd = unet.state_dict()
    targets = [k[: -len(".weight")] for k in sd if k.endswith(".weight") and re_match(k) and "motion_modules" not in k]
    text = [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "out_proj")]
    text_sd = {("text_model." + k if not k.startswith("text_model.") else k): v  # transformers 5 drops the prefix
               for k, v in text_encoder.state_dict().items()}
    out = {}
    for comp, names, weights in (("unet", targets, sd), ("text_encoder", text, text_sd)):
        for name in names:
            w = weights[name + ".weight"]
            down = 0.1 * torch.randn((rank, *w.shape[1:]), generator=g)
            up = 0.1 * torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=g)
            if layout.startswith("kohya"):
                prefix = ("lora_te_" + name.replace(".", "_") if comp != "unet" else
                          _ldm_name(name) if layout == "kohya_ldm" else "lora_unet_" + name.replace(".", "_"))
                out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = down, up
                out[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2)
            else:
                out[f"{comp}.{name}.lora_A.weight"], out[f"{comp}.{name}.lora_B.weight"] = down, up
    return out


def re_match(key: str) -> bool:
    import re

    return bool(re.search(r"(attn1\.to_q|attn2\.to_k|attn2\.to_out\.0|ff\.net\.2|proj_in)\.weight$", key))


def motion_lora(adapter, rank: int = 4, seed: int = 0, original: bool = False):
    """A random motion LoRA on every motion-module attention projection: PEFT (``unet.<...>.lora_A.weight``) or the
    original AnimateDiff layout (``<...>.temporal_transformer...attention_blocks.N.processor.to_q_lora.down``)."""
    g = torch.Generator().manual_seed(seed + 13)
    out = {}
    for key, w in adapter.state_dict().items():
        m = __import__("re").fullmatch(r"(.*motion_modules\.\d+)\.(transformer_blocks\.\d+)\.(attn[12])\."
                                       r"(to_q|to_k|to_v|to_out\.0)\.weight", key)
        if not m:
            continue
        down = 0.1 * torch.randn((rank, w.shape[1]), generator=g)
        up = 0.1 * torch.randn((w.shape[0], rank), generator=g)
        if original:
            attn = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1"}[m.group(3)]
            proj = m.group(4).replace(".0", "")
            head = f"{m.group(1)}.temporal_transformer.{m.group(2)}.{attn}.processor.{proj}_lora"
            out[f"{head}.down.weight"], out[f"{head}.up.weight"] = down, up
        else:
            name = f"unet.{key[: -len('.weight')]}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
    return out
