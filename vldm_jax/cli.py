"""``vldm``: the command line. Anything a user can fix ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(2, f"vldm: error: {message}\n")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="diffusers pipeline folder, single-file .safetensors, converted folder, or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for single-file checkpoints")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickle checkpoints (trusted files only)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vldm", description="Video LDM in JAX: latent diffusion for images and videos.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("txt2img", help="generate an image from a text prompt with a Stable Diffusion checkpoint")
    p.add_argument("prompt")
    _add_load_args(p)
    p.add_argument("--out", default="image.png", help="output image (.png, .jpg, .webp)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", help="ddim, dpm++ or euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("convert", help="convert a checkpoint to vldm_jax's own format (loads faster)")
    p.add_argument("src", help="diffusers pipeline folder, single-file .safetensors, or hub id")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    return parser


def _cmd_txt2img(args) -> int:
    from vldm_jax.io.video import IMAGE_SUFFIXES, check_output_path, write_image
    from vldm_jax.pipelines.text_to_image import SCHEDULERS, TextToImagePipeline
    from vldm_jax.errors import UserError

    out = check_output_path(args.out, IMAGE_SUFFIXES, overwrite=args.overwrite)
    if args.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    t0 = time.perf_counter()
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    images = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                  seed=args.seed, progress=True)
    write_image(out, images[0])
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _cmd_convert(args) -> int:
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    t0 = time.perf_counter()
    pipe = TextToImagePipeline.from_pretrained(args.src, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    t1 = time.perf_counter()
    pipe.save_pretrained(args.dst)
    print(f"converted {args.src} in {t1 - t0:.1f}s, wrote {args.dst} in {time.perf_counter() - t1:.1f}s",
          file=sys.stderr)
    return 0


COMMANDS = {"txt2img": _cmd_txt2img, "convert": _cmd_convert}


def main(argv: list[str] | None = None) -> int:
    from vldm_jax.errors import UserError

    args = _build_parser().parse_args(argv)
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
