"""nn/branches.py: how an axis is split into pieces that XLA's CPU runtime runs side by side, and the layers that
split themselves (GroupNorm over pieces, the 3D residual block over rows) equal their unsplit computation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vldm_jax.nn.branches import MIN_BRANCH_ELEMENTS, branch_count, map_branches
from vldm_jax.nn.norm import GroupNorm
from vldm_jax.nn.temporal import TemporalResnetBlock
from vldm_jax.parallel.aot import target_platform


def test_branch_count_by_platform_and_size():
    big = 64 * MIN_BRANCH_ELEMENTS
    assert branch_count(8, None, cap=8, elements=big) == 8  # this CPU, no mesh: split
    assert branch_count(8, None, cap=8, elements=2 * MIN_BRANCH_ELEMENTS) == 2  # pieces stay large enough
    assert branch_count(8, None, cap=8, elements=MIN_BRANCH_ELEMENTS // 2) == 1  # tiny: not worth it
    assert branch_count(6, None, cap=4, elements=big) == 3  # the largest count that divides the axis
    assert branch_count(7, None, cap=8, elements=big) == 7
    assert branch_count(5, None, cap=4, elements=big) == 1
    for platform in ("gpu", "tpu"):
        with target_platform(platform):
            assert branch_count(8, None, cap=8, elements=big) == 1  # accelerators: never automatically
            assert branch_count(8, 4, cap=8, elements=8) == 4  # an explicit count is honoured
    assert branch_count(8, 1, cap=8, elements=big) == 1
    assert branch_count(4, 16, cap=8, elements=big) == 4


def test_map_branches_is_the_function():
    x = jax.random.normal(jax.random.key(0), (6, 3, 5))
    y = jax.random.normal(jax.random.key(1), (6, 3, 5))
    fn = lambda a, b: jnp.tanh(a) * b.sum(-1, keepdims=True)  # noqa: E731 - per item of axis 0
    for n in (1, 2, 3, 6):
        np.testing.assert_allclose(map_branches(fn, n, 0, x, y), fn(x, y), rtol=1e-6)


def test_group_norm_over_pieces_equals_the_whole():
    gn = GroupNorm(4, 16, eps=1e-6, rngs=nnx.Rngs(0))
    gn.scale.set_value(jax.random.normal(jax.random.key(2), (16,)))
    gn.bias.set_value(jax.random.normal(jax.random.key(3), (16,)))
    x = 3.0 + jax.random.normal(jax.random.key(4), (2, 4, 8, 6, 16))
    whole = gn(x)
    for axis, n in ((2, 2), (2, 4), (1, 2), (3, 3)):
        pieces = gn.over_pieces(jnp.split(x, n, axis=axis))
        np.testing.assert_allclose(jnp.concatenate(pieces, axis=axis), whole, rtol=1e-5, atol=1e-5)


def test_temporal_resnet_block_over_rows_equals_whole():
    block = TemporalResnetBlock(32, 64, temb_channels=16, groups=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8, 4, 32))
    temb = jax.random.normal(jax.random.key(1), (2, 5, 16))
    graphdef, state = nnx.split(block)

    @jax.jit
    def both(state, x, temb):
        outs = []
        for n in (1, 2, 4):
            b = nnx.merge(graphdef, state)
            b.branches = n
            outs.append(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(b(x, temb))))(x))
        return outs

    (v1, g1), *rest = both(state, x, temb)
    assert len(rest) == 2
    for v, g in rest:
        np.testing.assert_allclose(v, v1, rtol=1e-5)
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-5)
