"""Does the prompt's direction word change what a Video LDM pipeline generates? (issue 7 diagnostics)

    python scripts/direction_check.py                       # the bundled model
    python scripts/direction_check.py runs/gpu/assembled --seeds 6 --guidance 3

1. For each seed, the key frames of "a white circle moving {left,right,up,down}" are judged by their pixels:
   a model that reads the direction gives four different directions; one that ignores it gives the same one four
   times (the noise decides).
2. The key-frame U-Net's output on the same noisy latents, with contexts that differ in the direction word or in
   the colour word: the relative change, at several timesteps.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", nargs="?", default=None, help="a Video LDM pipeline folder (default: the bundled one)")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from vldm_jax.eval.shapes import judge
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

    pipe = TextToVideoPipeline.from_pretrained(args.pipeline or default_checkpoint())
    same = 0
    for seed in range(args.seeds):
        got = []
        for d in DIRECTIONS:
            prompt = f"a white circle moving {d}"
            video = np.asarray(pipe([prompt], interpolate=1, seed=seed, guidance_scale=args.guidance)[0])
            got.append(judge(video, prompt).direction)
        same += len(set(got)) == 1
        print(f"seed {seed}: " + ", ".join(f"{d} -> {g}" for d, g in zip(DIRECTIONS, got)), flush=True)
    print(f"{same} of {args.seeds} seeds give one direction for all four prompts")

    prompts = ["a white circle moving left", "a white circle moving right", "a red circle moving left"]
    encoded = pipe.encode_prompt(prompts)
    context = jnp.asarray(encoded[0] if isinstance(encoded, tuple) else encoded)
    cfg = pipe.unet.config
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (1, 5, cfg.sample_size, cfg.sample_size, cfg.in_channels)).astype(np.float32))
    print("t     direction word   colour word   (relative change of the U-Net output)")
    for t in (900, 500, 100):
        out = [np.asarray(pipe.unet(x, jnp.asarray([t]), context[i:i + 1])) for i in range(3)]
        scale = np.linalg.norm(out[0])
        print(f"{t:<5} {np.linalg.norm(out[1] - out[0]) / scale:>14.4f} {np.linalg.norm(out[2] - out[0]) / scale:>13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
