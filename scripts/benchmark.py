"""Side-by-side benchmarks of vldm_jax and diffusers/PyTorch on the same weights, shapes and machine (issue 8).

    python scripts/benchmark.py                           # tiny and medium, table + results.json
    python scripts/benchmark.py --size medium --reps 7 --out medium.json
    python scripts/benchmark.py --size full               # SD 1.5 / SVD sizes: for accelerators (GBs of weights)
    vldm benchmark --size tiny --reps 1                   # the same through the CLI
    vldm benchmark --size medium --baseline old.json      # per-row ratio against a previous run, regressions flagged
    vldm benchmark --results new.json --baseline old.json # compare two runs without running anything
    vldm benchmark --only loading --load-folder PATH      # also time loading any diffusers U-Net folder (SD 1.5...)

Every model is built in diffusers/transformers with random weights, written with ``save_pretrained`` to a
temporary folder and loaded through ``vldm_jax.load_model``, so both sides run the very same weights. Nothing
is downloaded.

For each item: the median and spread (min, max, quartiles) of repeated runs after one warm-up, JAX compile time
measured apart (``jit(...).lower(...).compile()``), the FLOPs XLA's cost analysis counts for the compiled
program, the FLOP/s this gives and its fraction of a 2048x2048 float32 matmul timed on the same device, XLA's
buffer sizes (arguments + outputs + temporaries), and the process RSS. PyTorch runs eager float32 under
``inference_mode`` with ``torch.set_num_threads(os.cpu_count())``; its FLOP/s use XLA's count of the same
computation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# This script belongs to its source tree: import that tree's vldm_jax, not another installed copy.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from vldm_jax import cli_benchmark  # noqa: E402  (progress bar, --baseline comparison)

# OpenMP's default spin-waiting makes eager PyTorch with all cores up to 100x slower whenever another process
# shares the CPU (seen here: 5 s instead of 20 ms for a tiny U-Net at load 7 on 2 cores); passive waiting costs
# little on an idle machine. It must be set before torch starts its thread pool; XLA's pool does not read it.
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ITEMS = ("video_unet", "train_step", "image_unet", "vae_decode", "vae_decode_chunked", "clip_text", "sampling_loop",
         "loading")
STEPS = 25
GUIDANCE = 7.5

# Channels are multiples of 32 (SVD and the VAEs hard-code 32 GroupNorm groups). "medium" keeps the SD/SVD
# block structure (4 levels, 2 layers per block, 64-wide heads) at a fifth of the width, so one diffusers forward
# of the video U-Net at 8 frames of 32x32 latents takes a second or two on a 2-core CPU. "full" is SVD / SD 1.5.
SIZES = {
    "tiny": dict(
        video_unet=dict(block_out_channels=(32, 64), layers_per_block=1, num_attention_heads=(1, 2),
                        cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                        num_frames=4,
                        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
        video=dict(batch=1, frames=4, latent=16),
        image_unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2, cross_attention_dim=32,
                        norm_num_groups=32, sample_size=16,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        image=dict(batch=1, latent=16),
        vae=dict(block_out_channels=(32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 latent_channels=4),
        decode=dict(frames=4, latent=8, chunk=2),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, vocab_size=49408),
        text=dict(batch=2, seq=77),
    ),
    "medium": dict(
        video_unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, num_attention_heads=(1, 2, 4, 4),
                        cross_attention_dim=256, addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
                        num_frames=8),
        video=dict(batch=1, frames=8, latent=32),
        image_unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=8,
                        cross_attention_dim=256, sample_size=32),
        image=dict(batch=1, latent=32),
        vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                 latent_channels=4),
        decode=dict(frames=8, latent=16, chunk=4),
        clip=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"),
        text=dict(batch=2, seq=77),
    ),
    "full": dict(
        video_unet=dict(),  # diffusers' defaults are SVD's U-Net
        video=dict(batch=1, frames=14, latent=(72, 128)),
        image_unet=dict(cross_attention_dim=768, sample_size=64),  # SD 1.5
        image=dict(batch=1, latent=64),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4),
        decode=dict(frames=14, latent=(72, 128), chunk=7),
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"),
        text=dict(batch=2, seq=77),
    ),
}


def _variant(base: str, **changes) -> dict:
    """A copy of ``SIZES[base]`` with some items' fields replaced: ``changes`` maps an item to its new fields."""
    out = {k: dict(v) for k, v in SIZES[base].items()}
    for item, fields in changes.items():
        out[item].update(fields)
    return out


# Configurations the medium size does not use (issue 21): a lead must not belong to one shape. "h32f16": the
# medium widths with 32-wide heads everywhere (video and image U-Net, CLIP) and 16 frames (U-Net and decoder);
# "w1.5": channel widths 1.5x the medium's (96-384, the 137 M video U-Net of the issue, 32-wide heads; image
# U-Net with SD's 8 heads; decoder 64-96-192 (48 does not divide into 32 groups); CLIP 576 wide with 64-wide heads), 8 frames.
SIZES["h32f16"] = _variant(
    "medium", video_unet=dict(num_attention_heads=(2, 4, 8, 8), num_frames=16), video=dict(frames=16),
    image_unet=dict(attention_head_dim=(2, 4, 8, 8)), decode=dict(frames=16),
    clip=dict(num_attention_heads=12))
SIZES["w1.5"] = _variant(
    "medium", video_unet=dict(block_out_channels=(96, 192, 384, 384), num_attention_heads=(3, 6, 12, 12)),
    image_unet=dict(block_out_channels=(96, 192, 384, 384)),
    vae=dict(block_out_channels=(64, 96, 192, 192)),  # 48 would not divide into the VAE's 32 groups
    clip=dict(hidden_size=576, intermediate_size=2304, num_attention_heads=9))
SIZE_NAMES = tuple(SIZES)


# ----------------------------------------------------------------------------- measuring


def _hw(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def stats(times: list[float]) -> dict:
    t = np.asarray(times, np.float64)
    return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
            "q25_s": float(np.percentile(t, 25)), "q75_s": float(np.percentile(t, 75)), "n": int(t.size)}


def time_calls(fn, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats(times)


# Untimed calls a side makes right after the other side ran, before its timed call (``--settle``). 0: strict
# alternation. In one process, each PyTorch training step makes our next step's page faults 2-6x dearer (h32f16:
# 4.7 s alone, 5.6-6.2 s alternating; diffusers' step unchanged; docs/benchmarks.md, session 13).
SETTLE = 0


def time_pair(ours, theirs, reps: int, warmup: int = 1, inference: bool = True,
              settle: int | None = None) -> tuple[dict, dict]:
    """Times ``ours()`` and ``theirs()`` alternately (ours, theirs, ours, ...), so that a machine whose speed drifts
    during the run (a shared VM's steal time reached 50 % on the 2-core CI machine) slows both sides alike and the
    ratio of the medians stays meaningful. ``settle`` (default :data:`SETTLE`): untimed calls of each side before
    each of its timed ones, so that neither side is timed on the state the other left. ``inference``: PyTorch calls
    under ``torch.inference_mode``."""
    import contextlib

    import torch

    settle = SETTLE if settle is None else settle
    with torch.inference_mode() if inference else contextlib.nullcontext():
        for _ in range(warmup):
            ours()
            theirs()
        a, b = [], []
        for _ in range(reps):
            for fn, times in ((ours, a), (theirs, b)):
                for _ in range(settle):
                    fn()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return {**stats(a), "interleaved": True, "settle": settle}, {**stats(b), "interleaved": True, "settle": settle}


def paired_records(ours, theirs, reps: int, peak: float, flops: float | None = None) -> tuple[dict, dict]:
    """Our :class:`Jax` call and diffusers' ``theirs`` timed by :func:`time_pair`, as (ours, theirs) records."""
    jt, tt = time_pair(ours, theirs, reps)
    flops = flops if flops is not None else ours.flops
    return ours.record(reps, peak, flops=flops, timing=jt), torch_record(theirs, reps, flops, peak, timing=tt)


def rss() -> dict:
    """Current and peak resident memory of this process in MiB (both sides share the process)."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled program by XLA's cost analysis (None when it has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) or None


def xla_memory(compiled) -> dict | None:
    """XLA's memory accounting of a compiled program, in bytes: arguments + outputs + temporaries - aliased."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    return {"argument_bytes": int(arg), "output_bytes": int(out), "temp_bytes": int(tmp), "alias_bytes": int(alias),
            "total_bytes": int(arg + out + tmp - alias)}


class Jax:
    """jit + separate compile timing + XLA cost and memory analysis of one function."""

    def __init__(self, fn, *args):
        import jax

        self.args = args
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        self.lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = xla_flops(self.compiled)
        self.memory = xla_memory(self.compiled)

    def __call__(self):
        import jax

        return jax.block_until_ready(self.compiled(*self.args))

    def record(self, reps: int, peak: float, flops: float | None = None, timing: dict | None = None) -> dict:
        timing = timing or time_calls(self, reps)
        flops = flops if flops is not None else self.flops
        rec = {**timing, "lower_s": self.lower_s, "compile_s": self.compile_s, "xla_flops": self.flops,
               "memory": self.memory, **rss()}
        if flops:
            rate = flops / timing["median_s"]
            rec.update(flops=flops, gflops_per_s=rate / 1e9, fraction_of_matmul_peak=rate / peak)
        return rec


def torch_record(fn, reps: int, flops: float | None, peak: float, timing: dict | None = None) -> dict:
    import torch

    if timing is None:
        with torch.inference_mode():
            timing = time_calls(fn, reps)
    rec = {**timing, **rss()}
    if flops:
        rate = flops / rec["median_s"]
        rec.update(gflops_per_s=rate / 1e9, fraction_of_matmul_peak=rate / peak)
    return rec


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    """FLOP/s of an n x n float32 matmul in XLA on the default device (our 'peak')."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = Jax(lambda a, b: a @ b, a, b)
    t = time_calls(mm, reps, warmup=2)
    flops = 2.0 * n ** 3
    return {"n": n, **t, "gflops_per_s": flops / t["median_s"] / 1e9, "best_gflops_per_s": flops / t["min_s"] / 1e9}


def _pair(name, jax_rec, torch_rec, shapes) -> dict:
    rec = {"name": name, "shapes": shapes, "jax": jax_rec, "torch": torch_rec}
    if torch_rec and jax_rec:
        rec["speedup_vs_torch"] = torch_rec["median_s"] / jax_rec["median_s"]
    return rec


def _split(model):
    from flax import nnx

    return nnx.split(model)


def _randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- the items


def video_unet_inputs(cfg, c, rng):
    """Random inputs of the SVD-type video U-Net item (config ``c``): latents ``(B, F, h, w, C)`` channels-last,
    image-embedding context ``(B, 1, D)`` and added time ids ``(B, n)``."""
    b, f, (h, w) = cfg["video"]["batch"], cfg["video"]["frames"], _hw(cfg["video"]["latent"])
    x = _randn(rng, (b, f, h, w, c.in_channels))
    ctx = _randn(rng, (b, 1, c.cross_attention_dim))
    ids = rng.uniform(0, 128, (b, c.projection_class_embeddings_input_dim // c.addition_time_embed_dim)).astype(
        np.float32)
    return x, ctx, ids


def bench_video_unet(cfg, folder, reps, peak, rng):
    import diffusers
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import vldm_jax

    torch.manual_seed(0)
    ref = diffusers.UNetSpatioTemporalConditionModel(**cfg["video_unet"]).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    model = vldm_jax.load_model(folder)
    c = ref.config
    b, f, (h, w) = cfg["video"]["batch"], cfg["video"]["frames"], _hw(cfg["video"]["latent"])
    x, ctx, ids = video_unet_inputs(cfg, c, rng)
    t = np.float32(500.0)
    graphdef, state = nnx.split(model)
    ours = Jax(lambda s, x, t, ctx, ids: nnx.merge(graphdef, s)(x, t, ctx, ids), state, jnp.asarray(x),
               jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(ids))
    tx, tctx, tids = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy()), torch.from_numpy(ctx), torch.from_numpy(ids)
    jrec, trec = paired_records(ours, lambda: ref(tx, torch.tensor(500.0), tctx, tids).sample, reps, peak)  # noqa: F821 (del ref below frees it after the run)
    del ref
    return _pair("video U-Net forward", jrec, trec, f"B={b} F={f} {h}x{w}x{c.in_channels}"), model


def temporal_train_step(model):
    """The temporal stage's training step on ``model`` as it is (remat included): ``(step, trainable, opt_state,
    frozen)`` with ``step(trainable, opt_state, frozen, x, ctx, ids, target) -> (trainable, opt_state, loss)``;
    eps-MSE at t = 500, gradients of the temporal parameters only, AdamW. ``trainable`` is a copy, so the step
    may donate it."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vldm_jax.models.roles import temporal_filter

    graphdef, trainable, frozen = nnx.split(model, temporal_filter, ...)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    opt = optax.adamw(1e-5)

    def step(trainable, opt_state, frozen, x, ctx, ids, target):
        def loss_fn(tr):
            out = nnx.merge(graphdef, tr, frozen)(x, jnp.float32(500.0), ctx, ids)
            return jnp.mean(jnp.square(out - target))

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, trainable, opt.init(trainable), frozen


def bench_train_step(cfg, folder, model, reps, peak, rng, remat: str = "full"):
    """One training step of the temporal stage on the video U-Net: eps-MSE on noised latents, gradients of the
    temporal parameters only (the image layers frozen, Video LDM's recipe), AdamW update. Ours: one jitted
    step with the parameters and optimizer state donated, with the remat policy ``remat`` (``model.remat`` of the
    training configs; "full" recomputes each block in the backward pass, and on CPU it is also the faster step).
    diffusers: the same weights with requires_grad on the temporal parameters only (the same name rule), forward,
    backward and ``torch.optim.AdamW.step``, without gradient checkpointing (its fastest)."""
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from vldm_jax.models.roles import is_temporal_path

    ref = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(folder).train()
    c = ref.config
    b, f, (h, w) = cfg["video"]["batch"], cfg["video"]["frames"], _hw(cfg["video"]["latent"])
    x = _randn(rng, (b, f, h, w, c.in_channels))
    target = _randn(rng, (b, f, h, w, c.out_channels))
    ctx = _randn(rng, (b, 1, c.cross_attention_dim))
    ids = rng.uniform(0, 128, (b, c.projection_class_embeddings_input_dim // c.addition_time_embed_dim)).astype(
        np.float32)
    model.set_remat(remat)
    try:
        step, trainable, opt_state, frozen = temporal_train_step(model)
    finally:
        model.set_remat("none")
    n_train = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(trainable))

    jstep = jax.jit(step, donate_argnums=(0, 1))
    args = [trainable, opt_state, frozen, jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(ids), jnp.asarray(target)]
    t0 = time.perf_counter()
    compiled = jstep.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled)
    memory = xla_memory(compiled)
    state = {"tr": args[0], "opt": args[1]}

    def run_ours():
        state["tr"], state["opt"], loss = compiled(state["tr"], state["opt"], *args[2:])
        jax.block_until_ready(loss)


    params = []
    for name, prm in ref.named_parameters():
        prm.requires_grad_(is_temporal_path(name))
        if prm.requires_grad:
            params.append(prm)
    n_torch = sum(p.numel() for p in params)
    topt = torch.optim.AdamW(params, lr=1e-5)
    tx, tctx, tids = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy()), torch.from_numpy(ctx), torch.from_numpy(ids)
    ttarget = torch.from_numpy(target.transpose(0, 1, 4, 2, 3).copy())

    def run_torch():
        topt.zero_grad(set_to_none=True)
        loss = torch.mean(torch.square(ref(tx, torch.tensor(500.0), tctx, tids).sample - ttarget))  # noqa: F821
        loss.backward()
        topt.step()

    jt, tt = time_pair(run_ours, run_torch, reps, inference=False)
    jrec = {**jt, "compile_s": compile_s, "xla_flops": flops, "remat": remat, **rss()}
    if memory is not None:
        jrec["memory"] = memory
    if flops:
        rate = flops / jrec["median_s"]
        jrec.update(flops=flops, gflops_per_s=rate / 1e9, fraction_of_matmul_peak=rate / peak)
    trec = {**tt, **rss()}
    if flops:
        rate = flops / trec["median_s"]
        trec.update(gflops_per_s=rate / 1e9, fraction_of_matmul_peak=rate / peak)
    del ref
    rec = _pair("temporal training step (AdamW)", jrec, trec,
                f"B={b} F={f} {h}x{w}x{c.in_channels}, {n_train / 1e6:.2f}M temporal params, ours remat {remat}")
    rec["trainable_params"] = {"jax": n_train, "torch": int(n_torch)}
    return rec


def bench_image_unet_and_loop(cfg, folder, reps, loop_reps, peak, rng):
    import diffusers
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import vldm_jax
    from vldm_jax.diffusion.guidance import guided_denoiser
    from vldm_jax.diffusion.samplers import make_sampler, sample

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg["image_unet"]).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    model = vldm_jax.load_model(folder)
    c = ref.config
    b, (h, w) = cfg["image"]["batch"], _hw(cfg["image"]["latent"])
    seq = cfg["text"]["seq"]
    # One forward at the CFG batch (2B), which is what each sampling step runs.
    x2 = _randn(rng, (2 * b, h, w, c.in_channels))
    ctx2 = _randn(rng, (2 * b, seq, c.cross_attention_dim))
    graphdef, state = nnx.split(model)
    fwd = Jax(lambda s, x, t, ctx: nnx.merge(graphdef, s)(x, t, ctx), state, jnp.asarray(x2), jnp.int32(500),
              jnp.asarray(ctx2))
    tx2, tctx2 = torch.from_numpy(x2.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx2)
    jrec, trec = paired_records(fwd, lambda: ref(tx2, 500, encoder_hidden_states=tctx2).sample, reps, peak)  # noqa: F821 (del ref below frees it after the run)
    unet = _pair("image U-Net forward (CFG batch)", jrec, trec, f"B={2 * b} {h}x{w}x{c.in_channels} ctx {seq}")

    # The whole 25-step DDIM loop with classifier-free guidance.
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sampler = make_sampler("ddim", dict(scheduler.config), STEPS)
    noise = _randn(rng, (b, h, w, c.in_channels))
    cond, uncond = ctx2[b:], ctx2[:b]

    def loop(s, noise, cond, uncond):
        net = nnx.merge(graphdef, s)
        denoise = guided_denoiser(lambda x, t, ctx: net(x, t, ctx), cond, uncond, GUIDANCE)
        return sample(denoise, sampler, noise)

    ours = Jax(loop, state, jnp.asarray(noise), jnp.asarray(cond), jnp.asarray(uncond))
    # XLA counts a while loop's body once; the loop's work is STEPS forwards at the CFG batch.
    loop_flops = STEPS * fwd.flops if fwd.flops else None
    tnoise, tctx = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx2)

    def torch_loop():
        scheduler.set_timesteps(STEPS)
        lat = tnoise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([lat, lat]), t)
            out = ref(inp, t, encoder_hidden_states=tctx).sample  # noqa: F821
            u, co = out.chunk(2)
            lat = scheduler.step(u + GUIDANCE * (co - u), t, lat).prev_sample
        return lat

    jloop, tloop = paired_records(ours, torch_loop, loop_reps, peak, flops=loop_flops)
    loop_rec = _pair(f"sampling loop ({STEPS} DDIM steps, CFG)", jloop, tloop, f"B={b} {h}x{w}x{c.in_channels}")

    per_step = lambda rec, fw: (rec["median_s"] - STEPS * fw["median_s"]) / STEPS

    # Paired: each loop run right next to STEPS back-to-back forwards, so that load drift on a shared CPU cancels
    # in the difference (separate medians taken minutes apart moved the estimate by +-40 % of a forward).
    def paired(run_loop, run_forward):
        diffs = []
        for _ in range(loop_reps):
            t0 = time.perf_counter()
            run_loop()
            t1 = time.perf_counter()
            for _ in range(STEPS):
                run_forward()
            t2 = time.perf_counter()
            diffs.append(((t1 - t0) - (t2 - t1)) / STEPS)
        return float(np.median(diffs)), [float(d) for d in diffs]

    j_paired, j_diffs = paired(ours, fwd)
    with torch.inference_mode():
        t_paired, t_diffs = paired(torch_loop, lambda: ref(tx2, 500, encoder_hidden_states=tctx2).sample)  # noqa: F821 (del ref below frees it after the run)
    proof = {
        "paired_per_step_overhead_s": j_paired, "paired_per_step_overhead_fraction": j_paired / jrec["median_s"],
        "paired_runs_s": j_diffs,
        "torch_paired_per_step_overhead_s": t_paired,
        "torch_paired_per_step_overhead_fraction": t_paired / trec["median_s"], "torch_paired_runs_s": t_diffs,
        "loop_compile_s": ours.compile_s, "unet_compile_s": fwd.compile_s,
        "compile_ratio": ours.compile_s / fwd.compile_s,
        "loop_xla_flops_counted": ours.flops, "unet_xla_flops": fwd.flops,
        "per_step_overhead_s": per_step(jloop, jrec),
        "per_step_overhead_fraction": per_step(jloop, jrec) / jrec["median_s"],
        "torch_per_step_overhead_s": per_step(tloop, trec),
        "torch_per_step_overhead_fraction": per_step(tloop, trec) / trec["median_s"],
        "targets": {"compile_ratio_max": 2.0, "per_step_overhead_fraction_max": 0.03},
    }
    del ref
    return unet, loop_rec, proof


def bench_vae(cfg, folder, reps, peak, rng):
    import diffusers
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import vldm_jax

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLTemporalDecoder(**cfg["vae"]).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    model = vldm_jax.load_model(folder)
    f, (h, w), k = cfg["decode"]["frames"], _hw(cfg["decode"]["latent"]), cfg["decode"]["chunk"]
    z = _randn(rng, (1, f, h, w, ref.config.latent_channels))
    graphdef, state = nnx.split(model)
    tz = torch.from_numpy(z[0].transpose(0, 3, 1, 2).copy())
    out, whole_flops = [], None
    for chunk in (None, k):
        ours = Jax(lambda s, z: nnx.merge(graphdef, s).decode(z, decode_chunk_size=chunk), state, jnp.asarray(z))
        # XLA counts the chunk loop's body once; the work is the same as the whole decode's.
        whole_flops = whole_flops or ours.flops
        if chunk is None:
            fn = lambda: ref.decode(tz, num_frames=f).sample
        else:  # the SVD pipeline's decode_latents loop
            fn = lambda: torch.cat([ref.decode(tz[i:i + k], num_frames=tz[i:i + k].shape[0]).sample
                                    for i in range(0, f, k)])
        jrec, trec = paired_records(ours, fn, reps, peak, flops=whole_flops)
        jrec["per_frame_s"] = jrec["median_s"] / f
        trec["per_frame_s"] = trec["median_s"] / f
        name = "temporal VAE decode" + ("" if chunk is None else f" (chunks of {k})")
        out.append(_pair(name, jrec, trec, f"F={f} {h}x{w} latents"))
    return out


def bench_clip(cfg, folder, reps, peak, rng):
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    import vldm_jax

    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["clip"])).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    model = vldm_jax.load_model(folder)
    b, seq = cfg["text"]["batch"], cfg["text"]["seq"]
    ids = rng.integers(0, cfg["clip"]["vocab_size"], (b, seq)).astype(np.int32)
    graphdef, state = nnx.split(model)
    ours = Jax(lambda s, ids: nnx.merge(graphdef, s)(ids).last_hidden_state, state, jnp.asarray(ids))
    tids = torch.from_numpy(ids.astype(np.int64))
    jrec, trec = paired_records(ours, lambda: ref(tids).last_hidden_state, reps, peak)  # noqa: F821 (del ref below frees it after the run)
    return _pair("CLIP text encode", jrec, trec, f"B={b} seq={seq} d={cfg['clip']['hidden_size']}")


def _timed_loads(fn, reps):
    """time_calls of ``fn`` (a load) plus the loader's breakdown of each timed run."""
    from vldm_jax.checkpoints.placement import last_load_timing

    breakdowns = []

    def run():
        fn()
        breakdowns.append(last_load_timing())

    rec = {**time_calls(run, reps), **rss()}
    rec["breakdown"] = breakdowns[1:]  # the warm-up's is dropped
    return rec


def _read_reference(folder, reps):
    """``safetensors.numpy.load_file`` of the folder's weights: reading the file into host memory, the floor a
    load that must copy (the layout differs) is judged against."""
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    return {**time_calls(lambda: [load_file(f) for f in files], reps), **rss()}


def bench_loading(folder, model, reps):
    """diffusers folder -> NNX (key map + transposes) vs our converted folder; torch's from_pretrained alongside,
    and reading the file into memory with ``safetensors.numpy`` as the floor."""
    import diffusers
    import jax
    from flax import nnx

    import vldm_jax
    from vldm_jax.checkpoints.store import save_module

    converted = Path(folder).parent / "converted"
    converted.mkdir()
    save_module(model, converted)

    def load(path):
        return lambda: jax.block_until_ready(nnx.state(vldm_jax.load_model(path)))

    from_diffusers = _timed_loads(load(folder), reps)
    from_converted = _timed_loads(load(converted), reps)
    numpy_read = _read_reference(folder, reps)
    torch_load = {**time_calls(lambda: diffusers.UNetSpatioTemporalConditionModel.from_pretrained(folder), reps),
                  **rss()}
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return {"name": "load video U-Net", "shapes": f"{size / 2**20:.1f} MiB safetensors",
            "jax": from_diffusers, "jax_converted": from_converted, "torch": torch_load, "numpy_read": numpy_read,
            "speedup_vs_torch": torch_load["median_s"] / from_diffusers["median_s"],
            "converted_speedup_vs_torch": torch_load["median_s"] / from_converted["median_s"],
            "over_numpy_read": from_diffusers["median_s"] / numpy_read["median_s"]}


def bench_load_folder(folder, reps):
    """Loading a diffusers component folder given by the user (``--load-folder``, e.g. the real-size SD 1.5
    U-Net): ours vs reading its file into memory (``safetensors.numpy.load_file``) vs diffusers'
    ``from_pretrained``, interleaved run by run so that a shared machine's load drift hits all three alike;
    the page cache is warmed first. diffusers memory-maps lazily: its time excludes reading the weights,
    so ``touch`` adds the time of summing every parameter once (what its first forward pays)."""
    import diffusers
    import jax
    import torch
    from flax import nnx

    import vldm_jax
    from vldm_jax.checkpoints.load import read_config_file
    from vldm_jax.checkpoints.placement import last_load_timing

    folder = Path(folder)
    if not (folder / "config.json").exists():
        from vldm_jax.errors import UserError

        raise UserError(f"--load-folder {folder}: no config.json (not a diffusers component folder)")
    cls = getattr(diffusers, read_config_file(folder / "config.json").get("_class_name", ""), None)
    if cls is None:
        from vldm_jax.errors import UserError

        raise UserError(f"--load-folder {folder}: not a diffusers model class")
    files = sorted(folder.glob("*.safetensors"))
    from safetensors.numpy import load_file

    def numpy_read():
        return [load_file(f) for f in files]

    def ours():
        jax.block_until_ready(nnx.state(vldm_jax.load_model(folder)))

    def theirs():
        return cls.from_pretrained(folder)

    numpy_read()  # page cache warm
    runs = {"numpy_read": [], "jax": [], "torch": [], "torch_touch": []}
    breakdowns = []
    for _ in range(reps):
        for key, fn in (("numpy_read", numpy_read), ("jax", ours), ("torch", theirs)):
            t0 = time.perf_counter()
            out = fn()
            runs[key].append(time.perf_counter() - t0)
            if key == "jax":
                breakdowns.append(last_load_timing())
            if key == "torch":
                t0 = time.perf_counter()
                with torch.no_grad():
                    sum(float(p.sum()) for p in out.parameters())
                runs["torch_touch"].append(time.perf_counter() - t0)
            del out
    rec = {k: {**stats(v)} for k, v in runs.items()}
    rec["jax"]["breakdown"] = breakdowns
    size = sum(f.stat().st_size for f in files)
    return {"name": f"load {cls.__name__} folder", "shapes": f"{size / 2**20:.1f} MiB safetensors",
            "folder": str(folder), "jax": rec["jax"], "torch": rec["torch"], "torch_touch": rec["torch_touch"],
            "numpy_read": rec["numpy_read"], "speedup_vs_torch": rec["torch"]["median_s"] / rec["jax"]["median_s"],
            "over_numpy_read": rec["jax"]["median_s"] / rec["numpy_read"]["median_s"], **rss()}


# ----------------------------------------------------------------------------- running and reporting


def machine_info() -> dict:
    import diffusers
    import flax
    import jax
    import torch
    import transformers

    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "jax_devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": OMP_WAIT_POLICY,
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                         "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__}}


def planned_steps(sizes, only: set[str], load_folder=None) -> int:
    """How many ``log`` calls :func:`run_size` makes for these sizes and items (the progress bar's length)."""
    groups = [{"video_unet", "loading", "train_step"}, {"train_step"}, {"image_unet", "sampling_loop"},
              {"vae_decode", "vae_decode_chunked"}, {"clip_text"}, {"loading"}]
    per_size = sum(bool(only & g) for g in groups)
    return 1 + len(sizes) * per_size + (1 if load_folder and "loading" in only else 0)


def run_size(size: str, reps: int, only: set[str], peak: float, log, train_remat: str = "full") -> dict:
    cfg = SIZES[size]
    rng = np.random.default_rng(0)
    loop_reps = max(1, min(reps, 3))
    items, proof = [], None
    with tempfile.TemporaryDirectory(prefix=f"vldm-bench-{size}-") as tmp:
        video_model = None
        if only & {"video_unet", "loading", "train_step"}:
            log(f"[{size}] video U-Net")
            rec, video_model = bench_video_unet(cfg, Path(tmp, "video_unet", "unet"), reps, peak, rng)
            if "video_unet" in only:
                items.append(rec)
        if "train_step" in only:
            log(f"[{size}] temporal training step")
            items.append(bench_train_step(cfg, Path(tmp, "video_unet", "unet"), video_model, max(1, min(reps, 3)),
                                          peak, rng, remat=train_remat))
        if only & {"image_unet", "sampling_loop"}:
            log(f"[{size}] image U-Net and sampling loop")
            unet, loop, proof = bench_image_unet_and_loop(cfg, Path(tmp, "image_unet"), reps, loop_reps, peak, rng)
            items += [r for r, k in ((unet, "image_unet"), (loop, "sampling_loop")) if k in only]
        if only & {"vae_decode", "vae_decode_chunked"}:
            log(f"[{size}] temporal VAE decode")
            whole, chunked = bench_vae(cfg, Path(tmp, "vae"), reps, peak, rng)
            items += [r for r, k in ((whole, "vae_decode"), (chunked, "vae_decode_chunked")) if k in only]
        if "clip_text" in only:
            log(f"[{size}] CLIP text")
            items.append(bench_clip(cfg, Path(tmp, "clip"), reps, peak, rng))
        if "loading" in only:
            log(f"[{size}] loading")
            items.append(bench_loading(Path(tmp, "video_unet", "unet"), video_model, max(1, min(reps, 3))))
    return {"items": items, "scan_proof": proof}


def _ms(rec, key="median_s"):
    return f"{1e3 * rec[key]:.1f}" if rec and key in rec else "-"


def format_breakdown(breakdowns: list[dict]) -> str:
    """Median seconds per phase of the loader's breakdowns (checkpoints/placement.py)."""
    keys = [k for k in ("read_s", "build_s", "convert_s", "place_s", "merge_s", "copy_threads_s")
            if any(k in b for b in breakdowns)]
    med = {k: float(np.median([b.get(k, 0.0) for b in breakdowns])) for k in keys}
    b = breakdowns[-1]
    return (", ".join(f"{k[:-2].replace('_threads', ' (threads)')} {1e3 * v:.0f} ms" for k, v in med.items())
            + f"; {b.get('copied_bytes', 0) / 2**20:.0f} MiB copied, {b.get('aliased_bytes', 0) / 2**20:.0f} MiB "
              "aliased")


def format_table(results: dict) -> str:
    mm = results["matmul_peak"]
    lines = [f"matmul peak (2048^2 f32, XLA): best {mm['best_gflops_per_s']:.1f} GFLOP/s (the % peak reference), "
             f"median {mm['gflops_per_s']:.1f}; "
             f"load average {results['load_average_before']} -> {results['load_average_after']}", ""]
    head = ("| size | item | shapes | ours ms (min-max) | diffusers ms (min-max) | speedup | compile s | GFLOP/s ours "
            "| % peak ours | % peak torch | XLA MiB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    spread = lambda x: f"{_ms(x)} ({_ms(x, 'min_s')}-{_ms(x, 'max_s')})"
    pct = lambda x: f"{100 * x['fraction_of_matmul_peak']:.0f}" if "fraction_of_matmul_peak" in x else "-"
    for size, res in results["sizes"].items():
        for r in res["items"]:
            j, t = r["jax"], r["torch"]
            ours = spread(j)
            if "jax_converted" in r:
                ours += f"; converted {spread(r['jax_converted'])}"
            if "numpy_read" in r:
                ours += f"; numpy read {spread(r['numpy_read'])}"
            mem = j.get("memory") or {}
            compile_s = f"{j['compile_s']:.1f}" if "compile_s" in j else "-"
            rate = f"{j['gflops_per_s']:.1f}" if "gflops_per_s" in j else "-"
            xla_mib = f"{mem['total_bytes'] / 2**20:.0f}" if mem else "-"
            lines.append(f"| {size} | {r['name']} | {r['shapes']} | {ours} | {spread(t)} | "
                         f"{r.get('speedup_vs_torch', float('nan')):.2f}x | {compile_s} | {rate} | {pct(j)} | {pct(t)} "
                         f"| {xla_mib} |")
    for size, res in results["sizes"].items():
        for r in res["items"]:
            for side, label in (("jax", "diffusers folder"), ("jax_converted", "converted folder")):
                if r.get(side, {}).get("breakdown"):
                    lines.append(f"\n[{size}] {r['name']}, {label}: {format_breakdown(r[side]['breakdown'])}")
    lf = results.get("load_folder")
    if lf:
        lines.append(
            f"\n{lf['name']} ({lf['shapes']}, {lf['folder']}): ours {_ms(lf['jax'])} ms, read into memory "
            f"(safetensors.numpy) {_ms(lf['numpy_read'])} ms = {lf['over_numpy_read']:.2f}x the read; diffusers "
            f"from_pretrained {_ms(lf['torch'])} ms (lazy, + {_ms(lf['torch_touch'])} ms to touch every weight); "
            f"{format_breakdown(lf['jax']['breakdown'])}")
    for size, res in results["sizes"].items():
        p = res.get("scan_proof")
        if p:
            lines.append(
                f"\n[{size}] scan proof: loop compile {p['loop_compile_s']:.1f} s vs one U-Net compile "
                f"{p['unet_compile_s']:.1f} s ({p['compile_ratio']:.2f}x, target <= 2); per-step overhead "
                f"{1e3 * p['per_step_overhead_s']:.1f} ms = {100 * p['per_step_overhead_fraction']:.1f}% of a U-Net "
                f"forward (target < 3%; diffusers {100 * p['torch_per_step_overhead_fraction']:.1f}%); paired with "
                f"{STEPS} forwards run right after each loop: {1e3 * p['paired_per_step_overhead_s']:.1f} ms = "
                f"{100 * p['paired_per_step_overhead_fraction']:.1f}% (diffusers "
                f"{100 * p['torch_paired_per_step_overhead_fraction']:.1f}%)")
    return "\n".join(lines)


def run(sizes=("tiny", "medium"), reps: int = 5, out: str | None = "results.json", only=None, log=None,
        load_folder=None, progress: bool = True, train_remat: str = "full") -> dict:
    import torch

    only = set(only or ITEMS)
    bar = None
    if log is None:
        bar = cli_benchmark.Progress(planned_steps(sizes, only, load_folder), enabled=progress)
        log = bar.step
    unknown = only - set(ITEMS)
    if unknown:
        from vldm_jax.errors import UserError

        raise UserError(f"unknown benchmark items {sorted(unknown)}; choose from {', '.join(ITEMS)}")
    torch.set_num_threads(os.cpu_count())
    results = {"machine": machine_info(), "load_average_before": load_average(), "reps": reps, "steps": STEPS,
               "guidance": GUIDANCE, "train_remat": train_remat, "settle": SETTLE, "sizes": {}}
    log("matmul peak")
    results["matmul_peak"] = matmul_peak()
    # On a shared CPU the matmul gets whatever share of the cores is free at that moment, so the fastest run
    # (not the median) is the better estimate of what the device can do.
    peak = results["matmul_peak"]["best_gflops_per_s"] * 1e9
    for size in sizes:
        t0 = time.perf_counter()
        results["sizes"][size] = run_size(size, reps, only, peak, log, train_remat=train_remat)
        results["sizes"][size]["wall_s"] = time.perf_counter() - t0
    if load_folder and "loading" in only:
        log(f"loading {load_folder}")
        results["load_folder"] = bench_load_folder(load_folder, max(1, min(reps, 3)))
    if bar is not None:
        bar.close()
    results["load_average_after"] = load_average()
    results["peak_rss_mib"] = rss().get("peak_rss_mib")
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return results


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs="+", choices=SIZE_NAMES, default=["tiny", "medium"],
                   help="model sizes (full = SD 1.5 / SVD, meant for accelerators)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (loops: at most 3)")
    p.add_argument("--only", nargs="+", choices=ITEMS, default=None, help="run only these items")
    p.add_argument("--out", default="results.json", help="JSON file to write")
    p.add_argument("--baseline", metavar="OLD_JSON", default=None,
                   help="a previous run's JSON: print each row's time now / then and flag regressions")
    p.add_argument("--threshold", type=float, default=cli_benchmark.DEFAULT_THRESHOLD,
                   help="a row more than this fraction slower than the baseline is a regression (default 0.10)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit with status 1 when a row regressed")
    p.add_argument("--results", metavar="JSON", default=None,
                   help="run nothing: print the table of this results JSON (with --baseline: compare the two)")
    p.add_argument("--load-folder", metavar="PATH", default=None,
                   help="with the loading item: also time loading this diffusers component folder (e.g. the "
                        "real-size SD 1.5 U-Net) against safetensors.numpy.load_file and diffusers")
    p.add_argument("--train-remat", default="full", choices=("none", "full", "checkpoint", "dots_saveable"),
                   help="our training step's remat policy (model.remat; default full, the training configs' choice)")
    p.add_argument("--settle", type=int, default=0, metavar="N",
                   help="untimed calls of each side before each of its timed ones, so that neither is timed on the "
                        "state the other left (default 0: strict alternation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv=None, prog: str | None = None) -> int:
    from vldm_jax.errors import UserError

    try:
        args = build_parser(prog).parse_args(argv)
        if not args.threshold >= 0:
            raise UserError(f"--threshold must be at least 0 (got {args.threshold})")
        if args.reps < 1:
            raise UserError(f"--reps must be at least 1 (got {args.reps})")
        if args.settle < 0:
            raise UserError(f"--settle must be at least 0 (got {args.settle})")
        global SETTLE
        SETTLE = args.settle
        # Checked before anything runs: a bad baseline must not cost a whole benchmark run.
        baseline = cli_benchmark.read_results(args.baseline) if args.baseline else None
        if args.results:
            results = cli_benchmark.read_results(args.results, what="results")
        else:
            results = run(args.size, args.reps, args.out, args.only, load_folder=args.load_folder,
                          progress=not args.no_progress, train_remat=args.train_remat)
            print(format_table(results))
    except UserError as e:  # one line, exit 2, as every vldm command (also when run as a script)
        print(f"{prog or 'benchmark'}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.results:
        try:
            print(format_table(results))
        except (KeyError, TypeError, ValueError):  # an older or partial file: the comparison still stands
            print(f"(no table: {args.results} lacks fields this version prints)")
    if baseline is None:
        return 0
    entries = cli_benchmark.compare(results, baseline, args.threshold)
    print()
    print(cli_benchmark.format_comparison(entries, args.threshold, args.baseline))
    return 1 if args.fail_on_regression and any(e["regression"] for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
