"""The train state pytree, the optimizer, and the one jitted training step.

The NNX graph definition stays outside the state (a static argument of the step), and the parameters are
split once into two trees by the trainable filter:

* ``trainable``: what the optimizer updates (the temporal layers, by default). Gradients, AdamW moments and the
  EMA exist for these only: frozen weights cost no gradient or optimizer memory at all, which a mask inside
  optax (``optax.masked``) would not give: its gradients are still computed for every parameter.
* ``frozen``: everything else (the spatial U-Net, the VAE, the text encoder, buffers). Passed through the step
  untouched, so they stay bit-identical.

The step is a pure function ``(state, batch) -> (state, metrics)``; the loop jits it with explicit shardings and
donates the state. A non-finite loss or gradient norm skips the update (parameters, optimizer state and EMA
keep their values), counts it in ``skipped``, and the step counter still advances (the batch was consumed).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vldm_jax.errors import ConfigError
from vldm_jax.train.config import OptimConfig


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the graph definition and the data position.

    ``step``, ``skipped``: int32 scalars. ``rng``: raw uint32 key data; step ``s`` uses
    ``fold_in(rng, s)``, so randomness depends on the step alone (not on skips or restarts).
    ``ema``: EMA of ``trainable`` (same structure), or None when disabled.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    skipped: jax.Array

    @property
    def params(self) -> Any:
        """All model variables (trainable and frozen) as one ``nnx.State``."""
        return nnx.merge_state(self.trainable, self.frozen)


# -------------------------------------------------------------------------------------- trainable filter

def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def default_is_temporal_path(path) -> bool:
    """Fallback temporal-layer test: a path component names a temporal layer (Video LDM / SVD names)."""
    for p in path:
        p = str(p)
        if "temporal" in p or p in ("time_mixer", "time_pos_embed", "time_mix_blocks", "time_stack"):
            return True
    return False


def _is_temporal_path() -> Callable[[tuple], bool]:
    for module in ("vldm_jax.models.roles", "vldm_jax.models.unet"):
        try:
            mod = __import__(module, fromlist=["is_temporal_path"])
        except ImportError:
            continue
        fn = getattr(mod, "is_temporal_path", None)
        if fn is not None:
            return fn
    return default_is_temporal_path


def trainable_filter(spec: str, module: str | None = "unet") -> Callable[[tuple, Any], bool]:
    """An NNX filter ``(path, variable) -> bool`` of the trained parameters.

    ``spec``: ``'temporal'`` (the temporal layers, Video LDM's default), ``'all'``, ``'none'``, or a regex searched
    in the dotted path (``'unet.up_blocks.*temporal'``). Only ``nnx.Param`` variables of ``module`` (an attribute
    of the models container; None = anywhere) ever train.
    """
    is_temporal = _is_temporal_path()
    if spec == "temporal":
        def match(path):
            return is_temporal(tuple(path))
    elif spec == "all":
        def match(path):
            return True
    elif spec == "none":
        def match(path):
            return False
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ConfigError(f"model.trainable: {spec!r} is not 'temporal', 'all' or a valid regex ({e})") from None

        def match(path):
            return pattern.search(_path_str(path)) is not None

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        path = tuple(path)
        if module is not None:
            if not path or str(path[0]) != module:
                return False
            if spec in ("temporal", "all", "none"):
                return match(path[1:])
        return match(path)

    return keep


def split_model(model: nnx.Module, filter_fn) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``; frozen holds every other variable (params and buffers)."""
    graphdef, trainable, frozen = nnx.split(model, filter_fn, ...)
    return graphdef, trainable, frozen


# -------------------------------------------------------------------------------------------- optimizer

def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ``warmup_steps`` updates (the first at ``learning_rate / warmup_steps``, never a wasted
    zero), then cosine decay to ``end_learning_rate`` over ``decay_steps`` (or the rest of the run), or constant."""
    warmup = max(0, int(cfg.warmup_steps))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    else:
        decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - warmup)
        alpha = cfg.end_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0
        main = optax.cosine_decay_schedule(cfg.learning_rate, max(1, int(decay)), alpha=alpha)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, max(1, warmup - 1))
    return optax.join_schedules([ramp, main], [warmup])


def _decay_mask(params):
    # No weight decay on vectors (biases, norm scales, AlphaBlender logits): decaying a mixing logit would pull
    # alpha towards 0.5 for no reason.
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the warm-up + cosine schedule, after clipping by global norm."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------------------------ dtype

def compute_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


# ------------------------------------------------------------------------------------------------ state

def new_train_state(trainable, frozen, tx: optax.GradientTransformation, *, seed: int, ema: bool) -> TrainState:
    """A fresh state (traceable: the loop runs it under ``jax.jit`` with ``out_shardings``)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        ema=jax.tree.map(jnp.copy, trainable) if ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )


def ema_decay_at(decay: float, num_updates: jax.Array) -> jax.Array:
    """The EMA decay after ``num_updates`` applied updates: ``min(decay, (1 + n) / (10 + n))`` so the average
    forgets its random start quickly."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float = 0.0):
    """``train_step(state, batch) -> (state, metrics)``.

    ``loss_fn(model, batch, key) -> (loss, metrics)``: ``model`` is the merged NNX module (see
    :mod:`vldm_jax.train.objectives`). Metrics: ``loss``, ``grad_norm`` (before clipping), ``learning_rate``
    (of this update), ``skipped`` (total skipped updates so far), ``finite``, and the objective's own.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        batch = {"step": state.step, **batch}

        def objective(trainable):
            model = nnx.merge(graphdef, trainable, state.frozen)
            loss, metrics = loss_fn(model, batch, key)
            return loss.astype(jnp.float32), metrics

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = state.step - state.skipped  # updates applied before this one

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        trainable = keep_if_finite(trainable, state.trainable)
        opt_state = keep_if_finite(opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            d = ema_decay_at(ema_decay, applied)
            new_ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, trainable)
            ema = keep_if_finite(new_ema, ema)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                                  skipped=skipped)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": jnp.asarray(schedule(applied), jnp.float32),
                   "skipped": skipped, "finite": finite, **aux}
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------- flat checkpoint view

def flatten(tree: Any) -> dict[str, Any]:
    """``{'trainable.unet.down_blocks.0...kernel': leaf}``: the checkpoint's view of a pytree (stable names,
    independent of NNX's Variable wrappers)."""
    from vldm_jax.parallel.mesh import path_names

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(path_names(path))
        if name in out:  # pragma: no cover - would silently drop a leaf
            raise ValueError(f"duplicate leaf name {name}")
        out[name] = leaf
    return out


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
    """Inverse of :func:`flatten` onto ``template``'s structure."""
    from vldm_jax.parallel.mesh import path_names

    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = [flat[".".join(path_names(p))] for p, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)
