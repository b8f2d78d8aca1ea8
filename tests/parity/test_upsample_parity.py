"""``Upsample2D`` (nearest x2 then a 3x3 conv) against diffusers' ``Upsample2D``: the x2 case runs as one 2x2
convolution at the input's resolution (``nn/resnet.py``, ``upsample2x_conv``), the other output sizes upsample
first. Values, gradients and bfloat16 against the direct form, and that the program really is the smaller one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.jaxprs import all_eqns
from vldm_jax.checkpoints.convert import torch_to_jax_layout
from vldm_jax.nn.resnet import Upsample2D, subpixel_kernel, upsample2x_conv


def _direct(x, kernel, bias):
    """The definition: repeat every pixel 2x2, then a 3x3 SAME convolution."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    y = jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y + bias


@pytest.mark.parametrize("shape,cout", [((2, 5, 7, 6), 4), ((1, 1, 1, 3), 5), ((3, 8, 2, 8), 8)])
def test_matches_the_direct_form(shape, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    got = upsample2x_conv(x, kernel, bias, precision=jax.lax.Precision.HIGHEST)
    want = _direct(x, kernel, bias)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], cout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_one_kernel_entry_lands_where_the_definition_puts_it():
    # Only the centre tap: output (2i + a, 2j + b) = x(i, j) for every phase.
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 1] = 1.0
    x = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4, 1)
    got = np.asarray(upsample2x_conv(x, jnp.asarray(kernel)))[0, :, :, 0]
    np.testing.assert_array_equal(got, np.repeat(np.repeat(np.asarray(x)[0, :, :, 0], 2, 0), 2, 1))
    # Only the top-left tap: output (p, q) = upsampled (p - 1, q - 1), zero on the first row and column.
    kernel[:] = 0
    kernel[0, 0] = 1.0
    got = np.asarray(upsample2x_conv(x, jnp.asarray(kernel)))[0, :, :, 0]
    up = np.repeat(np.repeat(np.asarray(x)[0, :, :, 0], 2, 0), 2, 1)
    np.testing.assert_array_equal(got[1:, 1:], up[:-1, :-1])
    assert not got[0].any() and not got[:, 0].any()
    assert subpixel_kernel(jnp.asarray(kernel)).shape == (2, 2, 1, 4)


def test_gradients_match_the_direct_form():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 3)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(3), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 12, 10, 3)), jnp.float32)

    def loss(fn):
        return lambda x, k, b: jnp.sum(fn(x, k, b) * w)

    ours = jax.grad(loss(lambda x, k, b: upsample2x_conv(x, k, b, precision=jax.lax.Precision.HIGHEST)),
                    argnums=(0, 1, 2))(x, kernel, bias)
    want = jax.grad(loss(_direct), argnums=(0, 1, 2))(x, kernel, bias)
    for got, ref in zip(ours, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_bfloat16_is_no_worse_than_the_direct_form():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 16, 16, 32)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) / 17, jnp.float32)
    bias = jnp.zeros(32, jnp.float32)
    exact = np.asarray(_direct(x, kernel, bias))
    bf = jnp.bfloat16
    ours = upsample2x_conv(x.astype(bf), kernel.astype(bf), bias.astype(bf))
    assert ours.dtype == bf
    direct = _direct(x.astype(bf), kernel.astype(bf), bias.astype(bf))
    err_ours = np.abs(np.asarray(ours, np.float32) - exact).max()
    err_direct = np.abs(np.asarray(direct, np.float32) - exact).max()
    assert err_ours <= 1.5 * err_direct + 1e-3, (err_ours, err_direct)


def test_the_program_convolves_at_the_input_resolution():
    x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
    flops = jax.jit(upsample2x_conv).lower(x, kernel).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
    direct = 2 * 32 * 32 * 9 * 8 * 8
    assert flops < 0.55 * direct, (flops, direct)  # 17 * 17 * 4 * 8 * 32 * 2 = 0.50x, plus the 4x4 kernel sums


@pytest.mark.parametrize("hw,output_size", [((6, 5), None), ((3, 4), (7, 9)), ((4, 4), (8, 8))])
def test_matches_diffusers(hw, output_size):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

    torch.manual_seed(0)
    ref = TorchUpsample2D(6, use_conv=True, out_channels=5).eval()
    ours = Upsample2D(6, 5, rngs=nnx.Rngs(0))
    ours.conv.kernel[...] = jnp.asarray(torch_to_jax_layout(ref.conv.weight.detach().numpy(), (3, 3, 6, 5)))
    ours.conv.bias[...] = jnp.asarray(ref.conv.bias.detach().numpy())
    x = np.random.default_rng(3).standard_normal((2, 6, *hw)).astype(np.float32)  # NCHW
    with torch.no_grad():
        want = ref(torch.from_numpy(x), output_size=output_size).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 1)), output_size=output_size))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_sub_pixel_form_is_the_cpus():
    # Compiled for an accelerator the upsample stays fused into the 3x3 convolution (memory-bound there); both
    # forms give the same values.
    from vldm_jax.parallel.aot import target_platform

    m = Upsample2D(4, 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 5, 4)), jnp.float32)
    cpu = str(jax.make_jaxpr(lambda x: m(x))(x))
    with target_platform("tpu"):  # a new function: traces are cached per function
        tpu = str(jax.make_jaxpr(lambda x: m(x))(x))
        direct = np.asarray(m(x))
    # CPU: the 2x2 convolution's (N, H + 1, W + 1, 4 * C) output; TPU: the rows repeated before the convolution.
    assert "f32[1,6,6,16]" in cpu and "f32[1,10,5,4]" not in cpu
    assert "f32[1,10,5,4]" in tpu and "f32[1,6,6,16]" not in tpu
    np.testing.assert_allclose(np.asarray(m(x)), direct, rtol=1e-5, atol=1e-5)


def test_the_input_gradient_convolves_with_padding():
    # XLA's own transpose of the padded 2x2 convolution is an unpadded one, which XLA:CPU runs 2.5-3x slower than
    # the padded-and-cropped convolution of the hand-written backward (docs/benchmarks.md, session 15).
    x = jnp.ones((1, 6, 5, 4), jnp.float32)
    kernel = jnp.ones((3, 3, 4, 3), jnp.float32)
    grad_x = jax.grad(lambda x, k: jnp.sum(upsample2x_conv(x, k) ** 2))
    pads = [tuple(map(tuple, e.params["padding"])) for e in all_eqns(grad_x, x, kernel)
            if e.primitive.name == "conv_general_dilated"]
    assert all(any(p != (0, 0) for p in pad) for pad in pads), pads
    assert ((0, 1), (0, 1)) in pads
