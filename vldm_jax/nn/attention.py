"""Attention: one op over ``jax.nn.dot_product_attention`` and the diffusers ``Attention`` layer.

Everything that attends (spatial transformers, temporal layers, the VAE mid block, CLIP) goes
through :func:`dot_product_attention`, so each platform gets its kernel without code changes:
on TPUs the Pallas splash (flash) attention kernel, on GPUs cuDNN's fused flash attention for
half precision, on the CPU this module's query-chunked attention (:func:`attention_implementation`).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from vldm_jax.errors import ConfigError
from vldm_jax.nn.norm import GroupNorm, LayerNorm
from vldm_jax.parallel.activations import current_mesh
from vldm_jax.parallel.aot import trace_platform

log = logging.getLogger("vldm_jax.attention")

# The switch (``set_attention_implementation``, the CLI's ``--attention``). None ("auto"): splash on TPU, cuDNN on
# GPU for half precision (XLA otherwise), this module's chunked attention on the CPU. "xla": always
# jax.nn.dot_product_attention's XLA path; "chunked": this module's attention on any backend; "cudnn": the fused
# GPU kernel (half precision, no boolean mask); "splash": the TPU Pallas kernel (no bias or mask: such calls, and
# sequences shorter than SPLASH_MIN_LENGTH, take the XLA path).
ATTENTION_IMPLEMENTATION: str | None = None
IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")

# Splash pads sequences to its blocks (multiples of 128) and heads to 128 lanes: below this many queries or keys
# (temporal attention over a few frames, cross-attention to 77 text tokens) the padding would cost more than the
# kernel saves, and XLA's fused attention is used.
SPLASH_MIN_LENGTH = 128
SPLASH_MAX_BLOCK = 512
# cuDNN's flash attention takes heads of up to 128 channels (SD 1.5's 160-wide heads of the two lowest
# resolutions take XLA's path).
CUDNN_MAX_HEAD_DIM = 128

_LOGGED: set = set()

# Scores per chunk (B * heads * chunk * S floats): 1-2 M floats (4-8 MB) keep a block of the score matrix in the
# CPU's cache. Measured on the 2-core CPU (docs/benchmarks.md), best chunk per shape (B, T, heads, head dim):
# (2, 1024, 8, 8) 91 ms (XLA) -> 11 ms at 64 queries (1 M scores; PyTorch's fused SDPA 16 ms); (8, 1024, 1, 64)
# 61 -> 19 ms at 128-256 (1-2 M); (2, 1024, 8, 40) 108 -> 36-38 ms at 128-256 (2-4 M); (2, 4096, 8, 40) 1962 ->
# 1002 ms at 64-128. Heads of up to 16 channels prefer the smaller blocks.
CHUNK_SCORE_ELEMENTS = 2 ** 21
CHUNK_SCORE_ELEMENTS_NARROW = 2 ** 20
# At most this many score elements in one block: below it the whole attention is one block.
CHUNK_MIN_ELEMENTS = 2 ** 22
# The backward pass's query blocks: at least this many queries (when the block size is chosen automatically).
# Its per-block dots (dk and dv accumulated over the block's queries) are batched over B * heads and run at
# a fraction of the forward's speed at 32-64 queries: gradient of (16, 1024, 8, 32) attention 682 -> 522 ms
# going from 32 to 128 queries, (8, 1024, 4, 64) 257 -> 186 ms from 64 to 128, (16, 1024, 2, 32) 137 -> 111 ms;
# (8, 1024, 1, 64) stays at its forward's 256 (46 ms; 512: 53 ms). docs/benchmarks.md, session 12.
BACKWARD_MIN_CHUNK = 128
# Long self-attention (at least this many queries and keys) over at least two heads runs head by head
# (:func:`_heads`): one ``lax.map`` step per (batch, head), its queries in blocks of ``HEAD_BLOCK`` written out, so
# every matmul is a plain 2D one. XLA's CPU matmuls batched over (B, heads) ran at 45-160 GFLOP/s where the same
# work as 2D matmuls ran at 210-240 (32-wide heads). Forward and backward of (16, 1024, 2, 32): 28 -> 23 ms and
# 120 -> 64 ms; (2, 4096, 8, 40): 496 -> 232 ms and 963 -> 744 ms; 256-512 queries and a single head stay
# faster query-chunked (docs/benchmarks.md, session 14).
HEAD_MIN_LENGTH = 1024
HEAD_BLOCK = 512
HEAD_MAX_BLOCKS = 32


def set_attention_implementation(name: str | None) -> None:
    """Selects the attention kernel for every later trace (one switch for the process)."""
    global ATTENTION_IMPLEMENTATION
    if name is not None and name not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    ATTENTION_IMPLEMENTATION = None if name in (None, "auto") else name


def attention_implementation(dtype=jnp.float32) -> str:
    """The implementation a call of ``dtype`` inputs takes now: the switch, or the platform's choice for auto."""
    impl = ATTENTION_IMPLEMENTATION
    platform = trace_platform()
    if impl in (None, "auto"):
        if platform == "cpu":
            impl = "chunked"
        elif platform == "tpu":
            impl = "splash"
        elif platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
            impl = "cudnn"
        else:
            impl = "xla"
    if (impl, platform) not in _LOGGED:
        _LOGGED.add((impl, platform))
        log.info("attention: %s on %s (switch: %s)", impl, platform, ATTENTION_IMPLEMENTATION or "auto")
    return impl


def _attend(q, k, v, scale, bias=None, mask=None):
    """Softmax attention of one block, heads-major inside, normalising the output instead of the scores.

    q ``(B, T, N, H)``, k/v ``(B, S, N, H)``; ``bias`` (added to the logits) and boolean ``mask`` (True: attend)
    broadcast to ``(B, N, T, S)``. Scores and softmax statistics in float32. On the CPU this is 1.1-3x faster
    than ``jax.nn.dot_product_attention``'s XLA path even unchunked (one pass fewer over the scores)."""
    qt = jnp.transpose(q, (0, 2, 1, 3)) * jnp.asarray(scale, q.dtype)
    kt = jnp.transpose(k, (0, 2, 3, 1))
    vt = jnp.transpose(v, (0, 2, 1, 3))
    s = jnp.matmul(qt, kt, preferred_element_type=jnp.float32)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    denom = p.sum(-1, keepdims=True)
    out = jnp.matmul(p.astype(v.dtype), vt, preferred_element_type=jnp.float32) / denom
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _query_chunk(b: int, t: int, s: int, n: int, h: int) -> int | None:
    """The number of queries per chunk for a ``(b, t, s, n, h)`` attention, or None to not chunk."""
    if b * n * t * s <= CHUNK_MIN_ELEMENTS:
        return None
    block = CHUNK_SCORE_ELEMENTS_NARROW if h <= 16 else CHUNK_SCORE_ELEMENTS
    target = max(32, block // (b * n * s))
    for c in range(min(target, t // 2), 15, -1):
        if t % c == 0:
            return c
    return None


def chunked_attention(q, k, v, *, scale: float | None = None, chunk: int | None = None):
    """Exact attention computed ``chunk`` queries at a time (a ``lax.map``), so the block of scores being
    exponentiated and multiplied stays in cache instead of a ``(B, N, T, S)`` matrix making several trips
    through memory. Keys and values are whole: this is not flash attention's online softmax, and the memory
    saving is only in the scores (``B * N * chunk * S``). Without ``chunk``, :func:`_query_chunk` picks it, and
    long self-attention over several heads (no activation mesh) runs head by head instead (:func:`_by_heads`).

    Its gradient is written by hand (:func:`_flash`): the forward keeps only the output and each query's
    log-sum-exp, and the backward recomputes one block of probabilities at a time. Differentiating the
    ``lax.map`` instead stacks every block's probabilities (the whole ``B * N * T * S`` score matrix, twice)
    for the backward pass; measured on the h32f16 training step (docs/benchmarks.md): 8.4 -> 6.4 s, XLA temp
    memory 1337 -> 669 MiB."""
    b, t, n, h = q.shape
    scale = h ** -0.5 if scale is None else scale
    automatic = chunk is None
    if automatic and min(t, k.shape[1]) >= HEAD_MIN_LENGTH and b * n >= 2 and current_mesh() is None:
        return _by_heads(q, k, v, scale)  # under a mesh the folded heads axis would be sharded: query chunks
    chunk = chunk or _query_chunk(b, t, k.shape[1], n, h)
    if chunk is None or chunk >= t:
        return _attend(q, k, v, scale)
    if t % chunk:
        raise ValueError(f"chunk {chunk} does not divide {t} queries")
    chunks = (chunk, _backward_chunk(chunk, t) if automatic else chunk)  # an explicit chunk drives both passes
    qh, kh, vh = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
    return jnp.transpose(_flash(qh, kh, vh, scale, chunks), (0, 2, 1, 3))


def _backward_chunk(chunk: int, t: int) -> int:
    """The backward pass's query block for an automatic forward block ``chunk``: doubled while below
    :data:`BACKWARD_MIN_CHUNK` and still dividing ``t``."""
    while chunk < BACKWARD_MIN_CHUNK and t % (2 * chunk) == 0:
        chunk *= 2
    return chunk


def _chunks(x, chunk):
    """``(B, N, T, ...)`` -> ``(T // chunk, B, N, chunk, ...)``: query blocks first, for a ``lax.map``/``scan``."""
    b, n, t = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, n, t // chunk, chunk, *x.shape[3:]), 2, 0)


def _unchunk(x):
    """The inverse of :func:`_chunks`."""
    c, b, n, k = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, n, c * k, *x.shape[4:])


def _flash_forward(q, k, v, scale, chunk):
    """Heads-major ``(B, N, T, H)`` queries, ``(B, N, S, H)`` keys/values, ``chunk`` queries at a time: the output
    ``(B, N, T, H)`` and each query's log-sum-exp of its scores ``(B, N, T)`` (float32)."""
    qs = _chunks(q * jnp.asarray(scale, q.dtype), chunk)
    kt = jnp.swapaxes(k, -1, -2)
    o, lse = jax.lax.map(lambda qc: _block_forward(qc, kt, v), qs)
    return _unchunk(o), _unchunk(lse)


def _block_forward(qc, kt, v):
    """One block of (already scaled) queries ``(..., C, H)`` against transposed keys ``(..., H, S)`` and values
    ``(..., S, H)``: the output ``(..., C, H)`` and each query's log-sum-exp ``(..., C)`` (float32). Batched
    (query chunks) or 2D (head by head) alike."""
    s = jnp.matmul(qc, kt, preferred_element_type=jnp.float32)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    o = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    return o.astype(qc.dtype), (m + jnp.log(denom))[..., 0]


def _block_backward(qc, doc, lc, dc, k, kt, vt):
    """Flash attention's backward for one block of (already scaled) queries: rebuilds ``p = exp(s - lse)`` and
    returns ``dq`` (unscaled, float32) and this block's terms of ``dk`` and ``dv`` *transposed* (``(..., H, S)``).
    dk and dv are accumulated transposed, ``(H, C) @ (C, S)``: only the small per-block operands are transposed.
    Accumulating ``(S, H) += p^T @ do`` transposes every (C, S) block of probabilities in memory; measured on
    (8, 1, 1024, 64) attention: 74 -> 28 ms for the backward pass."""
    p = jnp.exp(jnp.matmul(qc, kt, preferred_element_type=jnp.float32) - lc[..., None])
    dvt = jnp.matmul(jnp.swapaxes(doc, -1, -2), p.astype(doc.dtype), preferred_element_type=jnp.float32)
    ds = p * (jnp.matmul(doc, vt, preferred_element_type=jnp.float32) - dc[..., None])
    dq = jnp.matmul(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dkt = jnp.matmul(jnp.swapaxes(qc, -1, -2), ds.astype(qc.dtype), preferred_element_type=jnp.float32)
    return dq, dkt, dvt


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, scale, chunks):
    """Query-chunked attention (heads-major) with flash attention's backward: residuals are q, k, v, the output
    and the log-sum-exp; per query block the backward rebuilds ``p = exp(s - lse)`` and accumulates dk, dv in
    a ``lax.scan`` (``ds = p * (dp - rowsum(do * o))``). ``chunks``: the (forward, backward) query blocks."""
    return _flash_forward(q, k, v, scale, chunks[0])[0]


def _flash_fwd(q, k, v, scale, chunks):
    o, lse = _flash_forward(q, k, v, scale, chunks[0])
    return o, (q, k, v, o, lse)


def _flash_bwd(scale, chunks, res, do):
    chunk = chunks[1]
    q, k, v, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # (B, N, T)
    qs, dos = _chunks(q * jnp.asarray(scale, q.dtype), chunk), _chunks(do, chunk)
    lses, deltas = _chunks(lse, chunk), _chunks(delta, chunk)
    kt, vt = jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2)

    def one(carry, xs):
        dq, dkt, dvt = _block_backward(*xs, k, kt, vt)
        return (carry[0] + dkt, carry[1] + dvt), dq

    zeros = jnp.zeros(kt.shape, jnp.float32)
    (dkt, dvt), dq = jax.lax.scan(one, (zeros, zeros), (qs, dos, lses, deltas))
    dq = _unchunk(dq) * scale
    dk, dv = jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _by_heads(q, k, v, scale):
    """:func:`chunked_attention` head by head: ``(B, T, N, H)`` inputs folded to ``(B * N, T, H)``, one
    ``lax.map`` step per head (:func:`_heads`), queries in blocks of :data:`HEAD_BLOCK` (more for very long
    sequences, at most :data:`HEAD_MAX_BLOCKS` blocks)."""
    b, t, n, h = q.shape
    block = max(HEAD_BLOCK, -(-t // HEAD_MAX_BLOCKS))

    def fold(x):
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * n, x.shape[1], h)

    out = _heads(fold(q), fold(k), fold(v), scale, block)
    return jnp.transpose(out.reshape(b, n, t, h), (0, 2, 1, 3))


def _blocks(t: int, block: int):
    return [(i, min(i + block, t)) for i in range(0, t, block)]


def _head_forward(q, k, v, scale, block):
    """Per head: ``(T, H)`` queries, ``(S, H)`` keys/values -> output ``(T, H)`` and log-sum-exp ``(T,)``."""
    q, kt = q * jnp.asarray(scale, q.dtype), k.T
    outs, lses = zip(*(_block_forward(q[lo:hi], kt, v) for lo, hi in _blocks(q.shape[0], block)))
    return jnp.concatenate(outs), jnp.concatenate(lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _heads(q, k, v, scale, block):
    """Attention of ``(G, T, H)`` queries and ``(G, S, H)`` keys/values, one ``lax.map`` step per head ``G``,
    with flash attention's backward: :func:`_flash`'s blocks (:func:`_block_forward`, :func:`_block_backward`),
    per head and 2D."""
    return jax.lax.map(lambda x: _head_forward(*x, scale, block)[0], (q, k, v))


def _heads_fwd(q, k, v, scale, block):
    o, lse = jax.lax.map(lambda x: _head_forward(*x, scale, block), (q, k, v))
    return o, (q, k, v, o, lse)


def _heads_bwd(scale, block, res, do):
    q, k, v, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # (G, T)

    def one(x):
        qi, ki, vi, doi, li, di = x
        qi = qi * jnp.asarray(scale, qi.dtype)
        kt, vt = ki.T, vi.T
        dq, dkt, dvt = zip(*(_block_backward(qi[lo:hi], doi[lo:hi], li[lo:hi], di[lo:hi], ki, kt, vt)
                             for lo, hi in _blocks(qi.shape[0], block)))
        return ((jnp.concatenate(dq) * scale).astype(q.dtype), sum(dkt).T.astype(k.dtype),
                sum(dvt).T.astype(v.dtype))

    return jax.lax.map(one, (q, k, v, do, lse, delta))


_heads.defvjp(_heads_fwd, _heads_bwd)


def dot_product_attention(q, k, v, *, mask=None, bias=None, is_causal: bool = False, upcast: bool = False,
                          scale: float | None = None):
    """Multi-head attention on ``(B, T, N, H)`` queries and ``(B, S, N, H)`` keys/values -> ``(B, T, N, H)``.

    ``upcast`` computes in float32 (diffusers' ``upcast_attention``: SD 2.1 overflows in fp16).
    ``mask``: boolean, broadcastable to ``(B, N, T, S)``, True where attending is allowed.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    impl = attention_implementation(q.dtype)
    if impl == "chunked":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if mask is None and bias is None and not is_causal:
            return chunked_attention(q, k, v, scale=scale).astype(dtype)
        if is_causal:
            causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        return _attend(q, k, v, scale, bias=bias, mask=mask).astype(dtype)
    if impl == "splash":
        if (mask is None and bias is None and not is_causal
                and min(q.shape[1], k.shape[1]) >= SPLASH_MIN_LENGTH):
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return splash_attention(q, k, v, scale=scale).astype(dtype)
        impl = "xla"  # biased (relative frame positions), masked or short: XLA's fused attention
    if impl == "xla":
        impl = None
    if impl == "cudnn" and (q.dtype not in (jnp.float16, jnp.bfloat16) or mask is not None
                            or q.shape[-1] % 8 or q.shape[-1] > CUDNN_MAX_HEAD_DIM):
        impl = None  # cuDNN's kernel takes half precision, no boolean mask, heads of a multiple of 8 up to 128
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
                                       implementation=impl)
    return out.astype(dtype)


# ------------------------------------------------------------------------------------------ TPU: splash

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
    blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                           block_q_dq=block_q, block_kv_dq=block_kv)
    return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, *, scale: float, interpret: bool = False):
    """Splash attention on one device's ``(B, T, N, H)`` / ``(B, S, N, H)``: heads padded to 128 lanes with
    zeros (scores and outputs unchanged), sequences to whole blocks; padded keys are kept out by segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    s = k.shape[1]
    hp = _round_up(h, 128)
    block_q = min(SPLASH_MAX_BLOCK, _round_up(t, 128))
    block_kv = min(SPLASH_MAX_BLOCK, _round_up(s, 128))
    tp, sp = _round_up(t, block_q), _round_up(s, block_kv)
    q = q * jnp.asarray(scale, q.dtype)  # the kernel does not scale

    def heads_major(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
        return jnp.transpose(x, (0, 2, 1, 3))  # (B, N, L, Hp)

    qh, kh, vh = heads_major(q, tp), heads_major(k, sp), heads_major(v, sp)
    kernel = _splash_kernel(n, tp, sp, block_q, block_kv, interpret)
    segments = None
    if sp != s:
        segments = sk.SegmentIds(q=jnp.zeros((tp,), jnp.int32), kv=(jnp.arange(sp) >= s).astype(jnp.int32))
    out = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(qh, kh, vh)
    return jnp.transpose(out[:, :, :t, :h], (0, 2, 1, 3))


def splash_attention(q, k, v, *, scale: float, interpret: bool = False):
    """The TPU splash (flash) attention kernel on ``(B, T, N, H)`` queries, ``(B, S, N, H)`` keys/values.

    A Pallas kernel cannot be partitioned by XLA, so under an activation mesh it runs in ``jax.shard_map``: the
    batch (folded frames or positions) over whichever of data/fsdp/context divide it, the queries over context
    when the batch left it unused (keys and values are then gathered: each device attends its queries over all
    keys, exactly), heads over tensor."""
    mesh = current_mesh()
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    if mesh is None:
        return local(q, k, v)
    b, t, n, _ = q.shape
    batch_axes, size = [], 1
    for axis in ("data", "fsdp", "context"):
        m = mesh.shape.get(axis, 1)
        if m > 1 and b % (size * m) == 0:
            batch_axes.append(axis)
            size *= m
    ctx = mesh.shape.get("context", 1)
    q_axis = "context" if ctx > 1 and "context" not in batch_axes and t % ctx == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and n % tensor == 0 else None
    batch = tuple(batch_axes) if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    q_spec = jax.sharding.PartitionSpec(batch, q_axis, head_axis, None)
    kv_spec = jax.sharding.PartitionSpec(batch, None, head_axis, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)


class Attention(nnx.Module):
    """diffusers ``Attention``: q/k/v projections, multi-head attention, output projection.

    ``norm_num_groups`` adds the input GroupNorm of the autoencoder's attention; ``residual_connection``
    adds the input back. Works on tokens ``(B, T, C)`` or, for the autoencoder, ``(B, H, W, C)``.
    """

    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, upcast_attention: bool = False,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, rngs: nnx.Rngs, dtype=jnp.float32):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps, rngs=rngs) if norm_num_groups else None
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, use_bias=out_bias, dtype=dtype, rngs=rngs)])

    def __call__(self, x, context=None, mask=None, bias=None):
        """x: ``(B, T, C)`` or ``(B, H, W, C)``; context: ``(B, S, D)`` for cross-attention; bias: added to the
        attention logits, broadcastable to ``(B, heads, T, S)`` (relative frame positions)."""
        residual = x
        spatial_shape = x.shape if x.ndim == 4 else None
        if spatial_shape is not None:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b, t, _ = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, -1)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)
        if bias is not None:
            bias = bias.astype(jnp.float32 if self.upcast_attention else q.dtype)
        out = dot_product_attention(q, k, v, mask=mask, bias=bias, upcast=self.upcast_attention)
        out = self.to_out[0](out.reshape(b, t, -1))
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


# ------------------------------------------------------------------------------------- spatial transformer

class GELU(nnx.Module):
    """diffusers ``GELU``: a linear layer then GELU (exact erf, or tanh with ``approximate="tanh"``)."""

    def __init__(self, dim_in: int, dim_out: int, *, approximate: str = "none", bias: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.approximate = approximate == "tanh"
        self.proj = nnx.Linear(dim_in, dim_out, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nnx.Module):
    """diffusers ``GEGLU``: one projection to ``2 * dim_out``, split into value and gate, ``value * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
        self.proj = nnx.Linear(dim_in, dim_out * 2, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward``: ``net[0]`` (activation with its input projection), ``net[1]`` dropout
    (inactive: inference and our fine-tuning run without it), ``net[2]`` output projection.

    ``activation_fn``: ``"geglu"`` (Stable Diffusion), ``"gelu"`` or ``"gelu-approximate"``.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: int = 4, activation_fn: str = "geglu",
                 inner_dim: int | None = None, bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
        inner_dim = inner_dim or int(dim * mult)
        if activation_fn == "geglu":
            act = GEGLU(dim, inner_dim, bias=bias, rngs=rngs, dtype=dtype)
        elif activation_fn in ("gelu", "gelu-approximate"):
            act = GELU(dim, inner_dim, approximate="tanh" if activation_fn == "gelu-approximate" else "none",
                       bias=bias, rngs=rngs, dtype=dtype)
        else:
            raise ValueError(f"unsupported feed-forward activation {activation_fn!r}")
        self.net = nnx.List([act, nnx.Dropout(0.0),
                             nnx.Linear(inner_dim, dim_out or dim, use_bias=bias, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention (when ``cross_attention_dim``
    is given), feed-forward, each with a residual connection. ``(B, T, dim)`` -> ``(B, T, dim)``.

    ``only_cross_attention`` (diffusers' flag, used by the SD x4 upscaler): ``attn1`` attends to the
    context instead of the tokens themselves (its keys/values project from ``cross_attention_dim``)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu",
                 attention_bias: bool = False, upcast_attention: bool = False, norm_eps: float = 1e-5,
                 only_cross_attention: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        attn = dict(heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                    upcast_attention=upcast_attention, rngs=rngs, dtype=dtype)
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, eps=norm_eps, rngs=rngs)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **attn)
        if cross_attention_dim is not None:
            self.norm2 = LayerNorm(dim, eps=norm_eps, rngs=rngs)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = LayerNorm(dim, eps=norm_eps, rngs=rngs)
        self.ff = FeedForward(dim, activation_fn=activation_fn, rngs=rngs, dtype=dtype)

    def __call__(self, x, context=None):
        """x: ``(B, T, dim)``; context: ``(B, S, cross_attention_dim)`` (ignored without cross-attention)."""
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def set_only_cross_attention(self, cross_attention_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> None:
        """Turns an already built block into an ``only_cross_attention`` one: a new ``attn1`` whose keys and
        values project from ``cross_attention_dim`` (for containers that build their blocks through hooks)."""
        a = self.attn1
        heads = a.heads
        self.attn1 = Attention(a.to_q.in_features, cross_attention_dim=cross_attention_dim, heads=heads,
                               dim_head=a.to_q.out_features // heads, bias=a.to_q.use_bias,
                               upcast_attention=a.upcast_attention, rngs=rngs, dtype=dtype)
        self.only_cross_attention = True


class Transformer2DModel(nnx.Module):
    """diffusers ``Transformer2DModel`` for continuous (latent image) input: GroupNorm (eps 1e-6),
    ``proj_in``, ``transformer_blocks`` over the ``H*W`` tokens, ``proj_out``, plus the input.

    ``(N, H, W, C)`` -> ``(N, H, W, C)``; ``N`` may be ``B*F`` folded frames (context then ``(B*F, S, D)``).
    ``proj_in``/``proj_out`` are linear layers for both values of ``use_linear_projection``: on
    channels-last input a 1x1 convolution is the same linear map, and the loader squeezes SD1's
    ``(out, in, 1, 1)`` conv kernels into linear kernels.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *,
                 num_layers: int = 1, cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, upcast_attention: bool = False,
                 activation_fn: str = "geglu", attention_bias: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, rngs=rngs)
        self.proj_in = nnx.Linear(in_channels, inner, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, upcast_attention=upcast_attention,
                                  rngs=rngs, dtype=dtype)
            for _ in range(num_layers)])
        self.proj_out = nnx.Linear(inner, in_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x, context=None):
        """x: ``(N, H, W, C)``; context: ``(N, S, D)`` or None. Returns ``(N, H, W, C)``."""
        n, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(n, h * w, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens).reshape(n, h, w, c) + x
