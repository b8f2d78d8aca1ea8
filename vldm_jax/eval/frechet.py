"""Fréchet distance between Gaussians fitted to features, with float64 statistics accumulated in a stream.

``d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^{1/2}``, as FID/FVD define it. The reference
implementations (pytorch-fid, StyleGAN-V, cd-fvd's scipy path) take ``scipy.linalg.sqrtm(Σ₁ Σ₂)`` and keep the
real part of its trace. Σ₁Σ₂ is similar to the symmetric PSD matrix ``Σ₁^{1/2} Σ₂ Σ₁^{1/2}``, so the trace
of its square root is the sum of the square roots of that matrix's eigenvalues; we compute it that way with
symmetric eigendecompositions in float64 (eigenvalues below zero from round-off clipped to zero). This is the
value scipy's Schur-based square root approaches, and it stays finite and real where scipy's goes complex or
warns of a singular product (fewer samples than feature dimensions, as in every FVD on < 400 videos).

Statistics are merged batch by batch (Chan et al.'s pairwise update of mean and scatter matrix), so 10,000
videos' features never sit in memory together: only ``n``, the mean (D,) and the scatter (D, D).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from vldm_jax.errors import UserError


@dataclasses.dataclass
class RunningStats:
    """Streaming mean and covariance (unbiased, ``ddof=1`` as ``np.cov``) of feature rows, in float64."""

    dim: int | None = None
    n: int = 0
    mean: np.ndarray | None = None
    scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, features) -> "RunningStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise UserError(f"features must be (N, D), got shape {x.shape}")
        if len(x) == 0:
            return self
        if self.dim is None:
            self.dim = x.shape[1]
            self.mean = np.zeros(self.dim)
            self.scatter = np.zeros((self.dim, self.dim))
        if x.shape[1] != self.dim:
            raise UserError(f"features of dimension {x.shape[1]} added to statistics of dimension {self.dim}")
        m = len(x)
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        scatter_b = dev.T @ dev
        delta = mean_b - self.mean
        total = self.n + m
        self.scatter += scatter_b + np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total
        return self

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.scatter / (self.n - 1)

    def save(self, path: str | os.PathLike) -> None:
        """``.npz`` with n, mu, sigma (reusable reference statistics, e.g. of a real data set)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, n=self.n, mu=self.mean, sigma=self.cov)
        os.replace(tmp, path)

    @staticmethod
    def load_moments(path: str | os.PathLike) -> tuple[int, np.ndarray, np.ndarray]:
        with np.load(path) as f:
            return int(f["n"]), f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(Σ₁ Σ₂)`` for symmetric PSD Σ₁, Σ₂ (float64)."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def sqrtm_psd_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """The principal square root of ``Σ₁ Σ₂`` (what ``scipy.linalg.sqrtm(Σ₁ @ Σ₂)`` returns) for symmetric
    positive definite Σ₁: ``Σ₁^{1/2} (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} Σ₁^{-1/2}``. For the distance only its trace
    is needed (:func:`trace_sqrt_product`, which also covers singular Σ₁)."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    if w.min() <= 0:
        raise UserError("sqrtm_psd_product needs a positive definite first matrix; use trace_sqrt_product")
    r, r_inv = (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T
    return r @ _psd_sqrt(r @ s2 @ r) @ r_inv


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_of(stats1: RunningStats, stats2: RunningStats) -> float:
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes a result file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def distance_between_sets(stats_of, real, generated, *, save_stats: str | os.PathLike | None = None) -> dict:
    """The Fréchet distance between two sets (FVD's videos, FID's frames): ``stats_of(source)`` gives a set's
    ``(n, mean, cov)``; the real set's statistics are saved to ``save_stats`` (an ``.npz``, written atomically)
    before the generated set is read. Returns ``{"distance", "n_real", "n_generated"}``."""
    n1, mu1, s1 = stats_of(real)
    if save_stats:
        save = Path(save_stats)
        tmp = save.with_name(f".{save.name}.tmp.npz")
        np.savez(tmp, n=n1, mu=mu1, sigma=s1)
        os.replace(tmp, save)
    n2, mu2, s2 = stats_of(generated)
    if mu1.shape != mu2.shape:
        raise UserError(f"feature dimensions differ: {mu1.shape[0]} (real) and {mu2.shape[0]} (generated)")
    return {"distance": frechet_distance(mu1, s1, mu2, s2), "n_real": int(n1), "n_generated": int(n2)}
