"""Times FVD features: the full Inception-I3D (random weights; the cost does not depend on them) on 16 frames at
224x224, resize and scaling included, sharded over the local devices. Prints and writes seconds per 1,000 videos.
With ``--fid``: the full FID Inception-v3 (pool3) on frames resized to 299x299, seconds per 1,000 frames.

    python scripts/time_fvd_features.py [--batch 4 --reps 3 --json docs/fvd_features_timing.json]
    python scripts/time_fvd_features.py --fid --batch 16 --reps 3 --json docs/fid_features_timing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--input-size", type=int, default=64, help="stored frame size before the resize to 224")
    p.add_argument("--json", default=None)
    p.add_argument("--fid", action="store_true", help="time the FID Inception on frames instead")
    args = p.parse_args(argv)
    if args.fid:
        return time_fid(args)

    from vldm_jax.checkpoints.convert import abstract_module, merge_arrays
    from vldm_jax.eval.frechet import write_json
    from vldm_jax.eval.fvd import i3d_extractor
    from vldm_jax.models.i3d import I3DConfig, InceptionI3d

    graphdef, abstract = abstract_module(lambda rngs: InceptionI3d(I3DConfig(), rngs=rngs))
    rng = np.random.default_rng(0)
    from flax import nnx

    arrays = {tuple(path): (rng.normal(size=v.get_value().shape) * 0.05).astype(np.float32) + (path[-1] == "var")
              for path, v in nnx.to_flat_state(abstract)}
    model = merge_arrays(graphdef, abstract, arrays)
    ex = i3d_extractor(model, batch_size=args.batch)
    videos = rng.integers(0, 256, (ex.batch_size, 16, args.input_size, args.input_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    ex(videos)
    compile_s = time.perf_counter() - t0
    ex.seconds, ex.count = 0.0, 0
    cpu0 = time.process_time()
    for _ in range(args.reps):
        ex(videos)
    cpu = time.process_time() - cpu0
    result = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(), "batch": ex.batch_size,
              "videos_timed": ex.count, "first_call_seconds": round(compile_s, 1),
              "seconds_per_1000_videos": round(1000 * ex.seconds / ex.count, 1),
              # CPU time of this process: on a shared machine the wall time above includes waiting for cores
              "cpu_seconds_per_1000_videos": round(1000 * cpu / ex.count, 1),
              "load_average": round(__import__("os").getloadavg()[0], 1), "frames": 16, "size": 224}
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return 0


def time_fid(args) -> int:
    from flax import nnx

    from vldm_jax.checkpoints.convert import abstract_module, merge_arrays
    from vldm_jax.eval.fid import inception_extractor
    from vldm_jax.eval.frechet import write_json
    from vldm_jax.models.inception import FIDInceptionV3

    graphdef, abstract = abstract_module(lambda rngs: FIDInceptionV3(rngs=rngs))
    rng = np.random.default_rng(0)
    arrays = {tuple(path): (rng.normal(size=v.get_value().shape) * 0.05).astype(np.float32) + (path[-1] == "var")
              for path, v in nnx.to_flat_state(abstract)}
    ex = inception_extractor(merge_arrays(graphdef, abstract, arrays), batch_size=args.batch)
    frames = rng.integers(0, 256, (ex.batch_size, args.input_size, args.input_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    ex(frames)
    compile_s = time.perf_counter() - t0
    ex.seconds, ex.count = 0.0, 0
    cpu0 = time.process_time()
    for _ in range(args.reps):
        ex(frames)
    cpu = time.process_time() - cpu0
    result = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(), "batch": ex.batch_size,
              "frames_timed": ex.count, "first_call_seconds": round(compile_s, 1),
              "seconds_per_1000_frames": round(1000 * ex.seconds / ex.count, 1),
              "cpu_seconds_per_1000_frames": round(1000 * cpu / ex.count, 1),
              "load_average": round(__import__("os").getloadavg()[0], 1), "input_size": args.input_size,
              "size": 299}
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
