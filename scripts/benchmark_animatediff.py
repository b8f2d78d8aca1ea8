"""One AnimateDiff U-Net step, ours vs diffusers, on this machine: SD 1.5 sizes (860 M spatial + 454 M motion
parameters, AnimateDiff v2 modules) with random weights, 16 frames of 64x64 latents, batch 1, float32, no guidance.

    python scripts/benchmark_animatediff.py [--frames 16] [--latent 64] [--reps 2] [--out docs/benchmarks-animatediff-cpu.json]

Both sides get the same weights (diffusers' random init, converted by our loader) and the same input; the output
difference is printed as a check. Ours: one jitted call of the video U-Net (compile time reported apart). One
model is in memory at a time (about 6 GB each plus activations): run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch
    from diffusers import UNetMotionModel
    from flax import nnx

    from vldm_jax.checkpoints.animatediff import motion_unet_config
    from vldm_jax.checkpoints.convert import UNET_RENAME, build_module
    from vldm_jax.models.unet import VideoUNet

    def reference():
        torch.manual_seed(0)  # the same random weights every time it is built
        return UNetMotionModel(cross_attention_dim=768, sample_size=64, motion_max_seq_length=32,
                               use_motion_mid_block=True).eval()

    rng = np.random.default_rng(0)
    f, s = args.frames, args.latent
    x = rng.standard_normal((1, f, s, s, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)

    # One model in memory at a time (1.3 B float32 parameters are 5.2 GB): ours first, then diffusers' rebuilt.
    ref = reference()
    config = motion_unet_config(dict(ref.config))
    unet = build_module(lambda rngs: VideoUNet(config, rngs=rngs),
                        {k: v.numpy().copy() for k, v in ref.state_dict().items()}, rename=UNET_RENAME,
                        name="random UNetMotionModel")
    del ref
    gc.collect()
    graph, state = nnx.split(unet)
    del unet
    call = jax.jit(lambda st, x, c: nnx.merge(graph, st)(x, 500, c))
    t0 = time.perf_counter()
    compiled = call.lower(state, x, ctx).compile()
    compile_s = time.perf_counter() - t0
    ours_times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        out = np.asarray(jax.block_until_ready(compiled(state, x, ctx)))
        ours_times.append(time.perf_counter() - t0)
    del state, compiled, call
    gc.collect()
    ref = reference()
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    ct = torch.from_numpy(np.repeat(ctx, f, axis=0))
    torch_times = []
    with torch.no_grad():
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            want = ref(xt, 500, ct).sample.numpy()
            torch_times.append(time.perf_counter() - t0)
    diff = float(np.abs(out.transpose(0, 4, 1, 2, 3) - want).max())
    result = {
        "what": f"AnimateDiff U-Net step, SD 1.5 + v2 motion modules (random), {f} frames x {s}x{s} latents, "
                "batch 1, float32",
        "ours_s": sorted(ours_times[1:]), "ours_compile_s": compile_s, "diffusers_s": sorted(torch_times[1:]),
        "first_calls_s": {"ours": ours_times[0], "diffusers": torch_times[0]},
        "max_abs_diff": diff, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "jax": jax.__version__, "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    print(f"| AnimateDiff U-Net step ({f}x{s}x{s}) | {np.median(ours_times[1:]):.1f} s | "
          f"{np.median(torch_times[1:]):.1f} s | compile {compile_s:.0f} s | diff {diff:.1e} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
