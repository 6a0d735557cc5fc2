"""Image-quality metrics from features: FID, KID, Inception Score, CLIP score. Pure numpy/scipy.

Everything here takes arrays that a feature extractor already produced, so the maths is tested
on its own (closed forms on Gaussians, uniform and one-hot predictions) without any network.
Conventions follow torchmetrics / torch-fidelity, so numbers are comparable with the literature
and with paper Table I (which reports FID, IS and CLIP score per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

FID_EPS = 1e-6  # diagonal offset when sqrtm of a near-singular product is not finite (pytorch-fid)


def _check_features(name: str, feats: np.ndarray, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name}: expected a (n, d) feature matrix, got shape {feats.shape}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {feats.shape[0]}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name}: features contain NaN or inf")
    return feats


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1) of a (n, d) feature matrix, as pytorch-fid/torchmetrics."""
    feats = _check_features("features", feats, min_rows=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        # A product of rank-deficient covariances (fewer images than feature dims) can make sqrtm
        # blow up; pytorch-fid's remedy is a tiny diagonal offset on both.
        offset = np.eye(sigma1.shape[0]) * FID_EPS
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off leaves a small imaginary part; the true matrix square root here is real.
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # tiny negative values are round-off of an exact 0


def fid(feats_real: np.ndarray, feats_fake: np.ndarray) -> float:
    """FID between two (n, d) feature sets (2048-d InceptionV3 pool3 features for the standard FID).

    With fewer images than feature dims (a few hundred per class here, d = 2048) both covariances
    are rank-deficient and a d x d sqrtm is slow and ill-conditioned. The trace term needs no
    sqrtm: with sigma_i = B_i^T B_i, B_i = centred features / sqrt(n_i - 1), the non-zero
    eigenvalues of sigma1 sigma2 are the squared singular values of M = B1 B2^T (n1 x n2), so
    Tr((sigma1 sigma2)^(1/2)) = ||M||_* exactly (torchmetrics sums sqrt(eigvals(sigma1 sigma2))).
    With more images than dims the d x d route (`fid_from_stats`, scipy sqrtm) is cheaper.
    """
    x = _check_features("real features", feats_real, min_rows=2)
    y = _check_features("synthetic features", feats_fake, min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) > x.shape[1]:
        return fid_from_stats(*gaussian_stats(x), *gaussian_stats(y))
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    b_x = (x - mu_x) / math.sqrt(x.shape[0] - 1)
    b_y = (y - mu_y) / math.sqrt(y.shape[0] - 1)
    trace_sqrt = float(np.linalg.svd(b_x @ b_y.T, compute_uv=False).sum())
    diff = mu_x - mu_y
    value = float(diff @ diff + (b_x * b_x).sum() + (b_y * b_y).sum() - 2.0 * trace_sqrt)
    return max(value, 0.0)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x.y / d + coef0)^degree, the KID kernel of Binkowski et al. 2018 (gamma = 1/d)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 estimator (Binkowski et al. 2018, eq. 3): diagonal terms left out of k_xx, k_yy."""
    m = k_xx.shape[0]
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2.0 * k_xy.sum() / (m * m))


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subset_size: int
    subsets: int


def kid(feats_real: np.ndarray, feats_fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, seed: int = 0) -> KID:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    Unlike FID, the estimator is unbiased, which matters with the few hundred images per class
    the paper generates. The subset size is capped at the smaller set (DESIGN: "subset size <=
    smallest set"); subsets are drawn without replacement within a subset, seeded.
    """
    x = _check_features("real features", feats_real, min_rows=2)
    y = _check_features("synthetic features", feats_fake, min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    size = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(x.shape[0], size, replace=False), rng.choice(y.shape[0], size, replace=False))
             for _ in range(subsets)]
    # Kernel entries are reused across subsets: when the full Gram matrices are smaller than what the
    # subsets would compute, build them once and index (same numbers, far fewer 2048-d dot products).
    n_x, n_y = x.shape[0], y.shape[0]
    if n_x * n_x + n_x * n_y + n_y * n_y < 3 * subsets * size * size:
        k_xx, k_yy, k_xy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
        values = np.array([_mmd2_unbiased(k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)], k_xy[np.ix_(i, j)])
                           for i, j in draws])
    else:
        values = np.array([_mmd2_unbiased(polynomial_kernel(x[i], x[i], degree), polynomial_kernel(y[j], y[j], degree),
                                          polynomial_kernel(x[i], y[j], degree)) for i, j in draws])
    std = float(values.std(ddof=1)) if subsets > 1 else 0.0  # ddof=1: t2id's one std convention
    return KID(mean=float(values.mean()), std=std, subset_size=size, subsets=subsets)


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int



def inception_score(logits: np.ndarray, splits: int = 10, seed: int | None = 0) -> InceptionScore:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean/std over splits.

    As torch-fidelity (`isc_featuresdict_to_metric`): `logits` are the classifier's unnormalized
    outputs ('logits_unbiased' of the FID InceptionV3); rows are shuffled with
    np.random.RandomState(seed) (seed None: no shuffle), split into exactly `splits` chunks with
    bounds i*N//splits, softmax in float64. Fewer images than splits is an error, not a silent
    change of the split count (torch-fidelity and this function give the same mean). The std over
    splits is the unbiased one (ddof=1, the one std convention of t2id's tables; torch-fidelity
    prints ddof=0, smaller by sqrt((splits-1)/splits)).
    """
    logits = _check_features("logits", logits, min_rows=1)
    n = logits.shape[0]
    if splits < 1:
        raise ValueError(f"inception_score needs splits >= 1, got {splits}")
    if n < splits:
        raise ValueError(f"inception_score: {n} image(s) for {splits} splits; IS needs at least one image "
                         f"per split (lower evaluate.is_splits or generate more images)")
    if seed is not None:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        chunk, log_chunk = probs[lo:hi], log_probs[lo:hi]
        marginal = chunk.mean(axis=0, keepdims=True)
        kl = (chunk * (log_chunk - np.log(np.clip(marginal, 1e-300, None)))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    scores_arr = np.array(scores)
    std = float(scores_arr.std(ddof=1)) if splits > 1 else 0.0  # one split has no spread
    return InceptionScore(mean=float(scores_arr.mean()), std=std, splits=splits)


def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-pair CLIP score = 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics)."""
    img = np.asarray(image_embeds, dtype=np.float64)
    txt = np.asarray(text_embeds, dtype=np.float64)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"image and text embeddings must be (n, d) of one shape, got {img.shape}, {txt.shape}")
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    return np.maximum(100.0 * (img * txt).sum(axis=1), 0.0)
