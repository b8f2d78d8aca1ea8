"""Trains the feature network of FVD on moving shapes: a small Inception-I3D (vldm_jax/models/i3d.py at 1/16
width, frames resized to 32x32, head pool (1, 1, 1)) classifying procedural clips into their 120 colour x shape x
direction x speed combinations, on clips of 17 frames (the head pool (1, 2, 2) also takes the 5 key frames, the
other frame count the shapes table measures; the network is trained on 17 only: one compilation of the step,
which takes minutes on this shared 2-core machine). Its 120 logits averaged over time are the features, as I3D's 400 Kinetics
logits are for FVD. Direction and speed are only visible in motion, so shuffled or independent frames land
elsewhere in feature space.

    python scripts/train_shapes_i3d.py --out vldm_jax/assets/shapes_i3d --max-seconds 900

Writes the folder with ``i3d.safetensors`` (PyTorch-port names and layouts) and ``i3d_config.json``, which
``vldm eval fvd --i3d FOLDER --size 32`` reads, and prints held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from vldm_jax.checkpoints.i3d import save_i3d
from vldm_jax.data.moving_shapes import COMBINATIONS, render_clip
from vldm_jax.eval.features import I3DPreprocess
from vldm_jax.models.i3d import I3DConfig, InceptionI3d

CONFIG = I3DConfig(num_classes=len(COMBINATIONS), width=0.0625, pool_size=(1, 1, 1), batch_norm_momentum=0.9)
FRAMES, SIZE = 17, 64  # rendered clips
INPUT = 32  # the network sees frames resized to 32x32 (I3DPreprocess), as vldm eval fvd --size 32 does


def batch(rng: np.random.Generator, n: int):
    labels = rng.integers(0, len(COMBINATIONS), n)
    clips = np.stack([render_clip(*COMBINATIONS[k], FRAMES, SIZE, rng).frames for k in labels])
    return clips, labels.astype(np.int32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this long (then evaluate "
                                                                       "and save)")
    args = p.parse_args(argv)

    model = InceptionI3d(CONFIG, rngs=nnx.Rngs(args.seed))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, min(20, args.steps // 4), args.steps, args.lr * 0.02), weight_decay=1e-4)
    opt = tx.init(params)
    pre = I3DPreprocess(size=INPUT)

    def loss_fn(params, stats, videos, labels):
        m = nnx.merge(graphdef, params, stats, copy=True)  # fresh variables inside the gradient's trace
        m.train()
        logits = m(pre(videos))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (nnx.state(m, nnx.BatchStat), (logits.argmax(-1) == labels).mean())

    @jax.jit
    def step(params, stats, opt, videos, labels):
        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, videos, labels)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss, acc

    @jax.jit
    def predict(params, stats, videos):
        m = nnx.merge(graphdef, params, stats)
        m.eval()
        return m(pre(videos)).argmax(-1)

    rng = np.random.default_rng([args.seed, 1])
    t0 = time.perf_counter()
    done = 0
    for i in range(args.steps):
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            print(f"time budget reached after {i} steps", file=sys.stderr)
            break
        videos, labels = batch(rng, args.batch)
        params, stats, opt, loss, acc = step(params, stats, opt, videos, labels)
        done = i + 1
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:4d} loss {float(loss):.3f} acc {float(acc):.2f} ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    held = np.random.default_rng([args.seed, 2])
    videos, labels = batch(held, 240)
    result = {"steps": done, "train_seconds": round(time.perf_counter() - t0, 1)}
    for name, v in (("accuracy_17_frames", videos), ("accuracy_5_keyframes", videos[:, ::4])):
        pred = np.concatenate([np.asarray(predict(params, stats, v[i:i + 48])) for i in range(0, len(v), 48)])
        result[name] = float((pred == labels).mean())
        # which attribute errs: (colour, shape, direction, speed) of prediction vs label
        for j, attr in enumerate(("color", "shape", "direction", "speed")):
            result[f"{name}_{attr}"] = float(np.mean([COMBINATIONS[a][j] == COMBINATIONS[b][j]
                                                      for a, b in zip(pred, labels)]))
    save_i3d(nnx.merge(graphdef, params, stats), args.out)
    (__import__("pathlib").Path(args.out) / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
