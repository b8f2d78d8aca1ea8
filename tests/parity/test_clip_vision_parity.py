"""CLIP vision encoder against transformers: tiny random models saved with save_pretrained, loaded by our loader."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from vldm_jax.checkpoints.load import load_model
from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.models.clip import CLIPVisionModel, CLIPVisionModelWithProjection

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=24, layer_norm_eps=1e-5)
# SVD's OpenCLIP ViT-H uses exact GELU; openai CLIP quick_gelu.
VARIANTS = {"gelu": dict(hidden_act="gelu"), "quick_gelu": dict(hidden_act="quick_gelu")}


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref.detach().numpy(), np.float32)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def pixels(n=2, size=32):
    return np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(**TINY, **VARIANTS[request.param])
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, load_model(folder), folder


def test_vision_model_with_projection(pair):
    ref, ours, _ = pair
    assert isinstance(ours, CLIPVisionModelWithProjection)
    x = pixels()
    with torch.no_grad():
        r = ref(torch.from_numpy(x), output_hidden_states=True)
    o = ours(jnp.asarray(x.transpose(0, 2, 3, 1)), output_hidden_states=True)
    errors = {"image_embeds": rel_err(o.image_embeds, r.image_embeds),
              "last_hidden_state": rel_err(o.last_hidden_state, r.last_hidden_state)}
    assert len(o.hidden_states) == len(r.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
        errors[f"hidden_states[{i}]"] = rel_err(a, b)
    print(ref.config.hidden_act, errors)
    assert max(errors.values()) < 1e-4, errors


def test_bare_vision_model_and_legacy_keys(pair, tmp_path):
    """A bare CLIPVisionModel (transformers 5 saves it without the vision_model. prefix), and a hub-style
    checkpoint with the prefix and the old position_ids buffer."""
    ref, _, folder = pair
    torch.manual_seed(1)
    bare = transformers.CLIPVisionModel(ref.config).eval()
    bare.save_pretrained(tmp_path / "bare")
    ours = load_model(tmp_path / "bare")
    assert isinstance(ours, CLIPVisionModel)
    x = pixels(1)
    with torch.no_grad():
        r = bare(torch.from_numpy(x))
    o = ours(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert rel_err(o.pooler_output, r.pooler_output) < 1e-4
    assert rel_err(o.last_hidden_state, r.last_hidden_state) < 1e-4

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    sd["vision_model.embeddings.position_ids"] = np.arange(n_pos, dtype=np.int64)[None]
    safetensors.numpy.save_file(sd, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        r = ref(torch.from_numpy(x))
    assert rel_err(load_model(legacy)(jnp.asarray(x.transpose(0, 2, 3, 1))).image_embeds, r.image_embeds) < 1e-4


def test_errors(pair, tmp_path):
    _, ours, folder = pair
    with pytest.raises(UserError, match="32x32"):
        ours(jnp.zeros((1, 16, 16, 3)))
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    del sd["visual_projection.weight"]
    safetensors.numpy.save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text())))
    with pytest.raises(CheckpointError, match="missing keys: vision_model|missing keys: visual_projection"):
        load_model(bad)
