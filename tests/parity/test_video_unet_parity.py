"""Parity of our video U-Net with diffusers ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion)
on tiny random models saved with ``save_pretrained`` and loaded through ``vldm_jax.load_model``."""

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
from vldm_jax.errors import CheckpointError  # noqa: E402
from vldm_jax.models.roles import count_params  # noqa: E402
from vldm_jax.models.unet import UNetSpatioTemporalConditionModel  # noqa: E402

# Channels are multiples of 32: SVD hard-codes 32 groups in every GroupNorm.
ONE_LAYER = dict(
    sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=24, num_attention_heads=(2, 4), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24, num_frames=3,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
)
# Two layers per block (three in the up path), one head of 32 channels, two transformer layers in the
# first down and last up block, one in the mid block.
TWO_LAYERS = dict(
    sample_size=8, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
    cross_attention_dim=16, num_attention_heads=(1, 2), transformer_layers_per_block=(2, 1),
    addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, num_frames=5,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
)


# LLVM's optimisations cost more compile time than these tiny models ever run; XLA's numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class Pair:
    """A perturbed torch SVD U-Net, saved with save_pretrained and loaded back with load_model; one jitted forward."""

    def __init__(self, kwargs, seed, folder):
        torch.manual_seed(seed)
        self.torch = diffusers.UNetSpatioTemporalConditionModel(**kwargs).eval()
        with torch.no_grad():  # zero-initialised and unit parameters would hide mistakes; perturb everything
            for p in self.torch.parameters():
                p.add_(0.1 * torch.randn_like(p))
        self.torch.save_pretrained(folder, safe_serialization=True)
        self.folder = folder
        self.model = vldm_jax.load_model(folder)
        graphdef, self.state = nnx.split(self.model)
        self.forward = jax.jit(lambda state, x, t, ctx, ids: nnx.merge(graphdef, state)(x, t, ctx, ids),
                               compiler_options=FAST_COMPILE)

    def compare(self, rng, b, f, hw, t, seq=1):
        c = self.torch.config
        x = rng.standard_normal((b, f, *hw, c.in_channels)).astype(np.float32)
        ctx = rng.standard_normal((b, seq, c.cross_attention_dim)).astype(np.float32)
        n_ids = c.projection_class_embeddings_input_dim // c.addition_time_embed_dim
        ids = (rng.uniform(0, 128, (b, n_ids))).astype(np.float32)
        with torch.no_grad():
            t_torch = torch.as_tensor(t) if np.ndim(t) else t
            ref = self.torch(torch.from_numpy(x.transpose(0, 1, 4, 2, 3)), t_torch, torch.from_numpy(ctx),
                             torch.from_numpy(ids)).sample.numpy().transpose(0, 1, 3, 4, 2)
        out = np.asarray(self.forward(self.state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(ids)))
        assert out.shape == ref.shape
        return _rel_err(out, ref)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return Pair(ONE_LAYER, 0, tmp_path_factory.mktemp("svd_one_layer"))


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    return Pair(TWO_LAYERS, 1, tmp_path_factory.mktemp("svd_two_layers"))


# Each case compiles once (about 10 s on 2 CPU cores), so the cases spread frame counts 2 to 5, scalar and
# batched timesteps, and an odd latent size over three compiles.
def test_one_layer_parity(one_layer):
    err = one_layer.compare(np.random.default_rng(2), 2, 2, (8, 8), 999)
    print(f"svd one layer F=2: rel err {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("frames,hw,t", [(5, (8, 8), np.array([3.0, 517.5], np.float32)), (3, (5, 7), 41)],
                         ids=["f5-batched", "f3-scalar-odd-size"])
def test_two_layers_parity(two_layers, frames, hw, t):
    # 5x7 downsamples to 3x4; the upsampler must follow the skip back to 5x7.
    err = two_layers.compare(np.random.default_rng(10 + frames), 2, frames, hw, t, seq=3)
    print(f"svd two layers F={frames} {hw}: rel err {err:.2e}")
    assert err < 1e-4


def test_loaded_as_svd_family(two_layers):
    m = two_layers.model
    assert isinstance(m, UNetSpatioTemporalConditionModel)
    assert m.config.num_attention_heads == (1, 2) and m.config.num_frames == 5
    assert len(m.down_blocks[0].attentions[0].temporal_transformer_blocks) == 2
    assert len(m.up_blocks[1].attentions[2].temporal_transformer_blocks) == 2
    assert len(m.mid_block.attentions[0].temporal_transformer_blocks) == 1
    # diffusers hard-codes these per block type
    assert m.down_blocks[0].resnets[0].spatial_res_block.norm1.eps == 1e-6
    assert m.down_blocks[1].resnets[0].spatial_res_block.norm1.eps == 1e-5
    assert m.up_blocks[0].resnets[0].temporal_res_block.norm1.eps == 1e-6
    assert m.mid_block.resnets[0].temporal_res_block.norm1.eps == 1e-5
    counts = count_params(m)
    torch_total = sum(p.numel() for p in two_layers.torch.parameters())
    assert counts["total"] == torch_total


def test_missing_temporal_key_is_named(one_layer):
    sd = dict(find_folder_weights(one_layer.folder))
    del sd["down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: .*temporal_transformer_blocks\.0\.attn1\.to_q\.kernel"):
        build_from_state_dict("UNetSpatioTemporalConditionModel", dict(one_layer.torch.config), sd, name="tiny-svd")


def test_needs_added_time_ids(one_layer):
    with pytest.raises(vldm_jax.UserError, match="added_time_ids"):
        jax.eval_shape(lambda s: nnx.merge(nnx.graphdef(one_layer.model), s)(
            jnp.zeros((1, 2, 8, 8, 8)), 1, jnp.zeros((1, 1, 24))), one_layer.state)
