"""Per-device memory of a video U-Net forward with its frames split over the mesh's ``context`` axis.

    python scripts/context_memory.py --frames 64 --json docs/context-memory-cpu.json

Compiles one forward of the bundled model's key-frame U-Net (or ``--checkpoint``'s ``unet``) for ``--frames``
frames at the model's latent size, on 1, 2, 4 and 8 devices of the ``context`` axis, and prints XLA's
per-device buffer sizes (``memory_analysis``: temp, arguments, output). Nothing runs: only compiles. On a CPU the
devices are simulated (the script sets ``--xla_force_host_platform_device_count`` itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--contexts", default="1,2,4,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from vldm_jax.checkpoints.load import load_model
    from vldm_jax.parallel import activation_mesh, make_mesh
    from vldm_jax.parallel.activations import video_sharding
    from vldm_jax.pipelines.text_to_video import default_checkpoint

    folder = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    unet = load_model(folder / "unet")
    cfg = unet.config
    size = cfg.sample_size[0] if isinstance(cfg.sample_size, (tuple, list)) else cfg.sample_size
    graph, state = nnx.split(unet)
    shape = (args.batch, args.frames, size, size, cfg.in_channels)
    text = jax.ShapeDtypeStruct((args.batch, 77, cfg.cross_attention_dim), jnp.float32)
    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

    def forward(state, x, text, mesh):
        with activation_mesh(mesh):
            b, f = x.shape[:2]
            return nnx.merge(graph, state)(x, jnp.full((b,), 500.0), text, image_only_indicator=jnp.zeros((b, f)))

    rows = []
    for c in map(int, args.contexts.split(",")):
        mesh = make_mesh(1, 1, jax.devices()[:c], context=c)
        x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=video_sharding(mesh, shape))
        m = jax.jit(forward, static_argnums=3).lower(abstract_state, x, text, mesh).compile().memory_analysis()
        rows.append({"context": c, "temp_bytes": int(m.temp_size_in_bytes),
                     "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes)})
    base = rows[0]["temp_bytes"]
    print(f"video U-Net forward, {args.batch} x {args.frames} frames of {size}x{size} latents, "
          f"{jax.devices()[0].platform}, per device:")
    print(f"{'context':>8} {'temp MiB':>10} {'x of 1':>7} {'args MiB':>9} {'out MiB':>8}")
    for r in rows:
        print(f"{r['context']:>8} {r['temp_bytes'] / 2**20:>10.1f} {r['temp_bytes'] / base:>7.3f} "
              f"{r['argument_bytes'] / 2**20:>9.1f} {r['output_bytes'] / 2**20:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(folder), "frames": args.frames, "batch": args.batch,
                                               "latent_size": size, "platform": jax.devices()[0].platform,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
