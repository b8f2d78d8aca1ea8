"""LoRA files fused into the weights at load: ``W += scale * (alpha / rank) * up @ down``.

Formats (told apart by their keys):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.<module>...`` for the text
  encoder; keys without a prefix are the U-Net's), optional ``<module>.alpha``;
* older diffusers: ``<module>.lora.down.weight`` / ``.up.weight``, attention processors
  ``<attention>.processor.to_q_lora.down.weight`` (to_k, to_v, to_out), text ``<proj>.lora_linear_layer.down.weight``;
* the original AnimateDiff motion LoRAs (``v2_lora_*.ckpt``): the processor form under the original motion-module
  names (``temporal_transformer``, ``attention_blocks``);
* kohya (``lora_unet_*`` / ``lora_te_*`` with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), module
  names in either the diffusers or the original LDM layout (``input_blocks_1_1_...``).

Motion LoRAs target ``motion_modules`` (a video U-Net with AnimateDiff motion modules); image LoRAs the SD 1.x
U-Net's spatial layers and the CLIP text encoder. A key that targets no module of the model, or a LoRA whose
shapes do not fit, is a CheckpointError naming it (a LoRA for another model).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.errors import CheckpointError

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_path(path: str, config) -> str | None:
    """A diffusers U-Net module path in the original LDM layout (``down_blocks.0.attentions.1.proj_in`` ->
    ``input_blocks.2.1.proj_in``); None where the layout has no such module (motion modules)."""
    layers = config.layers_per_block
    if not isinstance(layers, int):
        return None
    per, n = layers + 1, len(config.block_out_channels)

    def resnet(rest):
        head, _, tail = rest.partition(".")
        return ".".join(x for x in (_RESNET_TO_LDM.get(head, head), tail) if x)

    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0"}
    if path in top:
        return top[path]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return f"input_blocks.{1 + b * per + j}.{0 if kind == 'resnets' else 1}.{resnet(rest) if kind == 'resnets' else rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((m.group(1), int(m.group(2))))
        if slot is None:
            return None
        return f"middle_block.{slot}.{resnet(m.group(3)) if m.group(1) == 'resnets' else m.group(3)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}.{resnet(rest) if kind == 'resnets' else rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m and int(m.group(1)) < n - 1:
        b = int(m.group(1))
        has_attention = "CrossAttn" in config.up_block_types[b]
        return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.conv"
    return None


def _module_paths(module: nnx.Module) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Dotted module path -> (NNX kernel path, kernel shape) of every linear / conv layer."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if path[-1] == "kernel":
            out[".".join(map(str, path[:-1]))] = (tuple(path), tuple(var.get_value().shape))
    return out


def _target_names(component: str, module: nnx.Module) -> dict[str, str]:
    """Every name a LoRA may give a module of ``component`` (``unet`` / ``text_encoder``) -> its dotted path."""
    names = {}
    for path in _module_paths(module):
        names[f"{component}.{path}"] = path
        if component == "unet":
            names[f"lora_unet_{path.replace('.', '_')}"] = path
            ldm = ldm_unet_path(path, module.config)
            if ldm is not None:
                names[f"lora_unet_{ldm.replace('.', '_')}"] = path
        else:
            names[f"lora_te_{path.replace('.', '_')}"] = path
            if path.startswith("text_model."):
                names[f"lora_te_{path[len('text_model.'):].replace('.', '_')}"] = path
    return names


_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def parse_lora(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, dict[str, Any]]:
    """LoRA file -> ``{target name: {"down": (r, in[, kh, kw]), "up": (out, r[, 1, 1]), "alpha": float | None}}``;
    target names are ``unet.<diffusers path>``, ``text_encoder.<path>`` or kohya ``lora_unet_*`` / ``lora_te_*``."""
    from vldm_jax.checkpoints.animatediff import original_to_diffusers_key

    out: dict[str, dict[str, Any]] = {}

    def put(name, part, value):
        out.setdefault(name, {})[part] = value

    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        m = re.fullmatch(r"(lora_(?:unet|te)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)", k)
        if m:
            put(m.group(1), {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)], value)
            continue
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.default)?\.weight", k)
        if m:
            put(_prefixed(m.group(1)), "down" if m.group(2) == "A" else "up", value)
            continue
        m = re.fullmatch(r"(.+)\.alpha", k)
        if m:
            put(_prefixed(m.group(1)), "alpha", value)
            continue
        m = _PROCESSOR.fullmatch(k)
        if m:
            head = m.group(1)
            if ".temporal_transformer" in head or ".attention_blocks." in head:  # original motion LoRA
                head = original_to_diffusers_key(head + ".x")[:-2]
            proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
            put(_prefixed(f"{head}.{proj}"), m.group(3), value)
            continue
        m = re.fullmatch(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight", k)
        if m:
            put(_prefixed(m.group(1)), m.group(2), value)
            continue
        raise CheckpointError(f"LoRA {source}: unrecognised key {key}")
    for name, parts in out.items():
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"LoRA {source}: {name} lacks its {'up' if 'down' in parts else 'down'} matrix")
    if not out:
        raise CheckpointError(f"LoRA {source}: no LoRA weights in the file")
    return out


def _prefixed(name: str) -> str:
    if name.startswith(("unet.", "text_encoder.")):
        return name
    return f"unet.{name}"  # motion LoRAs and bare diffusers U-Net LoRAs


def read_lora(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, dict[str, Any]]:
    from vldm_jax.checkpoints.load import read_weights

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    return parse_lora({k: np.asarray(v) for k, v in read_weights(path, allow_pickle=allow_pickle).items()},
                      str(path))


def lora_delta(parts: Mapping[str, Any], scale: float) -> np.ndarray:
    """``scale * alpha / rank * up @ down`` in the torch layout of the target weight (``(out, in)`` or OIHW)."""
    down = np.asarray(parts["down"], np.float32)
    up = np.asarray(parts["up"], np.float32)
    rank = down.shape[0]
    alpha = parts.get("alpha")
    factor = scale * (float(np.asarray(alpha).reshape(-1)[0]) / rank if alpha is not None else 1.0)
    if down.ndim == 2:
        return factor * (up.reshape(up.shape[0], rank) @ down)
    # conv: up (out, r, 1, 1) after down (r, in, kh, kw)
    return factor * np.einsum("or,rihw->oihw", up.reshape(up.shape[0], rank), down)


def fuse_loras(unet: nnx.Module, text_encoder: nnx.Module | None,
               loras: Iterable[tuple[str | os.PathLike, float]], *, allow_pickle: bool = False):
    """``(unet, text_encoder)`` with every ``(file, scale)`` LoRA fused into copies of their weights."""
    from vldm_jax.checkpoints.convert import torch_to_jax_layout
    from vldm_jax.models.roles import flat_arrays

    components = {"unet": unet, "text_encoder": text_encoder}
    arrays = {c: ({p: np.array(a, np.float32) for p, a in flat_arrays(m).items()} if m is not None else None)
              for c, m in components.items()}
    lookups = {c: _target_names(c, m) for c, m in components.items() if m is not None}
    paths = {c: _module_paths(m) for c, m in components.items() if m is not None}
    touched = set()
    for file, scale in loras:
        for name, parts in read_lora(file, allow_pickle=allow_pickle).items():
            component = "text_encoder" if name.startswith(("text_encoder.", "lora_te_")) else "unet"
            path = lookups.get(component, {}).get(name)
            if path is None:
                raise CheckpointError(f"LoRA {file}: {name} targets no layer of this model's {component} "
                                      "(a LoRA for another model?)")
            kernel_path, shape = paths[component][path]
            delta = lora_delta(parts, float(scale))
            converted = torch_to_jax_layout(delta, shape)
            if tuple(converted.shape) != shape:
                raise CheckpointError(f"LoRA {file}: {name} has shape {tuple(delta.shape)}, the layer "
                                      f"{path} {shape} (a LoRA for another model?)")
            current = arrays[component][kernel_path]
            arrays[component][kernel_path] = current + converted.astype(current.dtype)
            touched.add(component)
    out = []
    for c, m in components.items():
        if m is None or c not in touched:
            out.append(m)
            continue
        graphdef, state = nnx.split(m)
        flat = [(tuple(p), v.replace(jnp.asarray(arrays[c][tuple(p)], dtype=v.get_value().dtype)))
                for p, v in nnx.to_flat_state(state)]
        out.append(nnx.merge(graphdef, nnx.from_flat_state(flat)))
    return tuple(out)


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE``."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0
