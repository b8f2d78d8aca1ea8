"""The judge over long and rolled-out clips: full-track R², jumps at rollout seams (issue 22)."""

import numpy as np

from vldm_jax.data.moving_shapes import render_clip
from vldm_jax.eval.shapes import judge, judge_many, seam_jump


def _clip(frames=13):
    return render_clip("red", "circle", "right", "fast", frames, 64, np.random.default_rng(1)).frames


def test_a_steady_clip_has_no_seam_jump():
    j = judge(_clip(), "a red circle moving right", seams=[5, 9])
    assert j.ok and j.seams_ok and j.seam_jump < 0.5


def test_a_jump_at_a_seam_fails_and_elsewhere_does_not_count():
    c = _clip(16)
    jumped = np.concatenate([c[:5], c[8:]])  # 13 frames, three steps skipped into frame 5
    j = judge(jumped, "a red circle moving right", seams=[5, 9])
    assert not j.ok and not j.seams_ok and "seam" in j.reason and j.seam_jump > 4
    assert judge(jumped, "a red circle moving right").ok  # without seams the line still fits
    stopped = np.concatenate([c[:9], np.repeat(c[8:9], 4, axis=0)])  # stops dead at the second seam
    assert not judge(stopped, "a red circle moving right", seams=[5, 9]).seams_ok


def test_interpolated_span_and_summary():
    c = _clip(17)
    jump, typical = seam_jump(np.stack([np.arange(17.0) * 2, np.zeros(17)], -1), [8], span=4)
    assert jump < 1e-9 and abs(typical - 8) < 1e-9
    s = judge_many([c, c], ["a red circle moving right"] * 2, seams=[8], seam_span=4)
    assert s["seams_ok"] == 1.0 and s["seam_jump_mean"] < 0.5
    assert "seams_ok" not in judge_many([c], ["a red circle moving right"])
