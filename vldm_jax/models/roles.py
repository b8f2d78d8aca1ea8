"""Roles in the video U-Net's parameter tree: which parameters are temporal, which spatial.

One path filter, :func:`is_temporal_path`, decides it everywhere (optimizer masks, freezing, the small
temporal checkpoint, the DreamBooth-style swap of spatial weights). A path is temporal when one of its
names contains ``temporal`` (``temporal_res_block``, ``temporal_transformer_blocks``) or is one of
``time_mixer`` (the AlphaBlenders' alpha), ``time_pos_embed`` (SVD's frame-position MLP) and
``motion_modules`` (AnimateDiff's motion modules, under diffusers' name). Names that
merely start with ``time`` are spatial: ``time_embedding`` (the timestep MLP) and ``time_emb_proj`` of a
2D resnet belong to the image model. SVD's ``add_embedding`` (fps / motion / noise-augmentation
conditioning) is spatial too: it is trained with the whole model and an image checkpoint lacks it.

An image U-Net's parameters map into the video U-Net by one rename: a 2D resnet becomes the
``spatial_res_block`` of its spatio-temporal pair (:data:`IMAGE_TO_VIDEO_UNET_RENAME`); every other
name is kept. A U-Net with AnimateDiff motion modules keeps every image name (no rename).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError

TEMPORAL_NAMES = ("time_mixer", "time_pos_embed", "motion_modules")

# Torch keys (``down_blocks.0.resnets.1.conv1.weight``) and our dotted NNX paths alike.
IMAGE_TO_VIDEO_UNET_RENAME = ((r"(.*\bresnets\.\d+)\.(.+)", r"\1.spatial_res_block.\2"),)


def _names(path) -> Iterable:
    if isinstance(path, str):
        return path.split(".")
    out = []
    for p in path:  # nnx paths hold names/ints; jax key paths hold DictKey/GetAttrKey/SequenceKey entries
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        out.append(p)
    return out


def is_temporal_path(path) -> bool:
    """True for a temporal parameter. ``path``: dotted string, NNX path tuple, or jax key path."""
    return any(isinstance(n, str) and ("temporal" in n or n in TEMPORAL_NAMES) for n in _names(path))


def temporal_filter(path, _value=None) -> bool:
    """:func:`is_temporal_path` as an NNX filter: ``nnx.state(model, temporal_filter)``."""
    return is_temporal_path(path)


def spatial_filter(path, _value=None) -> bool:
    return not is_temporal_path(path)


def split_params(state: nnx.State | nnx.Module) -> tuple[nnx.State, nnx.State]:
    """``(spatial, temporal)`` parts of a state (or of a module's state); ``nnx.merge_state`` joins them."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    temporal, spatial = state.split(temporal_filter, ...)
    return spatial, temporal


def temporal_mask(tree: Any) -> Any:
    """The pytree of ``tree`` (an NNX state or any pytree with named paths) with True at temporal leaves:
    an ``optax.masked`` mask."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_temporal_path(p), tree)


def temporal_labels(tree: Any) -> Any:
    """``"temporal"`` / ``"spatial"`` per leaf: the ``param_labels`` of ``optax.multi_transform``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "temporal" if is_temporal_path(p) else "spatial", tree)


def temporal_only(optimizer):
    """An optax transformation that applies ``optimizer`` to the temporal parameters and zero updates to
    the spatial ones (the paper's fine-tuning: spatial layers frozen). ``optax.masked`` alone would pass
    the spatial gradients through unchanged, so this uses ``multi_transform`` with ``set_to_zero``."""
    import optax

    return optax.multi_transform({"temporal": optimizer, "spatial": optax.set_to_zero()}, temporal_labels)


def image_to_video_key(key: str) -> str:
    """``down_blocks.0.resnets.1.conv1.kernel`` -> ``down_blocks.0.resnets.1.spatial_res_block.conv1.kernel``."""
    for pattern, replacement in IMAGE_TO_VIDEO_UNET_RENAME:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(replacement)
    return key


def _image_key_fn(config):
    """The image -> video key rename for a video config: none for AnimateDiff motion modules."""
    if getattr(config, "temporal_layer_type", "spatio_temporal") == "motion_module":
        return lambda key: key
    return image_to_video_key


def _split_key(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _join(path: tuple) -> str:
    return ".".join(map(str, path))


def flat_arrays(state: nnx.State | nnx.Module, filter=...) -> dict[tuple, Any]:
    """NNX path -> array of the variables that pass ``filter``."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    if filter is not ...:
        state = state.filter(filter)
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def merge_parts(graphdef, abstract_state: nnx.State, arrays: Mapping[tuple, Any], *, name: str) -> nnx.Module:
    """A module from ``graphdef`` with every variable of ``abstract_state`` taken from ``arrays``; a missing,
    unexpected or mis-shaped entry is a CheckpointError that names it."""
    targets = {tuple(p): v for p, v in nnx.to_flat_state(abstract_state)}
    missing = [p for p in targets if p not in arrays]
    unexpected = [p for p in arrays if p not in targets]
    shapes = {p: tuple(v.get_value().shape) for p, v in targets.items()}
    misshaped = [f"{_join(p)} {tuple(np.shape(a))} (expected {shapes[p]})"
                 for p, a in arrays.items() if p in shapes and tuple(np.shape(a)) != shapes[p]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = [i if isinstance(i, str) else _join(i) for i in items[:6]]
            more = f" ... and {len(items) - 6} more" if len(items) > 6 else ""
            problems.append(f"{label}: {', '.join(shown)}{more}")
    if problems:
        raise CheckpointError(f"{name} does not fit the video U-Net; " + "; ".join(problems))
    flat = [(p, v.replace(jnp.asarray(arrays[p], dtype=v.get_value().dtype))) for p, v in targets.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class CountingRngs:
    """Stands in for ``nnx.Rngs(seed)`` while a module is built under a trace (``jax.jit``, ``nnx.eval_shape``):
    the ``n``-th key drawn is ``fold_in(key(seed), n)`` with ``n`` a Python counter. ``nnx.Rngs`` keeps its
    counters as traced state, which makes tracing a U-Net-sized constructor take tens of seconds."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.count = 0

    def __getattr__(self, name):  # any stream: rngs.params(), rngs.default()...
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        self.count += 1
        return jax.random.fold_in(jax.random.key(self.seed), self.count)


# Hundreds of small random initialisers, run once: LLVM's optimisation passes buy nothing here. Without them the
# bundled model's temporal layers initialise in 7.7-9.8 s instead of 10.6-11.2 s on a 2-core CPU (two runs each).
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3),
                   compiler_options={"xla_backend_optimization_level": 0})
def _init_temporal_state(model_cls, config, dtype, seed: int):
    return nnx.state(model_cls(config, rngs=CountingRngs(seed), dtype=dtype), temporal_filter)


def init_temporal(model_cls, config, *, dtype=jnp.float32, seed: int = 0) -> dict[tuple, Any]:
    """Freshly initialised temporal arrays of ``model_cls(config)``, without materialising the spatial ones
    (compiled, and cached per config: XLA drops the unused spatial initialisers)."""
    return flat_arrays(_init_temporal_state(model_cls, config, dtype, seed))


@functools.lru_cache(maxsize=8)
def abstract_video_unet(model_cls, config, dtype=jnp.float32, remat=None):
    """``(graphdef, abstract state)`` of ``model_cls(config)`` (shapes only; cached per config)."""
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=CountingRngs(0), dtype=dtype, remat=remat)))


def transplant_spatial(image, config, *, model_cls, seed: int = 0, dtype=jnp.float32, remat=None):
    """A ``model_cls`` (a video U-Net class) of ``config`` whose spatial parameters are the image U-Net ``image``'s
    (renamed into the spatio-temporal layout) and whose temporal parameters are freshly initialised (identity)."""
    try:
        graphdef, abstract_state = abstract_video_unet(model_cls, config, dtype, remat)
    except TypeError:  # an unhashable remat policy: no caching
        graphdef, abstract_state = abstract_video_unet.__wrapped__(model_cls, config, dtype, remat)
    rename = _image_key_fn(config)
    arrays = {_split_key(rename(_join(p))): a for p, a in flat_arrays(image).items()}
    temporal = init_temporal(model_cls, config, dtype=dtype, seed=seed)
    clash = [p for p in temporal if p in arrays]
    if clash:
        raise CheckpointError(f"image U-Net has temporal parameters: {_join(clash[0])}")
    arrays.update(temporal)
    return merge_parts(graphdef, abstract_state, arrays, name="image U-Net")


def replace_spatial(video: nnx.Module, image) -> nnx.Module:
    """A copy of ``video`` with the spatial weights of another compatible image U-Net (DreamBooth transfer);
    temporal parameters are kept (the same arrays)."""
    graphdef, state = nnx.split(video)
    rename = _image_key_fn(video.config)
    arrays = {_split_key(rename(_join(p))): a for p, a in flat_arrays(image).items()}
    arrays.update(flat_arrays(state, temporal_filter))
    return merge_parts(graphdef, state, arrays, name="image U-Net")


def count_params(state: nnx.State | nnx.Module) -> dict[str, int]:
    """``{"spatial": n, "temporal": n, "total": n}`` parameter counts (works on ``nnx.eval_shape`` output)."""
    spatial, temporal = split_params(state)
    size = lambda s: sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(s))  # noqa: E731
    n_s, n_t = size(spatial), size(temporal)
    return {"spatial": n_s, "temporal": n_t, "total": n_s + n_t}
