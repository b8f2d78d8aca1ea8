"""``vldm eval fvd|fid|clipsim`` and ``vldm sample``: the paper's metrics and the evaluation sets they judge.

Kept apart from cli.py (which registers these with :func:`add_parsers` and :data:`COMMANDS`) so each command
family is one block.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="metrics: FVD (I3D) and per-frame FID (Inception) between two sets, CLIPSIM of videos and prompts")
    ev = p.add_subparsers(dest="metric", required=True, parser_class=type(p))

    q = ev.add_parser("fvd", help="Fréchet Video Distance between two folders of videos (mp4/gif/webp) or "
                                  "prepared array_record datasets; a saved .npz of statistics also works")
    q.add_argument("real")
    q.add_argument("generated")
    q.add_argument("--i3d", required=True, help="I3D weights: i3d_pretrained_400 / rgb_imagenet as .safetensors, "
                                                ".pt with --allow-pickle, or a folder with i3d_config.json")
    q.add_argument("--frames", type=int, default=16, help="first frames of each video used (default 16)")
    q.add_argument("--size", type=int, default=224, help="frames resized to SIZE x SIZE (default 224)")
    q.add_argument("--antialias", action="store_true", help="antialiased resize (the PyTorch references do not)")
    q.add_argument("--limit", type=int, default=None, help="use at most this many videos of each set")
    q.add_argument("--save-stats", default=None, help="also write the real set's statistics (.npz) for reuse")
    _common(q)

    q = ev.add_parser("fid", help="per-frame Fréchet Inception Distance between two folders of images and/or "
                                  "videos (every frame) or prepared array_record datasets; a saved .npz of "
                                  "statistics also works")
    q.add_argument("real")
    q.add_argument("generated")
    q.add_argument("--inception", required=True, help="FID Inception weights: pytorch-fid's "
                                                      "pt_inception-2015-12-05 as .safetensors, .pth with "
                                                      "--allow-pickle, or a folder with inception_config.json")
    q.add_argument("--frames", type=int, default=None, help="first frames of each video used (default: all)")
    q.add_argument("--size", type=int, default=299, help="frames resized to SIZE x SIZE (default 299)")
    q.add_argument("--antialias", action="store_true", help="antialiased resize (pytorch-fid does not)")
    q.add_argument("--limit", type=int, default=None, help="use at most this many files (videos or images) a set")
    q.add_argument("--save-stats", default=None, help="also write the real set's statistics (.npz) for reuse")
    _common(q, batch=32, unit="frames")

    q = ev.add_parser("clipsim", help="mean per-frame CLIP image-text cosine similarity of videos and prompts")
    q.add_argument("videos", help="folder of videos (sorted by name)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt a line, in the order of the sorted videos")
    src.add_argument("--captions", help="CSV with columns video (file name) and caption (vldm sample writes one)")
    q.add_argument("--clip", required=True, help="transformers CLIPModel folder or hub id "
                                                 "(e.g. openai/clip-vit-base-patch32)")
    q.add_argument("--scale", type=float, default=1.0, help="multiply the cosine (100 for CLIPScore-style tables)")
    _common(q)

    p = sub.add_parser("sample", help="generate an evaluation set: K videos per prompt, resumable (existing "
                                      "files are skipped; every file is written atomically)")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line")
    p.add_argument("--n-per-prompt", type=int, default=1)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="mp4", choices=("mp4", "gif", "webp"))
    p.add_argument("--frames", type=int, default=None, help="keyframes (default: the model's)")
    p.add_argument("--interpolate", type=int, default=None, help="1, 4 or 16 (default: the model's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="video i (prompt p, sample k; i = p * K + k) uses seed + i")


def _common(q: argparse.ArgumentParser, batch: int = 8, unit: str = "videos") -> None:
    q.add_argument("--batch", type=int, default=batch, help=f"{unit} per device step (rounded up to the device "
                                                            f"count; default {batch})")
    q.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=8 (default: every device on data)")
    q.add_argument("--allow-pickle", action="store_true", help="allow .pt/.bin pickle weights (trusted files only)")
    q.add_argument("--json", default=None, help="write the result here (JSON, atomically)")


def _mesh(text):
    from vldm_jax.parallel.mesh import make_mesh, mesh_from_sizes, parse_mesh

    return mesh_from_sizes(parse_mesh(text)) if text else make_mesh()


def _finish(result: dict, args) -> int:
    import json

    from vldm_jax.eval.frechet import write_json

    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))
    return 0


def _cmd_eval(args) -> int:
    from vldm_jax.errors import UserError

    for name in ("batch", "frames", "size", "limit"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1 (got {v})")
    return {"fvd": _eval_fvd, "fid": _eval_fid, "clipsim": _eval_clipsim}[args.metric](args)


def _eval_fvd(args) -> int:
    from vldm_jax.checkpoints.i3d import load_i3d
    from vldm_jax.eval.fvd import fvd_of_folders, i3d_extractor

    for path in (args.real, args.generated):
        if not Path(path).exists():
            from vldm_jax.errors import UserError

            raise UserError(f"not found: {path}")
    model = load_i3d(args.i3d, allow_pickle=args.allow_pickle)
    ex = i3d_extractor(model, size=args.size, frames=args.frames, batch_size=args.batch, mesh=_mesh(args.mesh),
                       antialias=args.antialias)
    t0 = time.perf_counter()

    def progress(n):
        print(f"\r{n} videos ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr, flush=True)

    out = fvd_of_folders(args.real, args.generated, ex, frames=args.frames, limit=args.limit,
                         save_stats=args.save_stats, progress=progress)
    print(file=sys.stderr)
    out.update(frames=args.frames, size=args.size, i3d=str(args.i3d))
    return _finish(out, args)


def _eval_fid(args) -> int:
    from vldm_jax.checkpoints.inception import load_inception
    from vldm_jax.errors import UserError
    from vldm_jax.eval.fid import fid_of_folders, inception_extractor
    from vldm_jax.models.inception import MIN_SIZE

    for path in (args.real, args.generated):
        if not Path(path).exists():
            raise UserError(f"not found: {path}")
    if args.size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} (the Inception's smallest input), got {args.size}")
    model = load_inception(args.inception, allow_pickle=args.allow_pickle)
    ex = inception_extractor(model, size=args.size, batch_size=args.batch, mesh=_mesh(args.mesh),
                             antialias=args.antialias)
    t0 = time.perf_counter()

    def progress(n):
        print(f"\r{n} frames ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr, flush=True)

    out = fid_of_folders(args.real, args.generated, ex, frames=args.frames, limit=args.limit,
                         save_stats=args.save_stats, progress=progress)
    print(file=sys.stderr)
    out.update(frames=args.frames, size=args.size, inception=str(args.inception))
    return _finish(out, args)


def _eval_clipsim(args) -> int:
    import numpy as np

    from vldm_jax.errors import UserError
    from vldm_jax.eval.clipsim import load_clip, read_prompts
    from vldm_jax.eval.features import video_files
    from vldm_jax.io.video import read_video

    files = video_files(args.videos)
    if not files:
        raise UserError(f"{args.videos}: no videos")
    prompts = read_prompts(args.prompts, args.captions)
    if isinstance(prompts, dict):
        missing = [f.name for f in files if f.stem not in prompts]
        if missing:
            raise UserError(f"{args.captions} has no caption for {missing[0]} ({len(missing)} videos without one)")
        texts = [prompts[f.stem] for f in files]
    else:
        if len(prompts) != len(files):
            raise UserError(f"{len(files)} videos but {len(prompts)} prompts in {args.prompts}")
        texts = prompts
    clipsim = load_clip(args.clip, allow_pickle=args.allow_pickle, mesh=_mesh(args.mesh), batch_size=args.batch,
                        scale=args.scale)
    scores = []
    for i, (f, text) in enumerate(zip(files, texts)):
        scores.append(float(clipsim.score(read_video(f)[0][None], [text])[0]))
        print(f"\r{i + 1}/{len(files)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return _finish({"clipsim": float(np.mean(scores)), "n_videos": len(files), "scale": args.scale,
                    "clip": str(args.clip)}, args)


def _cmd_sample(args) -> int:
    import csv
    import io
    import os

    from vldm_jax.errors import UserError
    from vldm_jax.io.video import write_video

    if args.n_per_prompt < 1:
        raise UserError(f"--n-per-prompt must be at least 1 (got {args.n_per_prompt})")
    p = Path(args.prompts)
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{p}: no prompts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k = args.n_per_prompt
    items = [(f"{i:05d}_{j:03d}.{args.format}", prompt, i * k + j)
             for i, prompt in enumerate(prompts) for j in range(k)]
    # The captions file first (deterministic, so a restart rewrites the same bytes): vldm eval clipsim --captions.
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video", "caption", "seed"])
    w.writerows([name, prompt, args.seed + idx] for name, prompt, idx in items)
    tmp = out / ".captions.csv.tmp"
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, out / "captions.csv")
    # A killed run may leave a temporary file (a hidden name); it is never mistaken for a video.
    for stale in out.glob(".*"):
        if stale.is_file() and not stale.name.startswith(".captions"):
            stale.unlink()
    todo = [it for it in items if not (out / it[0]).is_file()]
    print(f"{len(items)} videos, {len(items) - len(todo)} already in {out}, {len(todo)} to generate",
          file=sys.stderr, flush=True)
    if not todo:
        return 0
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    pipe = TextToVideoPipeline.from_pretrained(args.checkpoint if args.checkpoint is not None else default_checkpoint())
    factor = args.interpolate if args.interpolate is not None else pipe.default("interpolate", 1)
    fps = args.fps or pipe.default("fps", 8) * factor
    t0 = time.perf_counter()
    for n, (name, prompt, idx) in enumerate(todo, 1):
        video = pipe(prompt, num_frames=args.frames, height=args.height, width=args.width,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                     interpolate=args.interpolate, seed=args.seed + idx)[0]
        write_video(out / name, video, fps=fps)
        dt = time.perf_counter() - t0
        print(f"[{n}/{len(todo)}] wrote {name} ({dt / n:.1f}s per video, ~{dt / n * (len(todo) - n):.0f}s left)",
              file=sys.stderr, flush=True)
    return 0


COMMANDS = {"eval": _cmd_eval, "sample": _cmd_sample}
CACHED_COMMANDS = ("sample",)
