"""Phenotypic activity: mAP of replicate profiles against negative controls.

The copairs definition (Kalinin et al. 2024, used by JUMP-CP): every replicate profile
of a treatment is a query; its other replicates are the positives and the
negative-control profiles the negatives, ranked by cosine similarity to the query.
A query's average precision (AP) is the mean precision at the rank of each positive;
a treatment's mAP is the mean over its queries. Its p-value compares the mAP with
the AP of random rankings of the same numbers of positives and negatives (the
permutation null, `null_size` samples), and Benjamini-Hochberg q-values correct
over treatments. One deliberate difference from copairs 0.5.5: null samples *equal*
to the observed mAP count as at least as extreme (``>=``, a valid permutation
p-value). copairs counts only larger ones, which for few replicates (e.g. two wells,
where AP = 1 has probability 1 / (1 + n_controls)) reports p ~ 1 / null_size instead
of ~ 1 / (1 + n_controls). Vectorized with NumPy: one matrix product per treatment, no
pairwise tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from pipeline.profiling.profiles import feature_columns


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Return the rows of `values` (n, d) scaled to unit length; zero rows stay zero.

    Row products of the result are cosine similarities.
    """
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.where(norms > 0, norms, 1.0)


def _query_average_precision(pos_sims: np.ndarray, neg_sims: np.ndarray) -> np.ndarray:
    """AP per query row from its positive (q, p) and negative (q, n) similarities."""
    n_pos = pos_sims.shape[1]
    positives = -np.sort(-pos_sims, axis=1)  # descending
    negatives = np.sort(neg_sims, axis=1)  # ascending, for searchsorted
    # negatives ranked above each positive: similarity strictly greater
    above = np.stack(
        [
            negatives.shape[1] - np.searchsorted(row_neg, row_pos, side="right")
            for row_neg, row_pos in zip(negatives, positives, strict=True)
        ]
    )
    hits = np.arange(1, n_pos + 1)
    return (hits / (hits + above)).mean(axis=1)


def average_precision(
    profiles: pd.DataFrame,
    *,
    group_by: Sequence[str],
    control_role: str = "negative_control",
) -> pd.DataFrame:
    """Return the AP of every treatment replicate against the negative controls.

    Parameters
    ----------
    profiles : DataFrame
        Well profiles (normalized): ``Metadata_Role``, the `group_by` columns and
        numeric features; NaN features are not allowed.
    group_by : sequence of str
        Columns that define a treatment, e.g. ``["Metadata_Compound",
        "Metadata_Concentration"]`` (replicate wells) or ``["Metadata_Compound"]``
        (doses as replicates).
    control_role : str
        ``Metadata_Role`` of the negative controls.

    Returns
    -------
    DataFrame
        One row per treatment profile whose group has at least two replicates: the
        `group_by` columns, ``average_precision``, ``n_pos`` and ``n_total``
        (positives + negatives ranked); index of `profiles`.

    Raises
    ------
    ValueError
        If columns are missing, features hold NaN, or there are no controls.
    """
    missing = [c for c in [*group_by, "Metadata_Role"] if c not in profiles.columns]
    if missing:
        raise ValueError(f"profiles lacks columns {missing}.")
    features = profiles[feature_columns(profiles)].to_numpy(np.float64)
    if not np.isfinite(features).all():
        raise ValueError(
            "profiles has NaN or infinite features; drop those wells or features first "
            "(e.g. wells without cells)."
        )
    unit = unit_rows(features)
    is_control = (profiles["Metadata_Role"] == control_role).to_numpy()
    if not is_control.any():
        raise ValueError(f"profiles has no {control_role} rows to rank against.")
    controls = unit[is_control]
    treated = profiles.loc[~is_control, list(group_by)]
    rows = []
    for keys, group in treated.groupby(list(group_by), sort=True, dropna=False):
        if len(group) < 2:
            continue
        positions = profiles.index.get_indexer(group.index)
        queries = unit[positions]
        sims = queries @ queries.T
        off_diagonal = ~np.eye(len(group), dtype=bool)
        pos_sims = sims[off_diagonal].reshape(len(group), len(group) - 1)
        ap = _query_average_precision(pos_sims, queries @ controls.T)
        rows.append(
            pd.DataFrame(
                {
                    **dict(zip(group_by, np.broadcast_arrays(*keys), strict=True)),
                    "average_precision": ap,
                    "n_pos": len(group) - 1,
                    "n_total": len(group) - 1 + len(controls),
                },
                index=group.index,
            )
        )
    if not rows:
        raise ValueError(
            f"no treatment grouped by {list(group_by)} has two replicates."
        )
    return pd.concat(rows)


def null_average_precision(
    n_pos: int,
    n_total: int,
    *,
    null_size: int,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Sample the AP of random rankings of `n_pos` positives among `n_total` items.

    Returns
    -------
    ndarray of shape (null_size,), float64

    Raises
    ------
    ValueError
        If not ``1 <= n_pos <= n_total`` or `null_size` < 1.
    """
    if not 1 <= n_pos <= n_total or null_size < 1:
        raise ValueError(
            f"need 1 <= n_pos ({n_pos}) <= n_total ({n_total}) and null_size >= 1."
        )
    generator = np.random.default_rng(rng)
    out = np.empty(null_size)
    for start in range(0, null_size, 10_000):  # bounded memory
        size = min(10_000, null_size - start)
        ranks = generator.random((size, n_total)).argsort(axis=1)[:, :n_pos] + 1
        ranks.sort(axis=1)
        out[start : start + size] = (np.arange(1, n_pos + 1) / ranks).mean(axis=1)
    return out


def mean_average_precision(
    ap_scores: pd.DataFrame,
    *,
    group_by: Sequence[str],
    null_size: int = 100_000,
    fdr: float = 0.05,
    rng: np.random.Generator | int | None = None,
) -> pd.DataFrame:
    """Return mAP, permutation p-value and BH q-value per treatment.

    Parameters
    ----------
    ap_scores : DataFrame
        From `average_precision`.
    group_by : sequence of str
        As given to `average_precision`.
    null_size : int
        Samples of the permutation null per (n_pos, n_total) configuration; the
        smallest p-value is ``1 / (null_size + 1)``.
    fdr : float
        Treatments with q below it get ``is_active``.
    rng : Generator, int or None
        Seed of the null.

    Returns
    -------
    DataFrame
        One row per treatment: the `group_by` columns, ``mean_average_precision``,
        ``n_replicates``, ``p_value``, ``q_value``, ``is_active``.

    Raises
    ------
    ValueError
        If columns are missing or `fdr` is not in (0, 1).
    """
    needed = [*group_by, "average_precision", "n_pos", "n_total"]
    missing = [c for c in needed if c not in ap_scores.columns]
    if missing:
        raise ValueError(
            f"ap_scores lacks columns {missing}; make it with average_precision."
        )
    if not 0 < fdr < 1:
        raise ValueError(f"fdr = {fdr} must lie in (0, 1).")
    generator = np.random.default_rng(rng)
    configs = sorted(set(zip(ap_scores["n_pos"], ap_scores["n_total"], strict=True)))
    nulls = {
        config: null_average_precision(*config, null_size=null_size, rng=generator)
        for config in configs
    }
    rows = []
    for keys, group in ap_scores.groupby(list(group_by), sort=True, dropna=False):
        score = group["average_precision"].mean()
        null = np.mean(
            [nulls[c] for c in zip(group["n_pos"], group["n_total"], strict=True)],
            axis=0,
        )
        p_value = ((null >= score).sum() + 1) / (null_size + 1)
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append((*keys, score, len(group), p_value))
    result = pd.DataFrame(
        rows, columns=[*group_by, "mean_average_precision", "n_replicates", "p_value"]
    )
    result["q_value"] = false_discovery_control(result["p_value"], method="bh")
    result["is_active"] = result["q_value"] < fdr
    return result


def _treated_values(
    profiles: pd.DataFrame, group_by: Sequence[str], control_role: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """Non-control rows (index reset) and their features, checked finite."""
    missing = [c for c in [*group_by, "Metadata_Role"] if c not in profiles.columns]
    if missing:
        raise ValueError(f"profiles lacks columns {missing}.")
    treated = profiles[profiles["Metadata_Role"] != control_role].reset_index(drop=True)
    values = treated[feature_columns(treated)].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(
            "profiles has NaN or infinite features; drop those wells first."
        )
    return treated, values


def replicate_average_precision(
    profiles: pd.DataFrame,
    *,
    group_by: Sequence[str],
    control_role: str = "negative_control",
) -> pd.DataFrame:
    """Return each treatment's replicate mAP: how well its wells retrieve each other.

    copairs' replicate retrieval: every well of a treatment queries all other
    treatment wells (negative controls left out) by cosine similarity; its other
    replicates are the positives and the wells of other treatments the negatives.

    Parameters
    ----------
    profiles : DataFrame
        Normalized well profiles: ``Metadata_Role``, the `group_by` columns and
        finite features.
    group_by : sequence of str
        Columns that define a treatment.
    control_role : str
        ``Metadata_Role`` of the wells to leave out.

    Returns
    -------
    DataFrame
        One row per treatment with two or more wells: the `group_by` columns and
        ``replicate_map``.

    Raises
    ------
    ValueError
        If columns are missing or features are not finite.
    """
    treated, values = _treated_values(profiles, group_by, control_role)
    unit = unit_rows(values)
    rows = []
    for keys, members in treated.groupby(
        list(group_by), sort=True, dropna=False
    ).indices.items():
        if len(members) < 2:
            continue
        sims = unit[members] @ unit.T  # (k, N)
        others = np.ones(len(unit), bool)
        others[members] = False
        off_diagonal = ~np.eye(len(members), dtype=bool)
        pos = sims[:, members][off_diagonal].reshape(len(members), len(members) - 1)
        ap = _query_average_precision(pos, sims[:, others])
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append((*keys, float(ap.mean())))
    return pd.DataFrame(rows, columns=[*group_by, "replicate_map"])


def percent_replicating(
    profiles: pd.DataFrame,
    *,
    group_by: Sequence[str],
    control_role: str = "negative_control",
    n_null: int = 10_000,
    quantile: float = 0.95,
    rng: np.random.Generator | int | None = None,
) -> tuple[float, pd.DataFrame]:
    """Return Percent Replicating and each treatment's replicate correlation.

    The JUMP definition: a treatment replicates when the median Pearson correlation
    among its replicate wells exceeds the `quantile` of a null of median
    correlations among the same number of wells drawn from distinct treatments.

    Parameters
    ----------
    profiles : DataFrame
        Well profiles with ``Metadata_Role``, the `group_by` columns and finite
        features; negative controls are left out.
    group_by : sequence of str
        Columns that define a treatment (e.g. ``["Metadata_Compound"]``).
    control_role : str
        ``Metadata_Role`` of the wells to leave out.
    n_null : int
        Null samples per replicate count.
    quantile : float
        Null quantile a treatment must exceed.
    rng : Generator, int or None

    Returns
    -------
    percent : float
        Percent of treatments (with two or more replicates) that replicate.
    per_treatment : DataFrame
        `group_by` columns, ``n_replicates``, ``median_correlation``, ``threshold``,
        ``is_replicating``.

    Raises
    ------
    ValueError
        If columns are missing, features are not finite, or fewer than two
        treatments have replicates.
    """
    treated, values = _treated_values(profiles, group_by, control_role)
    corr = np.corrcoef(values)
    groups = treated.groupby(list(group_by), sort=True, dropna=False).indices
    groups = {key: members for key, members in groups.items() if len(members) >= 2}
    if len(groups) < 2:
        raise ValueError("fewer than two treatments have two or more replicates.")
    generator = np.random.default_rng(rng)
    members_of = list(groups.values())
    flat = np.concatenate(members_of)
    sizes = np.array([len(m) for m in members_of])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    thresholds = {}
    for size in sorted(set(sizes.tolist())):
        k = min(size, len(members_of))
        chosen = generator.random((n_null, len(members_of))).argsort(axis=1)[:, :k]
        picks = (generator.random((n_null, k)) * sizes[chosen]).astype(np.int64)
        wells = flat[offsets[chosen] + picks]  # (n_null, k), one well per treatment
        upper = np.triu_indices(k, 1)
        null = np.median(
            corr[wells[:, :, None], wells[:, None, :]][:, upper[0], upper[1]], axis=1
        )
        thresholds[size] = np.quantile(null, quantile)
    rows = []
    for key, members in groups.items():
        median = float(
            np.median(corr[np.ix_(members, members)][np.triu_indices(len(members), 1)])
        )
        keys = key if isinstance(key, tuple) else (key,)
        rows.append((*keys, len(members), median, thresholds[len(members)]))
    table = pd.DataFrame(
        rows, columns=[*group_by, "n_replicates", "median_correlation", "threshold"]
    )
    table["is_replicating"] = table["median_correlation"] > table["threshold"]
    return 100.0 * float(table["is_replicating"].mean()), table


def ledoit_wolf_shrinkage_gram(centred: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage of centred data (n, F), computed in sample space.

    Equal to `sklearn.covariance.ledoit_wolf_shrinkage` with ``assume_centered``,
    but from the n x n Gram matrix: O(n^2 F) instead of O(n F^2), which matters when
    thousands of features are refitted for every left-out control.

    Raises
    ------
    ValueError
        If `centred` is not 2-D with at least one row and column.
    """
    if centred.ndim != 2 or 0 in centred.shape:
        raise ValueError(f"centred has shape {centred.shape}; expected (n, F) > 0.")
    n, n_features = centred.shape
    gram = centred @ centred.T
    squared_norms = np.diag(gram)
    trace = squared_norms.sum() / n
    mu = trace / n_features
    delta_ = (gram**2).sum() / n**2
    beta = ((squared_norms**2).sum() / n - delta_) / (n_features * n)
    delta = (delta_ - 2 * mu * trace + n_features * mu**2) / n_features
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def _shrunk_mahalanobis(controls: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of `queries` (q, F) to `controls` (n, F).

    Features are standardized by the controls' own mean and standard deviation
    (features constant in the controls are left out), then the correlation matrix is
    Ledoit-Wolf shrunk towards the identity, (1 - s) R + s I, and inverted in the
    n-dimensional sample space (Woodbury), so F may far exceed n. Shrinking towards
    the controls' own variances makes the distance independent of any per-feature
    scaling done before (e.g. robust z on all controls, which a left-out control
    would otherwise have seen).
    """
    n = len(controls)
    mean = controls.mean(axis=0)
    std = controls.std(axis=0, ddof=1)
    keep = std > 0
    if not keep.any():
        raise ValueError("no feature varies within the control wells.")
    centred = (controls[:, keep] - mean[keep]) / std[keep]
    v = (queries[:, keep] - mean[keep]) / std[keep]
    shrinkage = ledoit_wolf_shrinkage_gram(centred)
    mu = float((centred**2).sum()) / (n * centred.shape[1])
    ridge = max(shrinkage * mu, 1e-12)
    a = 1.0 - shrinkage
    if a <= 0:
        return (v**2).sum(axis=1) / ridge
    projected = v @ centred.T  # (q, n)
    gram = centred @ centred.T + (ridge * n / a) * np.eye(n)
    solved = np.linalg.solve(gram, projected.T).T
    return ((v**2).sum(axis=1) - (projected * solved).sum(axis=1)) / ridge


def mahalanobis_to_controls(
    normalized: pd.DataFrame, *, control_role: str = "negative_control"
) -> pd.DataFrame:
    """Return each well's distance to its plate's negative controls, with a p-value.

    For single-replicate designs, where mAP has no replicates to rank. Per plate, the
    controls' correlation is Ledoit-Wolf shrunk (features may outnumber control
    wells; `_shrunk_mahalanobis`) and every well's squared Mahalanobis distance d2
    to the control mean is computed; each control's own d2 is to the *other*
    controls (leave one out, standardization included).
    The p-value is empirical, against the controls' leave-one-out d2 pooled over
    plates: (1 + #{null >= d2}) / (1 + #null), a conformal p-value, valid when the
    well is exchangeable with the controls. Parametric nulls (gamma fit, Hotelling's
    F) called 8-26 % of real DMSO wells at p < 0.05 (benchmarks/bench_calibration.py),
    so none is used; the price is that p cannot go below 1 / (1 + #controls).

    Parameters
    ----------
    normalized : DataFrame
        Well profiles after `pipeline.profiling.profiles.normalize_to_controls`:
        ``Metadata_Plate``, ``Metadata_Role`` and features.
    control_role : str
        ``Metadata_Role`` of the negative controls.

    Returns
    -------
    DataFrame
        Index of `normalized`; ``mahalanobis`` (sqrt of d2) and ``mahalanobis_p``
        (a control's p leaves its own d2 out of the null); NaN for wells without
        finite features.

    Raises
    ------
    ValueError
        If columns are missing or a plate has fewer than four finite control wells.
    """
    missing = {"Metadata_Plate", "Metadata_Role"} - set(normalized.columns)
    if missing:
        raise ValueError(f"normalized lacks columns {sorted(missing)}.")
    values = normalized[feature_columns(normalized)].to_numpy(np.float64)
    finite = np.isfinite(values).all(axis=1)
    is_control = (normalized["Metadata_Role"] == control_role).to_numpy()
    d2 = np.full(len(values), np.nan)
    plates = normalized["Metadata_Plate"].to_numpy()
    for plate in pd.unique(plates):
        on_plate = plates == plate
        control_rows = np.flatnonzero(on_plate & is_control & finite)
        if len(control_rows) < 4:
            raise ValueError(
                f"plate {plate!r} has {len(control_rows)} {control_role} wells with "
                "cells; the distance to controls needs at least four."
            )
        controls = values[control_rows]
        rows = np.flatnonzero(on_plate & finite & ~is_control)
        d2[rows] = _shrunk_mahalanobis(controls, values[rows])
        d2[control_rows] = [
            _shrunk_mahalanobis(np.delete(controls, i, axis=0), controls[i : i + 1])[0]
            for i in range(len(controls))
        ]
    d2 = np.maximum(d2, 0.0)
    null = np.sort(d2[is_control & finite])
    at_least = len(null) - np.searchsorted(null, d2, side="left")
    own = (is_control & finite).astype(int)  # a control is not its own null
    p_value = np.where(finite, (1 + at_least - own) / (1 + len(null) - own), np.nan)
    return pd.DataFrame(
        {"mahalanobis": np.sqrt(d2), "mahalanobis_p": p_value}, index=normalized.index
    )


def leave_out_null(
    controls: np.ndarray,
    k: int,
    *,
    null_size: int = 1000,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Sample the squared distances of k wells fitted together, under the null.

    Each sample leaves k random controls out, fits `_shrunk_mahalanobis` on the
    others and returns the k left-out wells' squared distances. Wells of one
    compound-dose on one plate share the controls' fit, so their distances are
    correlated; these samples have the same correlation (treating them as
    independent leave-one-out distances called 8 % of real DMSO triplets at
    p < 0.05).

    Parameters
    ----------
    controls : ndarray of shape (n, F)
        One plate's control profiles.
    k : int
        Wells left out together, 1 <= k <= n - 3.
    null_size : int
    rng : Generator, int or None

    Returns
    -------
    ndarray of shape (null_size, k)

    Raises
    ------
    ValueError
        If `k` is out of range or `null_size` < 1.
    """
    n = len(controls)
    if not 1 <= k <= n - 3 or null_size < 1:
        raise ValueError(
            f"need 1 <= k ({k}) <= controls - 3 ({n - 3}) and null_size >= 1."
        )
    generator = np.random.default_rng(rng)
    out = np.empty((null_size, k))
    for i in range(null_size):
        left_out = np.zeros(n, bool)
        left_out[generator.choice(n, size=k, replace=False)] = True
        out[i] = _shrunk_mahalanobis(controls[~left_out], controls[left_out])
    return out
