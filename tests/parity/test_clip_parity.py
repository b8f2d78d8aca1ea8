"""CLIP text encoder against transformers: tiny random models saved with save_pretrained, loaded by our loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from vldm_jax.checkpoints.convert import CLIP_TEXT_RENAME, build_module
from vldm_jax.checkpoints.load import load_model
from vldm_jax.errors import CheckpointError, ConfigError
from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

VOCAB, BOS, EOS = 1000, 998, 999
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24, bos_token_id=BOS, layer_norm_eps=1e-5)
# SD 1.x text encoders: quick_gelu, pre-2023 eos_token_id=2 (pool at the largest id), padding with the end token.
# SD 2.x: exact GELU, pool at the first end token, padding with id 0. gelu_new with max_position_embeddings ==
# hidden_size also checks that square embedding tables are not transposed.
VARIANTS = {
    "sd1": (dict(hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1), EOS, 77),
    "sd2": (dict(hidden_act="gelu", eos_token_id=EOS, pad_token_id=0), 0, 77),
    "gelu_new": (dict(hidden_act="gelu_new", eos_token_id=EOS, pad_token_id=0, max_position_embeddings=32), 0, 32),
}


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref.detach().numpy(), np.float32)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_ids(seq_len, pad_id, lengths=(5, 12, 1)):
    """Prompts of random tokens between the start and end tokens, then padding; (ids, attention mask)."""
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), seq_len), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : n + 2] = [BOS, *rng.integers(3, BOS - 1, n), EOS]
        mask[i, : n + 2] = 1
    ids[-1, -1] = EOS  # a full-length prompt whose end token is the last position: padding mask all ones
    ids[-1, :-1] = rng.integers(3, BOS - 1, seq_len - 1)
    mask[-1] = 1
    return ids, mask


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    overrides, pad_id, seq_len = VARIANTS[request.param]
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**{**TINY, **overrides})
    ref = transformers.CLIPTextModel(cfg).eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    ours = load_model(folder)
    return ref, ours, folder, make_ids(seq_len, pad_id)


@pytest.mark.parametrize("use_mask", [False, True])
def test_text_model(pair, use_mask):
    ref, ours, _, (ids, mask) = pair
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None,
                output_hidden_states=True)
    o = ours(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask) if use_mask else None,
             output_hidden_states=True)
    errors = {"last_hidden_state": rel_err(o.last_hidden_state, r.last_hidden_state),
              "pooler_output": rel_err(o.pooler_output, r.pooler_output)}
    assert len(o.hidden_states) == len(r.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
        errors[f"hidden_states[{i}]"] = rel_err(a, b)
    print(ref.config.hidden_act, "mask" if use_mask else "no mask", errors)
    assert max(errors.values()) < 1e-4, errors
    if use_mask:  # the mask must matter: padded positions attend only to the prompt
        unmasked = ours(jnp.asarray(ids, jnp.int32)).last_hidden_state
        assert np.abs(np.asarray(o.last_hidden_state - unmasked))[mask == 0].max() > 1e-3


def test_encode_clip_skip(pair):
    """encode() follows diffusers' SD pipelines (clip_skip, final LayerNorm) and SDXL (penultimate, no LayerNorm)."""
    ref, ours, _, (ids, _) = pair
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
        # transformers 5's CLIPTextModel holds the layers itself, 4's under .text_model
        sd_skip1 = getattr(ref, "text_model", ref).final_layer_norm(r.hidden_states[-2])
    x = jnp.asarray(ids, jnp.int32)
    errors = {"clip_skip=0": rel_err(ours.encode(x), r.last_hidden_state),
              "clip_skip=1": rel_err(ours.encode(x, clip_skip=1), sd_skip1),
              "sdxl": rel_err(ours.encode(x, clip_skip=1, final_layer_norm=False), r.hidden_states[-2])}
    print(ref.config.hidden_act, errors)
    assert max(errors.values()) < 1e-4, errors


def test_jit_and_bfloat16(pair):
    """bfloat16 compute through the functional boundary the pipelines use (split once, merge inside jit)."""
    ref, _, folder, (ids, _) = pair
    ours = load_model(folder, dtype=jnp.bfloat16)
    with torch.no_grad():
        r = ref(torch.from_numpy(ids))
    graphdef, state = nnx.split(ours)
    context = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))(state, jnp.asarray(ids, jnp.int32))
    assert context.dtype == jnp.bfloat16
    assert rel_err(context, r.last_hidden_state) < 5e-2


def test_with_projection(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(**TINY, hidden_act="gelu", eos_token_id=EOS, pad_token_id=0)
    ref = transformers.CLIPTextModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert isinstance(ours, CLIPTextModelWithProjection)
    ids, mask = make_ids(77, 0)
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
    o = ours(jnp.asarray(ids, jnp.int32), output_hidden_states=True)
    errors = {"text_embeds": rel_err(o.text_embeds, r.text_embeds),
              "last_hidden_state": rel_err(o.last_hidden_state, r.last_hidden_state),
              "penultimate": rel_err(o.hidden_states[-2], r.hidden_states[-2])}
    print("with projection", errors)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("prefixed", [False, True])
def test_build_module_key_layouts(pair, prefixed):
    """Hub checkpoints keep the ``text_model.`` prefix (transformers 5 saves a bare CLIPTextModel without it);
    older ones saved the position_ids buffer, which the rename table drops. Unknown keys are errors."""
    ref, ours, folder, (ids, _) = pair
    sd = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    if prefixed:
        sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    prefix = "text_model." if prefixed else ""
    sd[prefix + "embeddings.position_ids"] = np.arange(ours.config.max_position_embeddings)[None]
    cfg = CLIPTextConfig.from_dict({"text_config": ref.config.to_dict()})  # a full CLIPModel config nests it
    assert cfg == ours.config
    model = build_module(lambda rngs: CLIPTextModel(cfg, rngs=rngs), sd, rename=CLIP_TEXT_RENAME)
    x = jnp.asarray(ids, jnp.int32)
    np.testing.assert_array_equal(model(x).last_hidden_state, ours(x).last_hidden_state)
    sd["text_model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="text_model.extra.weight"):
        build_module(lambda rngs: CLIPTextModel(cfg, rngs=rngs), sd, rename=CLIP_TEXT_RENAME)


def test_config_errors():
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ConfigError, match="multiple"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
