"""Moving shapes, numpy side: captions, geometry, the object never leaves the frame, no TF needed."""

import subprocess
import sys

import numpy as np
import pytest

from vldm_jax.data.moving_shapes import (
    COLORS,
    COMBINATIONS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    caption_for,
    example,
    render_clip,
)
from vldm_jax.errors import UserError


def test_vocabulary():
    assert {"red", "green", "blue", "yellow", "white"} <= set(COLORS)
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert set(DIRECTIONS) == {"left", "right", "up", "down"}
    assert len(SPEEDS) >= 2
    assert caption_for("red", "circle", "right") == "a red circle moving right"
    assert caption_for("red", "circle", "right", "fast") == "a red circle moving right quickly"


@pytest.mark.parametrize("num_frames,size", [(16, 64), (8, (32, 48)), (5, (40, 24))])
def test_every_combination_stays_in_frame_and_moves_as_captioned(num_frames, size):
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(0)
    for color, shape, direction, speed in COMBINATIONS:
        frames, centers, extent = render_clip(color, shape, direction, speed, num_frames, size, rng)
        assert frames.shape == (num_frames, h, w, 3) and frames.dtype == np.uint8
        assert centers.shape == (num_frames, 2)
        # The bounding circle (plus the anti-aliased pixel) is inside the frame in every frame ...
        assert np.all(centers[:, 0] - extent >= 1.0) and np.all(centers[:, 0] + extent <= w - 1.0)
        assert np.all(centers[:, 1] - extent >= 1.0) and np.all(centers[:, 1] + extent <= h - 1.0)
        # ... so the border is black, and the object is visible in every frame.
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
        assert border.max() == 0, (color, shape, direction, speed)
        assert np.all(frames.reshape(num_frames, -1).max(axis=1) > 200)
        # Motion goes the captioned way, along one axis only.
        step = np.diff(centers, axis=0)
        dx, dy = DIRECTIONS[direction]
        if num_frames > 1:
            assert np.all(np.sign(step[:, 0]) == dx) and np.all(np.sign(step[:, 1]) == dy)
        # Only the captioned colour appears (black background, anti-aliased edges scale it).
        lit = frames.reshape(-1, 3)[frames.reshape(-1, 3).max(axis=1) > 0].astype(float)
        ref = np.asarray(COLORS[color], float)
        ratios = lit / lit.max(axis=1, keepdims=True)
        assert np.allclose(ratios, ref / ref.max(), atol=0.02)


def test_centres_match_the_drawn_object_and_speeds_differ():
    travel = {}
    for shape in SHAPES:
        for speed in SPEEDS:
            frames, centers, _ = render_clip("white", shape, "right", speed, 16, 64, np.random.default_rng(1))
            mass = frames[..., 0].astype(float)
            grid = np.arange(64) + 0.5
            cx = (mass.sum(axis=1) @ grid) / mass.sum(axis=(1, 2))
            cy = (mass.sum(axis=2) @ grid) / mass.sum(axis=(1, 2))
            np.testing.assert_allclose(cx, centers[:, 0], atol=0.1)
            np.testing.assert_allclose(cy, centers[:, 1], atol=0.1)
            travel[shape, speed] = centers[-1, 0] - centers[0, 0]
    for shape in SHAPES:
        assert travel[shape, "fast"] > 2 * travel[shape, "slow"] > 0


def test_examples_are_deterministic_and_balanced():
    a, b = example(5, seed=7), example(5, seed=7)
    assert a["caption"] == b["caption"] and np.array_equal(a["video"], b["video"])
    assert not np.array_equal(example(5, seed=8)["video"], a["video"])
    seen = {tuple(example(i, seed=2, num_frames=2, size=16)[k] for k in ("color", "shape", "direction", "speed"))
            for i in range(len(COMBINATIONS))}
    assert len(seen) == len(COMBINATIONS)
    ex = example(0, seed=0, speed_in_caption=True)
    assert ex["caption"] == caption_for(ex["color"], ex["shape"], ex["direction"], ex["speed"])


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="purple"):
        render_clip("purple", "circle", "left", "slow")
    with pytest.raises(UserError, match="8x8"):
        render_clip("red", "circle", "left", "slow", 4, 4)


def test_render_clip_needs_no_tensorflow():
    code = ("import sys; from vldm_jax.data.moving_shapes import render_clip; import vldm_jax.data;"
            "render_clip('red', 'circle', 'right', 'slow', 4, 16);"
            "assert 'tensorflow' not in sys.modules, 'TF was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
