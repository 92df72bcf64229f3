"""Quality metrics shared by the stages: the Fréchet distance between two feature sets.

FID is the Fréchet distance between Gaussians fitted to two sets of features,
``|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)``; the matrix square root is scipy's (``linalg.sqrtm``),
with the guards pytorch-fid uses: an ``eps·I`` offset when the product is singular (scipy warns), and the tiny
imaginary part that round-off leaves dropped only when it is negligible.
"""

from __future__ import annotations

import warnings

import numpy as np


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of ``features`` (N, D); N must exceed 1."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features (N ≥ 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if caught or not np.isfinite(covmean).all():  # (near-)singular product: regularize both covariances
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(np.diagonal(covmean)).max()))
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(f"sqrtm left an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                             "the covariances are too ill-conditioned (use more samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(features_a, features_b) -> float:
    """Fréchet distance between two feature sets (N, D)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
