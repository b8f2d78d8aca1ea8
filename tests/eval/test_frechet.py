"""Fréchet distance: streaming statistics equal np.mean/np.cov; the trace of the matrix square root equals
scipy.linalg.sqrtm's, on well-conditioned, rank-deficient (fewer samples than dimensions) and
ill-conditioned covariances."""

import warnings

import numpy as np
import pytest

scipy_linalg = pytest.importorskip("scipy.linalg")

from vldm_jax.errors import UserError  # noqa: E402
from vldm_jax.eval.frechet import RunningStats, frechet_distance, frechet_distance_of, sqrtm_psd_product  # noqa: E402


def scipy_fd(mu1, s1, mu2, s2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = scipy_linalg.sqrtm(s1 @ s2, disp=False)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n,d", [(400, 32), (40, 128)])
def test_streaming_statistics_and_distance(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 5.0
    y = rng.normal(size=(n + 3, d)) + 0.2
    sx, sy = RunningStats(), RunningStats()
    for i in range(0, n, 7):  # uneven batches
        sx.update(x[i:i + 7].astype(np.float32))
    sy.update(y)
    assert sx.n == n
    np.testing.assert_allclose(sx.mean, x.astype(np.float32).astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sx.cov, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), atol=1e-9)
    ours = frechet_distance_of(sx, sy)
    ref = scipy_fd(sx.mean, sx.cov, sy.mean, sy.cov)
    assert abs(ours - ref) / ref < 1e-6, (ours, ref)
    assert frechet_distance_of(sx, sx) == pytest.approx(0, abs=1e-6 * ref)


def test_ill_conditioned_covariances():
    rng = np.random.default_rng(0)
    d = 48
    q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1 = (q1 * np.logspace(-12, 3, d)) @ q1.T  # condition number 1e15
    s2 = (q2 * np.logspace(-10, 2, d)) @ q2.T
    mu = rng.normal(size=d)
    ours, ref = frechet_distance(mu, s1, 0 * mu, s2), scipy_fd(mu, s1, 0 * mu, s2)
    assert abs(ours - ref) / ref < 1e-6, (ours, ref)
    # the full square root where the first matrix is invertible
    a = s1 + 1e-3 * np.eye(d)
    r = scipy_linalg.sqrtm(a @ s2)
    assert np.abs(sqrtm_psd_product(a, s2) - r).max() / np.abs(r).max() < 1e-6


def test_errors():
    s = RunningStats().update(np.zeros((1, 3)))
    with pytest.raises(UserError, match="at least 2"):
        _ = s.cov
    with pytest.raises(UserError, match="dimension"):
        s.update(np.zeros((2, 4)))
