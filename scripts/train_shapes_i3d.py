"""Trains the feature network of FVD on moving shapes: a small Inception-I3D (vldm_jax/models/i3d.py at 1/16
width, frames resized to 32x32, head pool (1, 1, 1)) with one logit group per attribute of a clip: colour (5),
shape (3), direction of motion (4) and speed (2), 14 logits trained with a softmax cross-entropy per group.
Direction and speed are only visible in motion (the frames of a clip differ only in where the object is), so
shuffled or independent frames land elsewhere in feature space. Its 14 logits averaged over time are the
features, as I3D's 400 Kinetics logits are for FVD.

Each step trains on 17-frame clips and on their 5 key frames (every 4th frame): the two frame counts the
shapes table measures (two compilations of the step).

    python scripts/train_shapes_i3d.py --out vldm_jax/assets/shapes_i3d --steps 260 --max-cpu-seconds 840

(An earlier version classified the 120 colour x shape x direction x speed combinations jointly; in 900 s on a
loaded machine it reached 1.7 % accuracy and its FVD separated nothing.)

Writes the folder with ``i3d.safetensors`` (PyTorch-port names and layouts) and ``i3d_config.json``, which
``vldm eval fvd --i3d FOLDER --size 32`` reads, plus ``training.json`` (held-out accuracy per attribute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from vldm_jax.checkpoints.i3d import save_i3d
from vldm_jax.data.moving_shapes import COLORS, DIRECTIONS, SHAPES, SPEEDS, render_clip
from vldm_jax.eval.features import I3DPreprocess
from vldm_jax.models.i3d import I3DConfig, InceptionI3d

ATTRIBUTES = (("color", tuple(COLORS)), ("shape", SHAPES), ("direction", tuple(DIRECTIONS)),
              ("speed", tuple(SPEEDS)))
GROUPS = tuple(len(values) for _, values in ATTRIBUTES)  # logits [0:5] colour, [5:8] shape, [8:12] dir, [12:14]
CONFIG = I3DConfig(num_classes=sum(GROUPS), width=0.0625, pool_size=(1, 1, 1), batch_norm_momentum=0.9)
FRAMES, SIZE = 17, 64  # rendered clips
INPUT = 32  # the network sees frames resized to 32x32 (I3DPreprocess), as vldm eval fvd --size 32 does


def batch(rng: np.random.Generator, n: int):
    """uint8 clips (n, 17, 64, 64, 3) and labels (n, 4): the index of each attribute's value."""
    labels = np.stack([rng.integers(0, g, n) for g in GROUPS], axis=1)
    clips = np.stack([render_clip(*(values[i] for (_, values), i in zip(ATTRIBUTES, row)), FRAMES, SIZE,
                                  rng).frames for row in labels])
    return clips, labels.astype(np.int32)


def split_logits(logits):
    out, start = [], 0
    for g in GROUPS:
        out.append(logits[..., start:start + g])
        start += g
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this long (then evaluate "
                                                                       "and save)")
    p.add_argument("--max-cpu-seconds", type=float, default=None,
                   help="stop after this much process CPU time (all threads; compilation included): a budget that "
                        "means the same on a shared machine")
    args = p.parse_args(argv)

    model = InceptionI3d(CONFIG, rngs=nnx.Rngs(args.seed))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, min(20, args.steps // 4), args.steps,
                                                        args.lr * 0.05), weight_decay=1e-4)
    opt = tx.init(params)
    pre = I3DPreprocess(size=INPUT)

    def loss_fn(params, stats, videos, labels):
        m = nnx.merge(graphdef, params, stats, copy=True)  # fresh variables inside the gradient's trace
        m.train()
        groups = split_logits(m(pre(videos)))
        loss = sum(optax.softmax_cross_entropy_with_integer_labels(g, labels[:, j]).mean()
                   for j, g in enumerate(groups))
        acc = sum((g.argmax(-1) == labels[:, j]).mean() for j, g in enumerate(groups)) / len(groups)
        return loss, (nnx.state(m, nnx.BatchStat), acc)

    @jax.jit
    def step(params, stats, opt, videos, labels):
        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, videos, labels)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss, acc

    @jax.jit
    def predict(params, stats, videos):
        m = nnx.merge(graphdef, params, stats)
        m.eval()
        return jax.numpy.stack([g.argmax(-1) for g in split_logits(m(pre(videos)))], axis=1)

    rng = np.random.default_rng([args.seed, 1])
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for i in range(args.steps):
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            print(f"time budget reached after {i} steps", file=sys.stderr)
            break
        if args.max_cpu_seconds and time.process_time() - c0 > args.max_cpu_seconds:
            print(f"CPU budget reached after {i} steps", file=sys.stderr)
            break
        videos, labels = batch(rng, args.batch)
        # the same clips at both frame rates: 17 frames, then the 5 key frames
        params, stats, opt, loss, acc = step(params, stats, opt, videos, labels)
        params, stats, opt, loss5, acc5 = step(params, stats, opt, videos[:, ::4], labels)
        done = i + 1
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:4d} loss {float(loss):.3f} / {float(loss5):.3f} (5 frames) acc {float(acc):.2f} / "
                  f"{float(acc5):.2f} ({time.perf_counter() - t0:.0f}s, CPU {time.process_time() - c0:.0f}s)", file=sys.stderr, flush=True)
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    held = np.random.default_rng([args.seed, 2])
    videos, labels = batch(held, 120)
    result = {"task": "per-attribute classification: " + ", ".join(f"{n} ({len(v)})" for n, v in ATTRIBUTES),
              "steps": done, "batch": args.batch, "lr": args.lr, "train_seconds": round(train_seconds, 1),
              "train_cpu_seconds": round(cpu_seconds, 1),
              "held_out_clips": len(videos)}
    for name, v in (("accuracy_17_frames", videos), ("accuracy_5_keyframes", videos[:, ::4])):
        pred = np.concatenate([np.asarray(predict(params, stats, v[i:i + 40])) for i in range(0, len(v), 40)])
        result[name] = float((pred == labels).all(axis=1).mean())  # every attribute right
        for j, (attr, _) in enumerate(ATTRIBUTES):
            result[f"{name}_{attr}"] = float((pred[:, j] == labels[:, j]).mean())
    save_i3d(nnx.merge(graphdef, params, stats), args.out)
    (Path(args.out) / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
