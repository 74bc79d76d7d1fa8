"""Feature selection on profiles (pycytominer's operations, streaming-friendly).

Drops features with too many missing values, near-zero variance (pycytominer's
frequency and uniqueness cuts) and high correlation with a feature already kept.
The correlation step works in column blocks, so memory is O(block x features),
never the full feature x feature matrix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.profiling.columns import feature_columns


def _low_variance(
    values: np.ndarray, *, freq_cut: float, unique_cut: float
) -> np.ndarray:
    """Flag near-constant columns (pycytominer variance_threshold)."""
    n_rows, n_cols = values.shape
    flags = np.zeros(n_cols, dtype=bool)
    for j in range(n_cols):
        column = values[:, j]
        column = column[np.isfinite(column)]
        uniques, counts = np.unique(column, return_counts=True)
        if len(uniques) < 2:
            flags[j] = True
            continue
        top_two = np.sort(counts)[-2:]
        flags[j] = (
            top_two[0] / top_two[1] < freq_cut
            or len(uniques) / len(column) < unique_cut
        )
    return flags


def _standardize(values: np.ndarray) -> np.ndarray:
    """Columns to mean 0 and unit norm (NaN -> 0), so dot products are correlations."""
    filled = np.where(np.isfinite(values), values, np.nan)
    centred = filled - np.nanmean(filled, axis=0)
    centred = np.nan_to_num(centred)
    norms = np.linalg.norm(centred, axis=0)
    return centred / np.where(norms > 0, norms, 1.0)


def select_features(
    profiles: pd.DataFrame,
    *,
    max_missing_frac: float = 0.05,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    corr_threshold: float = 0.9,
    correlation_rows: np.ndarray | None = None,
    block_size: int = 512,
) -> list[str]:
    """Return the features to keep, in their original order.

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_*`` and numeric feature columns (e.g. normalized well profiles).
    max_missing_frac : float
        Features missing (NaN) in more than this fraction of rows are dropped.
    freq_cut : float
        Dropped when (count of the second most common value) / (count of the most
        common) is below this (pycytominer ``freq_cut``).
    unique_cut : float
        Dropped when (distinct values) / (rows) is below this (pycytominer
        ``unique_cut``).
    corr_threshold : float
        Greedy in column order: a feature whose absolute Pearson correlation with a
        kept feature exceeds this is dropped.
    correlation_rows : ndarray of shape (N,), bool, optional
        The rows whose values measure the correlations, e.g. the negative
        controls, so that features that move together only because treatments
        move them (all the readouts of one strong phenotype) are not merged into
        one; None: all rows (pycytominer). The missing-value and variance cuts
        always use all rows.
    block_size : int
        Columns per block of the correlation step.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        If a threshold is out of range, there are no feature columns, or
        `correlation_rows` is not one flag per row with at least two set.
    """
    for name, value in (
        ("max_missing_frac", max_missing_frac),
        ("freq_cut", freq_cut),
        ("unique_cut", unique_cut),
        ("corr_threshold", corr_threshold),
    ):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} = {value} must lie in [0, 1].")
    if block_size < 1:
        raise ValueError(f"block_size = {block_size} must be >= 1.")
    names = feature_columns(profiles)
    if not names:
        raise ValueError("profiles has no feature columns.")
    values = profiles[names].to_numpy(np.float64)
    if correlation_rows is None:
        correlation_rows = np.ones(len(values), dtype=bool)
    correlation_rows = np.asarray(correlation_rows)
    if correlation_rows.dtype != bool or correlation_rows.shape != (len(values),):
        raise ValueError(
            f"correlation_rows must be {len(values)} booleans, one per row; got "
            f"{correlation_rows.dtype} of shape {correlation_rows.shape}."
        )
    if correlation_rows.sum() < 2:
        raise ValueError(
            f"correlation_rows selects {int(correlation_rows.sum())} row(s); a "
            "correlation needs at least 2."
        )
    candidates = np.isnan(values).mean(axis=0) <= max_missing_frac
    candidates &= ~_low_variance(values, freq_cut=freq_cut, unique_cut=unique_cut)
    index = np.flatnonzero(candidates)
    unit = _standardize(values[np.ix_(correlation_rows, index)])
    kept: list[int] = []  # positions in `index`
    for start in range(0, len(index), block_size):
        block = np.arange(start, min(start + block_size, len(index)))
        against_kept = (
            np.abs(unit[:, block].T @ unit[:, kept]).max(axis=1)
            if kept
            else np.zeros(len(block))
        )
        within = np.abs(unit[:, block].T @ unit[:, block])
        block_kept: list[int] = []
        for i, position in enumerate(block):
            if against_kept[i] > corr_threshold:
                continue
            if block_kept and within[i, block_kept].max() > corr_threshold:
                continue
            block_kept.append(i)
            kept.append(int(position))
    return [names[index[k]] for k in kept]
