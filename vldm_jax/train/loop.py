"""The training loop: sharded init, the jitted step, orbax checkpoints, logging, preemption and resume.

One run in a workdir::

    workdir/
      config.yaml          the resolved config of the first run
      checkpoints/<step>/  orbax: the train state (frozen weights excepted) + meta.json (data position...)
      metrics.jsonl        one line per step: loss, grad_norm, learning_rate, skipped, rates
      tb/                  TensorBoard scalars and sample images (tensorboardX)
      samples/             sample GIFs every train.sample_every steps

Running again with the same workdir restores the latest checkpoint (parameters, optimizer, EMA, step, RNG
and every process's data iterator position) and continues, so a run stopped by SIGTERM (or killed) and
resumed produces the same losses as one that never stopped. Checkpoints are written by orbax into a
temporary folder renamed into place when complete: a save killed half-way never hides the previous one.
Frozen weights are not saved (they come again from ``model.pretrained`` or the seeded init); a fingerprint
of them in each checkpoint catches a resume against different weights.

The data iterator protocol (what :func:`train` consumes, implemented by ``vldm_jax.data`` and by
:class:`ArrayBatches`): ``next(it)`` -> dict of numpy arrays, this process's slice of the batch (leading
dimension ``batch_size_per_device * local_device_count``); ``it.state()`` -> a JSON-able position;
``it.restore(state)`` -> continue exactly after the batch whose ``state()`` was saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError, ConfigError, UserError
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.parallel.activations import activation_mesh
from vldm_jax.train import state as statelib
from vldm_jax.train.config import Config, save_config, to_dict
from vldm_jax.train.objectives import Setup, build_setup


class DataIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


class ArrayBatches:
    """Batches from in-memory arrays (a precomputed feature cache, or tests): an epoch-seeded shuffle, this
    process's slice of each global batch. Position = (epoch, batch index), so restore is exact."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {v.shape[0] for v in self.arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays disagree on their length: {sizes}")
        self.n = sizes.pop()
        self.local = batch_size
        self.global_size = batch_size * process_count
        if self.global_size > self.n:
            raise UserError(f"a global batch of {self.global_size} needs at least that many examples (have {self.n})")
        self.seed, self.shuffle = seed, shuffle
        self.process_index = process_index
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        per_epoch = self.n // self.global_size
        if self.index >= per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        start = self.index * self.global_size + self.process_index * self.local
        idx = order[start:start + self.local]
        self.index += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


@dataclasses.dataclass
class TrainResult:
    start_step: int
    step: int
    preempted: bool
    resumed: bool
    metrics: list[dict]
    step_time: float | None  # mean seconds per step, the first (compiling) step excluded; None if unmeasured
    workdir: Path
    state: statelib.TrainState | None = None


# ------------------------------------------------------------------------------------------- preemption

class Preemption:
    """SIGTERM sets a flag the loop checks after every step (single process). With several processes JAX's
    preemption service sees the signal and all processes agree on the step to stop at."""

    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.flag = False
        self._previous = None
        if not multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:
                return False
        return self.flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ------------------------------------------------------------------------------------------ checkpoints

def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths)]


class Checkpoints:
    """orbax ``CheckpointManager`` over the flat view of the train state (frozen weights left out)."""

    def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = directory
        # The loop decides when to save (every N steps, at the end, on SIGTERM) and always forces the save.
        # cleanup_tmp_directories: a save killed mid-write leaves an orbax tmp folder, removed when a run starts.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))

    @staticmethod
    def saved_view(state: statelib.TrainState) -> dict[str, Any]:
        return {k: v for k, v in statelib.flatten(state).items() if not k.startswith("frozen.")}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: statelib.TrainState, meta: dict, *, force: bool = False) -> bool:
        ocp = self.ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(self.saved_view(state)), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, template: statelib.TrainState) -> tuple[statelib.TrainState, dict]:
        ocp = self.ocp

        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        target = {k: abstract(v) for k, v in self.saved_view(template).items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  "the checkpoint does not fit this config") from None
        flat = statelib.flatten(template)
        flat.update(restored["state"])
        return statelib.unflatten_like(template, flat), dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------------------------ logging

class MetricsLog:
    """JSONL lines, TensorBoard scalars (tensorboardX when installed) and a tqdm bar; process 0 only."""

    def __init__(self, workdir: Path, *, start_step: int, total: int, tensorboard: bool, progress: bool,
                 echo: Callable[[str], None]):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:
                echo("tensorboardX is not installed: no TensorBoard logs (pip install tensorboardX)")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        # Steps after the checkpoint we resume from were logged by a run that died; they will be logged again.
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, rows: Sequence[dict]) -> None:
        if not self.enabled or not rows:
            return
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.file.flush()
        if self.bar is not None:
            last = rows[-1]
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            self.bar.update(last["step"] - self.bar.n)  # the bar's it/s is the training step rate

    def images(self, step: int, videos: np.ndarray) -> None:
        if self.tb is None:
            return
        for i, video in enumerate(videos):
            strip = np.concatenate(list(video), axis=1)  # frames side by side: (H, F*W, 3)
            self.tb.add_image(f"samples/{i}", strip, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


# ------------------------------------------------------------------------------------------- the loop

def _frozen_fingerprint(frozen) -> list[float]:
    leaves = jax.tree.leaves(frozen)
    if not leaves:
        return [0.0, 0.0]
    fn = jax.jit(lambda xs: (sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in xs),
                             sum(jnp.sum(x.astype(jnp.float32)) for x in xs)))
    a, b = fn(leaves)
    return [float(a), float(b)]


def _check_fingerprint(saved, now, where: str) -> None:
    if saved is None:
        return
    for s, n in zip(saved, now):
        if not math.isclose(s, n, rel_tol=1e-4, abs_tol=1e-3):
            raise CheckpointError(f"{where}: the frozen weights differ from those this run was trained with "
                                  "(model.pretrained or the model config changed); use a new workdir")


def abstract_train_state(setup: Setup, config: Config, mesh, tx, filter_fn):
    """``(graphdef, abstract state, shardings, init)`` of a traceable setup: the train state as ShapeDtypeStructs
    (nothing allocated) with its shardings, and ``init()`` -> the state (run under ``jax.jit`` with those shardings
    by :func:`init_state`). The trainer and ``vldm train --compile-only`` both start here."""
    rules = [tuple(r) for r in config.mesh.rules]
    ema = config.optim.ema_decay > 0
    seed = config.train.seed

    def split(model):
        return statelib.split_model(model, filter_fn)

    graphdef, _, _ = split(nnx.eval_shape(setup.init_models))

    def init_fn():
        _, trainable, frozen = split(setup.init_models())
        return statelib.new_train_state(trainable, frozen, tx, seed=seed, ema=ema)

    abstract = jax.eval_shape(init_fn)
    shardings = meshlib.tree_shardings(abstract, mesh, rules, config.mesh.min_shard_size)
    return graphdef, abstract, shardings, init_fn


def init_state(setup: Setup, config: Config, mesh, tx, filter_fn):
    """``(graphdef, state, shardings)``: the sharded train state, built without gathering any array."""
    rules = [tuple(r) for r in config.mesh.rules]
    ema = config.optim.ema_decay > 0
    seed = config.train.seed

    if setup.traceable:
        graphdef, _, shardings, init_fn = abstract_train_state(setup, config, mesh, tx, filter_fn)
        state = jax.jit(init_fn, out_shardings=shardings)()
    else:
        graphdef, trainable, frozen = statelib.split_model(setup.init_models(), filter_fn)

        def init_fn(trainable, frozen):
            return statelib.new_train_state(trainable, frozen, tx, seed=seed, ema=ema)

        abstract = jax.eval_shape(init_fn, trainable, frozen)
        shardings = meshlib.tree_shardings(abstract, mesh, rules, config.mesh.min_shard_size)
        trainable = jax.device_put(trainable, shardings.trainable)
        frozen = jax.device_put(frozen, shardings.frozen)
        state = jax.jit(init_fn, out_shardings=shardings)(trainable, frozen)
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    if n_train == 0:
        raise ConfigError(f"model.trainable={config.model.trainable!r} selects no parameter of "
                          f"{setup.objective.trained_module}")
    return graphdef, state, shardings


def compile_step(graphdef, setup: Setup, config: Config, tx, schedule, mesh, shardings):
    """The jitted train step with its shardings: what the loop runs, and what ``vldm train --compile-only``
    lowers with abstract arguments (:mod:`vldm_jax.train.compile_only`)."""
    step = in_mesh(statelib.make_train_step(graphdef, setup.objective.loss, tx, schedule, config.optim.ema_decay),
                   mesh)
    return jax.jit(step, in_shardings=(shardings, meshlib.batch_sharding(mesh)),
                   out_shardings=(shardings, meshlib.replicated(mesh)), donate_argnums=(0,))


def in_mesh(fn: Callable, mesh) -> Callable:
    """``fn`` traced under :func:`~vldm_jax.parallel.activations.activation_mesh`: the model's activations are
    pinned to ``mesh`` (frames over ``context``) wherever frames fold and unfold."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return traced


def _sample_fn(graphdef, objective, mesh, shardings, use_ema: bool):
    @functools.partial(in_mesh, mesh=mesh)
    def run(state, batch, key):
        params = state.ema if use_ema else state.trainable
        model = nnx.merge(graphdef, params, state.frozen)
        return objective.sample(model, batch, key)

    return jax.jit(run, in_shardings=(shardings, meshlib.batch_sharding(mesh), None),
                   out_shardings=meshlib.replicated(mesh))


def _to_row(step: int, metrics: dict, **extra) -> dict:
    row = {"step": step}
    for k, v in metrics.items():
        v = np.asarray(v)
        row[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
    row.update(extra)
    return row


def default_workdir(config_path: str | os.PathLike | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / stem


def train(config: Config, *, setup: Setup | None = None, data: DataIterator | None = None,
          workdir: str | os.PathLike | None = None, mesh=None,
          hooks: Sequence[Callable[[int, statelib.TrainState], None]] = (),
          echo: Callable[[str], None] | None = None) -> TrainResult:
    """Runs (or resumes) ``config.train.steps`` training steps in ``workdir``.

    ``setup``: objective + models (default: built from ``config.model`` / ``config.objective``). ``data``: the
    iterator (default: ``config.data`` through :mod:`vldm_jax.data`). ``hooks(step, state)`` run after every step
    (after its checkpoint was issued). ``echo``: where one-line notices go (process 0; default stderr).

    Multi-process runs start ``jax.distributed`` here (``config.mesh``); a caller that builds ``setup`` or ``data``
    itself must call :func:`vldm_jax.parallel.mesh.initialize_distributed` first, before anything touches a device.
    """
    if config.train.threefry_partitionable is not None:
        # A process-wide switch (it changes every random stream), set before anything is traced.
        jax.config.update("jax_threefry_partitionable", bool(config.train.threefry_partitionable))
    multi = meshlib.initialize_distributed(config.mesh.distributed, config.mesh.coordinator_address,
                                           config.mesh.num_processes, config.mesh.process_id)
    primary = jax.process_index() == 0

    def say(msg: str) -> None:
        if primary:
            (echo or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    workdir = Path(workdir or config.train.workdir or "runs/train")
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if primary else None  # a second trainer on this workdir stops here
    try:
        return _train_in(config, setup, data, workdir, mesh, hooks, say, primary, multi)
    finally:
        if lock is not None:
            lock.release()


class WorkdirLock:
    """``workdir/train.lock`` holding ``pid host``: one trainer per workdir. A lock whose process is gone (same
    host, pid not running) is stale and taken over; the lock is removed when training ends (any way but SIGKILL,
    which leaves a stale lock the next run takes over)."""

    NAME = "train.lock"

    def __init__(self, workdir: Path):
        import socket

        self.path = Path(workdir) / self.NAME
        self.mine = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise UserError(f"{workdir} is in use by another trainer (pid {holder}; lock file {self.path}); "
                                    "wait for it to finish or choose another --workdir") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.mine + "\n")
            return
        raise UserError(f"cannot take the lock {self.path}; remove it if no trainer is running")

    def _holder(self) -> str | None:
        """The live holder's pid (or pid@host), None when the lock is stale or unreadable."""
        import socket

        try:
            pid_text, host = (self.path.read_text().split() + [""])[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            return None  # half-written by a process killed while taking it
        if host and host != socket.gethostname():
            return f"{pid}@{host}"  # another machine's process: cannot tell, assume alive
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)

    def release(self) -> None:
        try:
            if self.path.read_text().strip() == self.mine:
                self.path.unlink()
        except OSError:
            pass


def _train_in(config: Config, setup, data, workdir: Path, mesh, hooks, say, primary: bool, multi: bool
              ) -> TrainResult:
    if config.train.compilation_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str((workdir / "cache" / "jax").absolute()))
    t_start = time.perf_counter()
    mesh = mesh or meshlib.make_mesh(config.mesh.data, config.mesh.fsdp, context=config.mesh.context,
                                     tensor=config.mesh.tensor)
    if data is None:  # first: a bad data path fails before minutes of model set-up
        data = make_data_iterator(config, mesh, workdir, echo=say)
    if setup is None:
        setup = build_setup(config)
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    objective = setup.objective
    graphdef, state, shardings = init_state(setup, config, mesh, tx, objective.trainable_filter(config.model.trainable))
    fingerprint = _frozen_fingerprint(state.frozen)
    ckpt = Checkpoints(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                       async_save=config.train.async_checkpoints)
    state, start, saved_step = _resume(ckpt, state, data, fingerprint, workdir, say)
    resumed = saved_step is not None
    if not resumed and primary:
        save_config(config, workdir / "config.yaml")
    global_bs = meshlib.global_batch_size(config.data.batch_size_per_device, mesh)
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_all = n_train + sum(x.size for x in jax.tree.leaves(state.frozen))
    say(f"training {n_train:,} of {n_all:,} parameters on {mesh.devices.size} device(s) "
        f"(mesh data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}); global batch {global_bs}; "
        f"set up in {time.perf_counter() - t_start:.1f}s")

    step_fn = compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
    sample_every = config.train.sample_every
    sampler = None
    log = MetricsLog(workdir, start_step=start, total=config.train.steps, tensorboard=config.train.tensorboard,
                     progress=config.train.progress, echo=say)
    window = _MetricsWindow(log, global_bs)
    budget = _TimeBudget(config.train, multi)
    preemption = Preemption(multi)
    step = start
    preempted = False

    def meta_for(step_: int, data_state) -> dict:
        return {"step": step_, "data": {str(i): s for i, s in enumerate(_gather_json(data_state))},
                "process_count": jax.process_count(), "frozen_fingerprint": fingerprint,
                "config": to_dict(config), "time": time.time()}

    try:
        while step < config.train.steps:
            host = objective.host_batch(next(data))
            data_state = data.state()
            batch = meshlib.global_batch(host, mesh)
            if step == start:
                budget.start()
                t_first = time.perf_counter()
                state, metrics = step_fn(state, batch)
                jax.block_until_ready(metrics)
                say(f"compiled and ran the first step in {time.perf_counter() - t_first:.1f}s")
                window.first_step_ran()
            else:
                state, metrics = step_fn(state, batch)
            step += 1
            window.add(step, metrics)
            if step % config.train.log_every == 0:
                window.flush()
            if sample_every and step % sample_every == 0:
                window.flush()
                if sampler is None:
                    sampler = _sample_fn(graphdef, objective, mesh, shardings, state.ema is not None)
                _write_samples(sampler, state, batch, step, workdir, log, config.train.seed)
                window.restart_clock()
            if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                window.flush()
                ckpt.save(step, state, meta_for(step, data_state), force=True)
                saved_step = step
            for hook in hooks:
                hook(step, state)
            out_of_time = budget.spent(step, window.pending)
            if out_of_time or preemption.reached(step):
                window.flush()
                if saved_step != step:
                    ckpt.save(step, state, meta_for(step, data_state), force=True)
                    saved_step = step
                if out_of_time:  # ends as at the last step (export); a preempted run does not export
                    say(f"train.max_seconds={config.train.max_seconds:g} spent at step {step} of {config.train.steps}")
                else:
                    preempted = True
                break
        window.flush()
        ckpt.wait()
    finally:
        preemption.close()
        log.close()
        ckpt.close()
    if preempted:
        say(f"stopped by SIGTERM at step {step}; checkpoint saved; run the same command again to resume")
    elif (step > start or not objective.exported(workdir)) and jax.process_index() == 0:
        # What the next stage or a pipeline loads (temporal layers, a VAE, a pipeline...); an export may read a few
        # more batches (e.g. the VAE's latent std).
        objective.export(graphdef, state, workdir, data, say)
    step_time = float(np.mean(window.step_times)) if window.step_times else None
    return TrainResult(start_step=start, step=step, preempted=preempted, resumed=resumed, metrics=window.rows,
                       step_time=step_time, workdir=workdir, state=state)


def _resume(ckpt: Checkpoints, state: statelib.TrainState, data: DataIterator, fingerprint, workdir: Path, say):
    """``(state, start step, latest checkpoint step or None)``: the latest checkpoint of ``workdir`` restored (and the
    data iterator's position, when saved with as many processes), or the fresh ``state``."""
    latest = ckpt.latest_step()
    if latest is None:
        return state, 0, None
    state, meta = ckpt.restore(latest, state)
    _check_fingerprint(meta.get("frozen_fingerprint"), fingerprint, str(workdir))
    start = int(state.step)
    mine = (meta.get("data") or {}).get(str(jax.process_index()))
    if mine is not None and int(meta.get("process_count", 1)) == jax.process_count():
        data.restore(mine)
    else:
        say("the checkpoint's data position is for another process count: the data iterator starts afresh")
    say(f"resuming from step {start} in {workdir}")
    return state, start, latest


class _MetricsWindow:
    """The metrics of the steps since the last flush (still on device, so steps run ahead of the host) and the
    measured step rate; ``flush`` fetches them into log rows."""

    def __init__(self, log: MetricsLog, global_batch: int):
        self.log, self.global_batch = log, global_batch
        self.pending: list[tuple[int, dict]] = []
        self.rows: list[dict] = []
        self.step_times: list[float] = []
        self.restart_clock()
        self.steps = 0

    def restart_clock(self) -> None:
        """Time spent from here on counts toward the step rate (not what came before: sampling, compiling)."""
        self.start = time.perf_counter()

    def first_step_ran(self) -> None:
        # The first step compiled: the rate is measured from its end, over the steps after it.
        self.restart_clock()
        self.steps = -1

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.steps += 1

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        elapsed = time.perf_counter() - self.start
        rate = self.steps / elapsed if self.steps > 0 and elapsed > 0 else None
        if rate:
            self.step_times.extend([1.0 / rate] * self.steps)
        extra = {"steps_per_sec": rate, "samples_per_sec": rate * self.global_batch} if rate else {}
        new = [_to_row(s, m, **extra) for (s, _), m in zip(self.pending, fetched)]
        self.rows.extend(new)
        self.log.write(new)
        self.pending.clear()
        self.restart_clock()
        self.steps = 0


class _TimeBudget:
    """``train.max_seconds``, counted from the start of this run's first step (its compilation included); with
    several processes, process 0's clock decides at each log step, so all stop at the same step."""

    def __init__(self, train_config, multi: bool):
        self.config, self.multi = train_config, multi
        self.t0 = None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def spent(self, step: int, pending: list[tuple[int, dict]]) -> bool:
        if not self.config.max_seconds or step >= self.config.steps:
            return False
        if len(pending) >= 2:
            # Steps run asynchronously: without this the host could queue minutes of steps past the budget.
            # Waiting for the step before the last keeps one step in flight while the next batch is prepared.
            jax.block_until_ready(pending[-2][1])
        if self.multi:
            if step % self.config.log_every:
                return False
            from jax.experimental import multihost_utils

            spent = time.perf_counter() - self.t0 >= self.config.max_seconds
            return bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
        return time.perf_counter() - self.t0 >= self.config.max_seconds


def _write_samples(sampler, state, batch, step: int, workdir: Path, log: MetricsLog, seed: int) -> None:
    from vldm_jax.io.video import write_video

    key = jax.random.fold_in(jax.random.key(seed + 1), step)
    videos = sampler(state, batch, key)
    if videos is None:
        return
    videos = np.asarray(jax.device_get(videos))[:4]
    if jax.process_index() != 0:
        return
    folder = workdir / "samples"
    folder.mkdir(exist_ok=True)
    for i, video in enumerate(videos):
        write_video(folder / f"step_{step:07d}_{i}.gif", video, fps=4)
    log.images(step, videos)


# ------------------------------------------------------------------------------------------------ data

def make_data_iterator(config: Config, mesh, workdir: Path, echo: Callable[[str], None] = print) -> DataIterator:
    """``config.data`` through :mod:`vldm_jax.data`: the dataset is built once under ``workdir/cache/tfds``
    (process 0 first; the others then open the same build), and this process reads its own slice."""
    d = config.data
    if not d.path:
        raise ConfigError("no training data: pass --data (a folder of videos, moving_shapes:N, a prepared "
                          "TFDS dataset folder or a `vldm prepare` array_record folder) or set data.path")
    resolution = (d.height, d.width)
    if d.in_memory:
        return _in_memory_shapes(config, mesh, echo)
    from vldm_jax.data.array_record import is_prepared

    if is_prepared(d.path):  # a `vldm prepare` folder: grain reads it on every host, no TensorFlow
        from vldm_jax.data.grain_pipeline import GrainIterator

        return GrainIterator(d.path, batch_size=meshlib.local_batch_size(d.batch_size_per_device, mesh), seed=d.seed,
                             shuffle=d.shuffle, num_frames=d.num_frames, resolution=(d.height, d.width))
    from vldm_jax.data import DataIterator as TFDSIterator
    from vldm_jax.data import default_data_dir, prepare_dataset

    def prepare():
        return prepare_dataset(d.path, default_data_dir(workdir), num_frames=d.num_frames, resolution=resolution,
                               frame_stride=d.frame_stride, fps=d.fps, clips_per_video=d.clips_per_video,
                               num_examples=d.num_examples, seed=d.seed)

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        builder = prepare() if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("vldm_jax data prepared")
        if builder is None:
            builder = prepare()
    else:
        builder = prepare()
    for item in getattr(builder, "skipped", None) or []:
        echo(f"skipped {item.get('file')}: {item.get('reason')}")
    local = meshlib.local_batch_size(d.batch_size_per_device, mesh)
    try:
        return TFDSIterator(builder, batch_size=local, seed=d.seed, shuffle=d.shuffle,
                            shuffle_buffer=d.shuffle_buffer, num_frames=d.num_frames, resolution=resolution)
    except UserError as e:
        if "batch size" not in str(e):
            raise
        raise UserError(f"{str(e).splitlines()[0]}: this process feeds {local // d.batch_size_per_device} device(s) "
                        f"x data.batch_size_per_device={d.batch_size_per_device}; lower data.batch_size_per_device "
                        "or add videos") from None


def _in_memory_shapes(config: Config, mesh, echo: Callable[[str], None]) -> ArrayBatches:
    """``data.in_memory``: the moving-shapes examples rendered with numpy into host memory (no TensorFlow), uint8
    frames (the objectives scale them on the device), shuffled per epoch; each process keeps its own slice of
    every global batch, as with the TFDS pipeline."""
    from vldm_jax.data.moving_shapes import parse_dataset_name, parse_dataset_setting, render_arrays

    d = config.data
    count = parse_dataset_name(str(d.path), d.num_examples)
    t0 = time.perf_counter()
    arrays = render_arrays(count, seed=d.seed, num_frames=d.num_frames, size=(d.height, d.width),
                           setting=parse_dataset_setting(str(d.path)))
    arrays["image_only_indicator"] = np.zeros(arrays["video"].shape[:2], np.float32)
    echo(f"rendered {count} moving-shapes clips of {d.num_frames} frames into memory "
         f"({arrays['video'].nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
    local = meshlib.local_batch_size(d.batch_size_per_device, mesh)
    return ArrayBatches(arrays, local, seed=d.seed, shuffle=d.shuffle, process_index=jax.process_index(),
                        process_count=jax.process_count())
