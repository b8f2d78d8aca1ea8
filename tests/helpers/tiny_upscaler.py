"""A tiny random Stable Diffusion x4 upscaler in diffusers' format (``StableDiffusionUpscalePipeline``).

* :func:`make_tiny_upscaler` -> the torch pipeline (U-Net with ``in_channels=7``, ``num_class_embeds``, mixed
  per-block ``only_cross_attention``; a 3-level (factor 4) VAE with the upscaler's scaling factor; OpenCLIP-style
  text encoder; DDIM v-prediction scheduler and the DDPM ``low_res_scheduler``; ``max_noise_level=350``).
* :func:`make_tiny_upscaler_folder` -> its ``save_pretrained`` folder (safetensors), what the loaders read.

The layout follows stabilityai/stable-diffusion-x4-upscaler (:data:`X4_UNET`, :data:`X4_VAE` are its real
configs) at toy widths, like diffusers' own upscaler pipeline test. Every parameter is perturbed so that zero
biases or unit norms cannot hide a swapped key, and the class embedding rows differ (noise levels matter).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The real model's component configs (unet/config.json and vae/config.json of the hub folder), for shape tests.
X4_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], center_input_sample=False,
    cross_attention_dim=1024, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=7,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=1000,
    only_cross_attention=[True, True, True, False], out_channels=4, sample_size=128,
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True)
X4_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3, in_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=256,
    scaling_factor=0.08333, up_block_types=["UpDecoderBlock2D"] * 3)
MAX_NOISE_LEVEL = 350

TINY_UNET = dict(
    sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    # down: [-, only-cross, self]; up (reversed flags): [self, only-cross, -]
    only_cross_attention=(True, True, False),
    cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, num_class_embeds=1000,
    norm_num_groups=32)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 16, 32), layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=32, scaling_factor=0.08333,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                 max_position_embeddings=77, bos_token_id=518, eos_token_id=519, pad_token_id=1,
                 layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=32)


def _perturb(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def tiny_upscaler_unet(seed: int = 0, **overrides):
    import diffusers

    torch.manual_seed(seed)
    return _perturb(diffusers.UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed)


def tiny_upscaler_vae(seed: int = 0):
    import diffusers

    torch.manual_seed(seed + 1)
    return _perturb(diffusers.AutoencoderKL(**TINY_VAE), seed + 1)


def schedulers():
    """``(scheduler, low_res_scheduler)`` with the x4 upscaler's scheduler configs."""
    from diffusers import DDIMScheduler, DDPMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="v_prediction")
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                            clip_sample=True, variance_type="fixed_small")
    return scheduler, low_res


def make_tiny_upscaler(tmp_path, seed: int = 0):
    """The torch ``StableDiffusionUpscalePipeline`` (tokenizer files are written under ``tmp_path``)."""
    from diffusers import StableDiffusionUpscalePipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.helpers.tiny_sd import tiny_tokenizer

    tokenizer = tiny_tokenizer(Path(tmp_path) / "_upscaler_tokenizer_src", "sd2", full_vocab=False)
    torch.manual_seed(seed + 2)
    text = _perturb(CLIPTextModel(CLIPTextConfig(**TINY_TEXT, vocab_size=len(tokenizer))), seed + 2)
    scheduler, low_res = schedulers()
    return StableDiffusionUpscalePipeline(vae=tiny_upscaler_vae(seed), text_encoder=text, tokenizer=tokenizer,
                                          unet=tiny_upscaler_unet(seed), low_res_scheduler=low_res,
                                          scheduler=scheduler, max_noise_level=MAX_NOISE_LEVEL)


def make_tiny_upscaler_folder(tmp_path, seed: int = 0, name: str = "tiny_x4_upscaler") -> Path:
    """``StableDiffusionUpscalePipeline.save_pretrained`` folder (safetensors) of :func:`make_tiny_upscaler`."""
    from tests.helpers.tiny_sd import write_tokenizer_files

    folder = Path(tmp_path) / name
    make_tiny_upscaler(tmp_path, seed).save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer", full_vocab=False)
    return folder
