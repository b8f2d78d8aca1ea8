"""Judges moving-shapes data and the bundled model's stages with the pixel judge (vldm_jax.eval.shapes).

    python scripts/evaluate_shapes.py --real 120                       # rendered clips (the judge's own check)
    python scripts/evaluate_shapes.py --vae runs/shapes/vae/export/vae  # VAE reconstructions of rendered clips
    python scripts/evaluate_shapes.py --image runs/shapes/image/export/pipeline --seeds 2 --out runs/shapes/eval

Rows (one per source), each judged against its prompt:

- ``real``: rendered clips, all colour x shape x direction x speed combinations (the judge must be ~100 %).
- ``real, frames shuffled``: the same clips with their frames in random order (direction/R² must fail: a
  chance-level reference for "an image model has no motion").
- ``vae``: rendered clips encoded and decoded frame by frame by a VAE (reconstruction MAE in [0, 1] too).
- ``image``: images of the image LDM for every ``a {color} {shape} moving {direction}`` prompt (60) and each
  seed; judged on colour and shape (an image has no direction). ``--out`` writes a PNG grid per seed.

- ``image LDM, frames independent`` (``--independent``): each prompt sampled ``--video-frames`` times by the image
  pipeline with different seeds and stacked as a video (the paper's image-only baseline: no temporal layers, so
  the direction is chance).
- ``Video LDM keyframes`` / ``Video LDM keyframes + interpolation x4`` (``--video``): the Video LDM pipeline for
  every prompt and seed (the keyframes are frames 0, 4, 8, ... of the interpolated video: the same sample).
- ``Video LDM animate (drawn first frame)`` (``--video``): the first frame of a rendered clip of the prompt's
  colour, shape and direction, animated by the prediction model with the prompt.

New rows (issue 22), each on ``--prompts N`` of the 60 prompts (default all) and the ``--video`` model; with
``--no-standard`` the rows above are skipped:

- ``long (K key frames xF)`` (``--long K``): K key frames at once (the temporal layers convolutional in time), then
  the pipeline's interpolation; judged over the whole track.
- ``rollout (W windows)`` (``--rollout W``): the key-frame window, then W-1 prediction windows each continuing the
  newest ``--rollout-context`` key frames, then interpolation; judged over the whole track and for jumps at the
  seams (the ``seams`` column: rate of videos without one).
- ``animate (SETTING renderer)`` (``--animate-settings varied,held_out``): first frames drawn by the renderer with
  that setting (other sizes, positions, outlines, noise), animated.
- ``real (SETTING renderer)`` (``--real-settings held_out``): rendered clips of that setting (the judge's check).
- ``upscaled`` (``--upscaled``, a pipeline with an upsampler): the key frames + interpolation, upscaled, judged after
  downscaling back (area mean); the ``sharpness`` figure is the mean gradient magnitude of the upscaled frames over
  that of bicubic upscaling of the same 64x64 frames (> 1: sharper than bicubic).
``--json FILE`` writes the summaries (without per-item rows unless ``--rows``). ``--save DIR`` writes each new row's
videos (uint8 npz) so they can be judged again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from vldm_jax.data.moving_shapes import COLORS, COMBINATIONS, DIRECTIONS, SHAPES, caption_for, render_clip
from vldm_jax.eval.shapes import judge_many

PROMPTS = [caption_for(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def rendered(count: int, frames: int, size: int, seed: int = 0, setting: str | None = None):
    """``count`` clips cycling through every combination: (videos uint8 (N, F, H, W, 3), prompts)."""
    videos, prompts = [], []
    for i in range(count):
        c, s, d, sp = COMBINATIONS[i % len(COMBINATIONS)]
        clip = render_clip(c, s, d, sp, frames, size, np.random.default_rng([seed, i]), setting)
        videos.append(clip.frames)
        prompts.append(caption_for(c, s, d, sp))
    return np.stack(videos), prompts


def shuffled(videos: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([v[rng.permutation(len(v))] for v in videos])


def vae_reconstructions(folder: str, videos: np.ndarray, batch: int = 64, noise: float = 0.0):
    """Frames encoded (posterior mean) and decoded by the VAE in ``folder``: float [0, 1], same shape. ``noise``:
    std of Gaussian noise added to the latents in scaled units (``scaling_factor`` x raw, what an LDM sees)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vldm_jax.checkpoints.load import load_model

    vae = load_model(folder)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def roundtrip(state, x, key):
        model = nnx.merge(graphdef, state)
        z = model.encode(x).mode()
        z = z + (noise / model.config.scaling_factor) * jax.random.normal(key, z.shape)
        return jnp.clip(model.decode(z) / 2 + 0.5, 0.0, 1.0)

    frames = videos.reshape((-1,) + videos.shape[2:]).astype(np.float32) / 127.5 - 1.0
    out = []
    for i in range(0, len(frames), batch):
        chunk = frames[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(roundtrip(state, jnp.asarray(chunk), jax.random.key(i)))[:batch - pad])
    return np.concatenate(out).reshape(videos.shape)


def image_samples(folder: str, seeds: int, steps: int, guidance: float, scheduler: str, vae: str | None = None):
    """Images of the text-to-image pipeline in ``folder`` for every prompt and seed: (images (S, P, H, W, 3),
    prompts); ``vae``: another VAE folder to decode with (a fine-tuned decoder of the same encoder)."""
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder)
    if vae:
        from vldm_jax.checkpoints.load import load_model

        other = load_model(vae)
        pipe = TextToImagePipeline(pipe.unet, other, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config)
    out = []
    for seed in range(seeds):
        out.append(pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=seed))
    return np.stack(out), PROMPTS


def independent_frames(folder: str, frames: int, seed: int, steps: int, guidance: float, scheduler: str):
    """The image-only baseline: every prompt sampled ``frames`` times (seeds ``seed*frames + k``), as videos
    ``(P, F, H, W, 3)``."""
    from vldm_jax.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder)
    shots = [pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                  seed=1000 + seed * frames + k) for k in range(frames)]
    return np.stack(shots, axis=1)


def video_samples(folder: str | None, seed: int, steps: int | None, scheduler: str):
    """Text-to-video with interpolation (x4) and animate for every prompt: (videos (P, F, H, W, 3) float,
    animated (P, F', H, W, 3) float, first frames uint8 (P, H, W, 3))."""
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    pipe = TextToVideoPipeline.from_pretrained(folder or default_checkpoint())
    factor = pipe.default("interpolate", 1)
    videos = pipe(PROMPTS, num_inference_steps=steps, scheduler=scheduler, seed=seed, interpolate=factor)
    window = pipe.default("num_frames", 5)
    rng = np.random.default_rng([7, seed])
    firsts, animated = [], []
    for prompt in PROMPTS:
        e = prompt.split()
        clip = render_clip(e[1], e[2], e[4], ["slow", "fast"][int(rng.integers(2))], window, videos.shape[2], rng)
        firsts.append(clip.frames[0])
        animated.append(pipe.animate(clip.frames[0], prompt, num_inference_steps=steps, scheduler=scheduler,
                                     seed=seed, interpolate=factor))
    return videos, np.stack(animated), np.stack(firsts), factor


def prompt_subset(count: int | None) -> list[str]:
    """``count`` of the 60 prompts, evenly spaced (every colour, shape and direction appears for ``count >= 12``)."""
    if not count or count >= len(PROMPTS):
        return list(PROMPTS)
    return [PROMPTS[int(i)] for i in np.linspace(0, len(PROMPTS), count, endpoint=False)]


def long_samples(pipe, prompts, seed: int, keyframes: int, rollout: int = 1, rollout_context: int = 1,
                 scheduler: str = "ddim", batch: int = 20):
    """Text-to-video with ``keyframes`` key frames (and ``rollout`` windows), interpolated with the pipeline's
    factor: (videos (P, F, H, W, 3) float, factor, key-frame seams)."""
    factor = pipe.default("interpolate", 1)
    out = []
    for i in range(0, len(prompts), batch):
        out.append(pipe(prompts[i:i + batch], num_frames=keyframes, scheduler=scheduler, seed=seed,
                        interpolate=factor, rollout=rollout, rollout_context=rollout_context))
    seams = pipe.rollout_seams(keyframes, rollout, rollout_context) if rollout > 1 else []
    return np.concatenate(out), factor, seams


def animate_drawn(pipe, prompts, seed: int, setting: str, scheduler: str = "ddim"):
    """First frames drawn by the renderer with ``setting`` for each prompt, animated: (videos, first frames)."""
    factor = pipe.default("interpolate", 1)
    window = pipe.default("num_frames", 5)
    size = pipe._size(None, None)[0]
    rng = np.random.default_rng([11, seed])
    firsts, videos = [], []
    for prompt in prompts:
        e = prompt.split()
        clip = render_clip(e[1], e[2], e[4], ["slow", "fast"][int(rng.integers(2))], window, size, rng, setting)
        firsts.append(clip.frames[0])
        videos.append(pipe.animate(clip.frames[0], prompt, scheduler=scheduler, seed=seed, interpolate=factor))
    return np.stack(videos), np.stack(firsts)


def downscale(videos: np.ndarray, factor: int) -> np.ndarray:
    """Area-mean downscaling of ``(..., H, W, 3)`` by an integer ``factor``."""
    *lead, h, w, c = videos.shape
    v = videos.reshape(*lead, h // factor, factor, w // factor, factor, c)
    return v.mean(axis=(-4, -2))


def gradient_energy(videos: np.ndarray) -> float:
    """Mean gradient magnitude of the frames (a sharpness figure; higher is sharper)."""
    v = np.asarray(videos, np.float64).mean(axis=-1)
    gy, gx = np.diff(v, axis=-2)[..., :, :-1], np.diff(v, axis=-1)[..., :-1, :]
    return float(np.mean(np.hypot(gx, gy)))


def bicubic(videos: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic upscaling of ``(N, F, H, W, 3)`` frames in [0, 1] by ``factor`` (jax.image.resize)."""
    import jax

    n, f, h, w, c = videos.shape
    return np.clip(np.asarray(jax.image.resize(videos.astype(np.float32), (n, f, h * factor, w * factor, c),
                                               "cubic")), 0.0, 1.0)


def sharpness_ratio(upscaled: np.ndarray, low: np.ndarray) -> float:
    """Gradient energy of ``upscaled`` over that of bicubic upscaling of ``low`` (same factor)."""
    factor = upscaled.shape[-2] // low.shape[-2]
    return gradient_energy(upscaled) / max(gradient_energy(bicubic(low, factor)), 1e-12)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """``(N, H, W, 3)`` -> one image, ``columns`` wide, with a 2-pixel grey border between cells."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 0.35, np.float32)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = im
    return out


def table(rows: dict[str, dict]) -> str:
    head = ("| source                       |    n |  ok % | colour % | shape % | direction % | R²≥0.8 % | R² mean |\n"
            "|------------------------------|------|-------|----------|---------|-------------|----------|---------|")
    seams = any("seams_ok" in s for s in rows.values())
    if seams:
        head = head.replace("R² mean |\n", "R² mean | no seam jump % |\n") + "---------------|"
    lines = [head]
    for name, s in rows.items():
        video = s.get("video", True)

        def pct(x, show=True):
            return "-" if (not show or x is None or not np.isfinite(x)) else f"{100 * x:.1f}"

        r2 = "-" if not video or not np.isfinite(s["r2_mean"]) else f"{s['r2_mean']:.2f}"
        lines.append(f"| {name:<28} | {s['n']:4d} | {pct(s['ok']):>5} | {pct(s['color']):>8} | "
                     f"{pct(s['shape']):>7} | {pct(s['direction'], video):>11} | {pct(s['r2_pass'], video):>8} | "
                     f"{r2:>7} |" + (f" {pct(s.get('seams_ok')):>13} |" if seams else ""))
    return "\n".join(lines)


def new_rows(args, video_seeds, results: dict, timings: dict) -> None:
    """The issue-22 rows (long, rollout, animate from other renderer settings, upscaled) into ``results``."""
    from vldm_jax.io.video import to_uint8
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    pipe = TextToVideoPipeline.from_pretrained(default_checkpoint() if args.video == "default" else args.video)
    prompts = prompt_subset(args.prompts)
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    def record(name, videos, prm, **judge_kwargs):
        results[name] = judge_many(videos, prm, **judge_kwargs)
        print(table({name: results[name]}).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:  # after every row, so a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                   for k, v in results.items()}, indent=1, default=str))
        if save:
            slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
            np.savez_compressed(save / f"{slug}.npz", videos=to_uint8(videos), prompts=np.asarray(prm))

    for setting in filter(None, args.animate_settings.split(",")):
        t = time.perf_counter()
        runs = [animate_drawn(pipe, prompts, s, setting, args.scheduler) for s in video_seeds]
        record(f"animate ({setting} renderer)", np.concatenate([r[0] for r in runs]), prompts * len(video_seeds))
        timings[f"animate {setting}"] = time.perf_counter() - t
    window = pipe.default("num_frames", 5)
    for keyframes, rollout, label in ((args.long, 1, "long"), (window, args.rollout, "rollout")):
        if not keyframes or (label == "rollout" and rollout < 2):
            continue
        t = time.perf_counter()
        runs = [long_samples(pipe, prompts, s, keyframes, rollout, args.rollout_context, args.scheduler)
                for s in video_seeds]
        factor, seams = runs[0][1], runs[0][2]
        videos = np.concatenate([r[0] for r in runs])
        prm = prompts * len(video_seeds)
        name = (f"long ({keyframes} key frames x{factor})" if label == "long"
                else f"rollout ({rollout} windows, {videos.shape[1]} frames)")
        record(name + ", key frames", videos[:, ::factor], prm, seams=seams)
        if factor > 1:
            record(name, videos, prm, seams=[x * factor for x in seams], seam_span=factor)
        timings[label] = time.perf_counter() - t
    if args.upscaled:
        if pipe.upsampler is None:
            print("--upscaled: this pipeline has no upsampler; row skipped", file=sys.stderr)
            return
        t = time.perf_counter()
        low, high = [], []
        for s in video_seeds:
            for prompt in prompts:
                v = pipe([prompt], scheduler=args.scheduler, seed=s)
                low.append(v[0])
                high.append(pipe.upsampler(v[0], prompt, seed=s))
        low, high = np.stack(low), np.stack(high)
        factor = high.shape[2] // low.shape[2]
        record(f"upscaled x{factor} (judged downscaled)", downscale(high, factor), prompts * len(video_seeds))
        results[f"upscaled x{factor} (judged downscaled)"]["sharpness_vs_bicubic"] = sharpness_ratio(high, low)
        timings["upscaled"] = time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", type=int, default=120, help="rendered clips to judge (0: none)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--vae", help="a VAE folder: judge its reconstructions of the rendered clips")
    p.add_argument("--image", help="a text-to-image pipeline folder: judge its images for the 60 prompts")
    p.add_argument("--vae-noise", type=float, default=0.0,
                   help="also judge --vae reconstructions of latents with this much noise (scaled units)")
    p.add_argument("--image-vae", help="decode --image samples with this VAE folder instead of the pipeline's")
    p.add_argument("--seeds", type=int, default=2, help="image samples per prompt")
    p.add_argument("--independent", help="a text-to-image pipeline folder: the image-only video baseline")
    p.add_argument("--video", nargs="?", const="default", default=None,
                   help="a Video LDM pipeline folder (no value: the bundled default model): text-to-video, "
                        "interpolation and animate rows")
    p.add_argument("--video-seeds", type=int, default=1, help="videos per prompt")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds of the video rows start here (e.g. seeds never looked at before: held out)")
    p.add_argument("--video-frames", type=int, default=5, help="frames of the image-only baseline")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--out", help="folder for PNG grids / GIFs")
    p.add_argument("--json", help="write the summaries here")
    p.add_argument("--rows", action="store_true", help="include per-item rows in --json")
    p.add_argument("--prompts", type=int, default=None, help="new rows: this many of the 60 prompts (evenly spaced)")
    p.add_argument("--long", type=int, default=0, metavar="K", help="new row: K key frames at once, interpolated")
    p.add_argument("--rollout", type=int, default=0, metavar="W", help="new row: W windows (key frames + W-1 "
                                                                        "prediction windows), interpolated")
    p.add_argument("--rollout-context", type=int, default=1, help="frames each rollout window continues (1 or 2)")
    p.add_argument("--animate-settings", default="", help="new rows: animate first frames drawn with these renderer "
                                                          "settings (comma-separated: varied,held_out)")
    p.add_argument("--real-settings", default="", help="new rows: rendered clips of these renderer settings")
    p.add_argument("--upscaled", action="store_true", help="new row: the pipeline's upsampler, judged downscaled")
    p.add_argument("--no-standard", action="store_true", help="skip the standard --video rows (new rows only)")
    p.add_argument("--save", help="write each new row's videos here (uint8 .npz)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    if args.first_seed < 0:
        p.error("--first-seed must be >= 0")
    video_seeds = range(args.first_seed, args.first_seed + args.video_seeds)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    videos, prompts = rendered(max(args.real, 1), args.frames, args.size)
    if args.real:
        t = time.perf_counter()
        results["real"] = judge_many(videos, prompts)
        results["real, frames shuffled"] = judge_many(shuffled(videos), prompts)
        timings["real"] = time.perf_counter() - t
    if args.vae:
        t = time.perf_counter()
        rec = vae_reconstructions(args.vae, videos)
        s = judge_many(rec, prompts)
        s["mae"] = float(np.mean(np.abs(rec - videos.astype(np.float32) / 255)))
        results["vae reconstructions"] = s
        if args.vae_noise > 0:
            noisy = vae_reconstructions(args.vae, videos, noise=args.vae_noise)
            s = judge_many(noisy, prompts)
            s["mae"] = float(np.mean(np.abs(noisy - videos.astype(np.float32) / 255)))
            results[f"vae, latent noise {args.vae_noise:g}"] = s
            if out:
                from vldm_jax.io.video import write_image

                write_image(out / "vae_noisy_latents.png", grid(noisy[:12, 0], 4))
        timings["vae"] = time.perf_counter() - t
        if out:
            from vldm_jax.io.video import write_image

            pairs = np.concatenate([videos[:12, 0].astype(np.float32) / 255, rec[:12, 0]], axis=2)
            write_image(out / "vae_reconstructions.png", grid(pairs, 3))
    if args.image:
        t = time.perf_counter()
        images, image_prompts = image_samples(args.image, args.seeds, args.steps, args.guidance, args.scheduler,
                                              args.image_vae)
        flat = images.reshape((-1,) + images.shape[2:])
        s = judge_many(flat, image_prompts * args.seeds)
        s["video"] = False
        # Per colour and per shape accuracy, and the confusions.
        by = {}
        for row in s["rows"]:
            e = row["expected"]
            for key in ("color", "shape"):
                by.setdefault(f"{key}={e[key]}", []).append(row[f"{key}_ok"])
        s["by_attribute"] = {k: float(np.mean(v)) for k, v in sorted(by.items())}
        conf = {}
        for row in s["rows"]:
            k = f"{row['expected']['shape']}->{row['shape']}"
            conf[k] = conf.get(k, 0) + 1
        s["shape_confusion"] = conf
        results["image LDM samples" + (" (other VAE)" if args.image_vae else "")] = s
        timings["image"] = time.perf_counter() - t
        if out:
            from vldm_jax.io.video import write_image

            for seed, ims in enumerate(images):
                write_image(out / f"image_samples_seed{seed}.png", grid(ims, 12))

    if args.independent:
        t = time.perf_counter()
        vids = np.concatenate([independent_frames(args.independent, args.video_frames, s, args.steps, args.guidance,
                                                  args.scheduler) for s in video_seeds])
        results["image LDM, frames independent"] = judge_many(vids, PROMPTS * args.video_seeds)
        timings["independent"] = time.perf_counter() - t
        if out:
            from vldm_jax.io.video import write_video

            write_video(out / "independent_red_circle_right.gif", vids[PROMPTS.index("a red circle moving right")],
                        fps=4)
    for setting in filter(None, args.real_settings.split(",")):
        vids, prm = rendered(max(args.real, 24), args.frames, args.size, seed=1, setting=setting)
        results[f"real ({setting} renderer)"] = judge_many(vids, prm)
    if args.video and (args.long or args.rollout or args.animate_settings or args.upscaled):
        new_rows(args, video_seeds, results, timings)
    if args.video and not args.no_standard:
        from vldm_jax.io.video import write_video

        t = time.perf_counter()
        folder = None if args.video == "default" else args.video
        runs = [video_samples(folder, s, None, args.scheduler) for s in video_seeds]
        factor = runs[0][3]
        videos = np.concatenate([r[0] for r in runs])
        animated = np.concatenate([r[1] for r in runs])
        prompts_all = PROMPTS * args.video_seeds
        results["Video LDM keyframes"] = judge_many(videos[:, ::factor], prompts_all)
        if factor > 1:
            results[f"Video LDM keyframes + interpolation x{factor}"] = judge_many(videos, prompts_all)
        results["Video LDM animate (drawn first frame)"] = judge_many(animated, prompts_all)
        timings["video"] = time.perf_counter() - t
        if out:
            for name in ("a red circle moving right", "a blue square moving up", "a yellow triangle moving left",
                         "a white circle moving down", "a green square moving left"):
                i = PROMPTS.index(name)
                slug = name.replace("a ", "", 1).replace(" moving ", "_").replace(" ", "_")
                write_video(out / f"t2v_{slug}.gif", videos[i], fps=4 * factor)
                write_video(out / f"animate_{slug}.gif", animated[i], fps=4 * factor)

    print(table(results))
    for name, s in results.items():
        extra = {k: s[k] for k in ("mae", "by_attribute", "shape_confusion", "direction_confusion",
                                   "seam_jump_mean", "sharpness_vs_bicubic") if k in s}
        if extra:
            print(f"{name}: {json.dumps(extra)}")
    print(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}", file=sys.stderr)
    if args.json:
        payload = {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if not args.rows else v)
                   for k, v in results.items()}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
