"""The video upsampler: a fresh one is the image upscaler frame by frame; output shape; noise-level
conditioning; tiled sampling against untiled (exact for one covering tile, a stated bound for overlapping
tiles); save/load round trip; bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("diffusers")

from tests.helpers.tiny_upscaler import make_tiny_upscaler_folder  # noqa: E402
from vldm_jax.errors import UserError  # noqa: E402
from vldm_jax.models.roles import temporal_filter  # noqa: E402
from vldm_jax.models.unet import TemporalConfig, VideoUNet  # noqa: E402
from vldm_jax.pipelines.upscale import UpscalePipeline, VideoUpscalePipeline, make_denoiser, tile_layout  # noqa: E402

F, H, W = 3, 16, 12
STEPS = 2
# Measured (CPU, this tiny random-temporal model, 2 DDIM steps, guidance 5): 6 overlapping 8x8 tiles (overlap 4)
# of the 16x12 low-res plane vs one untiled pass differ by max abs 0.526, mean abs 0.073 (pixels in [0, 1]).
# Tiles are an approximation: every tile has its own GroupNorm statistics and self-attention context, and here a
# tile is half the plane of a random network. The bounds leave ~30% room; the blending itself is exact for a
# network without spatial context (test_tiled_apply_is_exact_for_a_pointwise_function).
TILE_MAX_BOUND, TILE_MEAN_BOUND = 0.7, 0.1
TEMPORAL = TemporalConfig.paper(relative_position_dim=8)


def randomize_temporal(unet: VideoUNet, seed: int = 0, scale: float = 0.3) -> VideoUNet:
    """The temporal layers redrawn at random (fresh ones end in zeros and would hide temporal mixing)."""
    rng = np.random.default_rng(seed)
    graphdef, temporal, rest = nnx.split(unet, temporal_filter, ...)

    def draw(path, x):
        shape = tuple(x.shape)
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        fan_in = int(np.prod(shape[:-1])) if name == "kernel" and len(shape) > 1 else 1
        return jnp.asarray(rng.normal(0, scale / np.sqrt(fan_in), shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, temporal), rest)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_upscaler_folder(tmp_path_factory.mktemp("x4v"))


@pytest.fixture(scope="module")
def image_pipe(folder):
    return UpscalePipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def random_pipe(image_pipe):
    fresh = VideoUpscalePipeline.from_image_upscaler(image_pipe, TEMPORAL)
    p = fresh
    return VideoUpscalePipeline(randomize_temporal(p.unet), p.vae, p.text_encoder, p.tokenizer, p.scheduler_config,
                                p.low_res_scheduler_config, max_noise_level=p.max_noise_level)


@pytest.fixture(scope="module")
def video():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    frames[1:] = (0.5 * frames[1:] + 0.5 * frames[:1]).astype(np.uint8)  # related frames
    return frames


def _noise(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, F, H, W, 4)).astype(np.float32),
            rng.standard_normal((1, F, H, W, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def untiled(random_pipe, video):
    latents, low_res_noise = _noise()
    return random_pipe(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                       low_res_noise=low_res_noise, progress=False)


def test_fresh_video_upsampler_is_the_image_upscaler_per_frame(folder, image_pipe, video):
    pipe = VideoUpscalePipeline.from_pretrained(folder, temporal=TEMPORAL)  # an image upscaler folder loads too
    assert isinstance(pipe.unet, VideoUNet)
    latents, low_res_noise = _noise(1)
    out = pipe(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
               low_res_noise=low_res_noise, progress=False)
    ref = image_pipe(video, ["a cat"] * F, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents[0],
                     low_res_noise=low_res_noise[0])
    assert out.shape == ref.shape == (F, 4 * H, 4 * W, 3)
    err = np.abs(out - ref).max()
    assert err < 1e-4, err


def test_output_shape_and_range(untiled):
    assert untiled.shape == (F, 4 * H, 4 * W, 3) and untiled.dtype == np.float32
    assert 0.0 <= untiled.min() and untiled.max() <= 1.0 and np.isfinite(untiled).all()


def test_noise_level_is_the_class_label_and_changes_the_output(random_pipe, video, untiled):
    latents, low_res_noise = _noise()
    other = random_pipe(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, noise_level=200,
                        latents=latents, low_res_noise=low_res_noise, progress=False)
    assert np.abs(other - untiled).max() > 1e-2
    # What the denoiser hands the U-Net: the (noised) low-res frames as extra channels and the level as label.
    unet = random_pipe.unet
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, F, H, W, 4)), jnp.float32)
    image = jnp.asarray(rng.standard_normal((1, F, H, W, 3)), jnp.float32)
    ctx = random_pipe.encode_prompt(["a cat"])
    t = jnp.int32(500)
    denoise = make_denoiser(unet, ctx, ctx, image, jnp.array([37]), 1.0, guided=False)
    direct = unet(jnp.concatenate([x, image], -1), t, ctx, class_labels=jnp.array([37]))
    wrong = unet(jnp.concatenate([x, image], -1), t, ctx, class_labels=jnp.array([38]))
    got = denoise(x, t)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(direct))
    assert np.abs(np.asarray(got) - np.asarray(wrong)).max() > 1e-4


def test_one_covering_tile_equals_untiled_exactly(random_pipe, video, untiled):
    latents, low_res_noise = _noise()
    tiled = random_pipe(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                        low_res_noise=low_res_noise, tile_size=16, tile_overlap=4, progress=False)
    assert np.abs(tiled - untiled).max() == 0.0


def test_overlapping_tiles_stay_within_the_stated_bound(random_pipe, video, untiled):
    (th, tw), starts, weights = tile_layout(H, W, 8, 4)
    assert (th, tw) == (8, 8) and len(starts) == 6
    latents, low_res_noise = _noise()
    tiled = random_pipe(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                        low_res_noise=low_res_noise, tile_size=8, tile_overlap=4, tile_batch=4, progress=False)
    err = float(np.abs(tiled - untiled).max())
    print(f"tiled (6 tiles of 8, overlap 4) vs untiled: max abs {err:.4f}, mean abs "
          f"{float(np.abs(tiled - untiled).mean()):.4f}")
    assert tiled.shape == untiled.shape and np.isfinite(tiled).all()
    assert 0.0 < err < TILE_MAX_BOUND, err
    assert float(np.abs(tiled - untiled).mean()) < TILE_MEAN_BOUND


def test_tiled_apply_is_exact_for_a_pointwise_function():
    """Without spatial context a network gives the same prediction on a tile as on the plane, so the blend of
    overlapping tiles (with batch folding, zero-weight padding of the last tile chunk) must reproduce it."""
    from vldm_jax.pipelines.upscale import tiled_apply

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 20, 13, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((2, 3, 20, 13, 3)), jnp.float32)

    def fn(xt, ct, k):
        assert xt.shape[0] == 2 * k
        return xt * 2.0 + jnp.sin(ct).sum(-1, keepdims=True)

    tile_shape, starts, weights = tile_layout(20, 13, 8, 3)
    out = jax.jit(lambda a, c: tiled_apply(fn, a, c, jnp.asarray(starts), jnp.asarray(weights), tile_shape, 4))(
        x, cond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn(x, cond, 1)), rtol=1e-6, atol=1e-6)


def test_tile_weights_cover_the_plane_and_are_one_on_the_border():
    (th, tw), starts, weights = tile_layout(20, 13, 8, 3)
    total = np.zeros((20, 13))
    for (y, x), w in zip(starts, weights):
        total[y:y + th, x:x + tw] += w
    assert total.min() > 0.2
    one = tile_layout(8, 8, 8, 3)[2]
    np.testing.assert_array_equal(one, np.ones((1, 8, 8)))


def test_save_and_load_round_trip(random_pipe, video, untiled, tmp_path):
    random_pipe.save_pretrained(tmp_path / "saved")
    loaded = VideoUpscalePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.max_noise_level == random_pipe.max_noise_level
    latents, low_res_noise = _noise()
    out = loaded(video, "a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                 low_res_noise=low_res_noise, progress=False)
    np.testing.assert_allclose(out, untiled, atol=1e-6)
    with pytest.raises(Exception, match="video upsampler"):
        UpscalePipeline.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_size=6), "multiple of 4"), (dict(tile_size=8, tile_overlap=5), "overlap"),
    (dict(noise_level=351), "noise_level"), (dict(num_inference_steps=0), "at least 1")])
def test_bad_arguments_are_user_errors(random_pipe, video, kwargs, match):
    with pytest.raises(UserError, match=match):
        random_pipe(video, progress=False, **kwargs)


def test_bad_video_is_a_user_error(random_pipe):
    with pytest.raises(UserError, match="video"):
        random_pipe(np.zeros((4, 4, 3), np.uint8), progress=False)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        random_pipe(np.full((1, 4, 4, 3), 2.0, np.float32), progress=False)


HUB_SCRIPT = """
import sys
from vldm_jax.pipelines.upscale import UpscalePipeline, VideoUpscalePipeline
image = UpscalePipeline.from_pretrained(sys.argv[1])
video = VideoUpscalePipeline.from_pretrained(sys.argv[1])
print("loaded", image.max_noise_level, type(video.unet).__name__)
"""


def test_hub_id_loads_from_the_cache_offline(folder, tmp_path):
    import os
    import subprocess
    import sys

    from tests.checkpoints.test_hub import _fake_hub_cache

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-x4", folder)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "someone/tiny-x4"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded 350 VideoUNet" in proc.stdout
