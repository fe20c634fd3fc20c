"""Metrics in numpy: adjusted Rand index, PSNR, Spearman, IoU. No torch, no sklearn."""

from __future__ import annotations

import numpy as np


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI between two labelings of the same items (Hubert & Arabie)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    comb = lambda x: x * (x - 1) / 2.0
    sum_ij = comb(table).sum()
    sum_a, sum_b = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = sum_a * sum_b / comb(a.size)
    top = 0.5 * (sum_a + sum_b)
    if top == expected:  # both labelings trivial (one cluster or all singletons): perfect agreement
        return 1.0
    return float((sum_ij - expected) / (top - expected))


def fg_ari(assignment: np.ndarray, labels: np.ndarray) -> float:
    """Foreground ARI over patches: clusters vs object instances, background patches ignored."""
    fg = labels > 0
    if fg.sum() < 2:
        return 1.0
    return adjusted_rand_index(assignment[fg], labels[fg])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse <= 1e-10 else float(10.0 * np.log10(1.0 / mse))


def flat_baseline_psnr(img: np.ndarray) -> float:
    """PSNR of an image against a flat image of its own mean colour ((H, W, 3) in [0, 1])."""
    return psnr(img, np.broadcast_to(img.reshape(-1, 3).mean(0), img.shape))


def spearman(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    rx, ry = _rank(x), _rank(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty_like(x)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
