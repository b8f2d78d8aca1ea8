"""Numbers for the temporal decoder (issue 4): chunked-decode memory, decode time per frame next to
diffusers, and the flicker metric before / after a decoder fine-tune on a small synthetic video set.

    python scripts/temporal_decoder_report.py memory             # XLA buffer sizes, 8 / 16 / 64 frames
    python scripts/temporal_decoder_report.py timing             # ours vs diffusers on this machine
    python scripts/temporal_decoder_report.py finetune           # flicker before / after (a few minutes on CPU)

Everything is built here from random weights or trained here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vldm_jax.eval.flicker import flicker_report
from vldm_jax.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLTemporalDecoderConfig,
)

# SVD's temporal VAE (stabilityai/stable-video-diffusion-img2vid vae/config.json).
SVD = AutoencoderKLTemporalDecoderConfig(down_block_types=("DownEncoderBlock2D",) * 4,
                                         block_out_channels=(128, 256, 512, 512), layers_per_block=2)


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


# ------------------------------------------------------------------------------------------------ memory

def memory(args):
    """Compiles the chunked decode for several frame counts (abstract weights: nothing is allocated) and
    prints XLA's buffer assignment. Peak device memory ~ arguments + output + temp."""
    abstract = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(SVD, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, decode_chunk_size=args.chunk))
    h = args.size // 8
    print(f"SVD temporal decoder, {args.size}x{args.size} frames, decode_chunk_size={args.chunk}, "
          f"backend {jax.default_backend()}")
    print("frames |        temp |      output |   arguments |  args+out+temp")
    rows = {}
    for f in args.frames:
        z = jax.ShapeDtypeStruct((1, f, h, h, 4), jnp.float32)
        ma = fn.lower(state, z).compile().memory_analysis()
        rows[f] = ma
        total = ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes
        print(f"{f:6d} | {mib(ma.temp_size_in_bytes)} | {mib(ma.output_size_in_bytes)} | "
              f"{mib(ma.argument_size_in_bytes)} | {mib(total)}")
    lo, hi = min(rows), max(rows)
    growth = (rows[hi].temp_size_in_bytes + rows[hi].output_size_in_bytes + rows[hi].argument_size_in_bytes
              - rows[lo].temp_size_in_bytes - rows[lo].output_size_in_bytes - rows[lo].argument_size_in_bytes)
    print(f"peak growth {lo} -> {hi} frames: {mib(growth)}; output at {hi} frames: "
          f"{mib(rows[hi].output_size_in_bytes)}; temp difference "
          f"{rows[hi].temp_size_in_bytes - rows[lo].temp_size_in_bytes} bytes")


# ------------------------------------------------------------------------------------------------ timing

def timing(args):
    """Decode ``frames`` frames of an SVD-sized temporal decoder with random weights: ours (jit, float32)
    and diffusers (torch, float32, no_grad) on the same CPU."""
    import diffusers
    import torch

    torch.manual_seed(0)
    tv = diffusers.AutoencoderKLTemporalDecoder(down_block_types=list(SVD.down_block_types),
                                                block_out_channels=list(SVD.block_out_channels),
                                                layers_per_block=SVD.layers_per_block).eval()
    from vldm_jax.checkpoints.load import build_from_state_dict

    ours = build_from_state_dict("AutoencoderKLTemporalDecoder", SVD,
                                 {k: v.numpy() for k, v in tv.state_dict().items()})
    graphdef, state = nnx.split(ours)
    f, h = args.frames, args.size // 8
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, decode_chunk_size=args.chunk))
    z = jax.random.normal(jax.random.key(0), (1, f, h, h, 4))
    t0 = time.perf_counter()
    fn(state, z).block_until_ready()
    compile_s = time.perf_counter() - t0
    ours_s = min(_timed(lambda: fn(state, z).block_until_ready()) for _ in range(args.repeats))
    zt = torch.from_numpy(np.asarray(z)[0].transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        def run_torch():
            for i in range(0, f, args.chunk):
                tv.decode(zt[i:i + args.chunk], num_frames=min(args.chunk, f - i))
        run_torch()
        torch_s = min(_timed(run_torch) for _ in range(args.repeats))
    print(f"SVD temporal decoder, {f} frames of {args.size}x{args.size}, chunk {args.chunk}, "
          f"{torch.get_num_threads()} torch threads, JAX {jax.default_backend()}")
    print(f"ours (jit, first call incl. compile {compile_s:.1f} s): {ours_s / f * 1e3:.0f} ms/frame")
    print(f"diffusers {diffusers.__version__} (torch {torch.__version__}): {torch_s / f * 1e3:.0f} ms/frame")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- finetune

def video_set(n: int, frames: int, size: int, seed: int) -> np.ndarray:
    """Moving-shapes clips ``(n, F, size, size, 3)`` in [-1, 1]."""
    from vldm_jax.data.moving_shapes import example

    return np.stack([example(i, seed=seed, num_frames=frames, size=size)["video"] for i in range(n)]
                    ).astype(np.float32) / 127.5 - 1.0


def train_image_vae(frames: np.ndarray, steps: int, batch: int, seed: int = 0) -> AutoencoderKL:
    """A tiny image VAE trained per frame (L1 + a small KL), the stand-in for Stable Diffusion's."""
    config = AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 block_out_channels=(32, 64), layers_per_block=1, sample_size=frames.shape[1])
    vae = AutoencoderKL(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(vae)
    tx = optax.adam(1e-3)
    opt = tx.init(state)

    @jax.jit
    def step(state, opt, x, key):
        def loss_fn(state):
            model = nnx.merge(graphdef, state)
            post = model.encode(x)
            rec = model.decode(post.sample(key))
            return jnp.mean(jnp.abs(rec - x)) + 1e-6 * jnp.mean(post.kl())
        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        x = jnp.asarray(frames[rng.integers(0, len(frames), batch)])
        state, opt, loss = step(state, opt, x, jax.random.key(i))
        if i % 100 == 0 or i == steps - 1:
            print(f"  image VAE step {i}: L1 {float(loss):.4f}", flush=True)
    return nnx.merge(graphdef, state)


def cached_image_vae(args, frames: np.ndarray) -> AutoencoderKL:
    """The trained image VAE, read from / written to ``--vae-cache`` (an .npz) so that fine-tuning settings
    can be compared on one VAE."""
    import os

    if args.vae_cache and os.path.exists(args.vae_cache):
        vae = train_image_vae(frames, 0, args.vae_batch)
        graphdef, state = nnx.split(vae)
        saved = np.load(args.vae_cache)
        flat = [(p, v.replace(jnp.asarray(saved[".".join(map(str, p))]))) for p, v in nnx.to_flat_state(state)]
        print(f"image VAE read from {args.vae_cache}")
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
    vae = train_image_vae(frames, args.vae_steps, args.vae_batch)
    if args.vae_cache:
        np.savez(args.vae_cache, **{".".join(map(str, p)): np.asarray(v.get_value())
                                    for p, v in nnx.to_flat_state(nnx.state(vae))})
    return vae


def evaluate(vae: AutoencoderKLTemporalDecoder, videos: np.ndarray, seed: int = 0) -> dict[str, dict]:
    """Flicker report of reconstructions from the posterior mode and from posterior samples (per-frame latent
    noise, the kind of frame-to-frame inconsistency sampled latents carry)."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def recon(state, x, key):
        model = nnx.merge(graphdef, state)
        post = model.encode(x)
        return model.decode(post.mode()), model.decode(post.sample(key))

    mode, sampled = recon(state, jnp.asarray(videos), jax.random.key(seed))
    return {"mode": flicker_report(np.asarray(mode), videos), "sampled": flicker_report(np.asarray(sampled), videos)}


def finetune(args):
    from vldm_jax.models.discriminator import PatchDiscriminator3D, PatchDiscriminator3DConfig
    from vldm_jax.train.decoder_objective import (
        DecoderFinetuneModels,
        DecoderObjectiveConfig,
        make_decoder_finetune_step,
        trainable_filter,
    )

    t0 = time.perf_counter()
    train = video_set(args.train_videos, args.frames, args.size, seed=0)
    test = video_set(args.test_videos, args.frames, args.size, seed=1)
    print(f"video set: {len(train)} training / {len(test)} held-out moving-shapes clips of {args.frames} frames, "
          f"{args.size}x{args.size}", flush=True)
    image = cached_image_vae(args, train.reshape((-1,) + train.shape[2:]))
    vae = AutoencoderKLTemporalDecoder.from_image_vae(image)
    before = evaluate(vae, test)

    disc = PatchDiscriminator3D(PatchDiscriminator3DConfig(base_channels=32, num_layers=2), rngs=nnx.Rngs(1))
    models = DecoderFinetuneModels(vae, disc)
    disc_start = args.steps // 2 if args.disc_start is None else args.disc_start
    config = DecoderObjectiveConfig(trainable=args.trainable, disc_start=disc_start, disc_weight=args.disc_weight,
                                    sample_posterior=True)
    graphdef, trainable, frozen = nnx.split(models, trainable_filter(config.trainable), ...)
    tx = optax.adam(args.lr, b1=0.5, b2=0.9)
    opt = tx.init(trainable)
    step_fn = jax.jit(make_decoder_finetune_step(graphdef, tx, config))
    rng = np.random.default_rng(1)
    for s in range(args.steps):
        batch = jnp.asarray(train[rng.integers(0, len(train), args.batch)])
        trainable, opt, m = step_fn(trainable, frozen, opt, batch, jnp.asarray(s), jax.random.key(s))
        if s % 50 == 0 or s == args.steps - 1:
            print(f"  fine-tune step {s}: rec {float(m['rec_loss']):.4f} g {float(m['g_loss']):.3f} "
                  f"d {float(m['d_loss']):.3f} d_weight {float(m['d_weight']):.3f}", flush=True)
    tuned = nnx.merge(graphdef, trainable, frozen).vae
    after = evaluate(tuned, test)
    print(f"\n{args.trainable} fine-tune, {args.steps} steps, discriminator from step {disc_start} "
          f"(disc_weight {args.disc_weight}); {time.perf_counter() - t0:.0f} s in all")
    print("latents  | decoder                 | flicker  | temporal grad err | reconstruction L1")
    for kind in ("mode", "sampled"):
        for name, r in (("image (before)", before[kind]), ("temporal (after)", after[kind])):
            print(f"{kind:8s} | {name:23s} | {r['flicker']:+.4f}  | {r['temporal_gradient_error']:.4f}            "
                  f"| {r['reconstruction_error']:.4f}")
    print(f"held-out clips' own frame difference: {before['mode']['reference_frame_difference']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--size", type=int, default=576)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 64])
    p = sub.add_parser("timing")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("finetune")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--train-videos", type=int, default=96)
    p.add_argument("--test-videos", type=int, default=16)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--trainable", choices=("temporal", "decoder"), default="temporal")
    p.add_argument("--disc-start", type=int, default=None, help="default: half of --steps")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--vae-cache", default=None, help=".npz to reuse the trained image VAE across runs")
    args = parser.parse_args()
    {"memory": memory, "timing": timing, "finetune": finetune}[args.what](args)


if __name__ == "__main__":
    main()
