"""Frame (context) parallelism on 8 simulated CPU devices: the video U-Net's forward and gradient, and the real
temporal training step, with each video's frames split over the ``context`` axis, equal the single-device ones.
One subprocess (it needs its own device count) runs every case; see _context_worker.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_context_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def report():
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
    proc = subprocess.run([sys.executable, str(WORKER), "equivalence"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("c", [2, 4, 8])
def test_forward_and_gradient_equal_one_device(report, c):
    r = report[f"context{c}"]
    assert r["output_spec"] == "P(None, 'context')"  # the frames really are split
    assert r["forward"] < TOL and r["loss"] < TOL
    assert r["grad"] < TOL * max(1.0, report["grad_scale"])


def test_rows_are_split_when_frames_do_not_divide(report):
    r = report["rows_context4"]
    assert r["output_spec"] == "P(None, None, 'context')"
    assert r["forward"] < TOL


def test_xla_exchanges_frames_with_all_to_all_and_halos(report):
    ops = report["collectives"]
    assert ops["all-to-all"] > 0  # frames <-> positions around temporal attention
    assert ops["collective-permute"] > 0  # halos of the temporal convolutions
    assert ops["all-gather"] == 0  # nothing is gathered whole


@pytest.mark.parametrize("c", [2, 4, 8])
def test_train_step_equals_one_device(report, c):
    r = report["train_step"][f"data1_context{c}"]
    assert r["loss"] < TOL and r["grad_norm"] < TOL and r["params"] < TOL
