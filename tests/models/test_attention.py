"""The query-chunked CPU attention equals XLA's attention, forward and backward, and ``auto`` picks it only for
large plain attentions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm_jax.nn import attention as A


def _qkv(b, t, s, n, h, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, x, n, h)), jnp.float32) for x in (t, s, s))


def _assert_grads_match_xla(attend, q, k, v):
    """Gradients of ``sum(w * attend(q, k, v))`` (random ``w``) equal those through ``jax.nn.dot_product_attention``."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape[:3] + v.shape[3:]), jnp.float32)
    g_ref = jax.grad(lambda *a: jnp.sum(w * jax.nn.dot_product_attention(*a)), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(lambda *a: jnp.sum(w * attend(*a)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_equals_xla_forward_and_grad(chunk):
    q, k, v = _qkv(2, 128, 96, 3, 8)
    ref = jax.nn.dot_product_attention(q, k, v)
    out = A.chunked_attention(q, k, v, chunk=chunk)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)

    _assert_grads_match_xla(lambda *a: A.chunked_attention(*a, chunk=chunk), q, k, v)


def test_automatic_chunks_use_a_larger_backward_block():
    # Chosen automatically, the backward pass's query blocks are at least BACKWARD_MIN_CHUNK queries (doubling
    # the forward's while it divides the queries); an explicit chunk is used by both passes. Gradients stay exact.
    assert A._backward_chunk(32, 1024) == 128 and A._backward_chunk(256, 1024) == 256
    assert A._backward_chunk(48, 96) == 96 and A._backward_chunk(40, 120) == 40  # 80 does not divide 120
    b, t, n, h = 1, 512, 32, 8  # below HEAD_MIN_LENGTH: query-chunked
    assert A._query_chunk(b, t, t, n, h) == 64  # so the backward runs 128-query blocks
    q, k, v = _qkv(b, t, t, n, h)
    _assert_grads_match_xla(A.chunked_attention, q, k, v)


def test_chunked_gradient_keeps_no_score_matrix():
    # The hand-written backward keeps q, k, v, the output and the log-sum-exp, and rebuilds one block of
    # probabilities at a time: XLA's temporary memory for the gradient stays far below the (B, N, T, S) scores
    # that differentiating the lax.map would stack (twice).
    b, t, n, h = 1, 1024, 2, 16
    q, k, v = _qkv(b, t, t, n, h)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a, chunk=64) ** 2), argnums=(0, 1, 2)))
    temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    scores = b * n * t * t * 4
    assert temp < scores / 2, (temp, scores)


def test_chunked_gradient_in_bfloat16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 64, 48, 2, 8))
    g = jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a, chunk=16).astype(jnp.float32)), argnums=(0, 1, 2))
    g32 = jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a, chunk=16)), argnums=(0, 1, 2))
    for a, b in zip(g(q, k, v), g32(*(x.astype(jnp.float32) for x in (q, k, v)))):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2, rtol=3e-2)


def test_chunk_must_divide():
    q, k, v = _qkv(1, 30, 30, 1, 4)
    with pytest.raises(ValueError, match="does not divide"):
        A.chunked_attention(q, k, v, chunk=16)


def test_auto_choice():
    # Small score matrices are one block; large ones get a divisor of the query count, >= 16.
    assert A._query_chunk(2, 256, 256, 8, 8) is None
    c = A._query_chunk(2, 1024, 1024, 8, 8)
    assert c is not None and 1024 % c == 0 and 16 <= c <= 512
    c = A._query_chunk(2, 1000, 1000, 8, 8)
    assert c is not None and 1000 % c == 0
    # A prime number of queries has no useful divisor: not chunked.
    assert A._query_chunk(4, 1021, 1021, 8, 8) is None


@pytest.mark.parametrize("kind", ["bias", "mask", "causal"])
def test_cpu_path_with_bias_mask_causal_equals_xla(kind):
    q, k, v = _qkv(2, 12, 12, 3, 8)
    rng = np.random.default_rng(2)
    kw = {"bias": jnp.asarray(rng.standard_normal((1, 3, 12, 12)), jnp.float32)} if kind == "bias" else \
        {"mask": jnp.asarray(rng.random((2, 1, 12, 12)) > 0.3).at[..., 0].set(True)} if kind == "mask" else \
        {"is_causal": True}
    ref = jax.nn.dot_product_attention(q, k, v, **kw)
    np.testing.assert_allclose(A.dot_product_attention(q, k, v, **kw), ref, atol=2e-6, rtol=1e-5)


def test_dispatch(monkeypatch):
    calls = []
    real = A.chunked_attention
    monkeypatch.setattr(A, "chunked_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 64, 64, 2, 8)
    out = A.dot_product_attention(q, k, v)  # the CPU default: this module's attention
    assert calls == [1]
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-6)
    monkeypatch.setattr(A, "ATTENTION_IMPLEMENTATION", "xla")
    np.testing.assert_allclose(A.dot_product_attention(q, k, v), out, atol=2e-6)
    assert calls == [1]


@pytest.mark.parametrize("shape", [(2, 1024, 3, 8), (1, 1100, 2, 4)])
def test_long_attention_runs_head_by_head_and_stays_exact(shape, monkeypatch):
    # At HEAD_MIN_LENGTH queries and keys and two or more heads, the automatic path is _by_heads: one 2D problem
    # per head, queries in blocks (1100 = 2 blocks of 512 and a ragged 76 with HEAD_BLOCK 512). Values and
    # gradients equal XLA's attention.
    b, t, n, h = shape
    calls = []
    real = A._by_heads
    monkeypatch.setattr(A, "_by_heads", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(b, t, t, n, h)
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(A.chunked_attention(q, k, v), ref, atol=2e-6, rtol=1e-5)
    assert calls
    _assert_grads_match_xla(A.chunked_attention, q, k, v)


def test_head_by_head_only_where_it_is_faster():
    # One head, or fewer than HEAD_MIN_LENGTH queries or keys: the query-chunked path (measured faster there).
    seen = []
    for shape in [(1, 1024, 1, 8), (4, 512, 4, 8)]:
        q, k, v = _qkv(*shape[:2], shape[1], *shape[2:])
        jaxpr = str(jax.make_jaxpr(A.chunked_attention)(q, k, v))
        seen.append("_heads" in jaxpr)
    q, k, v = _qkv(2, 1024, 1024, 2, 8)
    assert not any(seen) and "_heads" in str(jax.make_jaxpr(A.chunked_attention)(q, k, v))


def test_head_by_head_gradient_in_bfloat16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 1024, 1024, 2, 8))
    g = jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    g32 = jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a)), argnums=(0, 1, 2))
    for a, b in zip(g(q, k, v), g32(*(x.astype(jnp.float32) for x in (q, k, v)))):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=5e-2, rtol=5e-2)


def test_head_by_head_gradient_keeps_no_score_matrix():
    # One head's blocks are live at a time: XLA's temporary memory does not grow with the heads' scores.
    b, t, n, h = 2, 1024, 4, 8
    q, k, v = _qkv(b, t, t, n, h)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(A.chunked_attention(*a) ** 2), argnums=(0, 1, 2)))
    temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    scores = b * n * t * t * 4
    assert temp < scores / 2, (temp, scores)
