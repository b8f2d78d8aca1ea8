"""Parity of our AutoencoderKL with diffusers' on a tiny random model (float32, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vldm_jax.checkpoints.load import load_model  # noqa: E402
from vldm_jax.errors import ConfigError  # noqa: E402
from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian  # noqa: E402

TOL = 1e-4
TINY = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4, sample_size=32,
)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY).eval()
    # Fresh init has unit norm scales and zero biases; perturb everything so a swapped or dropped
    # parameter shows up in the outputs.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def saved_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(torch_vae, images):
    with torch.no_grad():
        post = torch_vae.encode(nchw(images)).latent_dist
        z = post.mean
        dec = torch_vae.decode(z).sample
        full = torch_vae(nchw(images), sample_posterior=False).sample
    return dict(mean=nhwc(post.mean), logvar=nhwc(post.logvar), decode=nhwc(dec), forward=nhwc(full))


def jitted(model):
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return state, encode, decode, forward


@pytest.fixture(scope="module")
def ours(saved_dir):
    model = load_model(saved_dir)
    return model, jitted(model)


def test_config_roundtrip(ours):
    model, _ = ours
    assert isinstance(model, AutoencoderKL)
    cfg = model.config
    assert cfg.block_out_channels == (32, 64) and cfg.latent_channels == 4
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.shift_factor is None
    assert cfg.downscale_factor == 2


def test_encode_parity(ours, images, reference):
    _, (state, encode, _, _) = ours
    post = encode(state, jnp.asarray(images))
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (2, 16, 16, 4)
    e_mean = rel_err(post.mean, reference["mean"])
    e_logvar = rel_err(post.logvar, reference["logvar"])
    print(f"encode mean rel err {e_mean:.2e}, logvar rel err {e_logvar:.2e}")
    assert e_mean < TOL and e_logvar < TOL


def test_decode_parity(ours, reference):
    _, (state, _, decode, _) = ours
    out = decode(state, jnp.asarray(reference["mean"]))
    assert out.shape == (2, 32, 32, 3)
    err = rel_err(out, reference["decode"])
    print(f"decode rel err {err:.2e}")
    assert err < TOL


def test_forward_parity(ours, images, reference):
    _, (state, _, _, forward) = ours
    err = rel_err(forward(state, jnp.asarray(images)), reference["forward"])
    print(f"forward (mode) rel err {err:.2e}")
    assert err < TOL


def test_sample_is_mean_plus_std_eps(ours, images):
    _, (state, encode, _, _) = ours
    post = encode(state, jnp.asarray(images))
    key = jax.random.key(3)
    s = post.sample(key)
    eps = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(s, post.mean + jnp.exp(0.5 * post.logvar) * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(post.std, jnp.exp(0.5 * post.logvar), rtol=1e-6)
    assert not np.allclose(s, post.mode())
    # Different keys give different samples, same key the same one.
    assert not np.allclose(s, post.sample(jax.random.key(4)))
    np.testing.assert_array_equal(s, post.sample(key))


def test_logvar_is_clipped():
    post = DiagonalGaussian.from_moments(jnp.concatenate([jnp.zeros((1, 2, 2, 4)),
                                                          jnp.full((1, 2, 2, 4), 100.0)], axis=-1))
    assert float(post.logvar.max()) == 20.0
    post = DiagonalGaussian.from_moments(jnp.full((1, 2, 2, 8), -100.0))
    assert float(post.logvar.min()) == -30.0


def test_old_attention_layout(torch_vae, tmp_path_factory, images, reference):
    """diffusers < 0.14 names (query/key/value/proj_attn) with 1x1-conv-shaped weights load the same."""
    from safetensors.torch import save_file

    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in torch_vae.state_dict().items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if v.ndim == 2:
                    v = v[:, :, None, None]
        sd[k] = v.contiguous()
    assert any(".query.weight" in k for k in sd) and any(".proj_attn.bias" in k for k in sd)
    path = tmp_path_factory.mktemp("vae_old")
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY}))
    state, _, _, forward = jitted(load_model(path))
    err = rel_err(forward(state, jnp.asarray(images)), reference["forward"])
    print(f"old-layout forward rel err {err:.2e}")
    assert err < TOL


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError):
        AutoencoderKLConfig(block_out_channels=(32, 48), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    with pytest.raises(ConfigError):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",))
