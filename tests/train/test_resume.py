"""Preemption and crashes: a run stopped by SIGTERM, or killed by SIGKILL while a checkpoint is being written,
resumes to exactly the losses of a run that never stopped."""

import json
import signal

import pytest

from tests.train import _subproc
from vldm_jax.train.loop import Checkpoints

STEPS = 8


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    rc, res, err = _subproc.run("run", tmp_path_factory.mktemp("straight"), STEPS)
    assert rc == 0 and res is not None, err[-3000:]
    assert sorted(map(int, res["losses"])) == list(range(1, STEPS + 1))
    return res["losses"]


def logged_losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): r["loss"] for r in rows}


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(tmp_path, uninterrupted):
    rc, res, err = _subproc.run("run", tmp_path, STEPS, VLDM_TEST_SIGTERM_AT=3)
    assert rc == 0 and res["preempted"] and res["step"] == 3, err[-3000:]
    assert "stopped by SIGTERM at step 3" in err
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 3  # saved at the preemption, off the every-2-steps schedule
    rc, res, err = _subproc.run("run", tmp_path, STEPS)
    assert rc == 0 and res["resumed"] and res["start"] == 3, err[-3000:]
    assert "resuming from step 3" in err
    assert res["losses"] == {k: v for k, v in uninterrupted.items() if int(k) > 3}
    assert logged_losses(tmp_path) == uninterrupted  # the JSONL holds each step once


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    # Killed right after step 4's (asynchronous) save was issued: that save never completes.
    rc, res, err = _subproc.run("run", tmp_path, STEPS, 4)
    assert rc == -signal.SIGKILL, err[-3000:]
    complete = Checkpoints(tmp_path / "checkpoints", keep=3, async_save=False)
    latest = complete.latest_step()
    complete.close()
    assert latest in (2, 4)
    rc, res, err = _subproc.run("run", tmp_path, STEPS)
    assert rc == 0 and res["resumed"] and res["start"] == latest, err[-3000:]
    assert res["losses"] == {k: v for k, v in uninterrupted.items() if int(k) > latest}
    assert logged_losses(tmp_path) == uninterrupted
