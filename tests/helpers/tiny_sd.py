"""Tiny random Stable Diffusion 1.x / 2.x components in diffusers/transformers, and their original single-file form.

Used by the single-file loader tests and by the pipeline tests:

* :func:`make_tiny_sd_components` -> dict of torch ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.
* :func:`make_tiny_sd_pipeline_folder` -> a ``StableDiffusionPipeline.save_pretrained`` folder.
* :func:`original_state_dict` / :func:`write_original_single_file` -> the same weights under CompVis /
  Stability key names (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), written as
  ``.safetensors`` (or a ``.ckpt`` pickle).

The diffusers -> original mapping here is written independently of ``vldm_jax.checkpoints.single_file`` (plain
string surgery, no shared tables) and the tests check it against diffusers' own converters.

Shapes follow the SD conventions the loader infers from: SD1 text is a transformers CLIP (quick_gelu), U-Net with
8 heads per block and 1x1-conv ``proj_in``; SD2 text is OpenCLIP (gelu) with 64-dim heads, U-Net with 64-dim heads
(``attention_head_dim = channels // 64``), linear ``proj_in`` and ``upcast_attention``. The text encoder keeps the
full 49408-token CLIP vocabulary (by default) so that the bundled tokenizer's ids fit, and the saved ``tokenizer/``
holds that vocabulary: a pipeline loaded from the single file and one loaded from the folder see the same ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

SD1_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
    cross_attention_dim=128, attention_head_dim=(1, 2), norm_num_groups=32, use_linear_projection=True,
    upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
    norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)
FULL_VOCAB_SIZE = 49408
TINY_MERGES = ("t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "p h", "o t", "ph ot", "phot o</w>")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."


def _perturb(model, seed):
    """Zero biases and unit norm scales would hide swapped keys; perturb every parameter."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def prediction_type_of(variant: str) -> str:
    return "v_prediction" if variant == "sd2" else "epsilon"


def tiny_unet(variant: str = "sd1", seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _perturb(diffusers.UNet2DConditionModel(**(SD2_UNET if variant == "sd2" else SD1_UNET)), seed)


def tiny_vae(seed: int = 0):
    import diffusers

    torch.manual_seed(seed + 1)
    return _perturb(diffusers.AutoencoderKL(**VAE), seed + 1)


def tiny_text_encoder(variant: str = "sd1", seed: int = 0, vocab_size: int = FULL_VOCAB_SIZE):
    """transformers CLIPTextModel. For SD2 this is diffusers' form of OpenCLIP: the last layer already dropped."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    config = CLIPTextConfig(**TEXT, vocab_size=vocab_size, projection_dim=TEXT["hidden_size"],
                            hidden_act="gelu" if variant == "sd2" else "quick_gelu")
    return _perturb(CLIPTextModel(config), seed + 2)


def tiny_scheduler(variant: str = "sd1"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type_of(variant))


def _bytes_chars() -> list[str]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def write_tokenizer_files(folder, *, full_vocab: bool = True) -> int:
    """Writes ``vocab.json`` + ``merges.txt`` (CLIP BPE format) into ``folder``; returns the vocabulary size.

    ``full_vocab``: the standard 49408-token CLIP vocabulary (from the bundled merge list); otherwise a
    520-token one (bytes, a few merges, the two special tokens last as in CLIP)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if full_vocab:
        from vldm_jax.models.tokenizer import bundled_vocab_and_merges

        vocab, merges = bundled_vocab_and_merges()
    else:
        chars = _bytes_chars()
        merges = TINY_MERGES
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {t: i for i, t in enumerate(tokens)}
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_tokenizer(folder, variant: str = "sd1", *, full_vocab: bool = True):
    """A transformers CLIPTokenizer read from vocab files written into ``folder`` (SD2 pads with "!")."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, full_vocab=full_vocab)
    pad = "!" if variant == "sd2" else "<|endoftext|>"
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad)


def make_tiny_sd_components(variant: str = "sd1", seed: int = 0, *, tokenizer_dir=None,
                            full_vocab: bool = True) -> dict[str, Any]:
    """Tiny diffusers SD components: ``unet``, ``vae``, ``text_encoder``, ``scheduler`` (and ``tokenizer`` when
    ``tokenizer_dir`` is given: the vocabulary files are written there)."""
    if variant not in ("sd1", "sd2"):
        raise ValueError(f"variant must be 'sd1' or 'sd2', got {variant!r}")
    vocab_size = FULL_VOCAB_SIZE if full_vocab else 520
    out = dict(unet=tiny_unet(variant, seed), vae=tiny_vae(seed),
               text_encoder=tiny_text_encoder(variant, seed, vocab_size), scheduler=tiny_scheduler(variant))
    if tokenizer_dir is not None:
        out["tokenizer"] = tiny_tokenizer(tokenizer_dir, variant, full_vocab=full_vocab)
        assert len(out["tokenizer"]) == vocab_size
    return out


def make_tiny_sd_pipeline(tmp_path, variant: str = "sd1", seed: int = 0, *, full_vocab: bool = True):
    from diffusers import StableDiffusionPipeline

    c = make_tiny_sd_components(variant, seed, tokenizer_dir=Path(tmp_path) / f"_tokenizer_src_{variant}",
                                full_vocab=full_vocab)
    return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_tiny_sd_pipeline_folder(tmp_path, variant: str = "sd1", seed: int = 0, *, full_vocab: bool = True,
                                 name: str | None = None) -> Path:
    """A ``StableDiffusionPipeline.save_pretrained`` folder (safetensors) with tiny random components.

    ``tokenizer/`` holds ``vocab.json`` + ``merges.txt`` as well as transformers' ``tokenizer.json``."""
    folder = Path(tmp_path) / (name or f"tiny_{variant}_pipeline")
    pipe = make_tiny_sd_pipeline(tmp_path, variant, seed, full_vocab=full_vocab)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer", full_vocab=full_vocab)
    return folder


# ------------------------------------------------------------------------------ diffusers -> original keys

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_to_original(rest: str) -> str:
    head, leaf = rest.rsplit(".", 1)
    return f"{_UNET_RESNET[head]}.{leaf}"


def unet_to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> CompVis ``openaimodel.UNetModel`` keys (no prefix)."""
    per_level = config["layers_per_block"] + 1
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for top, orig in _UNET_TOP.items():
            if key.startswith(top + "."):
                new = orig + key[len(top):]
        if new is None and parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w
                new = f"input_blocks.{1 + b * per_level + per_level - 1}.0.op.{parts[-1]}"
            else:
                idx = 1 + b * per_level + int(parts[3])
                rest = ".".join(parts[4:])
                new = (f"input_blocks.{idx}.0.{_resnet_to_original(rest)}" if kind == "resnets"
                       else f"input_blocks.{idx}.1.{rest}")
        elif new is None and parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}.{_resnet_to_original(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # sits after the block's last resnet (and its attention, if any)
                slot = 2 if up_has_attn[b] else 1
                new = f"output_blocks.{b * per_level + per_level - 1}.{slot}.conv.{parts[-1]}"
            else:
                idx = b * per_level + int(parts[3])
                rest = ".".join(parts[4:])
                new = (f"output_blocks.{idx}.0.{_resnet_to_original(rest)}" if kind == "resnets"
                       else f"output_blocks.{idx}.1.{rest}")
        if new is None:
            raise KeyError(f"no original name for U-Net key {key}")
        out[new] = value
    return out


def vae_to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> CompVis ``AutoencoderKL`` keys (no prefix); attention linears become 1x1
    convs as in the original files, and the decoder's levels are numbered from the bottom."""
    n = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        rest = ".".join(parts[1:])
        if parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            name, level = ("down", level) if parts[1] == "down_blocks" else ("up", n - 1 - level)
            if parts[3] in ("downsamplers", "upsamplers"):
                new = f"{side}.{name}.{level}.{name}sample.conv.{parts[-1]}"
            else:
                sub = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{level}.block.{parts[4]}.{sub}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            sub = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{sub}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            sub, leaf = ".".join(parts[4:-1]), parts[-1]
            new = f"{side}.mid.attn_1.{_VAE_ATTN[sub]}.{leaf}"
            if sub != "group_norm" and leaf == "weight":
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no original name for VAE key {key} ({rest})")
        out[new] = value
    return out


def text_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights under the ``text_model.`` names every saved SD/HF file uses
    (transformers >= 5.6 flattened the module and dropped that prefix from ``state_dict()``)."""
    sd = text_encoder.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def clip_to_original(text_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1: the HF CLIP text model sits under ``cond_stage_model.transformer.`` unchanged (with its buffer)."""
    out = {CLIP_PREFIX + k: v for k, v in text_sd.items()}
    n_pos = text_sd["text_model.embeddings.position_embedding.weight"].shape[0]
    out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    return out


def open_clip_to_original(text_sd: Mapping[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """SD2: diffusers' N-layer CLIPTextModel -> OpenCLIP text tower with N + 1 resblocks (the last one, which SD2
    never runs, is random), fused ``in_proj`` q/k/v, ``text_projection`` (width, embed) and ``logit_scale``."""
    g = torch.Generator().manual_seed(seed + 7)
    p = OPENCLIP_PREFIX
    out = {
        p + "token_embedding.weight": text_sd["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": text_sd["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": text_sd["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": text_sd["text_model.final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[3]) for k in text_sd if k.startswith("text_model.encoder.layers.")})
    width = out[p + "ln_final.weight"].shape[0]
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [text_sd[src + f"self_attn.{q}_proj.{leaf}"] for q in ("q", "k", "v")], dim=0)
            for a, b in rename.items():
                out[dst + f"{b}.{leaf}"] = text_sd[src + f"{a}.{leaf}"]
    # The extra last layer: same shapes as layer 0.
    last = len(layers)
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        rnd = 0.05 * torch.randn(out[k].shape, generator=g)
        out[k.replace("resblocks.0.", f"resblocks.{last}.")] = rnd + (1.0 if ".ln_" in k and k.endswith("weight")
                                                                     else 0.0)
    out[p + "text_projection"] = 0.05 * torch.randn((width, width), generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def _components_of(pipe_or_components) -> dict[str, Any]:
    if isinstance(pipe_or_components, Mapping):
        return dict(pipe_or_components)
    if isinstance(pipe_or_components, (str, os.PathLike)):
        from diffusers import StableDiffusionPipeline

        pipe_or_components = StableDiffusionPipeline.from_pretrained(str(pipe_or_components), safety_checker=None)
    return {"unet": pipe_or_components.unet, "vae": pipe_or_components.vae,
            "text_encoder": pipe_or_components.text_encoder}


def original_state_dict(pipe_or_components, variant: str = "sd1", *, seed: int = 0,
                        global_step: int | None = None) -> dict[str, torch.Tensor]:
    """The components (dict, StableDiffusionPipeline or its folder) as one original-format state dict."""
    c = _components_of(pipe_or_components)
    unet, vae = c["unet"], c["vae"]
    sd = {UNET_PREFIX + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()})
    text = text_state_dict(c["text_encoder"])
    sd.update(open_clip_to_original(text, seed=seed) if variant == "sd2" else clip_to_original(text))
    if global_step is not None:
        sd["global_step"] = torch.tensor(global_step)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_original_single_file(pipe_or_components, path, variant: str = "sd1", *, seed: int = 0,
                               global_step: int | None = None, dtype=None) -> Path:
    """Writes the original-format checkpoint to ``path``: ``.safetensors``, or ``.ckpt`` as a Lightning-style
    pickle ``{"global_step": ..., "state_dict": ...}``. ``dtype`` (e.g. torch.float16) casts float tensors."""
    path = Path(path)
    sd = original_state_dict(pipe_or_components, variant, seed=seed,
                             global_step=global_step if path.suffix == ".safetensors" else None)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"global_step": global_step, "state_dict": sd}, str(path))
    return path
