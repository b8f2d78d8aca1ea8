"""The moving-shapes judge against rendered clips: it must be right on real data and fail on broken data."""

import numpy as np
import pytest
from scipy import ndimage

from vldm_jax.data.moving_shapes import COMBINATIONS, SHAPES, caption_for, example, render_clip
from vldm_jax.errors import UserError
from vldm_jax.eval.shapes import judge, judge_many, parse_prompt


def _clips(seeds, frames=16, size=64):
    out = []
    for seed in seeds:
        for i, (c, s, d, sp) in enumerate(COMBINATIONS):
            clip = render_clip(c, s, d, sp, frames, size, np.random.default_rng([seed, i]))
            out.append((clip.frames, dict(color=c, shape=s, direction=d), caption_for(c, s, d, sp)))
    return out


@pytest.fixture(scope="module")
def clips():
    # Every colour x shape x direction x speed combination (120), three seeds: 360 clips.
    return _clips(range(3))


def test_right_on_rendered_clips(clips):
    summary = judge_many([v for v, _, _ in clips], [p for _, _, p in clips])
    assert summary["n"] == 360
    # Measured: 360 / 360 (colour, shape, direction, R² >= 0.8, no flicker).
    assert summary["ok"] >= 0.99, [r["reason"] for r in summary["rows"] if not r["ok"]][:5]
    assert summary["color"] >= 0.99 and summary["shape"] >= 0.99 and summary["direction"] >= 0.99
    assert summary["r2_mean"] > 0.99
    assert summary["flicker_mean"] < 0.05
    assert summary["found"] == 1.0
    assert sum(summary["direction_confusion"]["left"].values()) == 90


def test_right_on_blurred_clips(clips):
    # A VAE decoder softens edges: a Gaussian blur of sigma 1.5 px must not change the verdicts.
    videos = [ndimage.gaussian_filter(v.astype(np.float64) / 255, (0, 1.5, 1.5, 0)) for v, _, _ in clips[:120]]
    summary = judge_many(videos, [attrs for _, attrs, _ in clips[:120]])
    assert summary["ok"] >= 0.99, [r["reason"] for r in summary["rows"] if not r["ok"]][:5]


def test_uint8_and_float_agree(clips):
    video, attrs, prompt = clips[7]
    a = judge(video, prompt)
    b = judge(video.astype(np.float32) / 255.0, prompt)
    assert a.ok and b.ok
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)


def test_centroids_track_the_true_centres():
    ex = example(3, seed=5)
    j = judge(ex["video"], ex["caption"])
    assert j.ok
    np.testing.assert_allclose(j.centroids, ex["centers"], atol=0.35)


def test_shuffled_frames_fail(clips):
    rng = np.random.default_rng(0)
    videos, prompts = [], []
    for video, _, prompt in clips[:120]:
        videos.append(video[rng.permutation(len(video))])
        prompts.append(prompt)
    summary = judge_many(videos, prompts)
    # Out of order, the centroid no longer follows a line: R² fails (and the fitted direction is often wrong).
    assert summary["ok"] <= 0.05
    assert summary["r2_pass"] <= 0.05
    assert summary["r2_mean"] < 0.5


def test_reversed_clip_has_the_opposite_direction(clips):
    video, attrs, prompt = clips[0]
    j = judge(video[::-1], prompt)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[attrs["direction"]]
    assert j.direction == opposite and not j.ok and j.r2 > 0.99
    assert "direction" in j.reason


def test_wrong_prompt_fails_on_the_wrong_attribute():
    clip = render_clip("red", "circle", "right", "fast")
    assert judge(clip.frames, "a red circle moving right").ok
    j = judge(clip.frames, "a blue circle moving right")
    assert not j.ok and not j.color_ok and j.shape_ok and j.direction_ok and j.color == "red"
    j = judge(clip.frames, "a red square moving right")
    assert not j.ok and not j.shape_ok and j.color_ok
    j = judge(clip.frames, "a red circle moving up")
    assert not j.ok and not j.direction_ok and j.direction == "right"


def test_empty_video_is_judged_not_crashed():
    for video in (np.zeros((16, 64, 64, 3), np.uint8), np.full((16, 64, 64, 3), np.nan, np.float32),
                  np.zeros((0, 64, 64, 3), np.uint8)):
        j = judge(video, "a red circle moving right")
        assert not j.ok and j.found == 0.0 and j.color is None and j.shape is None
        assert "no object" in j.reason
    summary = judge_many([np.zeros((4, 32, 32, 3))], ["a red circle moving left"])
    assert summary["ok"] == 0.0 and summary["found"] == 0.0


def test_static_object_does_not_move():
    frame = render_clip("green", "square", "right", "slow").frames[0]
    j = judge(np.stack([frame] * 16), "a green square moving right")
    assert j.direction == "none" and not j.ok and j.color_ok and j.shape_ok


def test_missing_frames_and_flicker_fail():
    clip = render_clip("yellow", "triangle", "down", "fast")
    video = clip.frames.copy()
    video[5] = 0
    j = judge(video, "a yellow triangle moving down")
    assert not j.ok and j.found == 15 / 16 and "missing" in j.reason
    video = clip.frames.astype(np.float64) / 255
    video[::2] *= 0.3  # every other frame fades: the soft area changes
    video[::2] = ndimage.gaussian_filter(video[::2], (0, 2.5, 2.5, 0))
    j = judge(video, "a yellow triangle moving down")
    assert j.flicker > 0.25 and not j.ok


def test_images_are_judged_on_colour_and_shape():
    for shape in SHAPES:
        frame = render_clip("white", shape, "left", "slow").frames[3]
        j = judge(frame, f"a white {shape} moving left")
        assert j.ok and j.direction is None and np.isnan(j.r2), j.reason
        assert not judge(frame, color="blue").ok


def test_parse_prompt_and_bad_input():
    assert parse_prompt("a red circle moving right quickly") == {"color": "red", "shape": "circle",
                                                                   "direction": "right"}
    assert parse_prompt("A Blue Triangle") == {"color": "blue", "shape": "triangle"}
    with pytest.raises(UserError, match="colour|color"):
        judge(np.zeros((2, 8, 8, 3)), color="purple")
    with pytest.raises(UserError, match="expected a video"):
        judge(np.zeros((2, 8, 8)), "a red circle")
