"""The attention kernel per platform: the auto choice for each compile target, the switch, the one log line, and the
splash kernel's padding (heads to 128 lanes, sequences to blocks, padded keys masked by segment ids) checked on the
CPU in Pallas' interpret mode against this module's exact attention."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm_jax.errors import ConfigError
from vldm_jax.nn import attention as attn
from vldm_jax.parallel.aot import target_platform


@pytest.fixture
def switch():
    saved = attn.ATTENTION_IMPLEMENTATION
    yield attn.set_attention_implementation
    attn.ATTENTION_IMPLEMENTATION = saved


def test_auto_picks_per_compile_target(switch):
    switch("auto")
    assert attn.attention_implementation(jnp.float32) == "chunked"  # this host: the CPU
    with target_platform("tpu"):
        assert attn.attention_implementation(jnp.float32) == "splash"
    with target_platform("gpu"):
        assert attn.attention_implementation(jnp.bfloat16) == "cudnn"
        assert attn.attention_implementation(jnp.float32) == "xla"  # cuDNN flash needs half precision
    switch("xla")
    with target_platform("tpu"):
        assert attn.attention_implementation(jnp.bfloat16) == "xla"
    with pytest.raises(ConfigError, match="flash"):
        switch("flash")


def test_choice_is_logged_once(switch, caplog):
    switch("auto")
    attn._LOGGED.discard(("splash", "tpu"))
    with caplog.at_level(logging.INFO, logger="vldm_jax.attention"), target_platform("tpu"):
        attn.attention_implementation()
        attn.attention_implementation()
    lines = [r.getMessage() for r in caplog.records if r.name == "vldm_jax.attention"]
    assert lines == ["attention: splash on tpu (switch: auto)"]


def test_splash_padding_matches_exact_attention():
    keys = jax.random.split(jax.random.key(0), 3)
    b, t, s, n, h = 1, 130, 200, 1, 40  # neither length a multiple of 128, heads of 40 channels
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, n, h))
    v = jax.random.normal(keys[2], (b, s, n, h))
    ref = attn._attend(q, k, v, h ** -0.5)
    out = attn.splash_attention(q, k, v, scale=h ** -0.5, interpret=True)
    assert out.shape == (b, t, n, h)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_cli_switch_lists_every_implementation():
    from vldm_jax.cli import ATTENTION_CHOICES, _build_parser

    assert ATTENTION_CHOICES == attn.IMPLEMENTATIONS
    args = _build_parser().parse_args(["--attention", "splash", "convert", "a", "b"])
    assert args.attention == "splash"
