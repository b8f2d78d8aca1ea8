"""A temporal decoder for the bundled moving-shapes model, fine-tuned briefly here: the row "+ fine-tuned
decoder" of the small-scale FVD table (scripts/shapes_fvd.py --temporal-decoder).

The bundled model ships only its image VAE (whose decoder was fine-tuned per frame on noisy latents,
configs/shapes/vae_decoder.yaml). This script turns it into a temporal decoder
(``AutoencoderKLTemporalDecoder.from_image_vae``: spatial weights copied, temporal layers starting as the
identity) and trains the temporal layers with the project's decoder fine-tuning step
(vldm_jax/train/decoder_objective.py: L1 + hinge GAN with a 3D patch discriminator from half the steps, the
adaptive weight at ``time_conv_out``; encoder frozen, posterior samples) on rendered moving-shapes clips,
within a CPU-time budget. It is a short run on a CPU, not the paper's decoder fine-tuning.

    python scripts/finetune_shapes_decoder.py --out runs/shapes_decoder/vae --steps 150 --max-cpu-seconds 420

Writes ``--out`` (our model folder: params.safetensors + vldm_config.json, atomically) and ``training.json``
beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the temporal VAE")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=9, help="frames of each training clip")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--max-cpu-seconds", type=float, default=None, help="stop after this much process CPU time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vldm_jax.checkpoints.store import atomic_folder, save_module
    from vldm_jax.data.moving_shapes import example
    from vldm_jax.eval.flicker import flicker_report
    from vldm_jax.models.autoencoder import AutoencoderKLTemporalDecoder
    from vldm_jax.models.discriminator import PatchDiscriminator3D, PatchDiscriminator3DConfig
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint
    from vldm_jax.train.decoder_objective import (
        DecoderFinetuneModels,
        DecoderObjectiveConfig,
        make_decoder_finetune_step,
        trainable_filter,
    )

    t0, c0 = time.perf_counter(), time.process_time()
    pipe = TextToVideoPipeline.from_pretrained(args.checkpoint or default_checkpoint())
    size = pipe.default("height", 64)
    vae = AutoencoderKLTemporalDecoder.from_image_vae(pipe.vae, rngs=nnx.Rngs(args.seed))

    def clips(start, n, seed):
        return np.stack([example(i, seed=seed, num_frames=args.frames, size=size)["video"]
                         for i in range(start, start + n)]).astype(np.float32) / 127.5 - 1.0

    disc = PatchDiscriminator3D(PatchDiscriminator3DConfig(base_channels=32, num_layers=2), rngs=nnx.Rngs(1))
    models = DecoderFinetuneModels(vae, disc)
    config = DecoderObjectiveConfig(trainable="temporal", disc_start=args.steps // 2, disc_weight=args.disc_weight,
                                    sample_posterior=True)
    graphdef, trainable, frozen = nnx.split(models, trainable_filter(config.trainable), ...)
    tx = optax.adam(args.lr, b1=0.5, b2=0.9)
    opt = tx.init(trainable)
    step_fn = jax.jit(make_decoder_finetune_step(graphdef, tx, config))

    @jax.jit
    def reconstruct(trainable, x, key):
        m = nnx.merge(graphdef, trainable, frozen).vae
        return m.decode(m.encode(x).sample(key))

    held = clips(0, 8, seed=args.seed + 1)
    before = flicker_report(np.asarray(reconstruct(trainable, jnp.asarray(held), jax.random.key(7))), held)
    done = 0
    for s in range(args.steps):
        if args.max_cpu_seconds and time.process_time() - c0 > args.max_cpu_seconds:
            print(f"CPU budget reached after {s} steps", file=sys.stderr)
            break
        batch = jnp.asarray(clips(s * args.batch, args.batch, seed=args.seed))
        trainable, opt, m = step_fn(trainable, frozen, opt, batch, jnp.asarray(s), jax.random.key(s))
        done = s + 1
        if s % 10 == 0 or s == args.steps - 1:
            print(f"step {s}: rec {float(m['rec_loss']):.4f} g {float(m['g_loss']):.3f} d {float(m['d_loss']):.3f} "
                  f"({time.perf_counter() - t0:.0f}s, CPU {time.process_time() - c0:.0f}s)", file=sys.stderr,
                  flush=True)
    after = flicker_report(np.asarray(reconstruct(trainable, jnp.asarray(held), jax.random.key(7))), held)
    tuned = nnx.merge(graphdef, trainable, frozen).vae
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, overwrite=True) as tmp:
        save_module(tuned, tmp)
    result = {"steps": done, "batch": args.batch, "frames": args.frames, "lr": args.lr,
              "disc_start": config.disc_start, "wall_seconds": round(time.perf_counter() - t0, 1),
              "cpu_seconds": round(time.process_time() - c0, 1),
              "held_out_posterior_samples": {"image_decoder": before, "temporal_decoder": after}}
    (out.parent / "training.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
