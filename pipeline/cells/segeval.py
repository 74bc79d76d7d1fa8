"""Instance-segmentation accuracy: one-to-one IoU matching and DSB-style AP.

AP(t) = TP / (TP + FP + FN), where a predicted and a true object match when their
intersection over union exceeds t (for t >= 0.5 such a match is unique), as in the
2018 Data Science Bowl and StarDist papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def pairwise_iou(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """IoU of every overlapping (true, predicted) object pair.

    Parameters
    ----------
    true, pred : ndarray of shape (Y, X), int
        Instance labels, 0 = background.

    Returns
    -------
    true_ids, pred_ids, iou : ndarray of shape (P,)
        One entry per pair of objects that share at least one pixel.

    Raises
    ------
    ValueError
        If the shapes differ or a label is negative.
    """
    if true.shape != pred.shape:
        raise ValueError(f"true {true.shape} and pred {pred.shape} shapes differ.")
    if (true.size and true.min() < 0) or (pred.size and pred.min() < 0):
        raise ValueError("labels must be >= 0 (0 = background).")
    t = true.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    n_pred = int(p.max(initial=0)) + 1
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(t[both] * n_pred + p[both], return_counts=True)
    true_ids, pred_ids = np.divmod(pairs, n_pred)
    area_t = np.bincount(t)
    area_p = np.bincount(p)
    union = area_t[true_ids] + area_p[pred_ids] - inter
    return true_ids, pred_ids, inter / union


def match_counts(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """Count matches of one image at each IoU threshold.

    Parameters
    ----------
    true, pred : ndarray of shape (Y, X), int
        Instance labels.
    thresholds : sequence of float
        IoU thresholds, each >= 0.5 (so that matches are one-to-one).

    Returns
    -------
    DataFrame
        One row per threshold: ``threshold``, ``tp``, ``n_true``, ``n_pred``.

    Raises
    ------
    ValueError
        If a threshold is below 0.5 or above 1.
    """
    bad = [t for t in thresholds if not 0.5 <= t <= 1]
    if bad:
        raise ValueError(f"thresholds {bad} must lie in [0.5, 1] for unique matching.")
    _, _, iou = pairwise_iou(true, pred)
    n_true = len(np.setdiff1d(np.unique(true), [0]))
    n_pred = len(np.setdiff1d(np.unique(pred), [0]))
    return pd.DataFrame(
        {
            "threshold": np.asarray(thresholds, dtype=float),
            "tp": [int((iou > t).sum()) for t in thresholds],
            "n_true": n_true,
            "n_pred": n_pred,
        }
    )


def average_precision(counts: pd.DataFrame) -> pd.Series:
    """Pool match counts over images and return AP per threshold.

    Parameters
    ----------
    counts : DataFrame
        Rows of `match_counts` for any number of images.

    Returns
    -------
    Series
        AP(t) = sum TP / (sum TP + sum FP + sum FN), indexed by threshold.

    Raises
    ------
    ValueError
        If a column of `match_counts` is missing.
    """
    missing = {"threshold", "tp", "n_true", "n_pred"} - set(counts.columns)
    if missing:
        raise ValueError(f"counts lacks columns {sorted(missing)}; use match_counts.")
    pooled = counts.groupby("threshold")[["tp", "n_true", "n_pred"]].sum()
    denominator = pooled["n_true"] + pooled["n_pred"] - pooled["tp"]
    return (pooled["tp"] / denominator.where(denominator > 0)).fillna(1.0).rename("ap")
