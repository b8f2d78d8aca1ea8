"""Subprocess entry points for the training tests (they need their own device count, process group or signals).

    python tests/train/_worker.py sharded                       # with 8 host devices: layouts vs one device
    python tests/train/_worker.py distributed_train PORT PID NPROC WORKDIR STEPS  # one of a jax.distributed group
    python tests/train/_worker.py run WORKDIR STEPS [KILL_AT]   # train; SIGKILL itself right after step KILL_AT
    python tests/train/_worker.py grain_train PORT PID NPROC WORKDIR STEPS DATA [KILL_AT]  # from a prepared
        array_record folder (vldm prepare) through the config's data path; SIGKILL itself after step KILL_AT

Each prints one JSON line starting with ``RESULT `` on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402

if os.environ.get("VLDM_TEST_FAST_PRNG", "1") == "1":
    # Partitionable threefry compiles ~3 s per random shape on CPU (jax 0.10); values stay sharding-invariant
    # either way, which is all these tests rely on.
    jax.config.update("jax_threefry_partitionable", False)

import numpy as np  # noqa: E402

from tests.train.tiny import tiny_arrays, tiny_config, tiny_data, tiny_encoding_setup, tiny_setup  # noqa: E402
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.train import loop  # noqa: E402
from vldm_jax.train import state as statelib


def result(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def one_step(mesh, config, batch_np):
    setup = tiny_setup()
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    filt = statelib.trainable_filter(config.model.trainable, "unet")
    graphdef, state, shardings = loop.init_state(setup, config, mesh, tx, filt)
    step = loop.compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
    batch = meshlib.global_batch(batch_np, mesh)
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)  # a second step: the optimizer's moments are used, not only set
    params = {k: np.asarray(jax.device_get(v)) for k, v in statelib.flatten(state.trainable).items()}
    specs = {k: str(v.sharding.spec) for k, v in statelib.flatten(state).items()}
    return float(metrics["loss"]), float(metrics["grad_norm"]), params, specs


def sharded() -> None:
    devices = jax.devices()
    assert len(devices) == 8, devices
    config = tiny_config(**{"data.batch_size_per_device": 1})
    arrays = tiny_arrays(8)
    ref_loss, ref_gn, ref_params, _ = one_step(meshlib.make_mesh(1, 1, devices[:1]), config, arrays)
    out = {"ref_loss": ref_loss}
    for data, fsdp in ((8, 1), (1, 8), (2, 4)):
        mesh = meshlib.make_mesh(data, fsdp)
        loss, gn, params, specs = one_step(mesh, config, arrays)
        out[f"{data}x{fsdp}"] = {
            "loss_diff": abs(loss - ref_loss), "grad_norm_diff": abs(gn - ref_gn),
            "param_diff": max(float(np.max(np.abs(params[k] - ref_params[k]))) for k in ref_params),
            "sharded_leaves": sorted(k for k, s in specs.items() if "fsdp" in s),
        }
    result(out)


def distributed_train(port: int, pid: int, nproc: int, workdir: str, steps: int) -> None:
    """A whole run (checkpoints, metrics, data positions of both processes) over a jax.distributed group."""
    config = tiny_config(**{"train.steps": steps, "train.checkpoint_every": 2, "mesh.fsdp": -1, "mesh.data": 1,
                            "mesh.coordinator_address": f"localhost:{port}", "mesh.num_processes": nproc,
                            "mesh.process_id": pid, "mesh.distributed": "true"})
    # Before anything touches a device (the objective's noise schedule is a jax array).
    meshlib.initialize_distributed("true", f"localhost:{port}", nproc, pid)
    res = loop.train(config, setup=tiny_setup(), data=tiny_data(2, process_index=pid, process_count=nproc),
                     workdir=workdir)
    result({"pid": pid, "start": res.start_step, "step": res.step, "resumed": res.resumed,
            "losses": {m["step"]: m["loss"] for m in res.metrics}})


def grain_train(port: int, pid: int, nproc: int, workdir: str, steps: int, data: str, kill_at: int | None) -> None:
    """A jax.distributed run whose batches come from ``data.path`` (a prepared array_record folder, read by grain
    through the trainer's own make_data_iterator), frames encoded in the step by a tiny VAE and text encoder."""
    config = tiny_config(**{"train.steps": steps, "train.checkpoint_every": 2, "mesh.data": 2, "mesh.fsdp": -1,
                            "mesh.coordinator_address": f"localhost:{port}", "mesh.num_processes": nproc,
                            "mesh.process_id": pid, "mesh.distributed": "true", "data.path": data,
                            "data.batch_size_per_device": 1, "data.num_frames": 4, "data.height": 16,
                            "data.width": 16, "objective.encode_in_step": "true"})
    meshlib.initialize_distributed("true", f"localhost:{port}", nproc, pid)

    def hook(step, state):
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    res = loop.train(config, setup=tiny_encoding_setup(config), workdir=workdir, hooks=[hook])
    result({"pid": pid, "start": res.start_step, "step": res.step, "resumed": res.resumed,
            "losses": {m["step"]: m["loss"] for m in res.metrics}, "tensorflow": "tensorflow" in sys.modules})


def run(workdir: str, steps: int, kill_at: int | None) -> None:
    config = tiny_config(**{"train.steps": steps, "train.checkpoint_every": 2})

    def hook(step, state):
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if os.environ.get("VLDM_TEST_SIGTERM_AT"):
        at = int(os.environ["VLDM_TEST_SIGTERM_AT"])

        def hook(step, state):  # noqa: F811 - a preemption notice arriving during step `at`
            if step == at:
                os.kill(os.getpid(), signal.SIGTERM)

    res = loop.train(config, setup=tiny_setup(), data=tiny_data(2), workdir=workdir, hooks=[hook])
    result({"start": res.start_step, "step": res.step, "preempted": res.preempted, "resumed": res.resumed,
            "losses": {m["step"]: m["loss"] for m in res.metrics}})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sharded":
        sharded()
    elif mode == "distributed_train":
        distributed_train(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    elif mode == "grain_train":
        grain_train(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7],
                    int(sys.argv[8]) if len(sys.argv) > 8 else None)
    elif mode == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        raise SystemExit(f"unknown mode {mode}")
