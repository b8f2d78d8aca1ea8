"""Sharded training equals single-device training: 8 simulated CPU devices (data, fsdp and mixed layouts) in a
subprocess, and two processes joined by jax.distributed on localhost."""

import json

import jax
import pytest

from tests.train import _subproc
from tests.train.tiny import (
    classic_threefry,  # noqa: F401 - autouse fixture
    tiny_config,
    tiny_data,
    tiny_setup,
)
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.train import loop

TOL = 1e-5


@pytest.mark.slow
def test_sharded_steps_match_one_device():
    rc, res, err = _subproc.run("sharded", devices=8)
    assert rc == 0 and res is not None, err[-3000:]
    for layout in ("8x1", "1x8", "2x4"):
        r = res[layout]
        assert r["loss_diff"] <= TOL and r["param_diff"] <= TOL and r["grad_norm_diff"] <= TOL, (layout, r)
    # Pure data parallelism replicates everything; with an fsdp axis the big kernels, their moments and EMA shard.
    assert res["8x1"]["sharded_leaves"] == []
    for layout in ("1x8", "2x4"):
        sharded = res[layout]["sharded_leaves"]
        assert "trainable.unet.temporal_conv.kernel" in sharded
        assert any(k.startswith("opt_state.") and k.endswith("temporal_conv.kernel") for k in sharded)
        assert "ema.unet.temporal_conv.kernel" in sharded and "frozen.unet.conv_in.kernel" in sharded


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    """Two processes (one CPU device each) joined by jax.distributed on localhost run 4 steps with checkpoints;
    they agree with each other and with one process holding the whole global batch."""
    port = _subproc.free_port()
    workdir = tmp_path / "two"
    procs = [_subproc.start("distributed_train", port, pid, 2, workdir, 4) for pid in range(2)]
    results = [_subproc.finish(p) for p in procs]
    for rc, res, err in results:
        assert rc == 0 and res is not None, err[-3000:]
    (_, a, _), (_, b, _) = results
    assert a["losses"] == b["losses"] and sorted(map(int, a["losses"])) == [1, 2, 3, 4]
    meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["process_count"] == 2 and set(meta["data"]) == {"0", "1"}  # both processes' data positions

    config = tiny_config(**{"data.batch_size_per_device": 4, "train.steps": 4})
    ref = loop.train(config, setup=tiny_setup(), data=tiny_data(4), workdir=tmp_path / "one",
                     mesh=meshlib.make_mesh(1, 1, jax.devices()[:1]), echo=lambda m: None)
    for m in ref.metrics:
        assert abs(a["losses"][str(m["step"])] - m["loss"]) <= TOL, (m["step"], a["losses"], m["loss"])
