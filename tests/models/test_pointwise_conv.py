"""PointwiseConv (nn/resnet.py): a 1x1 convolution computed as one matmul, the same layer as nnx.Conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.jaxprs import all_eqns
from vldm_jax.nn.resnet import PointwiseConv, ResnetBlock2D, conv2d
from vldm_jax.nn.temporal import TemporalResnetBlock


def _primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in all_eqns(fn, *args)}


@pytest.mark.parametrize("kernel,shape,bias", [((1, 1), (2, 5, 7, 6), True), ((1, 1, 1), (2, 3, 4, 5, 6), True),
                                               ((1, 1), (3, 4, 4, 6), False)])
def test_equals_nnx_conv_as_one_matmul(kernel, shape, bias):
    ours = PointwiseConv(6, 9, kernel, use_bias=bias, rngs=nnx.Rngs(0))
    ref = nnx.Conv(6, 9, kernel, use_bias=bias, rngs=nnx.Rngs(0))
    if bias:
        ref.bias.set_value(ours.bias[...] + 0.5)
        ours.bias.set_value(ref.bias[...])
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
    prims = _primitives(lambda x: ours(x), x)
    assert "dot_general" in prims and "conv_general_dilated" not in prims, prims
    grads = [jax.grad(lambda x, m=m: jnp.sum(m(x) ** 2))(x) for m in (ours, ref)]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-4, atol=1e-4)


def test_bfloat16_and_dtype_promotion_follow_nnx_conv():
    ours = PointwiseConv(4, 4, (1, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ref = nnx.Conv(4, 4, (1, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 3, 4)), jnp.float32)
    got, want = ours(x), ref(x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs", [dict(strides=(2, 2)), dict(padding=((1, 1), (1, 1))), dict(kernel_dilation=(2, 2))])
def test_other_settings_take_the_convolution(kwargs):
    ours = PointwiseConv(4, 5, (1, 1), rngs=nnx.Rngs(0), **kwargs)
    ref = nnx.Conv(4, 5, (1, 1), rngs=nnx.Rngs(0), **kwargs)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 6, 4)), jnp.float32)
    assert "conv_general_dilated" in _primitives(lambda x: ours(x), x)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)


def test_the_models_shortcuts_are_pointwise():
    assert isinstance(conv2d(4, 8, 1, rngs=nnx.Rngs(0)), PointwiseConv)
    assert type(conv2d(4, 8, 3, rngs=nnx.Rngs(0))) is nnx.Conv
    assert type(conv2d(4, 8, 1, stride=2, rngs=nnx.Rngs(0))) is nnx.Conv
    assert isinstance(ResnetBlock2D(32, 64, temb_channels=None, rngs=nnx.Rngs(0)).conv_shortcut, PointwiseConv)
    assert isinstance(TemporalResnetBlock(32, 64, temb_channels=None, rngs=nnx.Rngs(0)).conv_shortcut, PointwiseConv)
