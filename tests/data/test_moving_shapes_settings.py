"""Renderer settings of moving shapes (issue 22): the default draws the original clips, ``varied`` draws sizes of
8-24 px, outlines and noise, ``held_out`` only sizes and positions ``varied`` never draws, and the judge reads
them all right."""

import numpy as np
import pytest

from vldm_jax.data.moving_shapes import (
    _SQUARE_HALF_SIDE,
    _TRIANGLE_CIRCUMRADIUS,
    RENDER_SETTINGS,
    RenderSettings,
    example,
    parse_dataset_name,
    parse_dataset_setting,
    render_arrays,
    render_clip,
)
from vldm_jax.errors import UserError

_EXTENT_PER_RADIUS = {"circle": 1.0, "square": _SQUARE_HALF_SIDE * np.sqrt(2.0), "triangle": _TRIANGLE_CIRCUMRADIUS}


def _draws(setting, n=120, frames=5):
    """(radius fraction, across fraction, outline?, noisy background?) of ``n`` examples."""
    out = []
    for i in range(n):
        e = example(i, seed=4, num_frames=frames, setting=setting)
        r = float(e["extent"]) / _EXTENT_PER_RADIUS[e["shape"]]
        margin = float(e["extent"]) + 1.0
        horizontal = e["direction"] in ("left", "right")
        across = float(e["centers"][0, 1] if horizontal else e["centers"][0, 0])
        u = (across - margin) / (64 - 2 * margin)
        v = e["video"].astype(np.int32).max(axis=-1)
        cy, cx = np.rint(e["centers"][0]).astype(int)[::-1]
        background = np.ones(v.shape[1:], bool)
        yy, xx = np.mgrid[:64, :64]
        background &= np.hypot(yy + 0.5 - e["centers"][0, 1], xx + 0.5 - e["centers"][0, 0]) > margin + 2
        out.append((r / 64, u, v[0, cy, cx] < 128, v[0][background].mean() > 0.5, e))
    return out


def test_default_setting_is_the_original_renderer():
    for i in range(6):
        a = example(i, seed=1, num_frames=5)
        for setting in ("default", RenderSettings()):
            b = example(i, seed=1, num_frames=5, setting=setting)
            np.testing.assert_array_equal(a["video"], b["video"])
            np.testing.assert_array_equal(a["centers"], b["centers"])
    assert RenderSettings().is_default and not RENDER_SETTINGS["varied"].is_default


def test_varied_and_held_out_draw_disjoint_sizes_and_positions():
    varied, held = _draws("varied"), _draws("held_out")
    radii = np.array([d[0] for d in varied])
    assert radii.min() * 128 < 10 and radii.max() * 128 > 21  # diameters spread over 8-24 px
    assert radii.min() >= 0.0625 - 1e-6 and radii.max() <= 0.1875 + 1e-6
    lo, hi = 0.105, 0.135
    assert not np.any((radii > lo) & (radii < hi))
    across = np.array([d[1] for d in varied])
    assert not np.any((across > 0.4 + 1e-6) & (across < 0.6 - 1e-6))
    hr, ha = np.array([d[0] for d in held]), np.array([d[1] for d in held])
    assert np.all((hr >= lo - 1e-6) & (hr <= hi + 1e-6)) and np.all((ha >= 0.4 - 1e-6) & (ha <= 0.6 + 1e-6))
    assert 0.1 < np.mean([d[2] for d in varied]) < 0.5  # some outlines (centre pixel dark)
    assert np.mean([d[3] for d in varied]) > 0.5  # most backgrounds noisy
    assert np.mean([d[3] for d in _draws("default", 24)]) == 0.0


def test_the_judge_reads_every_setting_right():
    from vldm_jax.eval.shapes import judge_many

    for setting in ("varied", "held_out"):
        clips = [example(i, seed=7, num_frames=16 if i % 2 else 5, setting=setting) for i in range(60)]
        summary = judge_many([c["video"] for c in clips], [c["caption"] for c in clips])
        assert summary["ok"] == 1.0, [r["reason"] for r in summary["rows"] if not r["ok"]]


def test_dataset_names_and_arrays():
    assert parse_dataset_name("moving_shapes:30:varied", 5) == 30
    assert parse_dataset_setting("moving_shapes:30:varied") == "varied"
    assert parse_dataset_name("moving_shapes", 5) == 5 and parse_dataset_setting("moving_shapes:30") == "default"
    for bad in ("moving_shapes:30:odd", "moving_shapes:x", "moving_shapes:1:varied:2"):
        with pytest.raises(UserError):
            parse_dataset_name(bad, 5)
    with pytest.raises(UserError, match="setting"):
        render_clip("red", "circle", "up", "slow", setting="nope")
    arrays = render_arrays(3, seed=2, num_frames=4, setting="held_out", workers=1)
    np.testing.assert_array_equal(arrays["video"][1], example(1, seed=2, num_frames=4, setting="held_out")["video"])
