"""Text-to-video beyond one window (issue 22): ``rollout=`` continues the key frames with prediction windows."""

import numpy as np
import pytest

from tests.helpers.tiny_vldm import tiny_pipeline
from vldm_jax.errors import UserError

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_rollout_continues_the_key_frames(pipe):
    base, base_lat = pipe(PROMPT, num_inference_steps=2, return_latents=True)
    video, lat = pipe(PROMPT, num_inference_steps=2, rollout=3, return_latents=True)
    window = pipe.default("num_frames", 3)
    assert lat.shape[1] == window + 2 * (window - 1) == 7 and video.shape == (1, 7, 16, 16, 3)
    assert pipe.rollout_seams(window, 3, 1) == [3, 5]
    # The first window is the key-frame model's sample, untouched.
    np.testing.assert_allclose(np.asarray(lat[:, :window]), np.asarray(base_lat), atol=1e-5)
    np.testing.assert_allclose(video[:, :window], base, atol=1e-5)
    assert np.isfinite(video).all() and float(np.abs(video[0, 5] - video[0, 4]).max()) > 1e-3
    two = pipe(PROMPT, num_inference_steps=2, rollout=2, rollout_context=2, interpolate=1)
    assert two.shape[1] == window + (window - 2)


@pytest.mark.parametrize("kwargs, needle", [({"rollout": 0}, "rollout"), ({"rollout": 2, "rollout_context": 3},
                                                                         "rollout_context"),
                                             ({"upscale": True}, "no upsampler")])
def test_bad_rollout(pipe, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        pipe(PROMPT, num_inference_steps=2, **kwargs)
