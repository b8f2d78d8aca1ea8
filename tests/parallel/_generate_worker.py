"""Sharded sampling with the bundled model, in a subprocess with 8 simulated CPU devices.

    python tests/parallel/_generate_worker.py OUTDIR STEPS CLI_INTERPOLATE API_INTERPOLATE

Runs ``vldm generate`` (in process) with and without ``--mesh`` (GIFs: compared in colour levels, since the GIF
palette can flip on float noise) and the pipeline's Python call with and without ``mesh=`` (float frames);
prints one ``RESULT {json}`` line with the differences.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from vldm_jax.cli import main  # noqa: E402
from vldm_jax.io.video import read_video  # noqa: E402
from vldm_jax.parallel import mesh_from_sizes  # noqa: E402
from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint  # noqa: E402

PROMPTS = ("a red circle moving right", "a blue square moving up")


def _frames(path) -> np.ndarray:
    return read_video(path)[0].astype(np.int16)


def run(outdir: Path, steps: int, interpolate: int, api_interpolate: int) -> None:
    common = ["--frames", "16", "--seed", "0", "--steps", str(steps), "--interpolate", str(interpolate)]
    out: dict = {}
    times = {}
    for name, extra in (("single", []), ("context4", ["--mesh", "context=4"])):
        t0 = time.perf_counter()
        assert main(["generate", PROMPTS[0], "--out", str(outdir / f"{name}.gif"), *common, *extra]) == 0
        times[name] = time.perf_counter() - t0
    a, b = _frames(outdir / "single.gif"), _frames(outdir / "context4.gif")
    out["cli_context4"] = {"frames": int(a.shape[0]), "max_levels": int(np.abs(a - b).max()),
                           "mean_levels": float(np.abs(a - b).mean())}
    # Two prompts over data=2 against each prompt alone.
    t0 = time.perf_counter()
    assert main(["generate", *PROMPTS, "--out", str(outdir / "pair.gif"), *common, "--mesh", "data=2"]) == 0
    times["data2_two_prompts"] = time.perf_counter() - t0
    assert main(["generate", PROMPTS[1], "--out", str(outdir / "second.gif"), *common]) == 0
    pair = [_frames(outdir / f"pair-{i}.gif") for i in range(2)]
    singles = [a, _frames(outdir / "second.gif")]
    out["cli_data2"] = {"max_levels": max(int(np.abs(p - s).max()) for p, s in zip(pair, singles)),
                        "mean_levels": max(float(np.abs(p - s).mean()) for p, s in zip(pair, singles)),
                        "videos_differ": float(np.abs(pair[0] - pair[1]).mean())}
    # Float frames from the Python call (no GIF quantisation).
    pipe = TextToVideoPipeline.from_pretrained(default_checkpoint())
    kw = dict(num_frames=16, seed=0, num_inference_steps=steps, interpolate=api_interpolate)
    ref = pipe(PROMPTS[0], **kw)
    ctx = pipe(PROMPTS[0], mesh=mesh_from_sizes({"context": 4}), **kw)
    both = pipe(list(PROMPTS), mesh=mesh_from_sizes({"data": 2}), **kw)
    second = pipe(PROMPTS[1], **kw)
    out["api"] = {"context4": float(np.abs(ctx - ref).max()),
                  "data2": max(float(np.abs(both[0] - ref[0]).max()), float(np.abs(both[1] - second[0]).max())),
                  "frames": int(ref.shape[1])}
    out["seconds"] = times
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    run(Path(sys.argv[1]), *map(int, sys.argv[2:5]))
