"""Rematerialisation that holds on every XLA backend: a layer recomputed inside the backward pass, not beside the
forward one.

``jax.checkpoint`` marks what to recompute and puts an ``optimization_barrier`` on the saved inputs, but nothing
ties the recomputation to the *cotangent* of the layer's output. A scheduler is therefore free to run every
recomputation as soon as its inputs exist, i.e. right after the forward pass, and XLA's CPU pipeline also expands
the barriers away before it schedules. Measured on the medium video U-Net's training step (CPU XLA, buffer dump
``*-live-range.txt``): at the peak, the ``checkpoint/rematted_computation`` values of all blocks were live at
once, and block-level remat left the peak where it was without remat (docs/benchmarks.md, "remat").

:func:`recompute_in_backward` saves only a layer's inputs (``custom_vjp``). Its backward rule first makes every
input depend on one element of the incoming cotangent through an exact zero (``min(|g0|, 0)``, which no
algebraic simplification removes), then recomputes the layer and applies its VJP. The data dependence survives
every pass, so the recomputation can only run when the backward pass reaches the layer. The extra cost is one
add per input array. Gradients are those of the layer itself.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def _after(tree, cotangent):
    """``tree`` with each inexact leaf plus an exact zero computed from ``cotangent``: the same values, but data
    that exists only once the cotangent does."""
    leaves = [x for x in jax.tree.leaves(cotangent) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return tree
    first = leaves[0].reshape(-1)[:1].astype(jnp.float32)
    zero = jnp.minimum(jnp.abs(first), 0.0).reshape(())  # 0 for every finite cotangent, NaN stays NaN

    def tie(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
            return x + zero.astype(x.dtype)
        return x

    return jax.tree.map(tie, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(f, *args):
    return f(*args)


def _recomputed_fwd(f, *args):
    return f(*args), args  # residuals: the inputs only


def _recomputed_bwd(f, args, cotangent):
    _, vjp = jax.vjp(f, *_after(args, cotangent))
    return vjp(cotangent)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def recompute_in_backward(fn: Callable, *args):
    """``fn(*args)`` whose intermediate activations are not kept for the backward pass: only ``args`` are saved,
    and ``fn`` runs again inside the backward pass once the cotangent of its output exists. ``args`` may be any
    pytrees (e.g. a module's split state and its inputs); traced values that ``fn`` closes over become explicit
    inputs (``jax.closure_convert``), so their gradients flow too."""
    converted, consts = jax.closure_convert(fn, *args)
    return _recomputed(converted, *args, *consts)




def recompute_module(module, fn: Callable, *args):
    """``fn(module, *args)`` recomputed in the backward pass: :func:`recompute_in_backward` over the module's split
    state (gradients reach its parameters too). Traced values ``fn`` closes over are lifted by ``closure_convert``;
    static ones (frame counts) stay static."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    return recompute_in_backward(lambda st, *a: fn(nnx.merge(graphdef, st), *a), state, *args)
