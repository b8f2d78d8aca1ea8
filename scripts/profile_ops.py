"""Where the time goes, op by op, in our jitted program and in diffusers' eager one (issue 21).

    flock /work/wt/.heavy.lock python scripts/profile_ops.py --item forward --config w96h32
    flock /work/wt/.heavy.lock python scripts/profile_ops.py --item train --config medium
    flock /work/wt/.heavy.lock python scripts/profile_ops.py --item decode --config medium

Ours: ``jax.profiler`` perfetto trace of a few calls, summed per XLA op category (convolution, dot, fusion
kinds). Theirs: ``torch.profiler`` self-CPU time per aten op. Both over the same weights (diffusers writes,
our loader reads) and inputs; the configurations are the benchmark's (``scripts/benchmark.py`` SIZES).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark as bm  # noqa: E402
import numpy as np  # noqa: E402


def op_kinds(hlo_text: str) -> dict:
    """Instruction name -> the JAX primitive it came from (XLA's ``op_name`` metadata, last path element)."""
    import re

    kinds = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo_text):
        kinds[m.group(1)] = m.group(2).split("/")[-1]
    return kinds


def jax_profile(fn, calls: int = 3, top: int = 25, hlo_text: str | None = None):
    import jax

    fn()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        trace = next(Path(d).rglob("*.trace.json.gz"))
        events = json.loads(gzip.open(trace).read())
    evs = events["traceEvents"] if isinstance(events, dict) else events
    per = collections.Counter()
    per_thread = collections.Counter()
    for e in evs:
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if name.startswith(("PjitFunction", "Thunk", "$")):
            continue
        per[name] += e.get("dur", 0) / 1e3 / calls
        per_thread[e.get("tid")] += e.get("dur", 0) / 1e3 / calls
    cats = collections.Counter()
    for name, ms in per.items():
        base = name.split(".")[0].rstrip("0123456789_")
        cats[base] += ms
    if hlo_text:  # by the primitive each op computes (a YNNPACK fusion may be a convolution or a dot)
        kinds = op_kinds(hlo_text)
        cats = collections.Counter()
        for name, ms in per.items():
            cats[kinds.get(name, name.split(".")[0])] += ms
    return per.most_common(top), cats.most_common(20), per_thread


def torch_profile(fn, top: int = 25):
    import torch

    with torch.inference_mode():
        fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    rows = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()), key=lambda r: -r[1])
    return rows[:top]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--item", choices=("forward", "train", "decode"), default="forward")
    p.add_argument("--config", default="medium")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--remat", default="full", help="our training step's model.remat (the benchmark's default)")
    a = p.parse_args()
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import vldm_jax

    torch.set_num_threads(os.cpu_count())
    cfg = bm.SIZES[a.config]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if a.item == "decode":
            torch.manual_seed(0)
            ref = diffusers.AutoencoderKLTemporalDecoder(**cfg["vae"]).eval()
            ref.save_pretrained(tmp, safe_serialization=True)
            model = vldm_jax.load_model(tmp)
            f, (h, w) = cfg["decode"]["frames"], bm._hw(cfg["decode"]["latent"])
            z = bm._randn(rng, (1, f, h, w, 4))
            g, s = nnx.split(model)
            ours = bm.Jax(lambda s, z: nnx.merge(g, s).decode(z), s, jnp.asarray(z))
            tz = torch.from_numpy(z[0].transpose(0, 3, 1, 2).copy())
            theirs = lambda: ref.decode(tz, num_frames=f).sample
        else:
            torch.manual_seed(0)
            ref = diffusers.UNetSpatioTemporalConditionModel(**cfg["video_unet"])
            ref.save_pretrained(tmp, safe_serialization=True)
            model = vldm_jax.load_model(tmp)
            x, ctx, ids = bm.video_unet_inputs(cfg, ref.config, rng)
            tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())
            tctx, tids = torch.from_numpy(ctx), torch.from_numpy(ids)
            if a.item == "forward":
                ref.eval()
                g, s = nnx.split(model)
                ours = bm.Jax(lambda s, x, ctx, ids: nnx.merge(g, s)(x, jnp.float32(500.0), ctx, ids), s,
                              jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(ids))
                theirs = lambda: ref(tx, torch.tensor(500.0), tctx, tids).sample
            else:
                model.set_remat(a.remat)
                step, trainable, opt_state, frozen = bm.temporal_train_step(model)
                target = bm._randn(rng, x.shape[:-1] + (ref.config.out_channels,))
                compiled = jax.jit(step).lower(trainable, opt_state, frozen, x, ctx, ids, target).compile()
                globals()["_COMPILED"] = compiled
                ours = lambda: jax.block_until_ready(compiled(trainable, opt_state, frozen, x, ctx, ids, target))
                from vldm_jax.models.roles import is_temporal_path

                ref.train()
                params = [q for n, q in ref.named_parameters() if q.requires_grad_(is_temporal_path(n)).requires_grad]
                topt = torch.optim.AdamW(params, lr=1e-5)
                ttarget = torch.from_numpy(target.transpose(0, 1, 4, 2, 3).copy())

                def theirs():
                    topt.zero_grad(set_to_none=True)
                    out = ref(tx, torch.tensor(500.0), tctx, tids).sample
                    torch.mean(torch.square(out - ttarget)).backward()
                    topt.step()
        t0 = time.perf_counter()
        for _ in range(3):
            ours()
        t_ours = (time.perf_counter() - t0) / 3
        with torch.inference_mode(a.item != "train"):
            theirs()
            t0 = time.perf_counter()
            for _ in range(3):
                theirs()
            t_theirs = (time.perf_counter() - t0) / 3
        print(f"{a.item} {a.config}: ours {1e3 * t_ours:.1f} ms, diffusers {1e3 * t_theirs:.1f} ms, "
              f"ratio {t_theirs / t_ours:.2f}x")
        compiled = getattr(ours, "compiled", None) or globals().get("_COMPILED")
        ops, cats, threads = jax_profile(ours, top=a.top, hlo_text=compiled.as_text() if compiled else None)
        print("\nours, per op (ms per call):")
        for n, ms in ops:
            print(f"  {ms:8.1f}  {n}")
        print("ours, per primitive:")
        for n, ms in cats:
            print(f"  {ms:8.1f}  {n}")
        print("ours, busy per thread:", {k: round(v, 1) for k, v in threads.items()})
        if a.item != "train":
            print("\ndiffusers, self CPU per aten op (ms per call):")
            for n, ms in torch_profile(theirs, a.top):
                print(f"  {ms:8.1f}  {n}")


if __name__ == "__main__":
    main()
