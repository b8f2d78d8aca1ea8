"""Table-driven conversion of PyTorch state dicts (diffusers, transformers, original single files) to NNX state.

Our modules mirror the reference module names (``down_blocks[0].resnets[1].conv1``), so a torch key
``down_blocks.0.resnets.1.conv1.weight`` becomes the NNX path ``('down_blocks', 0, 'resnets', 1, 'conv1',
'kernel')`` by a generic rule. A model family only supplies a rename table for the keys that differ
(regex -> replacement, or ``None`` to drop a buffer). Every converted array is checked against
``nnx.eval_shape`` of the model: missing, unexpected and mis-shaped keys are errors that name them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from vldm_jax.checkpoints.placement import LoadTiming, Prefetch, place
from vldm_jax.errors import CheckpointError
from vldm_jax.parallel import aot as _aot

RenameTable = Sequence[tuple[str, str | None]]

# Torch leaf name -> candidate NNX leaf names, tried in order against the model's abstract state.
_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "embedding", "weight"),
    "bias": ("bias",),
}


def apply_rename(key: str, table: RenameTable) -> str | None:
    """Applies the first matching rule of ``table`` (``re.fullmatch``); ``None`` drops the key."""
    for pattern, replacement in table:
        m = re.fullmatch(pattern, key)
        if m:
            return None if replacement is None else m.expand(replacement)
    return key


def _split_path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def torch_to_jax_layout(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Transposes a torch parameter into the layout of the NNX parameter of ``target_shape``.

    linear (out, in) -> (in, out); conv2d OIHW -> HWIO; conv3d OIDHW -> DHWIO; a 1x1 conv stored
    where we use a linear layer (old VAE attention, SD1 ``proj_in``) is squeezed.
    """
    a = array
    if a.shape == tuple(target_shape) and a.ndim <= 1:
        return a
    if a.ndim == 2 and len(target_shape) == 2:
        return a.T
    if a.ndim == 4:
        if len(target_shape) == 2 and a.shape[2:] == (1, 1):
            return a[:, :, 0, 0].T
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 5:
        return a.transpose(2, 3, 4, 1, 0)
    if a.ndim == 3 and len(target_shape) == 2 and a.shape[2] == 1:  # conv1d k=1 used as linear
        return a[:, :, 0].T
    if a.ndim == 2 and len(target_shape) == 4 and tuple(target_shape[:2]) == (1, 1):  # linear used as 1x1 conv
        return a.T[None, None]
    return a


def _fmt(keys: Iterable, limit: int = 8) -> str:
    keys = [".".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in keys]
    head = ", ".join(keys[:limit])
    return head + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    abstract_state: nnx.State,
    *,
    rename: RenameTable = (),
    name: str = "model",
    sources: dict[tuple, np.ndarray] | None = None,
) -> dict[tuple, np.ndarray]:
    """Maps torch keys to NNX paths of ``abstract_state`` and transposes arrays. Validates everything.

    Returns a dict from NNX path to numpy array, a transposed view where the layout differs (no copy; the
    target dtype and the copy into place are :func:`build_module`'s). ``sources``, when given, receives
    path -> the state-dict array each came from.
    """
    targets = {tuple(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract_state)}
    out: dict[tuple, np.ndarray] = {}
    unexpected, misshaped = [], []
    for key, array in state_dict.items():
        new_key = apply_rename(key, rename)
        if new_key is None:
            continue
        path = _split_path(new_key)
        candidates = _LEAF_CANDIDATES.get(path[-1], (path[-1],))
        target = next((path[:-1] + (c,) for c in candidates if path[:-1] + (c,) in targets), None)
        if target is None:
            unexpected.append(key)
            continue
        # An embedding table is (num, dim) in torch and NNX alike; the 2-D linear transpose must not touch it.
        arr = np.asarray(array)
        if target[-1] != "embedding":
            arr = torch_to_jax_layout(arr, targets[target])
        if tuple(arr.shape) != targets[target]:
            misshaped.append(f"{key} {tuple(np.shape(array))} (expected {targets[target]} for {_fmt([target])})")
            continue
        if target in out:
            raise CheckpointError(f"{name}: two checkpoint keys map to {_fmt([target])} (second: {key})")
        out[target] = arr
        if sources is not None:
            sources[target] = array
    missing = [p for p in targets if p not in out]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_fmt(misshaped, 4)}")
    if problems:
        raise CheckpointError(f"{name}: checkpoint does not fit the model; " + "; ".join(problems))
    return out


# abstract_module: (graphdef, abstract state) of factory(rngs) without allocating parameters; one copy, in parallel.aot.
abstract_module = _aot.abstract_module


def build_module(
    factory: Callable[..., nnx.Module],
    state_dict: Mapping[str, np.ndarray],
    *,
    rename: RenameTable = (),
    name: str = "model",
    dtype=None,
    timing: LoadTiming | None = None,
) -> nnx.Module:
    """Builds ``factory(rngs)`` without running its random initialiser and fills in the weights.

    ``dtype``: parameter dtype (default: the dtype the factory declares, normally float32). The tensors are
    copied into their target layout in worker threads while the module's abstract state is built
    (:class:`~vldm_jax.checkpoints.placement.Prefetch`); ``timing`` collects where the time went.
    """
    timing = timing or LoadTiming(name)
    prefetch = Prefetch(state_dict, dtype, timing)
    try:
        with timing.phase("build"):
            graphdef, abstract_state = abstract_module(factory)
        sources: dict[tuple, np.ndarray] = {}
        with timing.phase("convert"):
            arrays = convert_state_dict(state_dict, abstract_state, rename=rename, name=name, sources=sources)
        module = merge_arrays(graphdef, abstract_state, arrays, dtype=dtype, sources=sources, prefetch=prefetch,
                              timing=timing)
    finally:
        prefetch.close()
    timing.finish()
    return module


def merge_arrays(graphdef, abstract_state: nnx.State, arrays: Mapping[tuple, np.ndarray], dtype=None, *,
                 sources: Mapping[tuple, np.ndarray] | None = None, prefetch: Prefetch | None = None,
                 timing: LoadTiming | None = None) -> nnx.Module:
    """Fills ``abstract_state`` with ``arrays`` (NNX path -> host array or view) and merges. Each array is
    written once into an aligned buffer of the target layout and dtype (or used as is when it already is
    one), which ``jax.device_put`` aliases on CPU without a copy."""
    flat = list(nnx.to_flat_state(abstract_state))
    dtypes = {tuple(p): np.dtype(dtype or v.get_value().dtype) for p, v in flat}
    with (timing.phase("place") if timing is not None else contextlib.nullcontext()):
        placed = place({tuple(p): arrays[tuple(p)] for p, _ in flat}, dtypes, sources=sources, prefetch=prefetch,
                       timing=timing)
    with (timing.phase("merge") if timing is not None else contextlib.nullcontext()):
        return nnx.merge(graphdef, nnx.from_flat_state([(tuple(p), v.replace(placed[tuple(p)])) for p, v in flat]))


# transformers CLIPTextModel / CLIPTextModelWithProjection. Hub checkpoints (SD text encoders) keep the
# ``text_model.`` prefix, as our module does; transformers 5 saves a bare CLIPTextModel without it.
# position_ids is a buffer that older checkpoints saved.
CLIP_TEXT_RENAME: RenameTable = (
    (r"(text_model\.)?embeddings\.position_ids", None),
    (r"(embeddings|encoder|final_layer_norm)\..+", r"text_model.\g<0>"),
)


# transformers CLIPVisionModel / CLIPVisionModelWithProjection (SVD's image encoder). As for the text tower,
# transformers 5 saves a bare CLIPVisionModel without the ``vision_model.`` prefix that our module and hub
# checkpoints have; older checkpoints saved the position_ids buffer.
CLIP_VISION_RENAME: RenameTable = (
    (r"(vision_model\.)?embeddings\.position_ids", None),
    (r"(embeddings|encoder|pre_layrnorm|post_layernorm)\..+", r"vision_model.\g<0>"),
)


# diffusers AutoencoderKL: current names match. Checkpoints from diffusers < 0.14 name the mid-block
# attention query/key/value/proj_attn (sometimes stored as 1x1 convs, which torch_to_jax_layout squeezes).
VAE_RENAME: RenameTable = (
    (r"(.*\.attentions\.\d+)\.query\.(weight|bias)", r"\1.to_q.\2"),
    (r"(.*\.attentions\.\d+)\.key\.(weight|bias)", r"\1.to_k.\2"),
    (r"(.*\.attentions\.\d+)\.value\.(weight|bias)", r"\1.to_v.\2"),
    (r"(.*\.attentions\.\d+)\.proj_attn\.(weight|bias)", r"\1.to_out.0.\2"),
)


# diffusers UNet2DConditionModel: current names match our modules. SD1's ``proj_in``/``proj_out`` are
# 1x1 convs in the checkpoint and linear layers here; torch_to_jax_layout squeezes them.
UNET_RENAME: RenameTable = ()
