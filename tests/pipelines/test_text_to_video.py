"""The Video LDM generation stack on a tiny random cascade: context-frame masking semantics, guidance on
context, interpolation layout, prediction rollout, the whole cascade, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.tiny_vldm import SCHEDULER, tiny_pipeline, video_unet
from vldm_jax.diffusion import samplers, schedules
from vldm_jax.errors import UserError
from vldm_jax.pipelines import stages


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def text(pipe):
    return pipe.encode_prompt(["a red circle moving right"]), pipe.encode_prompt([""])


# ------------------------------------------------------------------------------------ sampler: known frames

@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_output_for_x0_makes_the_step_see_x0(name, prediction_type):
    sampler = samplers.make_sampler(name, {**SCHEDULER, "prediction_type": prediction_type}, 6)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 4)) * 3, jnp.float32)
    x0 = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    for i in (0, 3, 5):
        out = samplers.output_for_x0(sampler, i, x, x0)
        c = sampler.coefficients
        if name == "euler":
            sigma = c["sigma"][i]
            if prediction_type == "epsilon":
                implied = x - c["sigma_hat"][i] * out
            elif prediction_type == "v_prediction":
                implied = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
            else:
                implied = out
        else:
            a, s = ((c["alpha_prod_t"][i] ** 0.5, (1 - c["alpha_prod_t"][i]) ** 0.5) if name == "ddim"
                    else (c["alpha_s"][i], c["sigma_s"][i]))
            implied, _ = schedules.predict_x0_eps(out, x, a, s, prediction_type)
        np.testing.assert_allclose(implied, x0, atol=2e-4, rtol=1e-4)


def test_known_frames_come_back_and_steer_the_others():
    sampler = samplers.make_sampler("ddim", SCHEDULER, 8)
    noise = jax.random.normal(jax.random.key(0), (1, 4, 2, 2, 1))
    x0 = jnp.full(noise.shape, 0.7)
    mask = jnp.asarray([1.0, 0, 0, 1.0]).reshape(1, 4, 1, 1, 1)

    def denoise(x, t):  # a denoiser that predicts "x0 = mean of the frames", coupling them
        a = sampler.coefficients["alpha_prod_t"][jnp.argmax(sampler.timesteps == t)]
        x0_hat = jnp.broadcast_to(x.mean(axis=1, keepdims=True) / a**0.5, x.shape)
        return (x - a**0.5 * x0_hat) / (1 - a) ** 0.5

    out = samplers.sample(denoise, sampler, noise, known=(x0, mask))
    np.testing.assert_array_equal(out[:, [0, 3]], x0[:, [0, 3]])
    free = samplers.sample(denoise, sampler, noise)
    assert float(jnp.abs(out[:, 1:3] - free[:, 1:3]).max()) > 1e-2


# --------------------------------------------------------------------------------- context-frame conditioning

@pytest.mark.parametrize("mode", ["temporal", "concat"])
def test_fresh_context_layers_leave_the_model_unchanged(mode):
    from flax import nnx

    from vldm_jax.models.unet import VideoUNet

    plain = video_unet("none", 7)
    config = video_unet(mode, 7).config
    fresh = VideoUNet.from_image_unet(_image_unet(plain), config.temporal)
    base = VideoUNet.from_image_unet(_image_unet(plain), video_unet("none", 7).config.temporal)
    x = jax.random.normal(jax.random.key(1), (1, 3, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 5, 16))
    with_context = fresh(x, jnp.array([50]), ctx, context_latents=x + 1, context_mask=jnp.array([[1.0, 0, 1]]))
    np.testing.assert_allclose(with_context, base(x, jnp.array([50]), ctx), atol=1e-6)
    assert isinstance(fresh, nnx.Module)


def _image_unet(video):
    from flax import nnx

    from vldm_jax.models.roles import flat_arrays, spatial_filter
    from vldm_jax.models.unet import UNet2DConditionModel

    image = nnx.eval_shape(lambda: UNet2DConditionModel(video.config.image_config(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(image)
    arrays = {}
    for path, value in flat_arrays(video, spatial_filter).items():
        path = tuple(p for p in path if p != "spatial_res_block")
        arrays[path] = value
    flat = [(p, v.replace(arrays[tuple(p)])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_concat_is_a_wider_conv_in():
    """``concat``: conv_in(x) + temporal_context_in([mask*ctx, mask]) equals one conv over the concatenated
    channels (SVD's layout), so weights convert both ways."""
    unet = video_unet("concat", 3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    cond = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
    split = unet.conv_in(x) + unet.temporal_context_in(cond)
    kernel = jnp.concatenate([unet.conv_in.kernel[...], unet.temporal_context_in.kernel[...]], axis=2)
    bias = unet.conv_in.bias[...] + unet.temporal_context_in.bias[...]
    wide = jax.lax.conv_general_dilated(jnp.concatenate([x, cond], -1), kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    np.testing.assert_allclose(split, wide, atol=1e-5)


@pytest.mark.parametrize("mode", ["temporal", "concat"])
def test_zero_context_frames_is_the_unconditional_model(mode):
    unet = video_unet(mode, 3)
    x = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 5, 16))
    t = jnp.array([300])
    none = unet(x, t, ctx)
    masked_out = unet(x, t, ctx, context_latents=5 * x, context_mask=jnp.zeros((1, 3)))
    np.testing.assert_array_equal(none, masked_out)
    given = unet(x, t, ctx, context_latents=5 * x, context_mask=jnp.array([[1.0, 0, 0]]))
    assert float(jnp.abs(given - none).max()) > 1e-3  # random context layers: the context acts


def test_context_guidance(pipe, text):
    predictor = pipe._samplers["predictor"]
    cond, null = text
    context = jax.random.normal(jax.random.key(3), (1, 1, 8, 8, 4))
    lat, mask = stages.context_window(context, 3)
    noise = jax.random.normal(jax.random.key(4), lat.shape)
    run = lambda **kw: predictor(noise, cond, null, context_latents=lat, context_mask=mask, steps=3,  # noqa: E731
                                 key=jax.random.key(5), **kw)
    plain = run()
    np.testing.assert_array_equal(run(context_guidance_scale=1.0), plain)
    guided = run(context_guidance_scale=3.0)
    assert float(jnp.abs(guided[:, 1:] - plain[:, 1:]).max()) > 1e-3
    np.testing.assert_array_equal(guided[:, :1], context)  # context frames stay put under guidance too
    # The tiny random text encoder barely tells prompts apart; a random "empty prompt" makes text guidance act.
    other = jax.random.normal(jax.random.key(6), cond.shape)
    both = predictor(noise, cond, other, context_latents=lat, context_mask=mask, steps=3, key=jax.random.key(5),
                     context_guidance_scale=3.0, guidance_scale=2.0)
    assert float(jnp.abs(both - guided).max()) > 1e-3


# ------------------------------------------------------------------------------------------- interpolation

def test_interpolation_windows():
    assert stages.interpolation_windows(3, 3) == [0]
    assert stages.interpolation_windows(5, 3) == [0, 2]
    assert stages.interpolation_windows(4, 3) == [0, 1]
    assert stages.interpolation_windows(6, 2) == [0, 1, 2, 3, 4]
    with pytest.raises(UserError):
        stages.interpolation_windows(1, 3)


@pytest.mark.parametrize("window", [None, 2])
def test_interpolation_keeps_keyframes(pipe, text, window):
    keyframes = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 4))
    out = stages.interpolate(pipe._samplers["interpolator"], keyframes, text[0], key=jax.random.key(1),
                             window_keyframes=window, steps=3)
    assert out.shape == (1, 9, 8, 8, 4)
    np.testing.assert_array_equal(out[:, ::4], keyframes)
    between = out[:, 1:4]
    assert bool(jnp.all(jnp.isfinite(between))) and float(jnp.abs(between - keyframes[:, :1]).max()) > 1e-3


# ---------------------------------------------------------------------------------------------- prediction

def test_rollout_extends_beyond_one_window(pipe, text):
    context = jax.random.normal(jax.random.key(0), (1, 1, 8, 8, 4))
    seen = []
    video = stages.rollout(pipe._samplers["predictor"], context, 6, 3, text[0], key=jax.random.key(1), steps=3,
                           progress_fn=seen.append)
    assert video.shape == (1, 6, 8, 8, 4)
    np.testing.assert_array_equal(video[:, :1], context)
    assert seen == [3, 5, 6]


def test_animate_first_frame_is_the_image(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    video = pipe.animate(image, "a red circle moving right", num_frames=5, window=3, num_inference_steps=3)
    assert video.shape == (5, 16, 16, 3)
    roundtrip = pipe.codec.decode(pipe.codec.encode(image[None, None] / 255.0))[0, 0]
    np.testing.assert_allclose(video[0], roundtrip, atol=1e-5)
    assert float(np.abs(video[1] - video[0]).max()) > 1e-3


# ------------------------------------------------------------------------------------------------- cascade

def test_cascade_end_to_end_and_reload(pipe, tmp_path):
    video, latents = pipe("a red circle moving right", num_frames=2, interpolate=16, num_inference_steps=2,
                          return_latents=True)
    assert video.shape == (1, 17, 16, 16, 3) and latents.shape == (1, 17, 8, 8, 4)
    assert 0.0 <= video.min() and video.max() <= 1.0
    pipe.save_pretrained(tmp_path / "vldm")
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    again = TextToVideoPipeline.from_pretrained(tmp_path / "vldm")
    assert again.defaults == pipe.defaults
    video2 = again("a red circle moving right", num_frames=2, interpolate=16, num_inference_steps=2)
    np.testing.assert_allclose(video2, video, atol=1e-6)


def test_longer_than_trained_is_convolutional_in_time(pipe):
    """The key-frame model samples more frames than its config's window in one pass."""
    video = pipe("a blue square moving up", num_frames=2 * pipe.unet.config.num_frames, num_inference_steps=2)
    assert video.shape[1] == 2 * pipe.unet.config.num_frames


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_frames": 0}, "num_frames"),
    ({"interpolate": 3}, "interpolate"),
    ({"height": 15}, "multiples"),
    ({"num_inference_steps": 0}, "steps"),
    ({"scheduler": "plms"}, "scheduler"),
])
def test_bad_arguments(pipe, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        pipe("x", **kwargs)


@pytest.mark.slow
def test_cascade_with_upsampler(tmp_path):
    """keyframes -> x4 interpolation -> decode -> x4 video upsampler, then saved and reloaded with its upsampler."""
    from tests.helpers.tiny_upscaler import make_tiny_upscaler_folder
    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline
    from vldm_jax.pipelines.upscale import UpscalePipeline, VideoUpscalePipeline

    up = VideoUpscalePipeline.from_image_upscaler(UpscalePipeline.from_pretrained(make_tiny_upscaler_folder(tmp_path)))
    pipe = tiny_pipeline(up)
    video = pipe("a red circle moving right", num_frames=2, interpolate=4, num_inference_steps=2, upscale=True,
                 upscale_kwargs={"num_inference_steps": 2})
    assert video.shape == (1, 5, 64, 64, 3)
    assert np.isfinite(video).all() and 0.0 <= video.min() and video.max() <= 1.0
    pipe.save_pretrained(tmp_path / "with_upsampler")
    again = TextToVideoPipeline.from_pretrained(tmp_path / "with_upsampler")
    assert isinstance(again.upsampler, VideoUpscalePipeline)
    video2 = again("a red circle moving right", num_frames=2, interpolate=4, num_inference_steps=2, upscale=True,
                   upscale_kwargs={"num_inference_steps": 2})
    np.testing.assert_allclose(video2, video, atol=1e-5)


def test_one_network_in_two_roles_is_saved_once(pipe, tmp_path):
    import json

    from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

    both = video_unet("temporal", 11)
    shared = TextToVideoPipeline(both, pipe.vae, pipe.text_encoder, pipe.tokenizer, SCHEDULER, predictor=both)
    shared.save_pretrained(tmp_path / "shared")
    index = json.loads((tmp_path / "shared" / "model_index.json").read_text())
    assert index["predictor"] == ["alias", "unet"] and not (tmp_path / "shared" / "predictor").exists()
    again = TextToVideoPipeline.from_pretrained(tmp_path / "shared")
    assert again.predictor is again.unet
