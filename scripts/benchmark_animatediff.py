"""One AnimateDiff U-Net step, ours vs diffusers, on this machine: SD 1.5 sizes (860 M spatial + 454 M motion
parameters, AnimateDiff v2 modules) with random weights, 16 frames of 64x64 latents, batch 1 (no guidance
doubling), float32.

    flock /work/wt/.heavy.lock python scripts/benchmark_animatediff.py [--frames 16] [--latent 64] [--reps 2] \
        [--out docs/benchmarks-animatediff-cpu.json]

Each side runs in its own subprocess, one after the other, so only one 5.3 GB model is ever in memory; each child
reports its peak resident set (``ru_maxrss``) after loading, after compiling (ours) and after the timed calls.
Both sides get the same weights: each child builds diffusers' ``UNetMotionModel`` under ``torch.manual_seed(0)``
(no weight file on disk). Ours converts it key by key, releasing each torch tensor once converted, so the torch
model and ours are never both whole in memory; then one jitted call of our video U-Net (compile time apart,
weights passed as arguments, no copy per call). Diffusers runs under ``torch.inference_mode`` with
``OMP_WAIT_POLICY=PASSIVE`` and as many threads as CPUs. The parent prints the two outputs' max abs difference
as a check, the table row and the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's vldm_jax, in the children too


def _rss_gib() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reference(small: bool = False):
    import torch
    from diffusers import UNetMotionModel

    # --small: a few-MB model of the same structure, to check the script without the 5 GB runs.
    sizes = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=768) if small else dict(cross_attention_dim=768)
    torch.manual_seed(0)  # the same random weights in both children
    with torch.no_grad():
        return UNetMotionModel(sample_size=64, motion_max_seq_length=32, use_motion_mid_block=True, **sizes).eval()


def _inputs(f: int, s: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, f, s, s, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    return x, ctx


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vldm_jax.checkpoints.animatediff import motion_unet_config
    from vldm_jax.checkpoints.convert import UNET_RENAME, abstract_module, convert_state_dict
    from vldm_jax.models.unet import VideoUNet

    x, ctx = _inputs(args.frames, args.latent)
    t0 = time.perf_counter()
    ref = _reference(args.small)
    config = motion_unet_config(dict(ref.config))
    class Consumed(dict):
        """Yields each tensor as a numpy copy and drops the torch tensor, so the torch model is released as it
        is converted (a numpy view would keep every torch buffer alive until the end)."""

        def items(self):
            while self:
                key, tensor = self.popitem()
                yield key, tensor.numpy().copy()

    # The only reference to each tensor (a plain dict beside it kept them all alive in the measured run).
    torch_state = Consumed(ref.state_dict())
    del ref
    rss_torch = _rss_gib()
    graph, abstract = abstract_module(lambda rngs: VideoUNet(config, rngs=rngs))
    arrays = convert_state_dict(torch_state, abstract, rename=UNET_RENAME, name="random UNetMotionModel")
    del torch_state
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        flat.append((path, var.replace(jnp.asarray(arrays.pop(tuple(path)), jnp.float32))))
    del arrays
    state = nnx.from_flat_state(flat)
    del flat
    gc.collect()
    load_s = time.perf_counter() - t0
    rss_load = _rss_gib()

    call = jax.jit(lambda st, x, c: nnx.merge(graph, st)(x, 500, c))
    x, ctx = jnp.asarray(x), jnp.asarray(ctx)
    t0 = time.perf_counter()
    compiled = call.lower(state, x, ctx).compile()
    compile_s = time.perf_counter() - t0
    rss_compile = _rss_gib()
    mem = compiled.memory_analysis()
    times = []
    for _ in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, x, ctx))
        times.append(time.perf_counter() - t0)
    np.save(args.output, np.asarray(out).transpose(0, 4, 1, 2, 3))
    return {"load_s": load_s, "compile_s": compile_s, "times_s": times,
            "peak_rss_gib": {"torch model built": rss_torch, "after load": rss_load, "after compile": rss_compile,
                             "after calls": _rss_gib()},
            "xla_temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else None,
            "params": int(sum(a.size for a in jax.tree.leaves(state))), "jax": jax.__version__,
            "backend": jax.default_backend()}


def run_diffusers(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    x, ctx = _inputs(args.frames, args.latent)
    t0 = time.perf_counter()
    ref = _reference(args.small)
    load_s = time.perf_counter() - t0
    rss_load = _rss_gib()
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    ct = torch.from_numpy(np.repeat(ctx, args.frames, axis=0))  # UNetMotionModel takes one context per frame
    times = []
    with torch.inference_mode():
        for _ in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            out = ref(xt, 500, ct).sample
            times.append(time.perf_counter() - t0)
    np.save(args.output, out.numpy())
    return {"load_s": load_s, "times_s": times, "peak_rss_gib": {"after load": rss_load, "after calls": _rss_gib()},
            "params": int(sum(p.numel() for p in ref.parameters())), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="timed calls per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first calls per side")
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="a tiny model of the same structure (checks the script)")
    p.add_argument("--side", choices=("ours", "diffusers"), help=argparse.SUPPRESS)  # the child's job
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.side:
        result = (run_ours if args.side == "ours" else run_diffusers)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import numpy as np

    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "diffusers"):
            out = os.path.join(tmp, f"{side}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--output", out,
                   "--frames", str(args.frames), "--latent", str(args.latent), "--reps", str(args.reps),
                   "--warmup", str(args.warmup)] + ["--small"] * args.small
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"{side} failed (exit {proc.returncode})")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            sides[side] = json.loads(line[len("RESULT "):])
            sides[side]["child_wall_s"] = time.perf_counter() - t0
            sides[side]["child_max_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            print(side, json.dumps(sides[side]), flush=True)
        diff = float(np.abs(np.load(os.path.join(tmp, "ours.npy")) - np.load(os.path.join(tmp, "diffusers.npy"))).max())
    f, s = args.frames, args.latent
    ours = float(np.median(sides["ours"]["times_s"][args.warmup:]))
    theirs = float(np.median(sides["diffusers"]["times_s"][args.warmup:]))
    result = {
        "what": f"AnimateDiff U-Net step, SD 1.5 + v2 motion modules (random weights), {f} frames x {s}x{s} "
                "latents, batch 1, float32, one process per side",
        "ours_s": ours, "diffusers_s": theirs, "speedup": theirs / ours, "max_abs_diff": diff,
        "ours": sides["ours"], "diffusers": sides["diffusers"], "warmup": args.warmup, "reps": args.reps,
        "cpus": os.cpu_count(), "load_average_end": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    print(json.dumps(result, indent=1))
    print("| frames x latent | ours s/step | diffusers s/step | speedup | ours compile s | peak RSS ours | "
          "peak RSS diffusers | max abs diff |")
    print(f"| {f} x {s}x{s} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x | {sides['ours']['compile_s']:.0f} | "
          f"{sides['ours']['peak_rss_gib']['after calls']:.1f} GiB | "
          f"{sides['diffusers']['peak_rss_gib']['after calls']:.1f} GiB | {diff:.1e} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
