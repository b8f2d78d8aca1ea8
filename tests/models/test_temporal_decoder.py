"""The temporal decoder on its own: built from an image VAE it decodes exactly as the image decoder;
chunked decode semantics and memory; encode on images and videos."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.random_params import random_model, randomize
from vldm_jax.checkpoints.store import class_name_of_module
from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, AutoencoderKLTemporalDecoder

# What SD VAEs have and the diffusers temporal decoder lacks: a post_quant_conv, and a two-resnet mid block
# (here at layers_per_block=1); 16 norm groups to check the groups travel.
IMAGE_CONFIG = AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                   layers_per_block=1, norm_num_groups=16, sample_size=16)


# Module-level jitted functions, graphdef static, so tests of models of one structure share compilations.
@functools.partial(jax.jit, static_argnums=(0, 3))
def decode(graphdef, state, z, chunk=None):
    return nnx.merge(graphdef, state).decode(z, decode_chunk_size=chunk)


@functools.partial(jax.jit, static_argnums=(0, 3))
def decode_folded(graphdef, state, z, num_frames):
    return nnx.merge(graphdef, state).decode(z, num_frames=num_frames)


@functools.partial(jax.jit, static_argnums=0)
def decode_video(graphdef, state, z):
    return nnx.merge(graphdef, state).decode_video(z)


@functools.partial(jax.jit, static_argnums=0)
def encode(graphdef, state, x):
    post = nnx.merge(graphdef, state).encode(x)
    return post.mean, post.logvar


def latents(b, f, seed=0, hw=8):
    return jax.random.normal(jax.random.key(seed), (b, f, hw, hw, 4))


@pytest.fixture(scope="module")
def image_vae():
    return random_model(lambda: AutoencoderKL(IMAGE_CONFIG, rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(scope="module")
def image_initialised(image_vae):
    return AutoencoderKLTemporalDecoder.from_image_vae(image_vae, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def model(image_initialised):
    """Same structure, every temporal layer random too (so chunking changes outputs)."""
    return randomize(image_initialised, seed=2)


# ------------------------------------------------------------------------------------ from an image VAE

def test_image_initialised_decoder_equals_image_decoder(image_vae, image_initialised):
    video = image_initialised
    cfg = video.config
    assert cfg.use_post_quant_conv and cfg.norm_num_groups == 16 and cfg.mid_block_layers == 2
    assert cfg.scaling_factor == image_vae.config.scaling_factor
    b, f = 2, 4
    z = latents(b, f, seed=4)
    gi, si = nnx.split(image_vae)
    per_frame = jax.jit(lambda s, z: nnx.merge(gi, s).decode(z))(si, z.reshape((b * f,) + z.shape[2:]))
    per_frame = per_frame.reshape((b, f) + per_frame.shape[1:])
    gv, sv = nnx.split(video)
    out = decode_video(gv, sv, z)
    err = float(jnp.max(jnp.abs(out - per_frame)))
    print(f"image-initialised temporal decoder vs image decoder: max abs diff {err:.2e}")
    assert out.shape == (b, f, 16, 16, 3)
    assert err < 1e-5

    # The encoder is the image encoder.
    x = jax.random.uniform(jax.random.key(5), (b, f, 16, 16, 3), minval=-1, maxval=1)
    mean, _ = encode(gv, sv, x)
    ref = jax.jit(lambda s, x: nnx.merge(gi, s).encode(x).mean)(si, x.reshape((b * f, 16, 16, 3)))
    np.testing.assert_allclose(mean.reshape(ref.shape), ref, atol=1e-6, rtol=0)

    # The temporal layers are live: disturbing one changes the frames.
    moved = nnx.clone(video)
    moved.decoder.time_conv_out.bias[...] = moved.decoder.time_conv_out.bias[...] + 0.1
    gm, sm = nnx.split(moved)
    assert float(jnp.max(jnp.abs(decode_video(gm, sm, z) - out))) > 0.05


def test_from_image_vae_copies_every_spatial_weight(image_vae, image_initialised):
    img = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(image_vae))}
    vid = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(image_initialised))}
    spatial = [p for p in vid if not any("temporal" in str(k) or str(k).startswith("time_") for k in p)]
    assert len(spatial) == len(img)
    up = ("decoder", "up_blocks", 1, "resnets", 0)
    np.testing.assert_array_equal(vid[up + ("spatial_res_block", "conv1", "kernel")], img[up + ("conv1", "kernel")])
    np.testing.assert_array_equal(vid[("decoder", "mid_block", "resnets", 1, "spatial_res_block", "norm2", "scale")],
                                  img[("decoder", "mid_block", "resnets", 1, "norm2", "scale")])
    np.testing.assert_array_equal(vid[("post_quant_conv", "kernel")], img[("post_quant_conv", "kernel")])
    tco = vid[("decoder", "time_conv_out", "kernel")]
    assert tco.shape == (3, 1, 1, 3, 3)
    np.testing.assert_array_equal(tco[1, 0, 0], np.eye(3))
    assert not np.any(tco[0]) and not np.any(tco[2])
    block = ("decoder", "up_blocks", 0, "resnets", 1, "temporal_res_block")
    assert not np.any(vid[block + ("conv2", "kernel")]) and np.std(vid[block + ("conv1", "kernel")]) > 0


# ------------------------------------------------------------------------------------------ decoding API

def test_chunked_decode_is_independent_chunks(model):
    g, s = nnx.split(model)
    z = latents(1, 6, seed=6)
    chunked = decode(g, s, z, 2)
    pieces = jnp.concatenate([decode_video(g, s, z[:, i:i + 2]) for i in range(0, 6, 2)], axis=1)
    np.testing.assert_allclose(chunked, pieces, atol=1e-5, rtol=0)
    # A chunk as long as all frames is the full decode; the full decode mixes information across chunks.
    full = decode_video(g, s, z)
    np.testing.assert_allclose(decode(g, s, z, 6), full, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(full - chunked))) > 1e-3


def test_chunks_run_over_batch_and_frames_together(model):
    """diffusers flattens (B, F) before chunking; a remainder chunk is decoded on its own."""
    g, s = nnx.split(model)
    z = latents(2, 3, seed=7)
    flat = z.reshape((1, 6) + z.shape[2:])
    expected = jnp.concatenate([decode_video(g, s, flat[:, :4]), decode_video(g, s, flat[:, 4:])], axis=1)
    np.testing.assert_allclose(decode(g, s, z, 4), expected.reshape((2, 3) + expected.shape[2:]), atol=1e-5, rtol=0)


def test_folded_latents_and_errors(model):
    g, s = nnx.split(model)
    z = latents(1, 6, seed=8)
    folded = z.reshape((6,) + z.shape[2:])
    np.testing.assert_allclose(decode_folded(g, s, folded, 6), decode_video(g, s, z)[0], atol=1e-6, rtol=0)
    # Shapes and argument checks without compiling.
    shape = lambda fn, *a: jax.eval_shape(fn, *a).shape  # noqa: E731
    assert shape(lambda z: model.decode(z), folded) == (6, 16, 16, 3)  # num_frames=1: independent images
    assert shape(lambda z: model.decode(z, decode_chunk_size=4), folded) == (6, 16, 16, 3)
    with pytest.raises(ValueError, match="num_frames"):
        jax.eval_shape(lambda z: model.decode(z, num_frames=4), z)
    with pytest.raises(ValueError, match="multiple of num_frames"):
        jax.eval_shape(lambda z: model.decode(z, num_frames=4), folded)
    with pytest.raises(ValueError, match="positive"):
        jax.eval_shape(lambda z: model.decode(z, decode_chunk_size=0), z)


def test_encode_images_and_videos(model):
    g, s = nnx.split(model)
    x = jax.random.uniform(jax.random.key(9), (2, 4, 16, 16, 3), minval=-1, maxval=1)
    mean, logvar = encode(g, s, x)
    img_mean, img_logvar = encode(g, s, x.reshape((8, 16, 16, 3)))
    assert mean.shape == (2, 4, 8, 8, 4) and img_mean.shape == (8, 8, 8, 4)
    np.testing.assert_allclose(mean.reshape(img_mean.shape), img_mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(logvar.reshape(img_logvar.shape), img_logvar, atol=1e-6, rtol=0)
    from vldm_jax.models.autoencoder import DiagonalGaussian
    video_kl = DiagonalGaussian(mean, logvar).kl()
    assert video_kl.shape == (2,)
    np.testing.assert_allclose(video_kl, DiagonalGaussian(img_mean, img_logvar).kl().reshape(2, 4).sum(1), rtol=1e-5)
    assert jax.eval_shape(model, x).shape == x.shape
    assert jax.eval_shape(model, x[:, 0]).shape == (2, 16, 16, 3)


def test_chunked_decode_memory_does_not_grow_with_frames(model):
    """XLA's buffer assignment for decoding 16 and 64 frames in chunks of 8: the working memory (temp) is
    that of one chunk; only the output grows."""
    g, s = nnx.split(model)
    fn = jax.jit(lambda s, z: nnx.merge(g, s).decode(z, decode_chunk_size=8))
    stats = {}
    for f in (16, 64):
        z = jax.ShapeDtypeStruct((1, f, 8, 8, 4), jnp.float32)
        ma = fn.lower(s, z).compile().memory_analysis()
        assert ma is not None, "XLA reported no memory analysis for the chunked decode"
        stats[f] = (ma.temp_size_in_bytes, ma.output_size_in_bytes)
    print(f"chunk 8: temp bytes 16 frames {stats[16][0]}, 64 frames {stats[64][0]}; "
          f"output bytes {stats[16][1]} / {stats[64][1]}")
    assert stats[64][1] == 4 * stats[16][1]
    assert abs(stats[64][0] - stats[16][0]) <= 0.01 * stats[16][0]
    assert abs(stats[64][0] - stats[16][0]) < stats[64][1] - stats[16][1]


def test_registered_family(model):
    from vldm_jax.checkpoints.families import FAMILIES

    assert class_name_of_module(model) == "AutoencoderKLTemporalDecoder"
    assert FAMILIES["AutoencoderKLTemporalDecoder"].config_cls == "AutoencoderKLTemporalDecoderConfig"


def _equal_with_and_without(model, configure, frames):
    """Loss, output and gradients of the decoder's parameters with ``configure(decoder, True)`` equal those with
    ``configure(decoder, False)``; returns the two jaxprs of the loss (on, off) for checks of what changed."""
    graphdef, state = nnx.split(model)
    z = latents(1, frames, hw=4)

    def loss(state, on):
        vae = nnx.merge(graphdef, state)
        configure(vae.decoder, on)
        out = vae.decode(z)
        return jnp.mean(out ** 2) + jnp.mean(out[:, :, :3]), out

    ((v0, out0), g0), ((v1, out1), g1) = jax.jit(
        lambda s: [jax.value_and_grad(loss, has_aux=True)(s, on) for on in (False, True)])(state)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    return [jax.make_jaxpr(lambda s: loss(s, on))(state).jaxpr for on in (True, False)]


def test_remat_gives_the_same_gradients(model):
    # set_remat(True): every spatio-temporal residual block is recomputed in the backward pass (nn/remat.py).
    on, off = _equal_with_and_without(model, lambda dec, on: dec.set_remat(on), frames=3)
    assert "name=_recomputed" in str(on) and "name=_recomputed" not in str(off)  # nn/remat.py's custom_vjp


def test_branches_give_the_same_decode_and_gradients(model):
    # set_branches(4): the full-resolution per-frame layers run as 4 independent pieces of frames and the 3D
    # residual blocks as row pieces with summed GroupNorm statistics (nn/branches.py). The tiny model is below
    # the automatic threshold (1 piece), so the count is explicit.
    on, off = _equal_with_and_without(model, lambda dec, on: dec.set_branches(4 if on else 1), frames=4)
    assert len(on.eqns) > len(off.eqns)  # the pieces are separate operations
