"""Assembles the bundled default Video LDM (moving shapes) from the recipe's stage outputs.

    python scripts/assemble_default_model.py [--runs runs/shapes] [--out vldm_jax/assets/default_model]
    python scripts/assemble_default_model.py --base vldm_jax/assets/default_model --video RUNS/video6 \
        --interpolation RUNS/interpolation6 --out RUNS/model6          # model 6: model 5 continued

Reads the image LDM pipeline (stage 2: VAE, text encoder, image U-Net, tokenizer, scheduler), builds the
key-frame/prediction video U-Net and the interpolation U-Net from it with the temporal configs stored in their
``temporal.safetensors`` (RUNS/video and RUNS/interpolation, or --video / --interpolation), loads the trained
temporal layers, and writes one TextToVideoPipeline folder (the key-frame model serves as the
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


def video_unet(image_unet, temporal_file: Path, seed: int):
    """The image U-Net with the temporal layers of ``temporal_file``, built with the temporal config stored in the file
    (the run's, --set overrides included)."""
    from vldm_jax.checkpoints.temporal import read_temporal
    from vldm_jax.models.unet import TemporalConfig, VideoUNet
    from vldm_jax.train.context_objectives import load_temporal_arrays

    _, stored = read_temporal(temporal_file)
    temporal = TemporalConfig.from_stored(stored)
    unet = VideoUNet.from_image_unet(image_unet, temporal, seed=seed)
    return load_temporal_arrays(unet, str(temporal_file))


def assemble_from_base(args) -> int:
    """``--base``: the pipeline folder with the runs' temporal layers in place of its own (the spatial layers, VAE and
    text encoder are the base's, which the runs trained on)."""
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline
    from vldm_jax.train.context_objectives import load_temporal_arrays

    pipe = TextToVideoPipeline.from_pretrained(args.base)
    same = pipe.predictor is pipe.unet
    video = Path(args.video or Path(args.runs) / "video") / "temporal.safetensors"
    interp = Path(args.interpolation or Path(args.runs) / "interpolation") / "temporal.safetensors"
    if video.exists():
        pipe.unet = load_temporal_arrays(pipe.unet, str(video))
        print(f"key-frame/prediction temporal layers: {video}")
    if interp.exists() and pipe.interpolator is not None:
        pipe.interpolator = load_temporal_arrays(pipe.interpolator, str(interp))
        print(f"interpolation temporal layers: {interp}")
    out = TextToVideoPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config,
                              interpolator=pipe.interpolator, predictor=pipe.unet if same else pipe.predictor,
                              upsampler=pipe.upsampler, clip_skip=pipe.clip_skip, defaults=pipe.defaults)
    out.save_pretrained(args.out, overwrite=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/shapes")
    p.add_argument("--out", default=str(ROOT / "vldm_jax" / "assets" / "default_model"))
    p.add_argument("--image-vae", action="store_true", help="keep the image stage's VAE (ignore vae_decoder)")
    p.add_argument("--image", default=None,
                   help="the image LDM pipeline the temporal stages were trained on (default RUNS/image/export/pipeline)")
    p.add_argument("--video", default=None, help="the key-frame/prediction run (default RUNS/video)")
    p.add_argument("--interpolation", default=None, help="the interpolation run (default RUNS/interpolation)")
    p.add_argument("--base", default=None,
                   help="continue a Video LDM pipeline folder instead (model 6: the shipped model 5): its parts are "
                        "kept and the temporal layers of --video / --interpolation replace its key-frame and "
                        "interpolation U-Nets'")
    args = p.parse_args(argv)
    if args.base:
        return assemble_from_base(args)
    runs = Path(args.runs)
    video_run = Path(args.video) if args.video else runs / "video"
    interp_run = Path(args.interpolation) if args.interpolation else runs / "interpolation"

    from vldm_jax.pipelines.text_to_image import TextToImagePipeline
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    image = TextToImagePipeline.from_pretrained(args.image or runs / "image" / "export" / "pipeline")
    vae = image.vae
    decoder = runs / "vae_decoder" / "export" / "vae"
    if decoder.exists() and not args.image_vae:  # the decoder fine-tuned on noisy latents (same encoder)
        from vldm_jax.checkpoints.load import load_model

        vae = load_model(decoder)
        print(f"VAE: {decoder}")
    keyframes = video_unet(image.unet, video_run / "temporal.safetensors", 0)
    interpolator = None
    interp_file = interp_run / "temporal.safetensors"
    if interp_file.exists():
        interpolator = video_unet(image.unet, interp_file, 1)
    text_encoder = image.text_encoder
    trained_text = video_run / "text_encoder"
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
