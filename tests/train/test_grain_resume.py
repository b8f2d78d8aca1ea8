"""The grain/array_record path end to end: a folder of real mp4 files (one corrupt) -> `vldm prepare` -> training
with 2 processes x 4 simulated devices (jax.distributed on localhost) -> SIGKILL -> resume gives the loss curve
of an uninterrupted run, and TensorFlow is never imported by training."""

import json
import signal
import subprocess
import sys

import pytest

from tests.data.test_array_record import write_clips
from tests.train import _subproc

STEPS = 6
KILL_AT = 5
NPROC, DEVICES = 2, 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("grain_videos")
    write_clips(root, n=12, frames=6, size=(16, 16))
    good = (root / "clip0.mp4").read_bytes()
    (root / "corrupt.mp4").write_bytes(good[: len(good) // 2])
    names = [f"clip{i}.mp4" for i in range(12)] + ["corrupt.mp4"]
    (root / "captions.csv").write_text("path,caption\n" + "".join(f"{n},a bar moving right {i}\n"
                                                                  for i, n in enumerate(names)))
    out = root / "prepared"
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", "prepare", str(root / "captions.csv"), "--out",
                           str(out), "--frames", "4", "--resolution", "16x16", "--shards", "4"],
                          capture_output=True, text=True, cwd=_subproc.ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["num_examples"] == 12 and spec["num_skipped"] == 1 and "corrupt.mp4" in spec["skipped"][0]["file"]
    return out


def run_group(workdir, data, kill_at=None):
    port = _subproc.free_port()
    extra = [] if kill_at is None else [kill_at]
    # The three runs compile the same programs: a persistent compilation cache shared by them saves most of that.
    cache = dict(JAX_COMPILATION_CACHE_DIR=data.parent / "jax_cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
    procs = [_subproc.start("grain_train", port, pid, NPROC, workdir, STEPS, data, *extra, devices=DEVICES, **cache)
             for pid in range(NPROC)]
    return [_subproc.finish(p, timeout=400) for p in procs]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, prepared):
    straight = run_group(tmp_path / "straight", prepared)
    for rc, res, err in straight:
        assert rc == 0 and res is not None, err[-3000:]
    (_, a, _), (_, b, _) = straight
    assert a["losses"] == b["losses"] and sorted(map(int, a["losses"])) == list(range(1, STEPS + 1))
    assert not a["tensorflow"] and not b["tensorflow"]  # training from array_record never imports TF
    expected = a["losses"]

    workdir = tmp_path / "killed"
    for rc, res, err in run_group(workdir, prepared, kill_at=KILL_AT):
        assert rc == -signal.SIGKILL, (rc, err[-3000:])
    resumed = run_group(workdir, prepared)
    for rc, res, err in resumed:
        assert rc == 0 and res is not None, err[-3000:]
        assert res["resumed"] and res["start"] in (2, 4), res  # the last complete checkpoint before the kill
        for step, loss in res["losses"].items():
            assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
        assert sorted(map(int, res["losses"])) == list(range(res["start"] + 1, STEPS + 1))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {str(r["step"]): r["loss"] for r in rows}
    assert logged.keys() == expected.keys() and all(abs(logged[k] - expected[k]) <= 1e-6 for k in expected)
    print("uninterrupted", expected, "resumed from", resumed[0][1]["start"], resumed[0][1]["losses"])
