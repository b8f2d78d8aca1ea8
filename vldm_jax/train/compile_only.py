"""``vldm train CONFIG --compile-only [--topology v5e:4x4]``: the training step compiled ahead of time, nothing run.

The step is the trainer's own: :func:`vldm_jax.train.loop.abstract_train_state` gives the train state's shapes and
shardings (the trainer materialises the same tree with ``jax.jit(init, out_shardings=...)``) and
:func:`vldm_jax.train.loop.compile_step` the jitted step with its in/out shardings and donation; here it is lowered
with ``jax.ShapeDtypeStruct`` arguments (no weights allocated, no data read) and compiled for a TPU slice named by
``topology`` (libtpu compiles offline) or this host's devices. The batch's shapes are those the data pipeline
yields for ``config.data`` (uint8 ``video`` (B, F, H, W, 3), ``image_only_indicator``, captions tokenized by the
objective's ``host_batch``; or cached ``latents`` + ``encoder_hidden_states``), with B the global batch.

Weights are never read, so the models are built at random (a traceable setup): ``model.pretrained`` null with
``model.unet``... dicts, or ``model.pretrained`` with ``model.random_init`` (implied here: the architecture of
``model.pretrained`` from its config.json files or the bundled reference configs, no download). The compiled
program is the same either way: weights are arguments of the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from vldm_jax.errors import ConfigError, UserError
from vldm_jax.parallel import aot
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.train.config import Config


class DoesNotFit(UserError):
    """The compiled step needs more memory per chip than the chip has."""


@dataclasses.dataclass
class CompiledStep:
    """What :func:`lower_train_step` built: the jitted step (the trainer's), its abstract arguments and mesh."""

    step_fn: Any
    state: Any  # ShapeDtypeStructs with shardings
    batch: dict[str, jax.ShapeDtypeStruct]
    mesh: Any
    devices: list
    params: dict[str, int]
    global_batch: int

    def lower(self):
        from vldm_jax.parallel.activations import activation_mesh

        with activation_mesh(self.mesh), aot.target_platform(self.devices[0].platform):
            return self.step_fn.lower(self.state, self.batch)


def mesh_for(config: Config, devices, mesh_spec: dict[str, int] | None = None):
    """The training mesh over ``devices``: ``--mesh`` sizes when given (missing axes 1), else ``config.mesh``."""
    if mesh_spec:
        sizes = {a: int(mesh_spec.get(a, 1)) for a in meshlib.MESH_AXES}
        return meshlib.make_mesh(sizes["data"], sizes["fsdp"], devices, context=sizes["context"],
                                 tensor=sizes["tensor"])
    c = config.mesh
    return meshlib.make_mesh(c.data, c.fsdp, devices, context=c.context, tensor=c.tensor)


def example_host_batch(config: Config, objective) -> dict[str, np.ndarray]:
    """One example as the data pipeline yields it for ``config.data`` (zeros), through ``objective.host_batch``."""
    d = config.data
    if config.objective.encode_in_step or config.objective.name not in ("temporal", "animatediff", "prediction",
                                                                           "interpolation"):
        raw = {"video": np.zeros((1, d.num_frames, d.height, d.width, 3), np.uint8),
               "image_only_indicator": np.zeros((1, d.num_frames), np.float32),
               "caption": np.asarray([""])}
    else:
        latent_channels = int(config.model.vae.get("latent_channels", 4)) if config.model.vae else 4
        ups = 2 ** (len(config.model.vae.get("block_out_channels", [0] * 4)) - 1) if config.model.vae else 8
        context_dim = int(config.model.unet.get("cross_attention_dim", 768))
        raw = {"latents": np.zeros((1, d.num_frames, d.height // ups, d.width // ups, latent_channels), np.float32),
               "encoder_hidden_states": np.zeros((1, 77, context_dim), np.float32),
               "image_only_indicator": np.zeros((1, d.num_frames), np.float32)}
    batch = objective.host_batch(raw)
    return {k: np.asarray(v) for k, v in batch.items()
            if np.asarray(v).dtype.kind in "biuf" and np.asarray(v).ndim > 0}


def count_params(abstract_state, trained_module: str) -> dict[str, int]:
    """``params_total`` (every parameter of the trained network, e.g. the video U-Net: frozen spatial + trainable
    temporal), ``params_trainable`` and ``params_other`` (the frozen networks the step also runs: VAE, text
    encoder)."""

    def size(tree) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))

    trainable = size(abstract_state.trainable)
    frozen_main = other = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.frozen):
        n = math.prod(leaf.shape)
        first = meshlib.path_names(path)[:1]
        if first == (trained_module,):
            frozen_main += n
        else:
            other += n
    return {"params_total": trainable + frozen_main, "params_trainable": trainable, "params_other": other}


def lower_train_step(config: Config, *, devices=None, mesh=None, mesh_spec: dict[str, int] | None = None,
                     setup=None) -> CompiledStep:
    """The trainer's step for ``config`` with abstract arguments on ``mesh`` (default: over ``devices``, default
    this host's)."""
    from vldm_jax.train import state as statelib
    from vldm_jax.train.loop import abstract_train_state, compile_step
    from vldm_jax.train.objectives import build_setup

    if config.train.threefry_partitionable is not None:
        jax.config.update("jax_threefry_partitionable", bool(config.train.threefry_partitionable))
    if setup is None and config.model.pretrained and not config.model.random_init:
        # Weights are arguments of the step, never constants: the architecture of model.pretrained (its config.json
        # files, or the bundled reference configs of a hub id) compiles the same program, with no download.
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, random_init=True))
    devices = list(devices) if devices is not None else jax.devices()
    mesh = mesh or mesh_for(config, devices, mesh_spec)
    setup = setup or build_setup(config)
    if not setup.traceable:
        raise ConfigError("--compile-only reads no weights: set model.random_init=true (the real-size model of "
                          "model.pretrained with random weights) or model.pretrained=null with model.unet/vae/...")
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    objective = setup.objective
    graphdef, abstract, shardings, _ = abstract_train_state(setup, config, mesh, tx,
                                                            objective.trainable_filter(config.model.trainable))
    params = count_params(abstract, objective.trained_module)
    if params["params_trainable"] == 0:
        raise ConfigError(f"model.trainable={config.model.trainable!r} selects no parameter of "
                          f"{objective.trained_module}")
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    global_bs = meshlib.global_batch_size(config.data.batch_size_per_device, mesh)
    bsh = meshlib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((global_bs,) + v.shape[1:], v.dtype, sharding=bsh)
             for k, v in example_host_batch(config, objective).items()}
    step_fn = compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
    return CompiledStep(step_fn, state, batch, mesh, list(mesh.devices.flat), params, global_bs)


def compile_train_step(config: Config, *, topology: str | None = None, mesh_spec: dict[str, int] | None = None,
                       name: str = "train_step") -> dict[str, Any]:
    """Lowers and compiles the step for ``topology`` (or this host); returns the report dict (see the CLI)."""
    devices = aot.target_devices(topology)
    t0 = time.perf_counter()
    built = lower_train_step(config, devices=devices, mesh_spec=mesh_spec)
    t1 = time.perf_counter()
    lowered = built.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    rep = aot.analyse(compiled, name=name, devices=built.devices, mesh=built.mesh, lower_seconds=t2 - t1,
                      compile_seconds=t3 - t2)
    out = rep.as_dict()
    out.update(topology=topology or f"host:{jax.default_backend()}", devices=rep.num_devices,
               peak_bytes_per_device=rep.peak_bytes, hbm_bytes_per_device=rep.hbm_bytes,
               flops_per_step=None if rep.flops is None else rep.flops * rep.num_devices,
               flops_per_device=rep.flops, global_batch=built.global_batch, batch_size_per_device=
               config.data.batch_size_per_device, build_seconds=t1 - t0,
               batch_shapes={k: [list(v.shape), str(v.dtype)] for k, v in built.batch.items()},
               dtype=config.model.dtype, remat=config.model.remat, **built.params)
    return out


def summary_lines(r: dict[str, Any]) -> list[str]:
    gib = lambda b: "n/a" if b is None else f"{b / aot.GiB:.2f} GiB"  # noqa: E731
    fits = {True: "yes", False: "NO", None: "unknown (chip not in the table)"}[r["fits"]]
    est = "n/a" if r["est_seconds"] is None else f"{r['est_seconds']:.3g} s ({r['est_source']})"
    tflops = "n/a" if r["flops_per_step"] is None else f"{r['flops_per_step'] / 1e12:.1f} TFLOP"
    return [
        f"topology        {r['topology']}: {r['device_kind']} x{r['devices']} "
        f"[{aot.mesh_summary_dict(r['mesh'])}], global batch {r['global_batch']}",
        f"per chip        arguments {gib(r['argument_bytes'])}, temp {gib(r['temp_bytes'])}, output "
        f"{gib(r['output_bytes'])} (aliased {gib(r['alias_bytes'])})",
        f"peak / chip     {gib(r['peak_bytes'])} of {gib(r['hbm_bytes'])} HBM: fits {fits}",
        f"compute         {tflops} per step, est. step time {est}",
        f"parameters      total {r['params_total']:,} (trainable {r['params_trainable']:,}); other networks in the "
        f"step {r['params_other']:,}",
        f"compiled in     {r['compile_seconds']:.1f} s (lowered in {r['lower_seconds']:.1f} s)",
    ]


def not_fitting_message(r: dict[str, Any], config: Config) -> str:
    over = (r["peak_bytes"] - r["hbm_bytes"]) / aot.GiB
    tries = []
    if config.model.remat in ("none", "checkpoint", "dots_saveable"):
        tries.append("--set model.remat=full")
    if config.model.dtype == "float32":
        tries.append("--set model.dtype=bfloat16")
    if r["mesh"].get("data", 1) > 1:
        tries.append(f"more fsdp (--mesh data=1,fsdp={r['devices']})")
    if config.data.batch_size_per_device > 1:
        tries.append(f"a smaller batch (--set data.batch_size_per_device={config.data.batch_size_per_device // 2})")
    tries.append("a bigger slice")
    return (f"the step does not fit: {r['peak_bytes'] / aot.GiB:.2f} GiB per chip, {over:.2f} GiB over the "
            f"{r['hbm_bytes'] / aot.GiB:.2f} GiB HBM of {r['device_kind']}; try {', '.join(tries)}")


def run(config: Config, *, topology: str | None, mesh_spec: dict[str, int] | None, report: str | None,
        echo: Callable[[str], None]) -> dict[str, Any]:
    r = compile_train_step(config, topology=topology, mesh_spec=mesh_spec)
    for line in summary_lines(r):
        echo(line)
    if report:
        path = Path(report)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(r, indent=2, default=str) + "\n")
        tmp.replace(path)  # never a half-written report
    check_fits(r, config)
    return r


def check_fits(r: dict[str, Any], config: Config) -> None:
    """Raises :class:`DoesNotFit` (the CLI: one line, exit 2) when the report's peak exceeds the chip's HBM."""
    if r["hbm_bytes"] is not None and r["peak_bytes"] > r["hbm_bytes"]:
        raise DoesNotFit(not_fitting_message(r, config))
