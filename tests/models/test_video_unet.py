"""The video U-Net made from an image U-Net (Video LDM): identity at initialisation, temporal coupling,
roles of parameters (path filter, spatial swap, temporal-only optimizer), remat and compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import vldm_jax  # noqa: E402
from vldm_jax.errors import ConfigError  # noqa: E402
from vldm_jax.models.roles import (  # noqa: E402
    count_params,
    image_to_video_key,
    is_temporal_path,
    replace_spatial,
    split_params,
    temporal_filter,
    temporal_mask,
    temporal_only,
)
from vldm_jax.models.unet import REMAT_POLICIES, TemporalConfig, UNet2DConditionConfig, VideoUNet, VideoUNetConfig  # noqa: E402
from vldm_jax.nn.branches import set_branches  # noqa: E402
from vldm_jax.nn.temporal import TemporalBasicTransformerBlock, TemporalResnetBlock  # noqa: E402

# No mid block: each layer costs compile time, and the SVD parity test covers the video mid block.
IMAGE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=32, mid_block_type=None,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tiny models: LLVM time dominates, numerics unchanged
B, S = 2, 3
MAX_FOLDED = 10  # the image reference always runs on this many frames, so it compiles once


def _image_unet(folder, seed):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**IMAGE).eval()
    with torch.no_grad():  # non-zero biases and non-unit norms, like a trained checkpoint
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return vldm_jax.load_model(folder)


class Setup:
    def __init__(self, tmp):
        self.image = _image_unet(tmp / "image", 0)
        self.image2 = _image_unet(tmp / "image2", 1)  # a "fine-tuned" image model with the same architecture
        self.video = VideoUNet.from_image_unet(self.image)  # the paper's default: relative frame positions
        self.graphdef, self.state = nnx.split(self.video)
        img_graph = nnx.graphdef(self.image)
        self.image_fn = jax.jit(lambda s, x, t, c: nnx.merge(img_graph, s)(x, t, c), compiler_options=FAST_COMPILE)
        self.video_fn = self.make_video_fn(self.graphdef)

    @staticmethod
    def make_video_fn(graphdef):
        return jax.jit(lambda s, x, t, c, ind: nnx.merge(graphdef, s)(x, t, c, image_only_indicator=ind),
                       compiler_options=FAST_COMPILE)

    def image_per_frame(self, image_state, x, t, ctx):
        """The image U-Net on every frame of ``x (B, F, h, w, C)`` with per-frame timesteps ``t (B, F)``."""
        b, f = x.shape[:2]
        n = b * f
        pad = MAX_FOLDED - n
        xf = jnp.pad(x.reshape((n,) + x.shape[2:]), ((0, pad), (0, 0), (0, 0), (0, 0)))
        tf = jnp.pad(t.reshape(n), (0, pad))
        cf = jnp.pad(jnp.repeat(ctx, f, axis=0), ((0, pad), (0, 0), (0, 0)))
        return self.image_fn(image_state, xf, tf, cf)[:n].reshape(x.shape[:2] + (8, 8, 4))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("video_unet"))


def _inputs(seed, f, b=B):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, f, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 999, (b, f)), jnp.float32)  # per-frame timesteps
    ctx = jnp.asarray(rng.standard_normal((b, S, 16)), jnp.float32)
    return x, t, ctx


def _perturbed(state, seed=0, scale=0.1, logit=-1.0):
    """Temporal parameters randomised (so the temporal branches are no longer the identity) and every
    alpha logit set to ``logit`` (alpha = sigmoid(-1) = 0.27 < 1). Spatial parameters untouched."""
    rng = np.random.default_rng(seed)  # numpy: one jax.random call per parameter shape would compile each
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if is_temporal_path(path):
            if path[-1] == "mix_factor":
                value = jnp.full_like(value, logit)
            else:
                value = value + jnp.asarray(scale * rng.standard_normal(value.shape), value.dtype)
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _leaves(state, filt):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state) if filt(p)}


# ------------------------------------------------------------------------------------------------ roles

@pytest.mark.parametrize("path,temporal", [
    ("down_blocks.0.resnets.0.temporal_res_block.conv1.kernel", True),
    ("down_blocks.0.resnets.0.temporal_res_block.time_emb_proj.kernel", True),
    ("down_blocks.0.resnets.0.time_mixer.mix_factor", True),
    ("mid_block.attentions.0.temporal_transformer_blocks.0.attn1.to_q.kernel", True),
    ("mid_block.attentions.0.temporal_transformer_blocks.0.rel_pos_bias.kernel", True),
    ("up_blocks.1.attentions.0.time_pos_embed.linear_1.bias", True),
    ("up_blocks.1.attentions.0.time_mixer.mix_factor", True),
    ("down_blocks.0.resnets.0.spatial_res_block.time_emb_proj.kernel", False),  # "time_" but spatial
    ("time_embedding.linear_1.kernel", False),
    ("add_embedding.linear_2.bias", False),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel", False),
    ("down_blocks.0.attentions.0.proj_in.kernel", False),
    ("conv_in.kernel", False),
])
def test_is_temporal_path(path, temporal):
    assert is_temporal_path(path) is temporal
    tup = tuple(int(p) if p.isdigit() else p for p in path.split("."))
    assert is_temporal_path(tup) is temporal


def test_spatial_part_is_the_image_unet(setup):
    spatial, temporal = split_params(setup.state)
    image_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(setup.image))}
    spatial_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(spatial)}
    assert {image_to_video_key(k) for k in image_keys} == spatial_keys
    assert image_to_video_key("up_blocks.1.resnets.2.conv_shortcut.kernel") == \
        "up_blocks.1.resnets.2.spatial_res_block.conv_shortcut.kernel"
    assert image_to_video_key("up_blocks.1.attentions.2.proj_in.kernel") == "up_blocks.1.attentions.2.proj_in.kernel"
    counts = count_params(setup.video)
    assert counts["spatial"] == count_params(setup.image)["total"]
    assert counts["temporal"] > 0 and counts["total"] == counts["spatial"] + counts["temporal"]
    mask = temporal_mask(setup.state)
    n_masked = sum(int(np.prod(v.shape)) for v, m in zip(jax.tree.leaves(setup.state), jax.tree.leaves(mask)) if m)
    assert n_masked == counts["temporal"]


# ------------------------------------------------------------------------------------- identity at init

# Frame counts 1 and 5 here, 3 in the next test (each count is a compile).
@pytest.mark.parametrize("frames", [1, 5])
def test_identity_at_init(setup, frames):
    x, t, ctx = _inputs(frames, frames)
    out = setup.video_fn(setup.state, x, t, ctx, jnp.zeros((B, frames)))
    ref = setup.image_per_frame(nnx.state(setup.image), x, t, ctx)
    err = float(jnp.abs(out - ref).max())
    print(f"identity at init, F={frames}: max abs err {err:.2e} (output scale {float(jnp.abs(ref).max()):.2f})")
    assert err < 1e-5


def test_identity_at_init_svd_style_layers(setup):
    # Absolute frame positions (SVD's time_pos_embed), a 3x3x3 temporal kernel, plain learned alpha.
    temporal = TemporalConfig(frame_position_encoding="absolute", temporal_kernel_size=(3, 3, 3),
                              merge_strategy="learned", merge_factor=2.0)
    video = VideoUNet.from_image_unet(setup.image, temporal)
    assert video.down_blocks[0].attentions[0].time_pos_embed is not None
    assert video.down_blocks[0].resnets[0].temporal_res_block.conv1.kernel.shape == (3, 3, 3, 32, 32)
    graphdef, state = nnx.split(video)
    x, t, ctx = _inputs(7, 3, 2)
    out = Setup.make_video_fn(graphdef)(state, x, t, ctx, jnp.zeros((2, 3)))
    err = float(jnp.abs(out - setup.image_per_frame(nnx.state(setup.image), x, t, ctx)).max())
    print(f"identity at init (absolute positions, 3x3x3 kernel): max abs err {err:.2e}")
    assert err < 1e-5


def test_alpha_stays_learnable(setup):
    mixers = [v for p, v in nnx.to_flat_state(setup.state) if p[-1] == "mix_factor"]
    assert mixers and all(isinstance(v, nnx.Param) for v in mixers)


# ---------------------------------------------------------------------------------------------- coupling

def test_temporal_layers_couple_frames(setup):
    f = 5
    x, t, ctx = _inputs(11, f)
    t = jnp.broadcast_to(t[:, :1], t.shape)
    x2 = x.at[:, 0].add(1.0)  # change frame 0 only
    zeros, ones = jnp.zeros((B, f)), jnp.ones((B, f))
    trained = _perturbed(setup.state)

    def others_change(state, indicator):
        a = setup.video_fn(state, x, t, ctx, indicator)
        b = setup.video_fn(state, x2, t, ctx, indicator)
        return float(jnp.abs(a[:, 1:] - b[:, 1:]).max()), float(jnp.abs(a[:, 0] - b[:, 0]).max())

    coupled, own = others_change(trained, zeros)
    print(f"alpha < 1: other frames move by {coupled:.3e} (frame 0 by {own:.3e})")
    assert coupled > 1e-3 and own > 1e-3
    # The spatial path alone: alpha = 1 for every frame (image-only frames), or temporal layers at init.
    spatial_only, own = others_change(trained, ones)
    assert spatial_only == 0.0 and own > 1e-3
    at_init, _ = others_change(setup.state, zeros)
    assert at_init < 1e-6
    # With alpha = 1 the trained video U-Net is exactly the image U-Net, frame by frame.
    out = setup.video_fn(trained, x, t, ctx, ones)
    assert float(jnp.abs(out - setup.image_per_frame(nnx.state(setup.image), x, t, ctx)).max()) < 1e-5


# -------------------------------------------------------------------------------------- spatial swapping

def test_swapping_spatial_weights(setup):
    trained = nnx.merge(setup.graphdef, _perturbed(setup.state, seed=3))
    swapped = replace_spatial(trained, setup.image2)
    _, before = split_params(trained)
    spatial_after, after = split_params(swapped)
    t_before, t_after = _leaves(before, lambda p: True), _leaves(after, lambda p: True)
    assert t_before.keys() == t_after.keys()
    assert all(np.array_equal(t_before[k], t_after[k]) for k in t_before)
    image2 = _leaves(nnx.state(setup.image2), lambda p: True)
    assert np.array_equal(_leaves(spatial_after, lambda p: True)[("conv_in", "kernel")], image2[("conv_in", "kernel")])
    x, t, ctx = _inputs(5, 5)
    out_before = setup.video_fn(nnx.state(trained), x, t, ctx, jnp.zeros((B, 5)))
    out_after = setup.video_fn(nnx.state(swapped), x, t, ctx, jnp.zeros((B, 5)))
    assert float(jnp.abs(out_before - out_after).max()) > 1e-2


# ----------------------------------------------------------------------------- temporal-only optimizer

def test_temporal_only_gradient_step(setup):
    model = nnx.merge(setup.graphdef, _perturbed(setup.state, seed=5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, t, ctx = _inputs(13, 2, b=1)
    target = jnp.zeros_like(x)
    tx = temporal_only(optax.adamw(1e-2, weight_decay=1e-2))
    opt_state = tx.init(params)

    @jax.jit(compiler_options=FAST_COMPILE)
    def step(params, opt_state):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p, rest)(x, t, ctx) - target) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), grads

    new, grads = step(params, opt_state)
    old_s, new_s = _leaves(params, lambda p: not is_temporal_path(p)), _leaves(new, lambda p: not is_temporal_path(p))
    assert old_s and all(np.array_equal(old_s[k].view(np.uint32), new_s[k].view(np.uint32)) for k in old_s)
    old_t, new_t = _leaves(params, temporal_filter), _leaves(new, temporal_filter)
    unchanged = [k for k in old_t if np.array_equal(old_t[k], new_t[k])]
    assert not unchanged, unchanged
    # The spatial parameters did get gradients: the mask, not the loss, froze them.
    assert max(float(jnp.abs(g).max()) for p, g in _leaves(grads, lambda p: not is_temporal_path(p)).items()) > 0


# --------------------------------------------------------------------------------------- remat and dtype

def test_remat_policies_match(setup):
    block = nnx.merge(setup.graphdef, _perturbed(setup.state, seed=7)).down_blocks[0]  # resnet + transformer
    graphdef, state = nnx.split(block)
    f = 3
    x = jax.random.normal(jax.random.key(0), (2 * f, 4, 4, 32))
    emb = jax.random.normal(jax.random.key(1), (2 * f, 128))
    ctx = jax.random.normal(jax.random.key(2), (2 * f, S, 16))
    extra = dict(num_frames=f, image_only_indicator=jnp.zeros((2, f)))

    def loss(state, remat):
        blk = nnx.merge(graphdef, state)
        blk.remat = remat
        return jnp.mean(blk(x, emb, ctx, **extra)[0] ** 2)

    assert "remat" in str(jax.make_jaxpr(lambda s: loss(s, True))(state))
    # "full" recomputes inside the backward pass (custom_vjp, nn/remat.py); "checkpoint" (jax.checkpoint) goes
    # through the same hook as in the image U-Net's remat test; here "full" and a policy variant.
    assert "name=_recomputed" in str(jax.make_jaxpr(lambda s: loss(s, REMAT_POLICIES["full"]))(state))
    names = ("none", "dots_saveable", "full")
    results = jax.jit(lambda s: [jax.value_and_grad(loss)(s, REMAT_POLICIES[n]) for n in names],
                      compiler_options=FAST_COMPILE)(state)
    v0, g0 = results[0]
    for v1, g1 in results[1:]:
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_set_branches_reaches_every_3d_block_and_keeps_the_output(setup):
    # VideoUNet.set_branches(n): every 3D residual block runs as n row pieces (nn/branches.py); same outputs.
    model = nnx.merge(setup.graphdef, _perturbed(setup.state, seed=7))
    model.set_branches(2)
    blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, TemporalResnetBlock)]
    assert blocks and all(b.branches == 2 for b in blocks)
    f = 3
    x = jax.random.normal(jax.random.key(0), (2 * f, 4, 4, 32))
    emb = jax.random.normal(jax.random.key(1), (2 * f, 128))
    ctx = jax.random.normal(jax.random.key(2), (2 * f, S, 16))
    extra = dict(num_frames=f, image_only_indicator=jnp.zeros((2, f)))
    graphdef, state = nnx.split(model.down_blocks[0])

    def out(state, n):
        blk = nnx.merge(graphdef, state)
        set_branches(blk, n)
        return blk(x, emb, ctx, **extra)[0]

    one, two = jax.jit(lambda s: (out(s, 1), out(s, 2)), compiler_options=FAST_COMPILE)(state)
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)


def test_remat_policy_from_config():
    cfg = VideoUNetConfig.from_image_config(UNet2DConditionConfig(**IMAGE), remat_policy="dots_saveable")
    model = nnx.eval_shape(lambda: VideoUNet(cfg, rngs=nnx.Rngs(0)))
    assert model.down_blocks[0].remat is REMAT_POLICIES["dots_saveable"]
    with pytest.raises(ConfigError, match="remat_policy"):
        VideoUNetConfig.from_image_config(UNet2DConditionConfig(**IMAGE), remat_policy="sometimes")


def test_bfloat16_compute():
    # Parameters stay float32, activations run in bfloat16 (checked by shape evaluation: no compile).
    cfg = VideoUNetConfig.from_image_config(UNet2DConditionConfig(**IMAGE))
    model = nnx.eval_shape(lambda: VideoUNet(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(state)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 3, 8, 8, 4)), 1.0, jnp.zeros((1, S, 16))),
                         state)
    assert out.shape == (1, 3, 8, 8, 4) and out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------ frame positions

def test_relative_positions_depend_on_distance_only():
    block = TemporalBasicTransformerBlock(32, 2, 16, relative_position_dim=16, rngs=nnx.Rngs(0))
    b5 = np.asarray(block.position_bias(5))
    assert b5.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(block.position_bias(3)), b5[:, :, :3, :3], atol=1e-6)
    np.testing.assert_allclose(b5[0, :, 0, 1], b5[0, :, 3, 4], atol=1e-6)
    assert not np.allclose(b5[0, :, 0, 1], b5[0, :, 1, 0])  # before vs after are different


def test_from_image_unet_refuses_a_video_unet(setup):
    with pytest.raises(ConfigError, match="image U-Net"):
        VideoUNet.from_image_unet(setup.video)


# ------------------------------------------------------------------------------- temporal context length

def test_temporal_context_length_limits_what_the_temporal_layers_read():
    from vldm_jax.nn.temporal import TransformerSpatioTemporalModel

    def module(length):
        m = TransformerSpatioTemporalModel(2, 16, 32, cross_attention_dim=16, norm_num_groups=8,
                                           frame_position_encoding="relative", relative_position_dim=8,
                                           zero_init=False, temporal_context_length=length, rngs=nnx.Rngs(0))
        spatial_out = m.transformer_blocks[0].attn2.to_out[0]  # the spatial layers stop reading the text
        spatial_out.kernel.set_value(jnp.zeros_like(spatial_out.kernel[...]))
        return m

    rng = np.random.default_rng(0)
    f = 3
    x = jnp.asarray(rng.standard_normal((2 * f, 4, 4, 32)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    late = ctx.at[:, 2:].add(1.0)   # tokens past the length
    early = ctx.at[:, 1].add(1.0)   # a token inside it
    ind = jnp.zeros((2, f))

    def run(m, c):
        return np.asarray(m(x, jnp.repeat(c, f, axis=0), num_frames=f, image_only_indicator=ind))

    short, full = module(2), module(None)
    base = run(short, ctx)
    assert np.abs(run(short, late) - base).max() == 0.0
    assert np.abs(run(short, early) - base).max() > 1e-3
    assert np.abs(run(full, late) - run(full, ctx)).max() > 1e-3
    # The same weights read the same tokens: the short module on a 6-token context equals the full one on 2 tokens.
    np.testing.assert_allclose(base, run(full, ctx[:, :2]), atol=1e-5)


def test_temporal_context_length_is_checked_and_stored(setup, tmp_path):
    from vldm_jax.checkpoints.temporal import load_temporal, save_temporal

    for bad in (0, 2.5, "8"):
        with pytest.raises(ConfigError, match="temporal_context_length"):
            TemporalConfig(temporal_context_length=bad)
    # A stored (JSON) config: lists become tuples (the config is hashed), fields of other configs are ignored.
    stored = TemporalConfig.from_stored({"temporal_kernel_size": [3, 3, 3], "temporal_context_length": 8,
                                         "sample_size": 16})
    assert stored.temporal_kernel_size == (3, 3, 3) and stored.temporal_context_length == 8
    hash(stored)
    video = VideoUNet.from_image_unet(setup.image, TemporalConfig.paper(temporal_context_length=2))
    save_temporal(video, tmp_path / "t.safetensors")
    assert load_temporal(setup.image, tmp_path / "t.safetensors").config.temporal_context_length == 2


@pytest.mark.parametrize("k,frames", [(3, 5), (5, 4), (3, 1), (5, 1), (5, 2)])
def test_temporal_conv_is_the_convolution(k, frames):
    """The (k, 1, 1) temporal convolution computed as one matmul and a shifted sum, with its hand-written
    backward, gives nnx.Conv's outputs and gradients (same kernel and bias), with the 'same' zero padding at
    both ends of the clip (a kernel wider than the clip, a one-frame clip)."""
    from vldm_jax.nn.temporal import TemporalConv, conv3d

    layer = conv3d(32, 48, (k, 1, 1), rngs=nnx.Rngs(0))
    assert isinstance(layer, TemporalConv)
    conv = nnx.Conv(32, 48, (k, 1, 1), padding=((k // 2, k // 2), (0, 0), (0, 0)), rngs=nnx.Rngs(1))
    conv.kernel.set_value(layer.kernel[...])
    conv.bias.set_value(jax.random.normal(jax.random.key(2), (48,)))
    layer.bias.set_value(conv.bias[...])
    x = jax.random.normal(jax.random.key(3), (2, frames, 3, 2, 32))
    np.testing.assert_allclose(layer(x), conv(x), atol=1e-5)

    def grads(module):
        g, s = nnx.split(module)
        return jax.grad(lambda s, x: jnp.sum(jnp.sin(nnx.merge(g, s)(x))), argnums=(0, 1))(s, x)

    (gs_ours, gx_ours), (gs_ref, gx_ref) = grads(layer), grads(conv)
    np.testing.assert_allclose(gx_ours, gx_ref, atol=1e-4)
    np.testing.assert_allclose(gs_ours["kernel"][...], gs_ref["kernel"][...], atol=1e-4)
    np.testing.assert_allclose(gs_ours["bias"][...], gs_ref["bias"][...], atol=1e-4)
    narrow = conv3d(3, 3, (3, 1, 1), rngs=nnx.Rngs(0))  # below TEMPORAL_MATMUL_MIN_CHANNELS: XLA's convolution
    assert narrow(x[..., :3]).shape == (2, frames, 3, 2, 3)
