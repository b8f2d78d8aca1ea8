"""Tiny Stable Video Diffusion pipelines for tests: diffusers components with random weights, the reference
run, and the Stability (sgm) single-file layout of their weights.

The sgm key names are written from the sgm module names (``VideoUNet``, ``SpatialVideoTransformer``, OpenCLIP's
``VisionTransformer``, ``VideoDecoder``), independently of the loader's tables.
"""

from __future__ import annotations

import re

import diffusers
import numpy as np
import torch
import transformers
from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd_module
from PIL import Image

from vldm_jax.checkpoints.svd_single_file import SVD_SCHEDULER_CONFIG
from vldm_jax.pipelines.image_to_video import ImageToVideoPipeline

# Two tiny SVDs. Channels are multiples of 32 (SVD hard-codes 32 GroupNorm groups). "a" follows the conventions a
# single file cannot store (64-wide U-Net heads, 16 OpenCLIP heads, diffusers' SVD sample sizes), so its folder
# and its original single-file layout build the same models. The CLIP tower takes 224 px: diffusers resizes to
# 224 whatever the encoder's size.
CONFIGS = {
    "a": dict(
        unet=dict(sample_size=96, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  cross_attention_dim=24, num_attention_heads=(1, 1), addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24, num_frames=3,
                  down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                  up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
        vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                 latent_channels=4, sample_size=768),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16, image_size=224,
                  patch_size=32, projection_dim=24, hidden_act="gelu"),
    ),
    "b": dict(
        unet=dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  cross_attention_dim=16, num_attention_heads=(2, 4), addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=12, num_frames=4,
                  down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
                  up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
        vae=dict(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3, layers_per_block=1,
                 latent_channels=4, sample_size=32),
        clip=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                  patch_size=56, projection_dim=16, hidden_act="quick_gelu"),
    ),
}


def _perturb(module, seed):
    # Zero-initialised output layers and unit norms would hide mapping mistakes.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_reference(name, seed=0):
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    unet = diffusers.UNetSpatioTemporalConditionModel(**cfg["unet"]).eval()
    vae = diffusers.AutoencoderKLTemporalDecoder(**cfg["vae"]).eval()
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg["clip"])).eval()
    for i, m in enumerate((unet, vae, clip)):
        _perturb(m, seed + i)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    fe = transformers.CLIPImageProcessor(crop_size=224, size=224)
    return diffusers.StableVideoDiffusionPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=scheduler,
                                                  feature_extractor=fe)


class Case:
    """The diffusers pipeline of config ``name``, saved with save_pretrained to ``folder`` and loaded by us."""

    def __init__(self, name, folder):
        self.name = name
        self.ref = build_reference(name)
        self.ref.set_progress_bar_config(disable=True)
        self.ref.save_pretrained(folder, safe_serialization=True)
        self.folder = folder
        self.pipe = ImageToVideoPipeline.from_pretrained(folder)


def make_image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    # smooth colours plus noise, so resizing has something to do
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 9.0)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def run_reference(case, image, *, b=1, f, height, width, steps, latents, noise_aug=0.0, image_noise=None,
                  min_g=1.0, max_g=3.0, chunk=None, monkeypatch=None):
    if image_noise is not None:  # the only randn_tensor call when latents are given: the image's noise
        monkeypatch.setattr(svd_module, "randn_tensor",
                            lambda shape, **kw: torch.from_numpy(image_noise.transpose(0, 3, 1, 2)).reshape(shape))
    with torch.no_grad():
        pil = Image.fromarray(image)
        out = case.ref([pil] * b if b > 1 else pil, height=height, width=width, num_frames=f, num_inference_steps=steps,
                       min_guidance_scale=min_g, max_guidance_scale=max_g, fps=7, motion_bucket_id=100,
                       noise_aug_strength=noise_aug, decode_chunk_size=chunk, output_type="np",
                       latents=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3)), generator=torch.manual_seed(0))
    return np.asarray(out.frames, np.float32)


def compare_with_diffusers(case, *, b, f, height, width, steps, guidance, chunk, image_seed=5, latent_seed=7,
                           pipe=None):
    """(ours, diffusers') frames ``(B, F, H, W, 3)`` of one image animated from the same initial latents, with
    ``noise_aug_strength=0`` (so no random draw differs)."""
    image = make_image(44, 60, seed=image_seed)
    pipe = pipe or case.pipe
    s = pipe.vae_scale_factor
    latents = np.random.default_rng(latent_seed).standard_normal((b, f, height // s, width // s, 4)).astype(np.float32)
    ref = run_reference(case, image, b=b, f=f, height=height, width=width, steps=steps, latents=latents,
                        min_g=guidance[0], max_g=guidance[1], chunk=chunk)
    ours = pipe([image] * b if b > 1 else image, height=height, width=width, num_frames=f,
                num_inference_steps=steps, min_guidance_scale=guidance[0], max_guidance_scale=guidance[1], fps=7,
                motion_bucket_id=100, noise_aug_strength=0.0, decode_chunk_size=chunk, latents=latents)
    return ours, ref


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet_key(rest):
    """diffusers SpatioTemporalResBlock suffix -> sgm VideoResBlock suffix."""
    if rest.startswith("time_mixer."):
        return rest
    m = re.fullmatch(r"(spatial|temporal)_res_block\.(\w+)\.(weight|bias)", rest)
    prefix = "time_stack." if m[1] == "temporal" else ""
    return f"{prefix}{_RESNET[m[2]]}.{m[3]}"


def _attention_key(rest):
    rest = re.sub(r"^temporal_transformer_blocks\.", "time_stack.", rest)
    rest = rest.replace("time_pos_embed.linear_1.", "time_pos_embed.0.").replace("time_pos_embed.linear_2.",
                                                                               "time_pos_embed.2.")
    return rest


def unet_to_sgm(sd, config):
    """diffusers UNetSpatioTemporalConditionModel keys -> sgm VideoUNet keys (written from the sgm module names,
    independently of the loader's tables)."""
    per = config["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        head = ".".join(p[:2])
        if head in top or p[0] in top:
            t = head if head in top else p[0]
            new = top[t] + key[len(t):]
        elif p[0] == "down_blocks":
            blk = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{1 + blk * per + per - 1}.0.op.{p[-1]}"
            else:
                idx, rest = 1 + blk * per + int(p[3]), ".".join(p[4:])
                new = (f"input_blocks.{idx}.0.{_resnet_key(rest)}" if p[2] == "resnets"
                       else f"input_blocks.{idx}.1.{_attention_key(rest)}")
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = (f"middle_block.{2 * int(p[2])}.{_resnet_key(rest)}" if p[1] == "resnets"
                   else f"middle_block.1.{_attention_key(rest)}")
        elif p[0] == "up_blocks":
            blk = int(p[1])
            if p[2] == "upsamplers":
                new = f"output_blocks.{blk * per + per - 1}.{2 if up_attn[blk] else 1}.conv.{p[-1]}"
            else:
                idx, rest = blk * per + int(p[3]), ".".join(p[4:])
                new = (f"output_blocks.{idx}.0.{_resnet_key(rest)}" if p[2] == "resnets"
                       else f"output_blocks.{idx}.1.{_attention_key(rest)}")
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def clip_to_openclip(sd):
    """transformers CLIPVisionModelWithProjection -> OpenCLIP visual tower under SVD's embedder prefix."""
    p = "conditioner.embedders.0.open_clip.model.visual."
    v = "vision_model."
    out = {p + "conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
           p + "class_embedding": sd[v + "embeddings.class_embedding"],
           p + "positional_embedding": sd[v + "embeddings.position_embedding.weight"],
           p + "proj": sd["visual_projection.weight"].T.copy()}
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            out[f"{p}{b}.{leaf}"] = sd[f"{v}{a}.{leaf}"]
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(v + "encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"{v}encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate([sd[f"{src}self_attn.{q}_proj.{leaf}"]
                                                               for q in "qkv"])
            for a, b in names.items():
                out[f"{dst}{b}.{leaf}"] = sd[f"{src}{a}.{leaf}"]
    # The text-tower remnants SVD files keep (ignored by the loader).
    root = "conditioner.embedders.0.open_clip.model."
    out[root + "logit_scale"] = np.float32(4.6)[None]
    out[root + "token_embedding.weight"] = np.zeros((4, 8), np.float32)
    return out


VAE_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}


def vae_to_sgm(sd, levels):
    """diffusers AutoencoderKLTemporalDecoder -> SVD's first stage (decoder) and conditioning encoder keys."""
    def resnet(rest):
        rest = rest.replace("spatial_res_block.", "").replace("conv_shortcut.", "nin_shortcut.")
        rest = rest.replace("time_mixer.mix_factor", "mix_factor")
        m = re.fullmatch(r"temporal_res_block\.(\w+)\.(weight|bias)", rest)
        return f"time_stack.{VAE_RESNET[m[1]]}.{m[2]}" if m else rest

    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"decoder\.time_conv_out\.(.+)", lambda m: f"decoder.conv_out.time_mix_conv.{m[1]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.+)", lambda m: f"{m[1]}.mid.attn_1.norm.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.(.+)", lambda m: f"{m[1]}.mid.attn_1.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.(.+)", lambda m: f"{m[1]}.mid.attn_1.proj_out.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(conv_in|conv_out|quant_conv)\.(.+)", None),
    ]
    out = {}
    for key, value in sd.items():
        if re.fullmatch(r".+\.attentions\.0\.to_(q|k|v|out\.0)\.weight", key):
            value = value[:, :, None, None]  # sgm's attention projections are 1x1 convs
        new = key
        for pattern, fn in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = fn(m) if fn else key
                break
        if new.startswith("decoder."):
            out["first_stage_model." + new] = value
        else:
            out["conditioner.embedders.3.encoder." + new] = value
    return out


def svd_single_file_state_dict(ref):
    """A Stability-layout state dict of a diffusers SVD pipeline's weights."""
    np_sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    out = unet_to_sgm(np_sd(ref.unet), dict(ref.unet.config))
    out.update(clip_to_openclip(np_sd(ref.image_encoder)))
    out.update(vae_to_sgm(np_sd(ref.vae), len(ref.vae.config.block_out_channels)))
    return out
