"""The small-scale FVD table: moving-shapes FVD (features of the small I3D trained by
scripts/train_shapes_i3d.py) beside the pixel judge's numbers (vldm_jax.eval.shapes, as scripts/evaluate_shapes.py
reports them), for real clips, shuffled-frame real clips, the image-only baseline, the bundled Video LDM's key
frames, and its key frames + interpolation.

    python scripts/shapes_fvd.py --cache runs/shapes_fvd --temporal-decoder runs/shapes_decoder/vae \
        --json docs/shapes_fvd.json   # sampling ~11 min of CPU, FVD 30 s

Sets (``--n`` videos each, default 60 = every colour x shape x direction prompt once, 64x64):

- reference: rendered clips, 17 frames, one per prompt at a random speed (seed 0). FVD is against this set.
- ``real (other clips)``: the same prompts rendered again (seed 1): FVD's floor at this set size.
- ``real, frames shuffled``: those clips with their frames in random order (the judge's chance reference).
- ``image-only baseline``: the bundled Video LDM's key-frame U-Net with every temporal layer switched off (the
  AlphaBlenders' alpha = 1: exactly its frozen image LDM), 5 frames sampled together: independent images.
- ``Video LDM key frames``: the bundled model's 5 key frames; ``+ interpolation x4``: the same samples after the
  interpolation model (17 frames), decoded frame by frame by the bundled image decoder.
- ``+ fine-tuned temporal decoder`` (with ``--temporal-decoder``): the same latents decoded by a temporal
  decoder. The bundled model has none; scripts/finetune_shapes_decoder.py fine-tunes one briefly from the
  bundled image VAE (a few minutes of CPU: a stand-in for the paper's decoder fine-tuning, not a reproduction).

Two FVD columns: on 5 frames (the key-frame rate: the reference and real rows take every 4th frame) and on
17 frames. Small sets (60 videos) make FVD biased upwards; the real-vs-real row gives the floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_I3D = ROOT / "vldm_jax" / "assets" / "shapes_i3d"


def _evaluate_shapes():
    spec = importlib.util.spec_from_file_location("evaluate_shapes", ROOT / "scripts" / "evaluate_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_for_prompts(prompts, frames: int, size: int, seed: int) -> np.ndarray:
    from vldm_jax.data.moving_shapes import render_clip

    rng = np.random.default_rng([seed, 17])
    out = []
    for prompt in prompts:
        e = prompt.split()  # "a {color} {shape} moving {direction}"
        out.append(render_clip(e[1], e[2], e[4], ["slow", "fast"][int(rng.integers(2))], frames, size, rng).frames)
    return np.stack(out)


def image_only(pipe):
    """A copy of ``pipe`` whose key-frame U-Net has every temporal layer switched off (alpha = 1)."""
    import jax.numpy as jnp
    from flax import nnx

    from vldm_jax.nn.temporal import AlphaBlender
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    unet = nnx.clone(pipe.unet)
    n = 0
    for _, m in nnx.iter_graph(unet):
        if isinstance(m, AlphaBlender):
            fixed = m.merge_strategy == "fixed"
            m.mix_factor[...] = jnp.full_like(m.mix_factor[...], 1.0 if fixed else 30.0)  # sigmoid(30) = 1 in f32
            n += 1
    if n == 0:
        raise SystemExit("the key-frame U-Net has no AlphaBlender: no temporal layers to switch off")
    return TextToVideoPipeline(unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config,
                               clip_skip=pipe.clip_skip, defaults=pipe.defaults)


def _decoder_note(folder) -> str:
    info = Path(folder).parent / "training.json"
    if info.is_file():
        steps = json.loads(info.read_text()).get("steps")
        return f"{steps} steps here"
    return Path(folder).name


def table(rows: dict, judge_rows: dict) -> str:
    head = ("| set | n | FVD, 5 frames | FVD, 17 frames | judge ok % | colour % | shape % | direction % | "
            "R²≥0.8 % |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        s = judge_rows[name]

        def f(x):
            return "-" if x is None else f"{x:.1f}"

        def pct(x):
            return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"

        lines.append(f"| {name} | {r['n']} | {f(r.get('fvd5'))} | {f(r.get('fvd17'))} | {pct(s['ok'])} | "
                     f"{pct(s['color'])} | {pct(s['shape'])} | {pct(s['direction'])} | {pct(s['r2_pass'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--i3d", default=str(DEFAULT_I3D), help="feature network folder (scripts/train_shapes_i3d.py)")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--n", type=int, default=60, help="videos per set (up to 60: evenly spaced prompts; more cycle)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the generated rows")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None, help="keep the generated samples here (samples.npz) and reuse them")
    p.add_argument("--samples-only", action="store_true", help="generate (and cache) the samples, then stop")
    p.add_argument("--real-only", action="store_true", help="only the rendered rows (no sampling): checks the "
                                                               "feature network")
    p.add_argument("--temporal-decoder", default=None,
                   help="a temporal VAE folder (scripts/finetune_shapes_decoder.py): adds the row that decodes the "
                        "Video LDM's latents with it instead of the image decoder")
    args = p.parse_args(argv)

    from vldm_jax.checkpoints.i3d import load_i3d
    from vldm_jax.eval.frechet import RunningStats, frechet_distance_of, write_json
    from vldm_jax.eval.fvd import i3d_extractor
    from vldm_jax.eval.shapes import judge_many
    from vldm_jax.io.video import to_uint8
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    es = _evaluate_shapes()
    # n <= 60: evenly spaced prompts (every colour, shape and direction from 12 on); more cycle through all 60
    prompts = (es.prompt_subset(args.n) if args.n <= len(es.PROMPTS)
               else [es.PROMPTS[i % len(es.PROMPTS)] for i in range(args.n)])
    size, frames = 64, 17
    net_size = 32  # the feature network sees 32x32 frames (scripts/train_shapes_i3d.py)
    t_start = time.perf_counter()
    timings = {}
    cache = Path(args.cache) / f"samples_n{args.n}_seed{args.seed}_steps{args.steps}.npz" if args.cache else None
    latents = None
    if args.real_only:
        base = videos = None
        factor = 4
    elif cache is not None and cache.is_file():
        with np.load(cache) as f:
            base, videos, factor = f["base"], f["videos"], int(f["factor"])
            latents = f["latents"] if "latents" in f else None
    else:
        t = time.perf_counter()
        pipe = TextToVideoPipeline.from_pretrained(args.checkpoint or default_checkpoint())
        factor = pipe.default("interpolate", 4)
        window = pipe.default("num_frames", 5)
        if (window - 1) * factor + 1 != frames:
            raise SystemExit(f"the model gives {(window - 1) * factor + 1} frames; this table expects {frames}")
        base = to_uint8(image_only(pipe)(prompts, interpolate=1, num_inference_steps=args.steps, seed=args.seed))
        timings["image-only samples"] = time.perf_counter() - t
        t = time.perf_counter()
        videos, latents = pipe(prompts, interpolate=factor, num_inference_steps=args.steps, seed=args.seed,
                               return_latents=True)
        videos, latents = to_uint8(videos), np.asarray(latents)
        timings["Video LDM samples"] = time.perf_counter() - t
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp.npz")
            np.savez(tmp, base=base, videos=videos, factor=factor, latents=latents)
            tmp.replace(cache)
    print(f"samples: {json.dumps({k: round(v, 1) for k, v in timings.items()})}", file=sys.stderr, flush=True)
    if args.samples_only:
        return 0

    ex = i3d_extractor(load_i3d(args.i3d), size=net_size, frames=frames, batch_size=20)

    def stats(videos):
        return RunningStats().update(ex(videos))

    reference = render_for_prompts(prompts, frames, size, seed=0)
    ref5, ref17 = stats(reference[:, ::4]), stats(reference)
    sets = {}
    real = render_for_prompts(prompts, frames, size, seed=1)
    sets["real (other clips)"] = (real[:, ::4], real)
    sets["real, frames shuffled"] = (es.shuffled(real[:, ::4], seed=2), es.shuffled(real, seed=2))
    if not args.real_only:
        sets["image-only baseline (temporal layers off)"] = (base, None)
        sets["Video LDM key frames"] = (videos[:, ::factor], None)
        sets[f"Video LDM key frames + interpolation x{factor}"] = (None, videos)
    if args.temporal_decoder and not args.real_only:
        if latents is None:
            raise SystemExit(f"{cache} holds no latents (made before --temporal-decoder existed); delete it")
        from vldm_jax.checkpoints.store import load_converted
        from vldm_jax.pipelines.stages import LatentCodec

        t = time.perf_counter()
        codec = LatentCodec(load_converted(args.temporal_decoder))
        decoded = np.concatenate([to_uint8(np.asarray(codec.decode(latents[i:i + 10], chunk=None)))
                                  for i in range(0, len(latents), 10)])  # the whole clip in one chunk
        timings["temporal decoding"] = time.perf_counter() - t
        sets[f"+ fine-tuned temporal decoder (same latents; {_decoder_note(args.temporal_decoder)})"] = (None, decoded)

    rows, judged = {}, {}
    t = time.perf_counter()
    for name, (five, seventeen) in sets.items():
        r = {"n": args.n}
        if five is not None:
            r["fvd5"] = frechet_distance_of(ref5, stats(five))
        if seventeen is not None:
            r["fvd17"] = frechet_distance_of(ref17, stats(seventeen))
        rows[name] = r
        judged[name] = judge_many(seventeen if seventeen is not None else five, prompts)
    timings["features + judge"] = time.perf_counter() - t
    rows["reference (rendered, seed 0)"] = {"n": args.n}
    judged["reference (rendered, seed 0)"] = judge_many(reference, prompts)
    rows = {"reference (rendered, seed 0)": rows.pop("reference (rendered, seed 0)"), **rows}

    text = table(rows, judged)
    print(text)
    feat = {"videos": ex.count, "seconds": round(ex.seconds, 1),
            "seconds_per_1000_videos": round(1000 * ex.seconds / max(ex.count, 1), 1)}
    print(f"features: {json.dumps(feat)}; timings (s): "
          f"{json.dumps({k: round(v, 1) for k, v in timings.items()})}; total {time.perf_counter() - t_start:.0f}s",
          file=sys.stderr)
    if args.json:
        write_json(args.json, {
            "rows": {k: {**v, "judge": {kk: vv for kk, vv in judged[k].items()
                                        if kk in ("n", "ok", "color", "shape", "direction", "r2_pass", "r2_mean")}}
                     for k, v in rows.items()},
            "features": feat, "timings": {k: round(v, 1) for k, v in timings.items()}, "table": text,
            "command": "python scripts/shapes_fvd.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
