"""Faults while writing (issue 23, item 3): SIGKILL at random moments during a write, and a full disk.

CI runs a handful of kills per writer through scripts/kill_harness.py (the full count: ``--kills 60``); a full
disk is simulated with RLIMIT_FSIZE in a subprocess (no root needed for a size-limited tmpfs)."""

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kill_harness", ROOT / "scripts" / "kill_harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.mark.parametrize("writer, kills", [
    ("image", 3), ("video", 3),
    pytest.param("checkpoint", 2, marks=pytest.mark.slow), pytest.param("convert", 1, marks=pytest.mark.slow),
    pytest.param("prepare", 2, marks=pytest.mark.slow),
])
def test_sigkill_mid_write_leaves_a_whole_result(tmp_path, writer, kills):
    r = harness.run_writer(writer, kills, tmp_path, random.Random(writer))
    assert r["kills"] == kills
    assert r["corrupt"] == 0 and r["intact"] == kills, r
    assert r["reruns_ok"] == 1, r
    assert r["final_leftovers"] == [], r  # the rerun removed the killed writers' temporaries


FULL_DISK = r"""
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk
kind, path = sys.argv[1], sys.argv[2]
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from vldm_jax import cli
rng = np.random.default_rng(0)
if kind == "video":
    from vldm_jax.io.video import write_video as w
    f = lambda: w(path, rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
elif kind == "image":
    from vldm_jax.io.video import write_image as w
    f = lambda: w(path, rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
else:
    from vldm_jax.checkpoints.store import atomic_folder
    from vldm_jax.checkpoints.safetensors_io import write_safetensors
    def f():
        with atomic_folder(path, overwrite=True) as tmp:
            write_safetensors(tmp / "params.safetensors", {"w": rng.standard_normal(50_000).astype(np.float32)})
from vldm_jax.errors import UserError
try:
    f()
    print("WROTE")
except UserError as e:
    print("USERERROR", e)
"""


@pytest.mark.parametrize("kind, name", [("video", "out.gif"), ("image", "out.png"), ("folder", "model")])
def test_full_disk_one_line_nothing_half_written(tmp_path, kind, name):
    out = subprocess.run([sys.executable, "-c", FULL_DISK, kind, str(tmp_path / name)], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("USERERROR") and name in lines[0], out.stdout
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no final name, no temporary left
