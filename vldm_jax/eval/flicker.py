"""Temporal consistency of decoded videos: how much a decoder adds frame-to-frame change (flicker) that
the input video does not have, and how far it is from the input at all.

All functions take videos ``(B, F, H, W, C)`` (any float range, both arguments in the same one; [-1, 1]
for decoder outputs) and return per-video values ``(B,)`` as numpy float64, so results from many batches
concatenate and average on the host.
"""

from __future__ import annotations

import numpy as np


def _as_video(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 5:
        raise ValueError(f"expected videos (B, F, H, W, C), got shape {x.shape}")
    if x.shape[1] < 2:
        raise ValueError("temporal metrics need at least two frames")
    return x


def frame_difference(video) -> np.ndarray:
    """Mean absolute difference of consecutive frames, ``mean |x[t+1] - x[t]|`` per video."""
    v = _as_video(video)
    return np.mean(np.abs(np.diff(v, axis=1)), axis=(1, 2, 3, 4))


def flicker(decoded, reference) -> np.ndarray:
    """Excess frame-to-frame change: ``frame_difference(decoded) - frame_difference(reference)``.

    0 for a decoder that changes frames exactly as much as the input does; positive when it adds flicker.
    A blurry decoder can score below 0 (it removes motion detail), so read it next to
    :func:`reconstruction_error`.
    """
    return frame_difference(decoded) - frame_difference(reference)


def temporal_gradient_error(decoded, reference) -> np.ndarray:
    """``mean |(d[t+1] - d[t]) - (r[t+1] - r[t])|``: flicker that does not cancel against lost motion
    (the error of the temporal derivative)."""
    d, r = _as_video(decoded), _as_video(reference)
    return np.mean(np.abs(np.diff(d, axis=1) - np.diff(r, axis=1)), axis=(1, 2, 3, 4))


def reconstruction_error(decoded, reference) -> np.ndarray:
    """Mean absolute error per video."""
    d, r = _as_video(decoded), _as_video(reference)
    return np.mean(np.abs(d - r), axis=(1, 2, 3, 4))


def flicker_report(decoded, reference) -> dict[str, float]:
    """The four numbers averaged over the batch: ``flicker``, ``temporal_gradient_error``,
    ``reconstruction_error`` and the reference's ``frame_difference``."""
    return {
        "flicker": float(np.mean(flicker(decoded, reference))),
        "temporal_gradient_error": float(np.mean(temporal_gradient_error(decoded, reference))),
        "reconstruction_error": float(np.mean(reconstruction_error(decoded, reference))),
        "reference_frame_difference": float(np.mean(frame_difference(reference))),
    }
