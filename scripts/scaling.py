"""How time and memory grow with frames and resolution (issue 8, item 3).

    python scripts/scaling.py                    # XLA memory of every configuration (compiles only)
    python scripts/scaling.py --time --reps 2    # also run each one and time it
    python scripts/scaling.py --out docs/scaling-cpu-2core.json

Models: the benchmark suite's ``medium`` SVD-architecture video U-Net (scripts/benchmark.py) and its temporal VAE
decoder, random weights made by diffusers and loaded through our loader. Rows:

* video U-Net forward at 8, 16, 32, 64 frames of 32x32 latents and at 8 frames of 32², 64², 128² latents;
* one temporal training step (temporal parameters only, AdamW) at 8 and 32 frames, without and with remat of
  every resnet/transformer (``UNet2DConditionModel.set_remat``);
* temporal VAE decode of 8, 16, 32, 64 frames of 16x16 latents, whole and in chunks of 8, and of 8 frames at
  16², 32², 64² latents.

Memory is XLA's own accounting of the compiled program (``memory_analysis``: arguments + outputs + temporaries
- aliased), which is what decides whether a shape fits a device; it does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

MiB = 2 ** 20


def _measure(fn, args, do_time: bool, reps: int) -> dict:
    import jax
    from benchmark import time_calls, xla_flops, xla_memory

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = xla_memory(compiled)
    rec = {"compile_s": time.perf_counter() - t0, "gflop": (xla_flops(compiled) or 0.0) / 1e9,
           **{k.replace("_bytes", "_mib"): v / MiB for k, v in mem.items() if k != "alias_bytes"}}
    if do_time:
        rec["median_s"] = time_calls(lambda: jax.block_until_ready(compiled(*args)), reps)["median_s"]
    return rec


def unet_rows(folder: Path, do_time: bool, reps: int, log) -> list[dict]:
    import jax.numpy as jnp
    from benchmark import temporal_train_step
    from flax import nnx

    import vldm_jax

    model = vldm_jax.load_model(folder)
    c = model.config
    rng = np.random.default_rng(0)
    rows = []

    def inputs(f, s):
        x = jnp.asarray(rng.standard_normal((1, f, s, s, c.in_channels)), jnp.float32)
        ctx = jnp.asarray(rng.standard_normal((1, 1, c.cross_attention_dim)), jnp.float32)
        ids = jnp.asarray(rng.uniform(0, 128, (1, 3)), jnp.float32)
        return x, ctx, ids

    graphdef, state = nnx.split(model)
    for f, s in [(8, 32), (16, 32), (32, 32), (64, 32), (8, 64), (8, 128)]:
        x, ctx, ids = inputs(f, s)
        log(f"U-Net forward F={f} {s}x{s}")
        rec = _measure(lambda st, x, ctx, ids: nnx.merge(graphdef, st)(x, jnp.float32(500.0), ctx, ids),
                       (state, x, ctx, ids), do_time, reps)
        rows.append({"item": "video U-Net forward", "frames": f, "latent": s, "remat": "-", **rec})

    for f in (8, 32):
        for remat in (False, True):
            model.set_remat(remat)
            step, trainable, opt_state, frozen = temporal_train_step(model)
            x, ctx, ids = inputs(f, 32)
            target = jnp.zeros_like(x[..., :c.out_channels])
            log(f"temporal training step F={f} remat={remat}")
            rec = _measure(step, (trainable, opt_state, frozen, x, ctx, ids, target), do_time, reps)
            rows.append({"item": "temporal training step", "frames": f, "latent": 32,
                         "remat": "every block" if remat else "none", **rec})
    model.set_remat(False)
    return rows


def decoder_rows(folder: Path, do_time: bool, reps: int, log) -> list[dict]:
    import jax.numpy as jnp
    from flax import nnx

    import vldm_jax

    model = vldm_jax.load_model(folder)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    rows = []
    for f, s, chunk in [(8, 16, None), (16, 16, None), (32, 16, None), (64, 16, None),
                        (8, 16, 8), (16, 16, 8), (32, 16, 8), (64, 16, 8), (8, 32, None), (8, 64, None)]:
        z = jnp.asarray(rng.standard_normal((1, f, s, s, 4)), jnp.float32)
        log(f"decode F={f} {s}x{s} chunk={chunk}")
        rec = _measure(lambda st, z, chunk=chunk: nnx.merge(graphdef, st).decode(z, decode_chunk_size=chunk),
                       (state, z), do_time, reps)
        rows.append({"item": "temporal VAE decode", "frames": f, "latent": s, "chunk": chunk or "-", **rec})
    return rows


def table(rows: list[dict]) -> str:
    head = "| item | frames | latent | remat / chunk | XLA total MiB | temp MiB | output MiB | GFLOP | compile s | time s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        extra = r.get("remat", r.get("chunk", "-"))
        t = f"{r['median_s']:.2f}" if "median_s" in r else "-"
        lines.append(f"| {r['item']} | {r['frames']} | {r['latent']}² | {extra} | {r['total_mib']:.0f} | "
                     f"{r['temp_mib']:.0f} | {r['output_mib']:.1f} | {r['gflop']:.0f} | {r['compile_s']:.1f} | {t} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time", action="store_true", help="also run and time every configuration")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--only", choices=["unet", "decoder"], nargs="+", default=["unet", "decoder"])
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    import diffusers
    import torch
    from benchmark import SIZES

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    cfg = SIZES["medium"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vldm-scaling-") as tmp:
        torch.manual_seed(0)
        if "unet" in args.only:
            diffusers.UNetSpatioTemporalConditionModel(**cfg["video_unet"]).save_pretrained(Path(tmp, "unet"))
            rows += unet_rows(Path(tmp, "unet"), args.time, args.reps, log)
        if "decoder" in args.only:
            diffusers.AutoencoderKLTemporalDecoder(**cfg["vae"]).save_pretrained(Path(tmp, "vae"))
            rows += decoder_rows(Path(tmp, "vae"), args.time, args.reps, log)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "time": args.time, "reps": args.reps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
