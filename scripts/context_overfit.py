"""Does the context-frame conditioning learn something measurable? A short overfit on a tiny random video U-Net.

    python scripts/context_overfit.py                      # prediction and interpolation, temporal and concat
    python scripts/context_overfit.py --kind prediction --conditioning concat --steps 100

Eight fixed clips of random latents whose frames are determined by the context frames and by nothing else:
prediction clips repeat one random latent (the first frame gives all the others), interpolation clips blend
linearly between two random keyframe latents (the keyframes at 0 and 4 give the 3 frames between). The objective
(:class:`~vldm_jax.train.context_objectives.PredictionObjective` / ``InterpolationObjective``, x0 prediction) trains
the U-Net for ``--steps`` Adam steps; then the denoising loss on the non-context frames is measured over 32 fixed
(noise, t in [100, 1000)) draws per clip, once with the true context frames and once with the context dropped
(all-zero mask). Every parameter trains: the spatial layers of a random tiny model cannot denoise at all, and the
gap between the two losses can only come through the context path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H = W = 8
C, S, D = 4, 3, 16


def clips(kind: str, n: int = 8, seed: int = 0) -> np.ndarray:
    """``(n, F, H, W, C)`` latents: prediction repeats one latent over 4 frames; interpolation blends two keyframe
    latents over 5 frames."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 1, H, W, C)).astype(np.float32)
    if kind == "prediction":
        return np.repeat(a, 4, axis=1)
    b = rng.standard_normal((n, 1, H, W, C)).astype(np.float32)
    w = np.linspace(0.0, 1.0, 5, dtype=np.float32)[None, :, None, None, None]
    return (1 - w) * a + w * b


def overfit(kind: str = "prediction", conditioning: str = "temporal", steps: int = 100, lr: float = 1e-2,
            draws: int = 32) -> dict:
    """``{"with_context", "without_context", "seconds"}``: mean non-context losses after ``steps`` steps."""
    from tests.helpers import tiny_vldm
    from vldm_jax.diffusion import schedules
    from vldm_jax.train.context_objectives import InterpolationObjective, PredictionObjective, frame_weighted_loss
    from vldm_jax.train.objectives import VideoModels, noise_schedule

    t0 = time.perf_counter()
    sched = dict(tiny_vldm.SCHEDULER, prediction_type="sample")
    common = dict(schedule=noise_schedule(sched), scheduler_config=sched, encode_in_step=False)
    obj = (PredictionObjective(context_probs=(0.25, 0.75), **common) if kind == "prediction"
           else InterpolationObjective(drop_context_prob=0.25, **common))
    x0 = jnp.asarray(clips(kind))
    n, f = x0.shape[:2]
    batch = {"latents": x0, "encoder_hidden_states": jnp.zeros((n, S, D), jnp.float32)}
    graphdef, params, rest = nnx.split(VideoModels(tiny_vldm.video_unet(conditioning, seed=4)), nnx.Param, ...)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        loss, grads = jax.value_and_grad(lambda p: obj.loss(nnx.merge(graphdef, p, rest), batch, key)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @jax.jit
    def held_out(params, key):
        model = nnx.merge(graphdef, params, rest)
        k_n, k_t = jax.random.split(key)
        noise = jax.random.normal(k_n, x0.shape)
        t = jax.random.randint(k_t, (n,), 100, 1000)
        x_t = schedules.add_noise(obj.schedule, x0, noise, t)
        target = schedules.training_target(obj.schedule, x0, noise, t)
        mask = obj.sample_mask(n, f)
        out = []
        for given in (mask, jnp.zeros_like(mask)):
            pred = model.unet(x_t, t, batch["encoder_hidden_states"], context_latents=x0, context_mask=given)
            out.append(frame_weighted_loss(pred, target, 1.0 - mask))
        return jnp.stack(out)

    for i in range(steps):
        params, opt, _ = step(params, opt, jax.random.key(i))
    losses = np.mean([np.asarray(held_out(params, jax.random.key(10_000 + i))) for i in range(draws)], axis=0)
    return {"with_context": float(losses[0]), "without_context": float(losses[1]),
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["prediction", "interpolation"], action="append")
    parser.add_argument("--conditioning", choices=["temporal", "concat"], action="append")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    for kind in args.kind or ["prediction", "interpolation"]:
        for conditioning in args.conditioning or ["temporal", "concat"]:
            r = overfit(kind, conditioning, args.steps, args.lr)
            print(f"{kind:13s} {conditioning:8s} steps {args.steps}: non-context loss with context "
                  f"{r['with_context']:.4f}, without {r['without_context']:.4f} "
                  f"(ratio {r['with_context'] / r['without_context']:.2f}; {r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
