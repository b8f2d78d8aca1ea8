"""Assembles the bundled default Video LDM (moving shapes) from the recipe's stage outputs.

    python scripts/assemble_default_model.py [--runs runs/shapes] [--out vldm_jax/assets/default_model]

Reads the image LDM pipeline (stage 2: VAE, text encoder, image U-Net, tokenizer, scheduler), builds the
key-frame/prediction video U-Net and the interpolation U-Net from it with the temporal configs of
configs/shapes/video.yaml and interpolation.yaml, loads the trained temporal layers (their
``temporal.safetensors``), and writes one TextToVideoPipeline folder (the key-frame model serves as the
prediction model too and is stored once). The folder replaces ``--out`` atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {"num_frames": 5, "interpolate": 4, "interpolation_window": 3, "num_inference_steps": 25,
            "interpolation_guidance_scale": 1.0,
            "guidance_scale": 3.0, "fps": 4, "height": 64, "width": 64}


def video_unet(image_unet, config_file: Path, temporal_file: Path, seed: int):
    from vldm_jax.models.unet import TemporalConfig, VideoUNet
    from vldm_jax.train.config import load_config
    from vldm_jax.train.context_objectives import load_temporal_arrays

    config = load_config(config_file)
    temporal = TemporalConfig.paper(**config.model.temporal)
    unet = VideoUNet.from_image_unet(image_unet, temporal, seed=seed)
    return load_temporal_arrays(unet, str(temporal_file))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/shapes")
    p.add_argument("--out", default=str(ROOT / "vldm_jax" / "assets" / "default_model"))
    p.add_argument("--image-vae", action="store_true", help="keep the image stage's VAE (ignore vae_decoder)")
    p.add_argument("--image", default=None,
                   help="the image LDM pipeline the temporal stages were trained on (default RUNS/image/export/pipeline)")
    args = p.parse_args(argv)
    runs = Path(args.runs)

    from vldm_jax.pipelines.text_to_image import TextToImagePipeline
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    image = TextToImagePipeline.from_pretrained(args.image or runs / "image" / "export" / "pipeline")
    vae = image.vae
    decoder = runs / "vae_decoder" / "export" / "vae"
    if decoder.exists() and not args.image_vae:  # the decoder fine-tuned on noisy latents (same encoder)
        from vldm_jax.checkpoints.load import load_model

        vae = load_model(decoder)
        print(f"VAE: {decoder}")
    keyframes = video_unet(image.unet, ROOT / "configs/shapes/video.yaml", runs / "video" / "temporal.safetensors", 0)
    interpolator = None
    interp_file = runs / "interpolation" / "temporal.safetensors"
    if interp_file.exists():
        interpolator = video_unet(image.unet, ROOT / "configs/shapes/interpolation.yaml", interp_file, 1)
    text_encoder = image.text_encoder
    trained_text = runs / "video" / "text_encoder"
    if trained_text.exists():  # objective.train_text_encoder: the key-frame stage trained the text encoder too
        from vldm_jax.checkpoints.load import load_model

        text_encoder = load_model(trained_text)
        print(f"text encoder: {trained_text}")
    defaults = dict(DEFAULTS)
    if interpolator is None:
        defaults["interpolate"] = 1
    pipe = TextToVideoPipeline(keyframes, vae, text_encoder, image.tokenizer, image.scheduler_config,
                               interpolator=interpolator, predictor=keyframes, clip_skip=image.clip_skip,
                               defaults=defaults)
    pipe.save_pretrained(args.out, overwrite=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
