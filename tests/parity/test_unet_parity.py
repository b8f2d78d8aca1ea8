"""Parity of our U-Net with diffusers ``UNet2DConditionModel`` on tiny random SD1- and SD2-style models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import vldm_jax  # noqa: E402
from vldm_jax.checkpoints.load import build_from_state_dict, find_folder_weights  # noqa: E402
from vldm_jax.errors import CheckpointError, ConfigError  # noqa: E402
from vldm_jax.models.unet import UNet2DConditionConfig  # noqa: E402
from vldm_jax.nn.embeddings import timestep_embedding  # noqa: E402

SD1 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# SD2: linear projections, per-block head counts, upcast attention; v-prediction does not change the net.
# Also covers scale_shift time conditioning, a mid-block scale factor and freq_shift/flip variants.
SD2 = dict(
    sample_size=16, in_channels=4, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
    cross_attention_dim=24, attention_head_dim=(2, 4, 4), norm_num_groups=16, use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=(1, 2, 1),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    resnet_time_scale_shift="scale_shift", mid_block_scale_factor=1.3, flip_sin_to_cos=False, freq_shift=1,
)


def _torch_unet(kwargs, seed):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():  # zero-initialised and unit parameters would hide mistakes; perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class Pair:
    """A torch model saved with save_pretrained, loaded back through our loader, and a jitted forward."""

    def __init__(self, kwargs, seed, folder):
        self.kwargs = kwargs
        self.torch = _torch_unet(kwargs, seed)
        self.torch.save_pretrained(folder, safe_serialization=True)
        self.folder = folder
        self.model = vldm_jax.load_model(folder)
        graphdef, state = nnx.split(self.model)
        self.state = state

        @jax.jit
        def forward(state, x, t, ctx):
            return nnx.merge(graphdef, state)(x, t, ctx)

        self.forward = forward

    def compare(self, x_nchw, t, ctx):
        with torch.no_grad():
            t_torch = torch.as_tensor(t) if np.ndim(t) else t
            ref = self.torch(torch.from_numpy(x_nchw), t_torch, torch.from_numpy(ctx)).sample.numpy()
        out = self.forward(self.state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
        out = np.asarray(out).transpose(0, 3, 1, 2)
        assert out.shape == ref.shape
        return _rel_err(out, ref)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Pair(SD1, 0, tmp_path_factory.mktemp("unet_sd1"))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return Pair(SD2, 1, tmp_path_factory.mktemp("unet_sd2"))


def _inputs(rng, b, c, h, w, s, d):
    return (rng.standard_normal((b, c, h, w)).astype(np.float32),
            rng.standard_normal((b, s, d)).astype(np.float32))


@pytest.mark.parametrize("t", [999, np.array([3.0, 517.5], np.float32)], ids=["scalar", "batched"])
def test_sd1_parity(sd1, t):
    x, ctx = _inputs(np.random.default_rng(0), 2, 4, 16, 16, 7, 32)
    err = sd1.compare(x, t, ctx)
    print(f"sd1 t={t}: rel err {err:.2e}")
    assert err < 1e-4


# The batched case also runs an odd size: 13x11 is not a multiple of 2**num_upsamplers = 4, so each
# upsampler must follow its skip's size (13 -> 7 -> 4 -> 7 -> 13).
@pytest.mark.parametrize("t,hw", [(41, (16, 16)), (np.array([999.0, 250.0], np.float32), (13, 11))],
                         ids=["scalar", "batched-odd-size"])
def test_sd2_parity(sd2, t, hw):
    x, ctx = _inputs(np.random.default_rng(1), 2, 4, *hw, 5, 24)
    err = sd2.compare(x, t, ctx)
    print(f"sd2 t={t} {hw}: rel err {err:.2e}")
    assert err < 1e-4


def test_sd2_heads_follow_attention_head_dim(sd2):
    # diffusers' attention_head_dim is the head count; the width is channels // heads.
    attn = sd2.model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 4
    assert len(sd2.model.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert sd2.model.config.attention_head_dim == (2, 4, 4)


def test_return_skips(sd1):
    graphdef, state = nnx.split(sd1.model)
    out, skips = jax.eval_shape(
        lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 16, 16, 4)), 10, jnp.zeros((1, 3, 32)), return_skips=True),
        state)
    assert out.shape == (1, 16, 16, 4)
    # conv_in, 2 resnets and the downsampler of block 0, 2 resnets of the last block
    assert [s.shape[1:] for s in skips] == [(16, 16, 32)] * 3 + [(8, 8, 32)] + [(8, 8, 64)] * 2


def test_remat_matches(sd1):
    # The mid block (resnet, transformer, resnet) exercises remat around both kinds of layer; a whole
    # U-Net would only add compile time.
    graphdef, state = nnx.split(sd1.model.mid_block)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 64))
    emb = jax.random.normal(jax.random.key(1), (1, 128))
    ctx = jax.random.normal(jax.random.key(2), (1, 3, 32))

    def loss(state, remat):
        block = nnx.merge(graphdef, state)
        block.remat = remat
        return jnp.mean(block(x, emb, ctx) ** 2)

    assert "remat" in str(jax.make_jaxpr(lambda s: loss(s, True))(state))  # jax.checkpoint's primitive
    both = jax.jit(lambda s: (jax.value_and_grad(loss)(s, False), jax.value_and_grad(loss)(s, True)))
    (v0, g0), (v1, g1) = both(state)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dim,flip,shift,scale", [(8, True, 0, 1.0), (7, False, 1, 1.0), (10, True, 1, 2.5)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift, scale):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                 scale=scale).numpy()
    out = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale))
    np.testing.assert_allclose(out, ref, atol=2e-5)


def _build(sd, state_dict):
    return build_from_state_dict("UNet2DConditionModel", dict(sd.torch.config), state_dict, name="tiny-unet")


def test_missing_key_is_named(sd1):
    sd = dict(find_folder_weights(sd1.folder))
    del sd["down_blocks.0.attentions.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: down_blocks\.0\.attentions\.1\.proj_in\.kernel"):
        _build(sd1, sd)


def test_renamed_key_is_named(sd1):
    sd = dict(find_folder_weights(sd1.folder))
    sd["mid_block.resnets.1.conv9.weight"] = sd.pop("mid_block.resnets.1.conv1.weight")
    with pytest.raises(CheckpointError, match=r"unexpected keys: mid_block\.resnets\.1\.conv9\.weight"):
        _build(sd1, sd)


def test_misshaped_key_is_named(sd1):
    sd = dict(find_folder_weights(sd1.folder))
    sd["up_blocks.1.resnets.0.time_emb_proj.weight"] = np.zeros((32, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: up_blocks\.1\.resnets\.0\.time_emb_proj\.weight"):
        _build(sd1, sd)


@pytest.mark.parametrize("bad", [dict(class_embed_type="timestep"), dict(dual_cross_attention=True),
                                 dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
                                 dict(addition_embed_type="text_time")])
def test_unsupported_config_raises(bad):
    cfg = {k: v for k, v in SD1.items()}
    cfg.update(bad)
    with pytest.raises(ConfigError):
        UNet2DConditionConfig(**cfg)
