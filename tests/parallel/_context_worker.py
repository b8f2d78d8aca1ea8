"""Frame (context) parallelism checks, run in a subprocess with 8 simulated CPU devices.

    python tests/parallel/_context_worker.py equivalence     # forward, gradient and train step vs one device
    python tests/parallel/_context_worker.py memory FRAMES    # per-device XLA temp of a forward per context size

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", False)  # compiles faster on CPU; values sharding-invariant

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.tiny_vldm import video_unet  # noqa: E402
from vldm_jax.parallel import activation_mesh, make_mesh  # noqa: E402
from vldm_jax.parallel.activations import video_sharding  # noqa: E402


def result(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def _inputs(b: int, f: int, size: int = 8):
    x = jax.random.normal(jax.random.key(0), (b, f, size, size, 4))
    text = jax.random.normal(jax.random.key(1), (b, 77, 16))
    return x, text


def _forward(graph):
    def fwd(state, x, text):
        b, f = x.shape[:2]
        return nnx.merge(graph, state)(x, jnp.full((b,), 500.0), text, image_only_indicator=jnp.zeros((b, f)))
    return fwd


def _forward_and_grads(graph):
    """``(output, loss, d loss / d params)`` in one compiled function (one compile per mesh)."""
    fwd = _forward(graph)

    def loss(state, x, text):
        y = fwd(state, x, text)
        return jnp.mean(y ** 2), y

    def both(state, x, text):
        (value, y), grads = jax.value_and_grad(loss, has_aux=True)(state, x, text)
        return y, value, grads

    return both


def _run(fn, mesh, state, x, text):
    """``fn`` jitted and traced under ``mesh`` (None: one device, no constraints)."""
    if mesh is None:
        return jax.jit(fn)(state, x, text)

    def traced(*a):
        with activation_mesh(mesh):
            return fn(*a)

    return jax.jit(traced)(state, jax.device_put(x, video_sharding(mesh, x.shape)), text)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def equivalence() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    unet = video_unet("none", 3)
    graph, state = nnx.split(unet)
    out = {}
    x, text = _inputs(1, 8)
    ref, ref_loss, ref_grads = _run(_forward_and_grads(graph), None, state, x, text)
    out["grad_scale"] = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    for c in (2, 4, 8):
        mesh = make_mesh(1, 1, jax.devices()[:c], context=c)
        y, loss, grads = _run(_forward_and_grads(graph), mesh, state, x, text)
        out[f"context{c}"] = {"forward": _max_diff(y, ref), "loss": abs(float(loss - ref_loss)),
                              "grad": _max_diff(grads, ref_grads), "output_spec": str(y.sharding.spec)}
    # 5 frames on 4 devices: context does not divide the frames, each frame's rows are split instead.
    x5, _ = _inputs(1, 5)
    y = _run(_forward(graph), make_mesh(1, 1, jax.devices()[:4], context=4), state, x5, text)
    out["rows_context4"] = {"forward": _max_diff(y, _run(_forward(graph), None, state, x5, text)),
                            "output_spec": str(y.sharding.spec)}
    # The collectives XLA inserted for context parallelism (forward, context 4).
    mesh = make_mesh(1, 1, jax.devices()[:4], context=4)

    def traced(*a):
        with activation_mesh(mesh):
            return _forward(graph)(*a)

    hlo = jax.jit(traced).lower(state, jax.device_put(x, video_sharding(mesh, x.shape)), text).compile().as_text()
    out["collectives"] = {op: hlo.count(op + "(") for op in ("all-to-all", "collective-permute", "all-gather",
                                                              "all-reduce")}
    out["train_step"] = train_step()
    result(out)


def train_step() -> dict:
    """The real training step (loop.compile_step) of a tiny video U-Net's temporal layers, frames sharded on
    context (with data parallelism beside it), against one device: loss, gradient norm and updated weights."""
    from tests.train.tiny import tiny_config
    from vldm_jax.parallel import mesh as meshlib
    from vldm_jax.train import loop
    from vldm_jax.train import state as statelib
    from vldm_jax.train.objectives import Setup, TemporalObjective, VideoModels, noise_schedule

    rng = np.random.default_rng(0)
    arrays = {"latents": rng.standard_normal((2, 8, 8, 8, 4)).astype(np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 16)).astype(np.float32)}
    objective = TemporalObjective(schedule=noise_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                           "beta_end": 0.012, "prediction_type": "epsilon"}),
                                  encode_in_step=False)
    setup = Setup(objective=objective, init_models=lambda: VideoModels(video_unet("none", 3)))

    def rematted():  # the same weights, every block recomputed in the backward pass (model.remat: full)
        unet = video_unet("none", 3)
        unet.set_remat("full")
        return VideoModels(unet)

    def one(mesh, config, setup=setup):
        tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
        filt = statelib.trainable_filter(config.model.trainable, "unet")
        graphdef, state, shardings = loop.init_state(setup, config, mesh, tx, filt)
        step = loop.compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
        state, metrics = step(state, meshlib.global_batch(arrays, mesh))
        params = {k: np.asarray(v) for k, v in statelib.flatten(state.trainable).items()}
        return float(metrics["loss"]), float(metrics["grad_norm"]), params

    base = {"data.batch_size_per_device": 2, "optim.ema_decay": 0.0}
    ref_loss, ref_gn, ref_params = one(make_mesh(1, 1, jax.devices()[:1]), tiny_config(**base))
    out = {"loss": ref_loss, "grad_norm": ref_gn}
    for data, c in ((1, 2), (1, 4), (1, 8)):
        config = tiny_config(**{**base, "mesh.data": data, "mesh.context": c})
        mesh = make_mesh(data, 1, jax.devices()[:data * c], context=c)
        # Context 8 also runs remat full: the recomputation (custom_vjp) around sharded frames.
        loss, gn, params = one(mesh, config, Setup(objective=objective, init_models=rematted) if c == 8 else setup)
        out[f"data{data}_context{c}"] = {"loss": abs(loss - ref_loss), "grad_norm": abs(gn - ref_gn),
                                         "params": max(float(np.max(np.abs(params[k] - ref_params[k])))
                                                       for k in ref_params)}
    return out


def memory(frames: int) -> None:
    """Per-device XLA buffers of one video U-Net forward of ``frames`` frames for context 1, 2, 4, 8."""
    unet = video_unet("none", 3)
    graph, state = nnx.split(unet)
    x, text = _inputs(1, frames, size=32)
    rows = {}
    for c in (1, 2, 4, 8):
        mesh = make_mesh(1, 1, jax.devices()[:c], context=c)

        def traced(*a, mesh=mesh):
            with activation_mesh(mesh):
                return _forward(graph)(*a)

        sharded = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=video_sharding(mesh, x.shape))
        compiled = jax.jit(traced).lower(state, sharded, text).compile()
        m = compiled.memory_analysis()
        rows[c] = {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
                   "output_bytes": int(m.output_size_in_bytes)}
    result({"frames": frames, "rows": rows})


if __name__ == "__main__":
    if sys.argv[1] == "equivalence":
        equivalence()
    elif sys.argv[1] == "memory":
        memory(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
