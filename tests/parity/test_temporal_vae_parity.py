"""Parity of our AutoencoderKLTemporalDecoder with diffusers' on tiny random models (float32, CPU):
encode, full decode, chunked decode (against the SVD pipeline's own ``decode_latents``), and the Stability
single-file layout."""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vldm_jax.checkpoints.load import load_model  # noqa: E402
from vldm_jax.checkpoints.temporal_vae_single_file import load_temporal_vae_single_file, split_temporal_vae_single_file  # noqa: E402
from vldm_jax.errors import CheckpointError, ConfigError  # noqa: E402
from vldm_jax.models.autoencoder import AutoencoderKLTemporalDecoder, AutoencoderKLTemporalDecoderConfig  # noqa: E402

TOL = 1e-4
# "svd": two resnets in the mid block (attention runs), as SVD. "deep": three levels and one mid resnet
# (diffusers then never runs the mid attention).
CONFIGS = {
    "svd": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                block_out_channels=[32, 64], layers_per_block=2, latent_channels=4, sample_size=32),
    "deep": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                 block_out_channels=[32, 32, 64], layers_per_block=1, latent_channels=4, sample_size=32),
}
SIZE = 16


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def to_torch_frames(x):
    """(B, F, H, W, C) -> torch (B*F, C, H, W)."""
    b, f = x.shape[:2]
    return torch.from_numpy(np.ascontiguousarray(x.reshape((b * f,) + x.shape[2:]).transpose(0, 3, 1, 2)))


def from_torch_frames(t, b):
    a = t.detach().numpy().transpose(0, 2, 3, 1)
    return a.reshape((b, -1) + a.shape[1:])


def build_torch(name, seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLTemporalDecoder(**CONFIGS[name]).eval()
    # Fresh init has unit norm scales, zero biases and mix_factor 0; perturb everything so a swapped or
    # dropped parameter shows.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


# Module-level jitted functions with the graphdef static: models of the same structure (a diffusers folder
# and the same weights from a single file) share one compilation.
@functools.partial(jax.jit, static_argnums=0)
def encode_mean(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x).mean


@functools.partial(jax.jit, static_argnums=(0, 3))
def decode(graphdef, state, z, chunk=None):
    return nnx.merge(graphdef, state).decode(z, decode_chunk_size=chunk)


class Pair:
    """A torch model and our model loaded from its saved folder."""

    def __init__(self, name, tmp_path_factory):
        self.torch = build_torch(name)
        path = tmp_path_factory.mktemp(f"tvae_{name}")
        self.torch.save_pretrained(path)
        self.ours = load_model(path)
        self.graphdef, self.state = nnx.split(self.ours)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {name: Pair(name, tmp_path_factory) for name in CONFIGS}


def latents_for(name, b, f, seed):
    ds = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, f, SIZE // ds, SIZE // ds, 4)).astype(np.float32)


def test_load_and_config(pairs):
    model = pairs["svd"].ours
    assert isinstance(model, AutoencoderKLTemporalDecoder)
    cfg = model.config
    assert cfg.block_out_channels == (32, 64) and cfg.layers_per_block == 2 and cfg.latent_channels == 4
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.downscale_factor == 2
    assert model.post_quant_conv is None and model.quant_conv is not None
    assert len(pairs["deep"].ours.decoder.mid_block.resnets) == 1


# Shapes are shared with the chunked and single-file tests so compilations are reused.
@pytest.mark.parametrize("name,b,f", [("svd", 2, 5), ("deep", 1, 6)])
def test_encode_parity(pairs, name, b, f):
    p = pairs[name]
    x = np.random.default_rng(f).uniform(-1, 1, (b, f, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        ref = from_torch_frames(p.torch.encode(to_torch_frames(x)).latent_dist.mean, b)
    ours = encode_mean(p.graphdef, p.state, jnp.asarray(x))
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"{name} B={b} F={f}: encode mean rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("name,b,f", [("svd", 2, 5), ("svd", 1, 3), ("deep", 1, 6)])
def test_decode_parity(pairs, name, b, f):
    p = pairs[name]
    z = latents_for(name, b, f, seed=10 + f)
    with torch.no_grad():
        ref = from_torch_frames(p.torch.decode(to_torch_frames(z), num_frames=f).sample, b)
    ours = decode(p.graphdef, p.state, jnp.asarray(z))
    assert ours.shape == (b, f, SIZE, SIZE, 3)
    err = rel_err(ours, ref)
    print(f"{name} B={b} F={f}: decode rel err {err:.2e}")
    assert err < TOL


def svd_decode_latents(vae, latents, num_frames, chunk):
    """The SVD pipeline's own ``decode_latents`` (scales by 1/scaling_factor, then decodes chunk by chunk)."""
    from diffusers import StableVideoDiffusionPipeline

    holder = types.SimpleNamespace(vae=vae)
    with torch.no_grad():
        frames = StableVideoDiffusionPipeline.decode_latents(holder, latents, num_frames, chunk)
    return frames.numpy().transpose(0, 2, 3, 4, 1)  # (B, C, F, H, W) -> (B, F, H, W, C)


@pytest.mark.parametrize("name,b,f,k", [
    ("svd", 2, 5, 2),   # chunks straddle the two videos, as in diffusers
    ("deep", 1, 6, 4),  # a shorter last chunk
])
def test_chunked_decode_parity(pairs, name, b, f, k):
    p = pairs[name]
    scaled = latents_for(name, b, f, seed=20 + f) * p.ours.config.scaling_factor
    lat_t = torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 1, 4, 2, 3)))  # (B, F, C, h, w)
    ref = svd_decode_latents(p.torch, lat_t, f, k)
    z = jnp.asarray(scaled) / p.ours.config.scaling_factor
    ours = decode(p.graphdef, p.state, z, k)
    err = rel_err(ours, ref)
    print(f"{name} B={b} F={f} chunk={k}: chunked decode rel err {err:.2e}")
    assert err < TOL
    # Chunking must change the result, or the comparison proves nothing.
    assert rel_err(decode(p.graphdef, p.state, z), ref) > 1e-3


# ------------------------------------------------------------------------------------------ single file

SGM_TEMPORAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}


def to_sgm_key(key, levels):
    """diffusers AutoencoderKLTemporalDecoder key -> Stability sgm VideoDecoder key (written independently of
    the loader's table, from the sgm module names)."""
    def resnet_suffix(rest):
        rest = rest.replace("spatial_res_block.conv_shortcut.", "nin_shortcut.")
        rest = rest.replace("spatial_res_block.", "").replace("time_mixer.mix_factor", "mix_factor")
        m = re.fullmatch(r"temporal_res_block\.(\w+)\.(weight|bias)", rest)
        if m:
            rest = f"time_stack.{SGM_TEMPORAL[m.group(1)]}.{m.group(2)}"
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"decoder\.time_conv_out\.(.+)", lambda m: f"decoder.conv_out.time_mix_conv.{m[1]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet_suffix(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet_suffix(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.+)",
         lambda m: f"{m[1]}.mid.attn_1.norm.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.(.+)",
         lambda m: f"{m[1]}.mid.attn_1.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.(.+)",
         lambda m: f"{m[1]}.mid.attn_1.proj_out.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet_suffix(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(m)
    return key


def sgm_state_dict(torch_vae):
    levels = len(torch_vae.config.block_out_channels)
    out = {}
    for k, v in torch_vae.state_dict().items():
        v = v.numpy()
        if re.fullmatch(r".+\.attentions\.0\.to_(q|k|v|out\.0)\.weight", k):
            v = v[:, :, None, None]  # sgm's attention projections are 1x1 convs
        out[to_sgm_key(k, levels)] = v
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_file_keys_map_back_exactly(pairs, name):
    ref = {k: v.numpy() for k, v in pairs[name].torch.state_dict().items()}
    sgm = sgm_state_dict(pairs[name].torch)
    assert any(".time_stack.in_layers.2." in k for k in sgm) and "decoder.conv_out.time_mix_conv.weight" in sgm
    assert any(re.fullmatch(r"decoder\.up\.\d+\.block\.\d+\.mix_factor", k) for k in sgm)
    config, converted = split_temporal_vae_single_file(sgm)
    assert sorted(converted) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(converted[k], ref[k], err_msg=k)
    # The converted dict is a valid diffusers state dict (strict load) and the config rebuilds the model.
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k in CONFIGS[name] and k != "sample_size"}
    assert cfg == {k: v for k, v in CONFIGS[name].items() if k != "sample_size"}
    again = diffusers.AutoencoderKLTemporalDecoder(**CONFIGS[name])
    again.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in converted.items()}, strict=True)


def test_single_file_svd_layout_parity(pairs, tmp_path):
    """A full SVD-style file: the decoder under first_stage_model., the encoder + quant_conv under the
    conditioning embedder; other networks' keys ignored. Loaded from a .safetensors path."""
    from safetensors.numpy import save_file

    p = pairs["svd"]
    sgm = sgm_state_dict(p.torch)
    full = {}
    for k, v in sgm.items():
        if k.startswith("decoder."):
            full["first_stage_model." + k] = v
        else:
            full["conditioner.embedders.3.encoder." + k] = v
            if k.startswith("encoder."):  # SVD's first stage has its own encoder copy; it must not be used
                full["first_stage_model." + k] = np.zeros_like(v)
    full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4), np.float32)
    full["conditioner.embedders.3.encoder.decoder.conv_in.weight"] = np.zeros((4, 4), np.float32)
    path = tmp_path / "svd.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in full.items()}, str(path))
    assert load_temporal_vae_single_file(path).config.sample_size == 768  # SVD's, not in the weights
    model = load_temporal_vae_single_file(path, sample_size=SIZE)
    assert isinstance(model, AutoencoderKLTemporalDecoder)

    b, f = 2, 5
    x = np.random.default_rng(5).uniform(-1, 1, (b, f, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        post = p.torch.encode(to_torch_frames(x)).latent_dist
        ref_mean = from_torch_frames(post.mean, b)
        ref_dec = from_torch_frames(p.torch.decode(post.mean, num_frames=f).sample, b)
    g, s = nnx.split(model)
    mean = encode_mean(g, s, jnp.asarray(x))
    dec = decode(g, s, mean)
    e_enc, e_dec = rel_err(mean, ref_mean), rel_err(dec, ref_dec)
    print(f"single-file (SVD layout): encode rel err {e_enc:.2e}, decode rel err {e_dec:.2e}")
    assert e_enc < TOL and e_dec < TOL


def test_single_file_bare_layout_parity(pairs):
    p = pairs["deep"]
    model = load_temporal_vae_single_file(sgm_state_dict(p.torch), sample_size=SIZE)
    z = latents_for("deep", 1, 6, seed=3)
    with torch.no_grad():
        ref = from_torch_frames(p.torch.decode(to_torch_frames(z), num_frames=6).sample, 1)
    g, s = nnx.split(model)
    err = rel_err(decode(g, s, jnp.asarray(z)), ref)
    print(f"single-file (bare layout): decode rel err {err:.2e}")
    assert err < TOL


def test_single_file_errors(pairs):
    sgm = sgm_state_dict(pairs["svd"].torch)
    image_only = {k: v for k, v in sgm.items() if "time_" not in k and "mix_factor" not in k}
    with pytest.raises(CheckpointError, match="no temporal decoder"):
        split_temporal_vae_single_file(image_only)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint keys"):
        split_temporal_vae_single_file({**sgm, "decoder.bogus.weight": np.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_temporal_vae_single_file({**sgm, "decoder.up.0.block.0.time_stack.bogus.weight": np.zeros(1)})
    missing = dict(sgm)
    del missing["decoder.up.0.block.1.time_stack.out_layers.3.weight"]
    with pytest.raises(CheckpointError, match="missing keys"):
        load_temporal_vae_single_file(missing)


def test_from_image_vae_folder(pairs, tmp_path):
    """The image VAE of a Video LDM temporal decoder may come from a diffusers AutoencoderKL folder."""
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=32).save_pretrained(tmp_path / "image")
    video = AutoencoderKLTemporalDecoder.from_image_vae(load_model(tmp_path / "image"))
    assert video.config.block_out_channels == (32,) and video.post_quant_conv is not None
    pairs["deep"].torch.save_pretrained(tmp_path / "video")
    with pytest.raises(ConfigError, match="expected an AutoencoderKL"):
        AutoencoderKLTemporalDecoder.from_image_vae(load_model(tmp_path / "video"))


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError):
        AutoencoderKLTemporalDecoderConfig(block_out_channels=(32, 48), down_block_types=("DownEncoderBlock2D",) * 2)
    with pytest.raises(ConfigError):
        AutoencoderKLTemporalDecoderConfig(down_block_types=("AttnDownEncoderBlock2D",))
