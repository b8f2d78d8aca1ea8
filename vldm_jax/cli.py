"""``vldm``: the command line. Anything a user can fix ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time

from vldm_jax.pipelines import defaults


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(2, f"vldm: error: {message}\n")


# vldm_jax.nn.attention.IMPLEMENTATIONS (not imported here: parsing stays free of jax).
ATTENTION_CHOICES = ("auto", "xla", "chunked", "cudnn", "splash")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="diffusers pipeline folder, single-file .safetensors, converted folder, or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for single-file checkpoints")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickle checkpoints (trusted files only)")


def _add_animatediff_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("AnimateDiff (with --motion-adapter: --checkpoint is any SD 1.x checkpoint)")
    g.add_argument("--motion-adapter", default=None, metavar="A",
                   help="AnimateDiff motion modules: MotionAdapter folder or hub id, or an mm_sd_v15*.safetensors/.ckpt")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA fused at load (motion LoRA or SD 1.5 image LoRA; diffusers/PEFT or kohya); repeatable")
    g.add_argument("--free-noise", type=int, default=None, metavar="CONTEXT",
                   help="FreeNoise context windows of CONTEXT frames (stride 4) for videos longer than the window")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder for single-file SD checkpoints")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickle files (trusted files only)")


def _parse_loras(values) -> list[tuple[str, float]]:
    from vldm_jax.checkpoints.lora import parse_lora_arg

    return [parse_lora_arg(v) for v in values]


def _generate_animatediff(args, outs) -> int:
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import write_video
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    if args.checkpoint is None:
        raise UserError("--motion-adapter needs --checkpoint: an SD 1.x checkpoint (folder, single file, hub id)")
    if args.interpolate not in (None, 1) or args.upscale:
        raise UserError("--interpolate and --upscale are Video LDM stages; AnimateDiff has neither")
    if args.free_noise is not None and args.free_noise < 1:
        raise UserError(f"--free-noise must be at least 1 (got {args.free_noise})")
    if args.mesh or args.rollout != 1:
        raise UserError("--mesh and --rollout apply to Video LDM pipelines, not to AnimateDiff (--motion-adapter)")
    loras = _parse_loras(args.lora)
    t0 = time.perf_counter()
    pipe = AnimateDiffPipeline.from_pretrained(args.checkpoint, motion_adapter=args.motion_adapter,
                                               tokenizer=args.tokenizer, allow_pickle=args.allow_pickle, lora=loras)
    if args.free_noise is not None:
        pipe.enable_free_noise(context_length=args.free_noise)
    videos = pipe(args.prompt, negative_prompt=args.negative, num_frames=args.frames or 16, height=args.height,
                  width=args.width, num_inference_steps=args.steps or 25,
                  guidance_scale=7.5 if args.guidance is None else args.guidance, scheduler=args.scheduler,
                  seed=args.seed, decode_chunk_size=args.decode_chunk, progress=True)
    fps = args.fps or 8
    for out, video in zip(outs, videos):
        write_video(out, video, fps=fps)
        print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, {fps:g} fps) in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vldm", description="Video LDM in JAX: latent diffusion for images and videos.")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                        help="attention kernel (default auto: splash on TPU, cuDNN on GPU in half precision, "
                             "chunked on CPU); goes before the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("txt2img", help="generate an image from a text prompt with a Stable Diffusion checkpoint")
    p.add_argument("prompt")
    _add_load_args(p)
    p.add_argument("--out", default="image.png", help="output image (.png, .jpg, .webp)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=defaults.IMAGE_STEPS)
    p.add_argument("--guidance", type=float, default=defaults.IMAGE_GUIDANCE)
    p.add_argument("--scheduler", default=defaults.SCHEDULER, help="ddim, dpm++ or euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("generate", help="text-to-video with a Video LDM pipeline (keyframes -> interpolation -> "
                                        "decoder -> upsampler)")
    p.add_argument("prompt", nargs="+", help="one or more prompts (one video each, sampled as one batch)")
    p.add_argument("--checkpoint", default=None,
                   help="Video LDM pipeline folder or hub id (default: the bundled moving-shapes model)")
    p.add_argument("--out", default=["video.gif"], nargs="+",
                   help="output video (.gif, .mp4, .webm, .webp): one per prompt, or one name that gets -0, -1, ... "
                        "for several prompts")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--frames", type=int, default=None, help="keyframes to sample (default: the model's window)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...", help=MESH_HELP)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the model's, times the "
                                                           "interpolation factor)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per stage (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale on the text")
    p.add_argument("--scheduler", default=defaults.SCHEDULER, help="ddim, dpm++ or euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--interpolate", type=int, default=None,
                   help="temporal interpolation factor: 1, 4 or 16 (default: the model's)")
    p.add_argument("--upscale", action="store_true", help="run the video upsampler (x4 in space)")
    p.add_argument("--decode-chunk", type=int, default=defaults.DECODE_CHUNK, help="frames decoded at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--rollout", type=int, default=1, metavar="K",
                   help="windows in all: after the key frames, K-1 prediction windows each continue the newest "
                        "--rollout-context key frames (longer videos; default 1: key frames only)")
    p.add_argument("--rollout-context", type=int, default=1, help="frames each rollout window continues (1 or 2)")
    _add_animatediff_args(p)

    p = sub.add_parser("interpolate", help="insert frames between the frames of a video with a Video LDM "
                                           "interpolation model (x4 or x16)")
    p.add_argument("video", help="input video (.gif, .mp4, ...)")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--out", default="interpolated.gif", help="output video (.gif, .mp4, .webm, .webp)")
    p.add_argument("--factor", type=int, default=4, help="4 or 16")
    p.add_argument("--prompt", default="", help="what the video shows (the model is text-conditioned)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: input fps x factor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...", help=MESH_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("animate", help="animate an image: Video LDM prediction model (default) or Stable Video "
                                       "Diffusion checkpoint")
    p.add_argument("image", help="input image (.png, .jpg, .webp...)")
    p.add_argument("--checkpoint", default=None,
                   help="Video LDM pipeline folder (default: the bundled model), or a diffusers SVD pipeline folder, "
                        "original single-file SVD .safetensors, or hub id "
                        "(e.g. stabilityai/stable-video-diffusion-img2vid-xt)")
    p.add_argument("--prompt", default="", help="Video LDM: what should happen (e.g. 'a red circle moving right')")
    p.add_argument("--guidance", type=float, default=None, help="Video LDM: text guidance scale")
    p.add_argument("--context-guidance", type=float, default=1.0, help="Video LDM: guidance on the given frame")
    p.add_argument("--interpolate", type=int, default=None,
                   help="Video LDM: temporal interpolation factor 1, 4 or 16 (default: the model's)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...", help=MESH_HELP)
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickle checkpoints (trusted files only)")
    p.add_argument("--out", default="video.mp4", help="output video (.gif, .mp4, .webm, .webp)")
    p.add_argument("--frames", type=int, default=None, help="number of frames (default: the model's, 14 or 25)")
    p.add_argument("--fps", type=int, default=None, help="frame rate: the model's conditioning and the output's "
                                                         "(SVD default 7; Video LDM: the model's)")
    p.add_argument("--motion", type=int, default=defaults.SVD_MOTION_BUCKET,
                   help="motion bucket id (more motion when higher)")
    p.add_argument("--noise-aug", type=float, default=defaults.SVD_NOISE_AUG, help="noise added to the input image")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (SVD default 25; Video LDM: the model's)")
    p.add_argument("--min-guidance", type=float, default=defaults.SVD_MIN_GUIDANCE,
                   help="guidance scale of the first frame")
    p.add_argument("--max-guidance", type=float, default=defaults.SVD_MAX_GUIDANCE,
                   help="guidance scale of the last frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-chunk", type=int, default=defaults.DECODE_CHUNK,
                   help="frames decoded at a time (memory vs. consistency)")
    p.add_argument("--height", type=int, default=None, help="default 576 (1024 for portrait images)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (576 for portrait images)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute and parameter dtype (bfloat16 to fit SVD-XT on a 24 GB GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("upscale", help="upsample a video x4 with the video upsampler (or an SD x4 upscaler folder)")
    p.add_argument("video", help="input video (.gif, .mp4, .webm, .webp) or image")
    p.add_argument("--checkpoint", required=True,
                   help="video upsampler folder, or an x4 upscaler folder / hub id "
                        "(stabilityai/stable-diffusion-x4-upscaler: fresh temporal layers, i.e. per-frame)")
    p.add_argument("--out", required=True, help="output video (.gif, .mp4, .webm, .webp)")
    p.add_argument("--prompt", default="", help="text prompt describing the video")
    p.add_argument("--steps", type=int, default=defaults.VIDEO_UPSCALE_STEPS)
    p.add_argument("--guidance", type=float, default=defaults.UPSCALE_GUIDANCE)
    p.add_argument("--noise-level", type=int, default=defaults.UPSCALE_NOISE_LEVEL, help="noise added to the low-res input (0..max_noise_level)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="denoise on overlapping tiles of this many input pixels (bounds memory for big videos)")
    p.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in input pixels (default tile/4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("convert", help="convert a checkpoint to vldm_jax's own format (loads faster)")
    p.add_argument("src", help="diffusers pipeline folder, single-file .safetensors, or hub id")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--temporal", default=None, metavar="FILE",
                   help="temporal layers (.safetensors written by save_temporal) to insert into SRC's image U-Net: "
                        "DST's unet/ is then a video U-Net (paper's transfer to any compatible SD fine-tune)")
    p.add_argument("--to", default=None, choices=["diffusers-motion-adapter"],
                   help="diffusers-motion-adapter: SRC is a temporal weights file with AnimateDiff motion modules "
                        "(training's workdir/temporal.safetensors), a MotionAdapter folder or an mm_sd_v15* file; "
                        "DST becomes a diffusers MotionAdapter folder")

    p = sub.add_parser("train", help="train (or resume) a Video LDM stage from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--data", default=None,
                   help="training data: a folder of videos, moving_shapes:N, a prepared TFDS folder, or a "
                        "`vldm prepare` array_record folder (data.path)")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, logs and samples; an existing workdir resumes (default: train.workdir or "
                        "runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (train.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.learning_rate=1e-4 (repeatable)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the training step (abstract arrays: no weights, no data) and print its memory per "
                        "chip, FLOPs and estimated time; exits 2 if it does not fit (implies model.random_init: the "
                        "architecture of model.pretrained, no weights read or downloaded)")
    p.add_argument("--topology", default=None, metavar="NAME",
                   help="with --compile-only: a TPU slice to compile for, e.g. v5e:4x4, v5p:2x2x1 (libtpu; no TPU "
                        "needed); default this host's devices")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="with --compile-only: mesh sizes, e.g. data=4,fsdp=4 (missing axes 1; default config.mesh)")
    p.add_argument("--report", default=None, metavar="JSON", help="with --compile-only: write the report here")

    _add_prepare_parser(sub)

    from vldm_jax import cli_benchmark  # vldm benchmark: its arguments are scripts/benchmark.py's

    cli_benchmark.add_parser(sub)

    from vldm_jax import cli_eval  # vldm eval fvd|fid|clipsim, vldm sample

    cli_eval.add_parsers(sub)
    return parser


def _cmd_benchmark(args) -> int:
    from vldm_jax import cli_benchmark

    return cli_benchmark.run(args)


def _cmd_txt2img(args) -> int:
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import IMAGE_SUFFIXES, check_output_path, write_image
    from vldm_jax.pipelines.text_to_image import SCHEDULERS, TextToImagePipeline

    out = check_output_path(args.out, IMAGE_SUFFIXES, overwrite=args.overwrite)
    if args.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    _check_positive(("--height", args.height), ("--width", args.width))
    t0 = time.perf_counter()
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    f = pipe.vae_scale_factor
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % f:  # against the loaded model, before the first denoising step
            raise UserError(f"{name} must be a multiple of {f} for this model (got {value})")
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    images = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                  seed=args.seed, progress=True)
    write_image(out, images[0])
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _cmd_animate(args) -> int:
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import VIDEO_SUFFIXES, check_output_path, read_image, write_video

    # Everything a user can get wrong is checked before the (slow) model load.
    out = check_output_path(args.out, VIDEO_SUFFIXES, overwrite=args.overwrite)
    for name, value, low in (("--frames", args.frames, 1), ("--steps", args.steps, 1),
                             ("--decode-chunk", args.decode_chunk, 1), ("--fps", args.fps, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low} (got {value})")
    if args.noise_aug < 0:
        raise UserError(f"--noise-aug must not be negative (got {args.noise_aug})")
    if args.interpolate is not None and args.interpolate not in (1, 4, 16):
        raise UserError(f"--interpolate must be 1, 4 or 16 (got {args.interpolate})")
    video_ldm = _is_video_ldm(args.checkpoint)
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value <= 0 or (value % 8 and not video_ldm)):
            raise UserError(f"{name} must be a positive multiple of 8 (got {value})")
    image = read_image(args.image)
    mesh = _mesh(args.mesh)
    if video_ldm:
        return _animate_video_ldm(args, image, out, mesh)
    args.fps = args.fps or defaults.SVD_FPS
    args.steps = args.steps or defaults.SVD_STEPS
    portrait = image.shape[0] > image.shape[1]
    height = args.height or (defaults.SVD_WIDTH if portrait else defaults.SVD_HEIGHT)
    width = args.width or (defaults.SVD_HEIGHT if portrait else defaults.SVD_WIDTH)

    import jax.numpy as jnp

    from vldm_jax.pipelines.image_to_video import ImageToVideoPipeline

    t0 = time.perf_counter()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    pipe = ImageToVideoPipeline.from_pretrained(args.checkpoint, allow_pickle=args.allow_pickle, dtype=dtype,
                                                param_dtype=dtype)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    video = pipe(image, height=height, width=width, num_frames=args.frames, num_inference_steps=args.steps,
                 min_guidance_scale=args.min_guidance, max_guidance_scale=args.max_guidance, fps=args.fps,
                 motion_bucket_id=args.motion, noise_aug_strength=args.noise_aug, decode_chunk_size=args.decode_chunk,
                 seed=args.seed, progress=True, mesh=mesh)
    write_video(out, video[0], fps=args.fps)
    print(f"wrote {out} ({video.shape[1]} frames, {width}x{height}) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0


def _is_video_ldm(checkpoint) -> bool:
    """True for a Video LDM pipeline folder (or no checkpoint: the bundled one); False for SVD checkpoints."""
    from vldm_jax.checkpoints.pipeline_folder import pipeline_class_name
    from vldm_jax.pipelines.text_to_video import CLASS_NAME

    return checkpoint is None or pipeline_class_name(checkpoint) == CLASS_NAME


def _load_video_ldm(checkpoint):
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    # No "loaded" line: an error found after loading (a bad size) must still be the only line printed.
    path = checkpoint if checkpoint is not None else default_checkpoint()
    return TextToVideoPipeline.from_pretrained(path)


def _check_positive(*pairs) -> None:
    from vldm_jax.errors import UserError

    for name, value in pairs:
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")


def _write_generated(out, video, pipe, args, t0) -> int:
    """Writes a Video LDM result at ``--fps`` (default: the model's rate times the interpolation factor)."""
    from vldm_jax.io.video import write_video

    factor = args.interpolate if args.interpolate is not None else pipe.default("interpolate")
    fps = args.fps if args.fps else pipe.default("fps") * factor
    write_video(out, video, fps=fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, {fps:g} fps) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


MESH_HELP = ("device mesh, e.g. data=2,context=4: prompts over data, each video's frames over context "
             "(axes data, fsdp, context, tensor; default: one device)")


def _mesh(spec):
    """``--mesh data=2,context=4`` -> a mesh over this host's devices (None without the option)."""
    if not spec:
        return None
    from vldm_jax.parallel.mesh import mesh_from_sizes, parse_mesh

    return mesh_from_sizes(parse_mesh(spec))


def _output_paths(outs, n: int, suffixes, overwrite: bool):
    """``--out`` for ``n`` results: one path each, or one path numbered -0, -1, ...; all checked up front."""
    from pathlib import Path

    from vldm_jax.errors import UserError
    from vldm_jax.io.video import check_output_path

    outs = [outs] if isinstance(outs, str) else list(outs)
    if len(outs) == 1 and n > 1:
        p = Path(outs[0])
        outs = [str(p.with_name(f"{p.stem}-{i}{p.suffix}")) for i in range(n)]
    if len(outs) != n:
        raise UserError(f"--out names {len(outs)} files for {n} prompts; give one per prompt or one name")
    paths = [check_output_path(o, suffixes, overwrite=overwrite) for o in outs]
    if len(set(paths)) != len(paths):
        raise UserError("--out names the same file twice")
    return paths


def _animate_video_ldm(args, image, out, mesh) -> int:
    t0 = time.perf_counter()
    pipe = _load_video_ldm(args.checkpoint)
    if args.height or args.width:
        from PIL import Image

        h, w = args.height or image.shape[0], args.width or image.shape[1]
        image = __import__("numpy").asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))
    video = pipe.animate(image, args.prompt, num_frames=args.frames, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, context_guidance_scale=args.context_guidance,
                         interpolate=args.interpolate, decode_chunk_size=args.decode_chunk, seed=args.seed,
                         progress=True, mesh=mesh)
    return _write_generated(out, video, pipe, args, t0)


def _validate_generate(args, pipe=None) -> None:
    """Every error a user can cause in ``vldm generate``, found before the first denoising step: the request
    alone (before the model load), then against the loaded pipeline (``pipe``): options it cannot serve
    (``--upscale`` without an upsampler, interpolation without an interpolation model), sizes, frame counts."""
    from vldm_jax.diffusion.samplers import SAMPLER_NAMES
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import VIDEO_SUFFIXES
    from vldm_jax.pipelines.text_to_video import INTERPOLATE_CHOICES

    if pipe is None:
        _output_paths(args.out, len(args.prompt), VIDEO_SUFFIXES, args.overwrite)
        _check_positive(("--frames", args.frames), ("--steps", args.steps), ("--decode-chunk", args.decode_chunk),
                        ("--height", args.height), ("--width", args.width))
        if args.interpolate is not None and args.interpolate not in INTERPOLATE_CHOICES:
            raise UserError(f"--interpolate must be 1, 4 or 16 (got {args.interpolate})")
        if args.fps is not None and args.fps <= 0:
            raise UserError(f"--fps must be positive (got {args.fps})")
        if args.scheduler not in SAMPLER_NAMES:
            raise UserError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if args.motion_adapter is None and (args.lora or args.free_noise is not None):
            raise UserError("--lora and --free-noise apply to AnimateDiff (--motion-adapter)")
        return
    name = args.checkpoint or "the bundled model"
    if args.upscale and pipe.upsampler is None:
        raise UserError(f"--upscale: {name} has no upsampler (drop --upscale)")
    factor = args.interpolate if args.interpolate is not None else pipe.default("interpolate", 1)
    if factor != 1 and pipe.interpolator is None:
        raise UserError(f"--interpolate {factor}: {name} has no interpolation model (use --interpolate 1)")
    frames = args.frames if args.frames is not None else pipe.default(
        "num_frames", getattr(pipe.unet.config, "num_frames", 8))
    if factor != 1 and frames < 2:
        raise UserError(f"--interpolate {factor} needs at least 2 keyframes (got --frames {frames})")
    pipe._size(args.height, args.width)  # positive multiples of the VAE factor


def _cmd_generate(args) -> int:
    from vldm_jax.io.video import VIDEO_SUFFIXES

    _validate_generate(args)
    outs = _output_paths(args.out, len(args.prompt), VIDEO_SUFFIXES, args.overwrite)
    if args.motion_adapter is not None:
        return _generate_animatediff(args, outs)
    mesh = _mesh(args.mesh)
    t0 = time.perf_counter()
    pipe = _load_video_ldm(args.checkpoint)
    _validate_generate(args, pipe)
    videos = pipe(args.prompt, negative_prompt=args.negative, num_frames=args.frames, height=args.height,
                  width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  scheduler=args.scheduler, interpolate=args.interpolate, upscale=args.upscale,
                  decode_chunk_size=args.decode_chunk, seed=args.seed, progress=True, mesh=mesh,
                  rollout=args.rollout, rollout_context=args.rollout_context)
    for out, video in zip(outs, videos):
        _write_generated(out, video, pipe, args, t0)
    return 0


def _cmd_interpolate(args) -> int:
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import VIDEO_SUFFIXES, check_output_path, read_video, write_video

    out = check_output_path(args.out, VIDEO_SUFFIXES, overwrite=args.overwrite)
    if args.factor not in (4, 16):
        raise UserError(f"--factor must be 4 or 16 (got {args.factor})")
    _check_positive(("--steps", args.steps))
    frames, fps = read_video(args.video)
    if len(frames) < 2:
        raise UserError(f"{args.video}: a video of at least 2 frames is needed (got {len(frames)})")
    mesh = _mesh(args.mesh)
    t0 = time.perf_counter()
    pipe = _load_video_ldm(args.checkpoint)
    video = pipe.interpolate_video(frames, args.prompt, factor=args.factor, num_inference_steps=args.steps,
                                   guidance_scale=args.guidance, seed=args.seed, progress=True, mesh=mesh)
    out_fps = args.fps if args.fps else (fps or pipe.default("fps")) * args.factor
    write_video(out, video, fps=out_fps)
    print(f"wrote {out} ({video.shape[0]} frames) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _cmd_upscale(args) -> int:
    from vldm_jax.errors import UserError
    from vldm_jax.io.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, check_output_path, read_image, read_video, write_video

    # Everything a user can get wrong is checked before the (slow) model load.
    out = check_output_path(args.out, VIDEO_SUFFIXES, overwrite=args.overwrite)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    if args.tile_size is not None and args.tile_size < 1:
        raise UserError(f"--tile-size must be positive (got {args.tile_size})")
    if args.tile_overlap is not None and (args.tile_size is None or not 0 <= args.tile_overlap <= args.tile_size // 2):
        raise UserError("--tile-overlap needs --tile-size and must be in [0, tile size / 2]")
    if args.fps is not None and args.fps <= 0:
        raise UserError(f"--fps must be positive (got {args.fps})")
    if args.noise_level < 0:
        raise UserError(f"--noise-level must not be negative (got {args.noise_level})")
    if os.path.splitext(args.video)[1].lower() in IMAGE_SUFFIXES:
        frames, fps = read_image(args.video)[None], 8.0
    else:
        frames, fps = read_video(args.video)

    from vldm_jax.pipelines.upscale import VideoUpscalePipeline

    t0 = time.perf_counter()
    pipe = VideoUpscalePipeline.from_pretrained(args.checkpoint)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    video = pipe(frames, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 noise_level=args.noise_level, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                 seed=args.seed, progress=True)
    write_video(out, video, fps=args.fps or fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _validate_convert(args) -> None:
    """Everything a user can get wrong in ``vldm convert``, found before the (slow) pipeline load."""
    from pathlib import Path

    from vldm_jax.errors import UserError

    dst = Path(args.dst).absolute()
    if dst.exists():
        raise UserError(f"{dst} already exists; choose another destination")
    if not dst.parent.is_dir():
        raise UserError(f"folder {dst.parent} does not exist")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise UserError(f"folder {dst.parent} is not writable")
    if args.temporal is not None:
        from vldm_jax.checkpoints.temporal import read_temporal

        read_temporal(args.temporal)


def _cmd_convert(args) -> int:
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    t0 = time.perf_counter()
    if args.to == "diffusers-motion-adapter":
        return _convert_motion_adapter(args, t0)
    _validate_convert(args)
    pipe = TextToImagePipeline.from_pretrained(args.src, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    t1 = time.perf_counter()
    if args.temporal is None:
        pipe.save_pretrained(args.dst)
    else:
        _save_with_temporal(pipe, args.temporal, args.dst)
    print(f"converted {args.src} in {t1 - t0:.1f}s, wrote {args.dst} in {time.perf_counter() - t1:.1f}s",
          file=sys.stderr)
    return 0


def _convert_motion_adapter(args, t0) -> int:
    from pathlib import Path

    from vldm_jax.checkpoints import animatediff as ad
    from vldm_jax.errors import UserError

    if args.temporal is not None:
        raise UserError("--temporal does not apply to --to diffusers-motion-adapter")
    if Path(args.dst).exists():
        raise UserError(f"{args.dst} already exists; choose another destination")
    adapter = ad.read_motion_adapter(args.src, allow_pickle=args.allow_pickle)
    ad.save_motion_adapter(adapter, args.dst)
    print(f"wrote the motion adapter {args.dst} ({len(adapter.state_dict)} tensors) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _save_with_temporal(pipe, temporal_file: str, dst: str) -> None:
    """Writes ``pipe`` with its U-Net replaced by the video U-Net of its image U-Net + ``temporal_file``."""
    import shutil

    from vldm_jax.checkpoints.pipeline_folder import read_pipeline_folder, write_index
    from vldm_jax.checkpoints.store import atomic_folder
    from vldm_jax.checkpoints.temporal import load_temporal

    pipe.unet = load_temporal(pipe.unet, temporal_file)
    with atomic_folder(dst) as tmp:
        inner = tmp / "pipeline"
        pipe.save_pretrained(inner)
        index = read_pipeline_folder(inner).index
        # Not a text-to-image pipeline any more: its U-Net takes (B, F, h, w, C) videos.
        index.update({"_class_name": "TextToVideoPipeline", "unet": ["vldm_jax", type(pipe.unet).__name__],
                      "_vldm_temporal_source": os.path.basename(temporal_file)})
        write_index(inner, index)
        for child in inner.iterdir():
            shutil.move(str(child), str(tmp / child.name))
        inner.rmdir()


def _cmd_train(args) -> int:
    from vldm_jax.train.config import load_config
    from vldm_jax.train.loop import default_workdir, train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(args.config, overrides)
    if args.compile_only:
        from vldm_jax.parallel.mesh import parse_mesh
        from vldm_jax.train.compile_only import run

        run(config, topology=args.topology, mesh_spec=parse_mesh(args.mesh) if args.mesh else None,
            report=args.report, echo=print)
        return 0
    if args.topology or args.mesh or args.report:
        from vldm_jax.errors import UserError

        raise UserError("--topology, --mesh and --report go with --compile-only")
    workdir = args.workdir or config.train.workdir or str(default_workdir(args.config))
    result = train(config, workdir=workdir)
    if result.preempted:
        return 143  # 128 + SIGTERM: the job did not finish; running it again resumes
    rate = f", {1.0 / result.step_time:.2f} steps/s" if result.step_time else ""
    print(f"trained to step {result.step} in {workdir}{rate}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- prepare

def _add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="decode a WebVid-style video list (CSV/JSONL: path, caption[, start, end]) "
                                       "once into sharded array_record files for training (data.path=OUT)")
    p.add_argument("source", help="CSV or JSONL list of clips: path, caption[, start, end] (seconds); local or gs://")
    p.add_argument("--out", required=True, help="output folder (shards + spec.json); local or gs://")
    p.add_argument("--frames", type=int, required=True, help="frames per clip")
    p.add_argument("--resolution", required=True, metavar="HxW", help="training resolution, e.g. 256x256 (or 256)")
    p.add_argument("--shards", type=int, default=None, help="array_record files (default: one per 1024 clips)")
    p.add_argument("--stride", type=int, default=1, help="take every N-th source frame (default 1)")
    p.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead of --stride")
    p.add_argument("--workers", type=int, default=None, help="videos decoded at once (default: cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--encode", default=None, metavar="PIPELINE",
                   help="also store the VAE latents and text embeddings of this Stable Diffusion pipeline (folder, "
                        "single file or hub id), for objective.encode_in_step=false with model.pretrained=PIPELINE")
    p.add_argument("--encode-batch", type=int, default=8, help="clips per encoder call with --encode")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled --encode checkpoint")


def _parse_resolution(text: str) -> tuple[int, int]:
    from vldm_jax.errors import UserError

    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UserError(f"--resolution {text!r} is not HxW (e.g. 256x256) or a single size")
    return sizes[0], sizes[1]


def _cmd_prepare(args) -> int:
    from vldm_jax.data.array_record import prepare_array_record

    encoder = info = None
    if args.encode:
        from vldm_jax.train.cached_features import pipeline_encoder

        encoder, info = pipeline_encoder(args.encode, batch_size=args.encode_batch, allow_pickle=args.allow_pickle)
    spec = prepare_array_record(args.source, args.out, num_frames=args.frames,
                                resolution=_parse_resolution(args.resolution), shards=args.shards,
                                frame_stride=args.stride, fps=args.fps, workers=args.workers,
                                overwrite=args.overwrite, encoder=encoder, encode_batch=args.encode_batch,
                                encoded_info=info, echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{spec['num_examples']} clips, {spec['num_skipped']} skipped: train with --data {args.out}")
    return 0


COMMANDS = {"txt2img": _cmd_txt2img, "generate": _cmd_generate, "interpolate": _cmd_interpolate,
            "animate": _cmd_animate, "convert": _cmd_convert, "train": _cmd_train,
            "benchmark": _cmd_benchmark}
COMMANDS["upscale"] = _cmd_upscale
COMMANDS["prepare"] = _cmd_prepare


# Commands whose compiled programs are worth keeping between runs (persistent compilation cache).
CACHED_COMMANDS = ("txt2img", "generate", "interpolate", "animate", "upscale")


def _register_eval_commands():  # vldm eval fvd|fid|clipsim, vldm sample (vldm_jax/cli_eval.py)
    global CACHED_COMMANDS
    from vldm_jax import cli_eval

    COMMANDS.update(cli_eval.COMMANDS)
    CACHED_COMMANDS = CACHED_COMMANDS + cli_eval.CACHED_COMMANDS


_register_eval_commands()


def main(argv: list[str] | None = None) -> int:
    # transformers (the tokenizer) announces on import that PyTorch is missing, which it does not need here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from vldm_jax.errors import UserError

    parser = _build_parser()
    # `vldm benchmark` hands every argument after it to scripts/benchmark.py's own parser.
    args, extra = parser.parse_known_args(argv)
    if args.command == "benchmark":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.attention:
        from vldm_jax.nn.attention import set_attention_implementation

        set_attention_implementation(args.attention)
    if args.command in CACHED_COMMANDS:
        from vldm_jax.pipelines.common import enable_compilation_cache

        enable_compilation_cache()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"vldm: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vldm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
