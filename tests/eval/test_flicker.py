"""Flicker metrics on hand-made videos."""

import numpy as np
import pytest

from vldm_jax.eval.flicker import (
    flicker,
    flicker_report,
    frame_difference,
    reconstruction_error,
    temporal_gradient_error,
)


def ramp(b=2, f=5):
    """Each frame brighter than the last by 0.1: frame difference 0.1 everywhere."""
    return np.broadcast_to(0.1 * np.arange(f)[None, :, None, None, None], (b, f, 4, 4, 3)).astype(np.float32)


def test_frame_difference_and_flicker():
    ref = ramp()
    np.testing.assert_allclose(frame_difference(ref), [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(flicker(ref + 0.3, ref), [0.0, 0.0], atol=1e-7)  # a constant offset is no flicker
    flickering = ref + 0.05 * (-1.0) ** np.arange(5)[None, :, None, None, None]
    # Alternating ±0.05 on a 0.1 ramp: differences alternate 0.0 and 0.2 -> mean 0.1 -> no excess on this
    # metric; the temporal-gradient error sees it.
    np.testing.assert_allclose(temporal_gradient_error(flickering, ref), [0.1, 0.1], rtol=1e-6)
    noisy = ref.copy()
    noisy[:, 2] += 0.5
    assert np.all(flicker(noisy, ref) > 0)
    np.testing.assert_allclose(reconstruction_error(noisy, ref), [0.1, 0.1], rtol=1e-6)


def test_report_and_errors():
    ref = ramp()
    report = flicker_report(ref, ref)
    assert report == pytest.approx({"flicker": 0.0, "temporal_gradient_error": 0.0, "reconstruction_error": 0.0,
                                    "reference_frame_difference": 0.1})
    with pytest.raises(ValueError):
        frame_difference(ref[:, :1])
    with pytest.raises(ValueError):
        frame_difference(ref[0])
