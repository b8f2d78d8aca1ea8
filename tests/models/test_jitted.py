"""``vldm_jax.jitted``: the jitted call of a loaded module gives what the eager call gives, static leaves included."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vldm_jax
from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel

CONFIG = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=8, eos_token_id=63)


@pytest.fixture(scope="module")
def clip():
    return CLIPTextModel(CONFIG, rngs=nnx.Rngs(0))


def test_jitted_equals_eager(clip):
    ids = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)
    fast = vldm_jax.jitted(clip)
    eager = clip(jnp.asarray(ids))
    out = fast(ids)
    assert type(out) is type(eager)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), np.asarray(eager.last_hidden_state),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.pooler_output), np.asarray(eager.pooler_output), rtol=1e-5, atol=1e-5)
    assert fast.config is CONFIG and fast.method == "__call__"
    # A static leaf (a bool) picks another program; arrays of the same shape reuse the compiled one.
    with_states = fast(ids, output_hidden_states=True)
    assert len(with_states.hidden_states) == CONFIG.num_hidden_layers + 1
    fast(ids[::-1].copy())
    assert fast._jit._cache_size() == 2


def test_jitted_unknown_method(clip):
    with pytest.raises(AttributeError, match="no method 'decode'"):
        vldm_jax.jitted(clip, "decode")
