"""A tiny random Video LDM cascade in JAX (no PyTorch counterpart exists for the whole stack): text encoder,
VAE, key-frame video U-Net, interpolation and prediction U-Nets with context-frame conditioning.

Every parameter is random (temporal layers included, so that they and the context conditioning actually act);
the models are a few hundred thousand parameters and 16x16 frames.
"""

from __future__ import annotations

import functools

from flax import nnx

from tests.helpers.random_params import random_model

IMAGE_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                  norm_num_groups=8)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
           sample_size=16)
TEXT = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
            max_position_embeddings=77, projection_dim=16)
SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
             "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False}


def video_unet_config(context_conditioning: str = "none", **temporal):
    from vldm_jax.models.unet import TemporalConfig, UNet2DConditionConfig, VideoUNetConfig

    image = UNet2DConditionConfig(**IMAGE_UNET)
    t = TemporalConfig.paper(relative_position_dim=8, num_frames=5, context_conditioning=context_conditioning,
                             **temporal)
    return VideoUNetConfig.from_image_config(image, t)


def video_unet(context_conditioning: str = "none", seed: int = 0, **temporal):
    from vldm_jax.models.unet import VideoUNet

    config = video_unet_config(context_conditioning, **temporal)
    return random_model(lambda: VideoUNet(config, rngs=nnx.Rngs(0)), seed)


@functools.lru_cache(maxsize=2)
def tiny_pipeline(upsampler=None):
    """A :class:`TextToVideoPipeline` with every stage (upsampler optional), random weights; cached."""
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from vldm_jax.models.tokenizer import load_tokenizer
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    vae = random_model(lambda: AutoencoderKL(AutoencoderKLConfig(**VAE), rngs=nnx.Rngs(0)), 1)
    text = random_model(lambda: CLIPTextModel(CLIPTextConfig.from_dict(TEXT), rngs=nnx.Rngs(0)), 2)
    return TextToVideoPipeline(
        video_unet("none", 3), vae, text, load_tokenizer(None), SCHEDULER,
        interpolator=video_unet("temporal", 4), predictor=video_unet("concat", 5), upsampler=upsampler,
        defaults={"num_frames": 3, "num_inference_steps": 3, "guidance_scale": 2.0, "fps": 4})
