"""Parity of the x4 upscaler with diffusers: the U-Net with noise-level class embeddings and per-block
``only_cross_attention``, the real stabilityai/stable-diffusion-x4-upscaler layout (shapes only), and the whole
``StableDiffusionUpscalePipeline`` on a tiny random folder with the same noise."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from tests.helpers.tiny_upscaler import X4_UNET, X4_VAE, make_tiny_upscaler_folder  # noqa: E402
from vldm_jax.checkpoints import convert  # noqa: E402
from vldm_jax.checkpoints.load import load_model  # noqa: E402
from vldm_jax.errors import UserError  # noqa: E402
from vldm_jax.models.config import config_from_dict  # noqa: E402
from vldm_jax.pipelines.upscale import UpscalePipeline  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_upscaler_folder(tmp_path_factory.mktemp("x4"))


@pytest.fixture(scope="module")
def torch_pipe(folder):
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    return UpscalePipeline.from_pretrained(folder)


def test_unet_matches_diffusers_with_class_labels_and_only_cross_attention(folder, torch_pipe):
    unet = load_model(folder / "unet")
    blocks = [unet.down_blocks[1], unet.down_blocks[2], unet.up_blocks[0], unet.up_blocks[1]]
    flags = [b.attentions[0].transformer_blocks[0].only_cross_attention for b in blocks]
    assert flags == [True, False, False, True]  # down (T, T, F) -> up reversed; the mixed case is covered
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 16, 12)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    labels = np.array([20, 311])
    t = np.array([10, 700])
    with torch.no_grad():
        ref = torch_pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                              class_labels=torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
                          class_labels=jnp.asarray(labels)))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
    # The class label reaches the output: another noise level, another prediction.
    other = np.asarray(unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
                            class_labels=jnp.asarray(labels[::-1].copy())))
    assert np.abs(other - out).max() > 1e-3
    with pytest.raises(UserError, match="class_labels"):
        unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))


def test_real_x4_upscaler_layout_maps_one_to_one():
    """Every key of the real model's U-Net and VAE (built on torch's meta device: shapes only) has exactly one
    place of the right shape in ours, and nothing of ours is left over."""
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from vldm_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    for torch_cls, cfg_cls, cls, kwargs, table in (
            (diffusers.UNet2DConditionModel, UNet2DConditionConfig, UNet2DConditionModel, X4_UNET, convert.UNET_RENAME),
            (diffusers.AutoencoderKL, AutoencoderKLConfig, AutoencoderKL, X4_VAE, convert.VAE_RENAME)):
        with torch.device("meta"):
            model = torch_cls(**kwargs)
        sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
        config = config_from_dict(cfg_cls, dict(kwargs))
        _, abstract = convert.abstract_module(lambda rngs: cls(config, rngs=rngs))
        arrays = convert.convert_state_dict(sd, abstract, rename=table, name=cls.__name__)  # raises on any mismatch
        assert len(arrays) == len(sd)
    assert config_from_dict(UNet2DConditionConfig, X4_UNET).num_class_embeds == 1000


@pytest.mark.parametrize("guidance,noise_level", [(6.0, 20), (1.0, 150)])
def test_pipeline_matches_diffusers(torch_pipe, ours, guidance, noise_level):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (1, 16, 12, 3)).astype(np.float32)
    # diffusers draws the low-res noise, then the latents, from its generator; we hand ours the same arrays.
    g = torch.Generator().manual_seed(0)
    low_res_noise = torch.randn((1, 3, 16, 12), generator=g)
    latents = torch.randn((1, 4, 16, 12), generator=g)
    ref = torch_pipe(prompt=["a cat"], image=torch.from_numpy(image.transpose(0, 3, 1, 2)),
                     generator=torch.Generator().manual_seed(0), latents=latents, num_inference_steps=3,
                     guidance_scale=guidance, noise_level=noise_level, output_type="np").images
    out = ours(image, "a cat", num_inference_steps=3, guidance_scale=guidance, noise_level=noise_level,
               latents=latents.numpy().transpose(0, 2, 3, 1),
               low_res_noise=low_res_noise.numpy().transpose(0, 2, 3, 1))
    assert out.shape == ref.shape == (1, 64, 48, 3)
    err = np.abs(out - ref).max()
    assert err < 2e-3, err


def test_pipeline_rejects_bad_noise_level(ours):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(UserError, match="noise_level"):
        ours(image, num_inference_steps=1, noise_level=ours.max_noise_level + 1)
