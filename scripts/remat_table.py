"""XLA peak memory vs step time of the medium temporal training step under each remat policy (issue 21, item 2).

    flock /work/wt/.heavy.lock python scripts/remat_table.py --reps 3 --out docs/remat-cpu-2core.json
    python scripts/remat_table.py --policies none spatial_frozen --reps 0      # memory only (compiles)

The step is the benchmark's (scripts/benchmark.py ``temporal_train_step``: eps-MSE at t = 500, gradients of the
temporal parameters only, AdamW) on the benchmark's ``medium`` SVD-architecture video U-Net at 8 frames of 32x32
latents, random weights. Each policy is set on the model by name (``VideoUNet.set_remat``, config ``model.remat``),
the step compiled once (XLA's ``memory_analysis``: arguments + outputs + temporaries - aliased = the peak) and run
``--reps`` times after a warm-up (median). Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 2 ** 20


def medium_model(frames: int):
    from benchmark import SIZES
    from flax import nnx

    from vldm_jax.models.unet import UNetSpatioTemporalConditionConfig, VideoUNet

    fields = dict(SIZES["medium"]["video_unet"])
    fields["num_frames"] = frames
    config = UNetSpatioTemporalConditionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in fields.items()})
    return VideoUNet(config, rngs=nnx.Rngs(0))


def measure(model, policy: str, frames: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchmark import temporal_train_step, time_calls, xla_flops, xla_memory

    model.set_remat(policy)
    c = model.config
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, frames, 32, 32, c.in_channels), np.float32))
    target = jnp.asarray(rng.standard_normal((1, frames, 32, 32, c.out_channels), np.float32))
    ctx = jnp.asarray(rng.standard_normal((1, 1, c.cross_attention_dim), np.float32))
    ids = jnp.asarray(rng.uniform(0, 128, (1, c.projection_class_embeddings_input_dim // c.addition_time_embed_dim)),
                      jnp.float32)
    step, trainable, opt_state, frozen = temporal_train_step(model)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, x, ctx, ids, target).compile()
    rec = {"policy": policy, "frames": frames, "compile_s": time.perf_counter() - t0,
           "gflop": (xla_flops(compiled) or 0.0) / 1e9}
    mem = xla_memory(compiled)
    rec.update({k.replace("_bytes", "_mib"): v / MiB for k, v in mem.items()})
    if reps:
        state = {"tr": trainable, "opt": opt_state}

        def run():
            state["tr"], state["opt"], loss = compiled(state["tr"], state["opt"], frozen, x, ctx, ids, target)
            jax.block_until_ready(loss)

        rec["median_s"] = time_calls(run, reps)["median_s"]
    model.set_remat("none")
    return rec


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["policy"] == "none"), rows[0])
    out = ["| policy | XLA peak MiB | vs none | temp MiB | GFLOP | step s | vs none | compile s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("total_mib", 0.0)
        t = r.get("median_s")
        dt = f"{(t / base['median_s'] - 1) * 100:+.0f} %" if t and base.get("median_s") else "n/a"
        out.append(f"| {r['policy']} | {peak:.0f} | {(peak / base['total_mib'] - 1) * 100:+.0f} % | "
                   f"{r.get('temp_mib', 0):.0f} | {r['gflop']:.0f} | {'n/a' if t is None else f'{t:.2f}'} | {dt} | "
                   f"{r['compile_s']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from vldm_jax.models.unet import REMAT_POLICIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=list(REMAT_POLICIES), choices=list(REMAT_POLICIES))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per policy (0: memory only)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    model = medium_model(args.frames)
    rows = []
    for policy in args.policies:
        rows.append(measure(model, policy, args.frames, args.reps))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "table": table(rows)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
