"""Time per stage of the Video LDM cascade (keyframes, interpolation, decode, upsampler) on this machine.

    python scripts/time_stages.py [--checkpoint FOLDER] [--frames 4] [--steps 10] [--reps 3] [--out stages.json]

Without --checkpoint it times the bundled default model, or, when that is missing, a tiny random cascade (the
test helper's). Each stage runs once to compile, then ``--reps`` times; the table shows compile + first run and the
median of the timed runs, in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np


def _timed(fn, reps: int):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times), (min(times), max(times))


def _load(checkpoint: str | None):
    from vldm_jax.pipelines.text_to_video import DEFAULT_MODEL, TextToVideoPipeline

    if checkpoint:
        return TextToVideoPipeline.from_pretrained(checkpoint), checkpoint
    if (DEFAULT_MODEL / "model_index.json").is_file():
        return TextToVideoPipeline.from_pretrained(DEFAULT_MODEL), "bundled default model"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_vldm import tiny_pipeline

    return tiny_pipeline(), "tiny random cascade (tests/helpers/tiny_vldm.py)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompt", default="a red circle moving right")
    p.add_argument("--frames", type=int, default=None, help="keyframes (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per stage (default: the model's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)

    from vldm_jax.pipelines import stages

    pipe, name = _load(args.checkpoint)
    steps = args.steps or pipe.default("num_inference_steps", 25)
    frames = args.frames or pipe.default("num_frames", 8)
    guidance = pipe.default("guidance_scale", 7.5)
    h, w = pipe._size(None, None)
    f = pipe.vae_scale_factor
    key = jax.random.key(0)
    text, null = pipe._texts([args.prompt], None, guidance != 1.0)
    noise = jax.random.normal(key, (1, frames, h // f, w // f, pipe.latent_channels))
    rows = []

    def add(stage, shape, first, median, spread):
        rows.append({"stage": stage, "output": list(shape), "compile_and_first_s": round(first, 3),
                     "median_s": round(median, 4), "min_s": round(spread[0], 4), "max_s": round(spread[1], 4)})

    keys, *t = _timed(lambda: pipe._samplers["unet"](noise, text, null, steps=steps, guidance_scale=guidance,
                                                     key=key), args.reps)
    add(f"keyframes ({steps} steps, CFG {guidance})", keys.shape, *t)
    latents = keys
    if pipe.interpolator is not None:
        latents, *t = _timed(lambda: stages.interpolate(pipe._samplers["interpolator"], keys, text, null, key=key,
                                                        steps=steps, guidance_scale=guidance), args.reps)
        add(f"interpolation x4 ({steps} steps)", latents.shape, *t)
    video, *t = _timed(lambda: pipe.codec.decode(latents, chunk=8), args.reps)
    add("decode (chunks of 8 frames)", video.shape, *t)
    if pipe.predictor is not None:
        context = keys[:, :1]
        window = frames
        pred, *t = _timed(lambda: stages.rollout(pipe._samplers["predictor"], context, window, window, text, null,
                                                 key=key, steps=steps, guidance_scale=guidance), args.reps)
        add(f"prediction, 1 context frame ({steps} steps)", pred.shape, *t)
    if pipe.upsampler is not None:
        frames_np = np.asarray(video[0])
        up, *t = _timed(lambda: pipe.upsampler(frames_np, args.prompt, num_inference_steps=steps, progress=False),
                        args.reps)
        add(f"upsampler x4 ({steps} steps)", up.shape, *t)

    print(f"model: {name}; device: {jax.devices()[0].device_kind}; {platform.processor() or platform.machine()}")
    print(f"{'stage':48s} {'output':>22s} {'compile+1st':>12s} {'median':>9s}")
    for r in rows:
        print(f"{r['stage']:48s} {str(tuple(r['output'])):>22s} {r['compile_and_first_s']:12.2f} {r['median_s']:9.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": name, "device": jax.devices()[0].device_kind, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
