"""CLIP text and vision transformers (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` /
``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``) in Flax NNX.

Attribute names mirror transformers (``text_model.encoder.layers[i].self_attn.q_proj`` ...), so a
transformers state dict converts by the generic rule of :mod:`vldm_jax.checkpoints.convert` with
:data:`~vldm_jax.checkpoints.convert.CLIP_TEXT_RENAME`.

What the U-Net sees is :meth:`CLIPTextModel.encode`:

* SD 1.x: the last layer with the final LayerNorm (``clip_skip=0``).
* SD 2.x: OpenCLIP's penultimate layer with the final LayerNorm. diffusers' SD 2 text encoders already
  have that layer removed (``num_hidden_layers=23``), so they too use ``clip_skip=0``.
* ``clip_skip=k`` (diffusers' pipeline argument): the output of layer ``N - k``, then the final LayerNorm.
* SDXL takes the penultimate layer *without* the final LayerNorm: ``clip_skip=1, final_layer_norm=False``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError, UserError
from vldm_jax.models.config import config_from_dict
from vldm_jax.nn.attention import dot_product_attention
from vldm_jax.nn.norm import LayerNorm


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions. "gelu" is torch's exact (erf) GELU, "gelu_new" the tanh form.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` fields that change the forward pass (defaults: openai ViT-B/32 text)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CLIPTextConfig: unsupported hidden_act {self.hidden_act!r} "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIPTextConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int):
            raise ConfigError(f"CLIPTextConfig: eos_token_id must be one integer, got {self.eos_token_id!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a text-encoder ``config.json``, or a full ``CLIPModel`` one (its ``text_config``)."""
        data = dict(data)
        if isinstance(data.get("text_config"), Mapping):
            data = dict(data["text_config"])
        return config_from_dict(cls, data)


class CLIPTextOutput(NamedTuple):
    """last_hidden_state ``(B, T, D)`` (after the final LayerNorm); pooler_output ``(B, D)`` (the eos token);
    hidden_states: ``None``, or ``N + 1`` arrays ``(B, T, D)``: embeddings, then each layer (before the
    final LayerNorm), as transformers' ``output_hidden_states=True``."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextModelOutput(NamedTuple):
    """text_embeds ``(B, projection_dim)``; the rest as :class:`CLIPTextOutput`."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, dtype=dtype,
                                            param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, input_ids):
        """input_ids ``(B, T)`` int -> ``(B, T, D)``; positions are ``0 .. T-1``."""
        t = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, causal: bool = True):
        d = config.hidden_size
        self.causal = causal
        self.num_heads = config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        lin = functools.partial(nnx.Linear, d, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.k_proj = lin()
        self.v_proj = lin()
        self.q_proj = lin()
        self.out_proj = lin()

    def __call__(self, x, mask=None):
        """x ``(B, T, D)``; mask: boolean ``(B, 1, 1, T)`` over keys (True = attend), or None. Causal for text,
        not for the vision tower."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.hidden_act = config.hidden_act
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=jnp.float32,
                              rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                              rngs=rngs)

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, causal: bool = True):
        self.self_attn = CLIPAttention(config, rngs=rngs, dtype=dtype, causal=causal)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(config, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, causal: bool = True):
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, causal=causal)
                                for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    """transformers' inner ``CLIPTextTransformer`` (the ``text_model`` attribute)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, rngs=rngs)

    def hidden_states(self, input_ids, attention_mask=None, num_layers: int | None = None) -> list[jax.Array]:
        """Embeddings and the outputs of the first ``num_layers`` layers (all by default): a list of
        ``num_layers + 1`` arrays ``(B, T, D)``, none with the final LayerNorm."""
        t = input_ids.shape[-1]
        if t > self.config.max_position_embeddings:
            raise UserError(f"CLIP text: sequence length {t} exceeds max_position_embeddings "
                            f"{self.config.max_position_embeddings}; tokenize with max_length="
                            f"{self.config.max_position_embeddings}")
        n = len(self.encoder.layers) if num_layers is None else num_layers
        if not 0 <= n <= len(self.encoder.layers):
            raise UserError(f"CLIP text: cannot take layer {n} of {len(self.encoder.layers)}")
        # Padding only hides keys; the causal part is passed as is_causal so fused kernels can apply it.
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        x = self.embeddings(input_ids)
        states = [x]
        for i in range(n):
            x = self.encoder.layers[i](x, mask)
            states.append(x)
        return states

    def pool(self, last_hidden_state, input_ids):
        """The state at the end-of-text token: ``(B, T, D) -> (B, D)``.

        Like transformers: configs with the pre-2023 ``eos_token_id == 2`` take the largest id (the eot
        token is the last entry of the vocabulary); others take the first position holding ``eos_token_id``
        (padding may reuse that id)."""
        if self.config.eos_token_id == 2:
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return last_hidden_state[jnp.arange(last_hidden_state.shape[0]), idx]

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        states = self.hidden_states(input_ids, attention_mask)
        last = self.final_layer_norm(states[-1])
        return CLIPTextOutput(last, self.pool(last, input_ids), tuple(states) if output_hidden_states else None)


class _EncodeMixin:
    def encode(self, input_ids, attention_mask=None, *, clip_skip: int = 0, final_layer_norm: bool = True):
        """The U-Net's context ``(B, T, D)`` for token ids ``(B, T)``.

        ``clip_skip=k`` takes the output of layer ``N - k`` (diffusers' ``hidden_states[-(k + 1)]``; the
        skipped layers are not run); ``final_layer_norm`` applies the final LayerNorm to it, as diffusers'
        SD pipelines do (SDXL does not: ``clip_skip=1, final_layer_norm=False``). Defaults give
        ``last_hidden_state``. ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding) is only passed by
        models whose config sets ``use_attention_mask``; SD checkpoints attend to the padding.
        """
        tm = self.text_model
        n = len(tm.encoder.layers)
        if not 0 <= clip_skip <= n:
            raise UserError(f"clip_skip must be in [0, {n}], got {clip_skip}")
        x = tm.hidden_states(input_ids, attention_mask, num_layers=n - clip_skip)[-1]
        return tm.final_layer_norm(x) if final_layer_norm else x


class CLIPTextModel(_EncodeMixin, nnx.Module):
    """transformers ``CLIPTextModel``: token ids ``(B, T)`` -> :class:`CLIPTextOutput`."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids ``(B, T)`` int, T <= max_position_embeddings; attention_mask ``(B, T)`` (1 keep, 0 pad)."""
        return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(_EncodeMixin, nnx.Module):
    """transformers ``CLIPTextModelWithProjection``: adds ``text_projection`` (no bias) of the pooled state."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if config.projection_dim is None:
            raise ConfigError("CLIPTextModelWithProjection needs projection_dim in its config")
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype)
        self.text_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                          param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextModelOutput:
        """Shapes as :meth:`CLIPTextModel.__call__`; ``text_embeds`` is ``(B, projection_dim)``."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextModelOutput(self.text_projection(out.pooler_output), out.last_hidden_state, out.hidden_states)


# ------------------------------------------------------------------------------------------------- vision


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` fields that change the forward pass (defaults: openai ViT-B/32).

    Stable Video Diffusion's image encoder (OpenCLIP ViT-H/14): hidden 1280, 32 layers, 16 heads,
    intermediate 5120, patch 14, projection 1024, ``hidden_act="gelu"``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CLIPVisionConfig: unsupported hidden_act {self.hidden_act!r} "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        if ih % ph or iw % pw:
            raise ConfigError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along height and width."""
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        return ih // ph, iw // pw

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a vision-encoder ``config.json``, or a full ``CLIPModel`` one (its ``vision_config``)."""
        data = dict(data)
        if isinstance(data.get("vision_config"), Mapping):
            data = dict(data["vision_config"])
        return config_from_dict(cls, data)


class CLIPVisionOutput(NamedTuple):
    """last_hidden_state ``(B, 1 + P, D)`` (no final LayerNorm: CLIP's vision tower has none on the tokens);
    pooler_output ``(B, D)``: the class token after ``post_layernorm``; hidden_states: ``None``, or ``N + 1``
    arrays ``(B, 1 + P, D)``: the embeddings after ``pre_layrnorm``, then each layer."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPVisionModelOutput(NamedTuple):
    """image_embeds ``(B, projection_dim)``; the rest as :class:`CLIPVisionOutput`."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding (a strided conv without bias), the learned class token and absolute positions."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        d = config.hidden_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32))
        p = _pair(config.patch_size)
        self.patch_embedding = nnx.Conv(config.num_channels, d, kernel_size=p, strides=p, padding="VALID",
                                        use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        gh, gw = config.grid
        self.position_embedding = nnx.Embed(gh * gw + 1, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, pixel_values):
        """pixel_values ``(B, H, W, C)`` (normalised, at ``image_size``) -> tokens ``(B, 1 + P, D)``."""
        b, h, w, _ = pixel_values.shape
        ih, iw = _pair(self.config.image_size)
        if (h, w) != (ih, iw):
            raise UserError(f"CLIP vision: input is {h}x{w} but the model takes {ih}x{iw} (resize the image first)")
        patches = self.patch_embedding(pixel_values)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """The vision tower (transformers' ``vision_model`` attribute): embeddings, ``pre_layrnorm`` (transformers'
    spelling), a bidirectional encoder, ``post_layernorm`` on the class token."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs, dtype=dtype)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, rngs=rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype, causal=False)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, rngs=rngs)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        pooled = self.post_layernorm(x[:, 0])
        return CLIPVisionOutput(x, pooled, tuple(states) if output_hidden_states else None)


class CLIPVisionModel(nnx.Module):
    """transformers ``CLIPVisionModel``: pixels ``(B, H, W, C)`` -> :class:`CLIPVisionOutput`."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """pixel_values ``(B, image_size, image_size, num_channels)``, CLIP-normalised, channels-last."""
        return self.vision_model(pixel_values, output_hidden_states)


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers ``CLIPVisionModelWithProjection``: adds ``visual_projection`` (no bias) of the pooled class
    token. Stable Video Diffusion conditions its U-Net on ``image_embeds``."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if config.projection_dim is None:
            raise ConfigError("CLIPVisionModelWithProjection needs projection_dim in its config")
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype)
        self.visual_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                            param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionModelOutput:
        """Shapes as :meth:`CLIPVisionModel.__call__`; ``image_embeds`` is ``(B, projection_dim)``."""
        out = self.vision_model(pixel_values, output_hidden_states)
        return CLIPVisionModelOutput(self.visual_projection(out.pooler_output), out.last_hidden_state,
                                     out.hidden_states)
