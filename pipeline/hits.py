"""Hit calling: phenotypic activity with FDR, potency and toxicity per compound.

From DMSO-normalized well profiles, two tables:

* **compound-doses**: mAP of the replicate wells of each compound-dose against the
  plate's negative controls, permutation p and Benjamini-Hochberg q
  (`pipeline.activity`); the distance score of `pipeline.profiles.rank_compounds`
  (for single-replicate designs); the cell-count ratio to DMSO and a toxicity flag.
* **hits**, one row per compound: is it active at any dose? Its doses' p-values are
  combined with Simes' method and BH-corrected over compounds (the first stage of
  Yekutieli's hierarchical FDR, as copairs' ``hierarchical_by``), so a compound
  active only at its top doses is not diluted by its inactive low doses. A compound
  without replicate wells (any dose) has its doses serve as its replicates (copairs'
  convention), also when other compounds of the screen have replicates.
  Also: the mAP with doses as replicates, the 4PL EC50 of well activity
  (`pipeline.doseresponse`), the largest activity, the toxicity flag, replicate
  consistency (median correlation of replicate wells against the JUMP null) and the
  most similar other compounds (annotated ones, when a MoA column exists).

For single-replicate designs, every compound-dose also gets a Mahalanobis distance
to the DMSO wells with an empirical p-value against the DMSO wells' own distances
(`pipeline.activity.mahalanobis_to_controls`, `dose_distances`);
doses with one well are called active on it (``active_by``), and ``distance_q``
gives a compound-level call from it as well.

Wells without cells (NaN features) cannot be ranked; they count for toxicity.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from pipeline.activity import (
    average_precision,
    leave_out_null,
    mahalanobis_to_controls,
    mean_average_precision,
    percent_replicating,
    replicate_average_precision,
)
from pipeline.doseresponse import fit_dose_responses
from pipeline.profiles import feature_columns, rank_compounds, score_wells

logger = logging.getLogger(__name__)

DOSE_KEYS = ["Metadata_Compound", "Metadata_Concentration", "Metadata_Role"]
#: Columns of the compound hit list shown to users, in display order.
HIT_COLUMNS = [
    "rank", "Metadata_Compound", "is_hit", "q_value", "n_active_doses", "n_doses",
    "max_activity_z", "ec50", "ec50_flag", "min_cell_count_ratio", "is_toxic",
    "replicate_correlation", "nearest_compounds",
]  # fmt: skip
#: Columns of the compound-dose table shown to users, in display order.
DOSE_COLUMNS = [
    "Metadata_Compound", "Metadata_Concentration", "Metadata_Role", "n_wells",
    "mean_average_precision", "q_value", "mahalanobis", "mahalanobis_q", "is_active",
    "active_by", "activity", "activity_z", "replicate_correlation", "is_replicating",
    "replicate_map", "cell_count_ratio", "is_toxic",
]  # fmt: skip
#: Similar compounds listed per hit.
N_NEAREST = 3


def simes(p_values: np.ndarray) -> float:
    """Combine p-values with Simes' method: min over i of n p_(i) / i.

    Raises
    ------
    ValueError
        If `p_values` is empty.
    """
    ordered = np.sort(np.asarray(p_values, dtype=float))
    if len(ordered) == 0:
        raise ValueError("p_values is empty.")
    return float(
        min(1.0, np.min(len(ordered) * ordered / np.arange(1, len(ordered) + 1)))
    )


def _activity(
    rankable: pd.DataFrame, group_by: list[str], **options: object
) -> pd.DataFrame:
    """Return the mAP table of `group_by` groups; empty when none has two replicates."""
    try:
        ap = average_precision(rankable, group_by=group_by)
    except ValueError as exc:
        if "two replicates" not in str(exc):
            raise
        columns = [*group_by, "mean_average_precision", "n_replicates", "p_value"]
        return pd.DataFrame(columns=[*columns, "q_value", "is_active"])
    return mean_average_precision(ap, group_by=group_by, **options)


def dose_distances(
    normalized: pd.DataFrame, *, null_size: int = 1000, rng: int = 0
) -> pd.DataFrame:
    """Return the Mahalanobis distance of each compound-dose to DMSO, with p and q.

    A compound-dose's statistic is the mean squared distance of its wells to their
    plates' DMSO wells (`pipeline.activity.mahalanobis_to_controls`). With one
    well, its p-value is the well's conformal p-value; with several, the null is the
    same mean over as many DMSO wells per plate, each plate's share left out of its
    fit together (`pipeline.activity.leave_out_null`; one well per plate: the DMSO
    wells' leave-one-out distances). q is Benjamini-Hochberg over compound-doses.
    ``mahalanobis`` reports the median distance of the wells.

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with the `DOSE_KEYS` columns and
        ``Metadata_Plate``.
    null_size : int
        Null samples per replicate layout (smallest p: 1 / (null_size + 1)).
    rng : int
        Seed of the null.

    Returns
    -------
    DataFrame
        One row per non-negative-control compound-dose with a finite well: the
        `DOSE_KEYS`, ``mahalanobis``, ``mahalanobis_p``, ``mahalanobis_q``; empty
        (with a logged warning) when a plate has fewer than four DMSO wells.

    Raises
    ------
    ValueError
        If columns are missing or `null_size` < 1.
    """
    columns = [*DOSE_KEYS, "mahalanobis", "mahalanobis_p", "mahalanobis_q"]
    missing = [c for c in [*DOSE_KEYS, "Metadata_Plate"] if c not in normalized.columns]
    if missing:
        raise ValueError(f"normalized lacks columns {missing}.")
    if null_size < 1:
        raise ValueError(f"null_size = {null_size} must be >= 1.")
    try:
        wells = mahalanobis_to_controls(normalized)
    except ValueError as exc:
        if "at least four" not in str(exc) and "varies" not in str(exc):
            raise
        logger.warning("no Mahalanobis scores: %s", exc)
        return pd.DataFrame(columns=columns)
    table = normalized[[*DOSE_KEYS, "Metadata_Plate"]].join(wells)
    table = table.dropna(subset=["mahalanobis"])
    is_control = table["Metadata_Role"] == "negative_control"
    values = normalized[feature_columns(normalized)].to_numpy(np.float64)
    controls = {
        plate: values[normalized.index.get_indexer(group.index)]
        for plate, group in table[is_control].groupby("Metadata_Plate")
    }
    loo = {
        plate: group["mahalanobis"].to_numpy() ** 2
        for plate, group in table[is_control].groupby("Metadata_Plate")
    }
    generator = np.random.default_rng(rng)
    nulls: dict[tuple[str, int], np.ndarray] = {}

    def plate_null(plate: str, k: int) -> np.ndarray:
        k = min(k, len(controls[plate]) - 3)
        if (plate, k) not in nulls:
            nulls[(plate, k)] = (
                generator.choice(loo[plate], size=null_size)
                if k == 1
                else leave_out_null(
                    controls[plate], k, null_size=null_size, rng=generator
                )
            )
        return nulls[(plate, k)]

    rows = []
    for keys, group in table[~is_control].groupby(DOSE_KEYS, dropna=False, sort=True):
        if len(group) == 1:
            p_value = float(group["mahalanobis_p"].iloc[0])
        else:
            per_plate = group.groupby("Metadata_Plate").size()
            null = sum(
                k * generator.permutation(plate_null(plate, k))
                for plate, k in per_plate.items()
            ) / len(group)
            statistic = float((group["mahalanobis"] ** 2).mean())
            p_value = (1 + int((null >= statistic).sum())) / (1 + null_size)
        rows.append((*keys, float(group["mahalanobis"].median()), p_value))
    if not rows:
        return pd.DataFrame(columns=columns)
    out = pd.DataFrame(rows, columns=columns[:-1])
    out["mahalanobis_q"] = false_discovery_control(out["mahalanobis_p"], method="bh")
    return out


def replicate_consistency(normalized: pd.DataFrame) -> pd.DataFrame:
    """Return each compound-dose's replicate consistency.

    `pipeline.activity.percent_replicating` per compound-dose: the median Pearson
    correlation of its replicate wells against the 95th percentile of a null of
    wells of different compound-doses (JUMP's Percent Replicating); and its
    replicate mAP (`pipeline.activity.replicate_average_precision`: its wells
    retrieving each other among all treatment wells).

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with the `DOSE_KEYS` columns.

    Returns
    -------
    DataFrame
        The `DOSE_KEYS`, ``replicate_correlation``, ``is_replicating`` and
        ``replicate_map``, for compound-doses with two or more finite wells; empty
        when fewer than two compound-doses have replicates.

    Raises
    ------
    ValueError
        If columns are missing.
    """
    columns = [*DOSE_KEYS, "replicate_correlation", "is_replicating"]
    missing = [c for c in DOSE_KEYS if c not in normalized.columns]
    if missing:
        raise ValueError(f"normalized lacks columns {missing}.")
    values = normalized[feature_columns(normalized)].to_numpy(float)
    finite = normalized[np.isfinite(values).all(axis=1)]
    try:
        _, table = percent_replicating(finite, group_by=DOSE_KEYS, rng=0)
    except ValueError as exc:
        if "fewer than two" not in str(exc):
            raise
        return pd.DataFrame(columns=[*columns, "replicate_map"]).astype(
            {"replicate_correlation": float, "replicate_map": float}
        )
    table = table.rename(columns={"median_correlation": "replicate_correlation"})
    retrieval = replicate_average_precision(finite, group_by=DOSE_KEYS)
    return table[columns].merge(retrieval, on=DOSE_KEYS, how="left")


def nearest_compounds(
    normalized: pd.DataFrame, doses: pd.DataFrame, *, k: int = N_NEAREST
) -> pd.Series:
    """Return, per compound, its `k` most similar other compounds as text.

    Each compound is represented by the consensus profile (median of normalized
    wells over plates) of its most active dose; similarity is cosine. When the
    wells carry a MoA annotation (``Metadata_MoA``, any case), only annotated
    compounds are listed, with their MoA: ``"Mitoglow (uncoupler) 0.91; ..."``.

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with the `DOSE_KEYS` columns.
    doses : DataFrame
        The `DOSE_KEYS` and ``activity_z`` (from `call_hits`' compound-dose table).
    k : int
        Compounds listed per compound.

    Returns
    -------
    Series
        Indexed by compound (name ``Metadata_Compound``); "" when none qualifies.

    Raises
    ------
    ValueError
        If `k` < 1 or columns are missing.
    """
    if k < 1:
        raise ValueError(f"k = {k} must be >= 1.")
    missing = [c for c in [*DOSE_KEYS, "activity_z"] if c not in doses.columns]
    if missing:
        raise ValueError(f"doses lacks columns {missing}.")
    features = feature_columns(normalized)
    moa_column = next(
        (c for c in normalized.columns if c.lower() == "metadata_moa"), None
    )
    values = normalized[features].to_numpy(float)
    wells = normalized[
        np.isfinite(values).all(axis=1)
        & (normalized["Metadata_Role"] != "negative_control")
    ]
    keys = DOSE_KEYS[:2]
    profiles = wells.groupby(keys, dropna=False)[features].median()
    best = (
        doses.dropna(subset=["activity_z"])
        .sort_values("activity_z", ascending=False)
        .drop_duplicates("Metadata_Compound")
    )
    best = best[
        best.set_index(keys).index.isin(profiles.index)
    ]  # doses whose wells all lack cells have no profile
    names = best["Metadata_Compound"].to_numpy()
    result = pd.Series("", index=pd.Index(names, name="Metadata_Compound"))
    if len(best) < 2:
        return result
    matrix = profiles.loc[pd.MultiIndex.from_frame(best[keys])].to_numpy(float)
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    if moa_column is not None:
        moa = wells.groupby("Metadata_Compound")[moa_column].first()
        labels = moa.reindex(names)
        candidate = labels.notna().to_numpy() & (labels.astype(str) != "").to_numpy()
    else:
        labels, candidate = None, np.ones(len(names), bool)
    for i in range(len(names)):
        order = [j for j in np.argsort(-similarity[i]) if j != i and candidate[j]][:k]
        result.iloc[i] = "; ".join(
            names[j]
            + (f" ({labels.iloc[j]})" if labels is not None else "")
            + f" {similarity[i, j]:.2f}"
            for j in order
        )
    return result


def call_hits(
    normalized: pd.DataFrame,
    *,
    fdr: float = 0.05,
    toxic_ratio: float = 0.5,
    null_size: int = 100_000,
    rng: np.random.Generator | int | None = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Call hits per compound and score every compound-dose.

    Parameters
    ----------
    normalized : DataFrame
        Well profiles from `pipeline.profiles.normalize_to_controls`, with
        ``Metadata_Compound``, ``Metadata_Concentration``, ``Metadata_Role`` and
        ``Metadata_CellCount``.
    fdr : float
        False discovery rate of ``is_hit`` and ``is_active``.
    toxic_ratio : float
        A compound-dose whose median cell count is below this fraction of the
        negative controls' is toxic; a compound is toxic if any of its doses is.
    null_size : int
        Permutation-null samples (smallest p-value 1 / (null_size + 1)).
    rng : Generator, int or None
        Seed of the null, for reproducible p-values.

    Returns
    -------
    hits : DataFrame
        One row per treatment compound, hits first (by q, then activity):
        `HIT_COLUMNS` plus ``p_value``, ``mean_average_precision`` (doses as
        replicates), ``distance_q`` (Simes over doses of the Mahalanobis p, then
        BH), ``replicate_map`` (median over doses), ``hill``, ``ec50_ci_low``,
        ``ec50_ci_high``, ``top``.
    compound_doses : DataFrame
        One row per non-negative-control compound-dose (positive controls included,
        for QC), sorted by activity: `DOSE_COLUMNS` plus ``p_value``,
        ``mahalanobis_p`` and ``rank``; mAP, p and q are NaN for a dose with a single
        replicate well, which is then called active on its Mahalanobis q
        (``active_by``).

    Raises
    ------
    ValueError
        If columns are missing, there are no negative controls or treatments, or
        `fdr` is not in (0, 1).
    """
    if not 0 < fdr < 1:
        raise ValueError(f"fdr = {fdr} must lie in (0, 1).")
    doses = rank_compounds(normalized)
    roles = normalized["Metadata_Role"]
    if not (roles == "treatment").any():
        raise ValueError("normalized has no treatment wells to call hits on.")
    finite = np.isfinite(normalized[feature_columns(normalized)].to_numpy(float)).all(
        axis=1
    )
    options = {"null_size": null_size, "fdr": fdr, "rng": rng}
    dose_activity = _activity(normalized[finite], DOSE_KEYS, **options)
    doses = doses.merge(
        dose_activity.drop(columns="n_replicates"), on=DOSE_KEYS, how="left"
    )
    doses = doses.merge(dose_distances(normalized), on=DOSE_KEYS, how="left")
    doses = doses.merge(
        replicate_consistency(normalized[roles != "negative_control"]),
        on=DOSE_KEYS,
        how="left",
    )
    has_map = doses["q_value"].notna()
    doses["active_by"] = np.where(
        has_map, "mAP", np.where(doses["mahalanobis_q"].notna(), "mahalanobis", "")
    )
    doses["is_active"] = np.where(
        has_map, doses["q_value"] < fdr, doses["mahalanobis_q"] < fdr
    )
    doses["is_toxic"] = doses["cell_count_ratio"] < toxic_ratio

    treatment_rows = normalized[finite & (roles != "positive_control")]
    as_replicates = _activity(treatment_rows, ["Metadata_Compound"], **options)
    treated = doses[doses["Metadata_Role"] == "treatment"]
    tested = treated.dropna(subset=["p_value"])
    # replicate wells: is any dose active? (Simes over its tested doses)
    combined = tested.groupby("Metadata_Compound")["p_value"].agg(simes)
    # compounds without replicate wells: their doses are the replicates
    untested = as_replicates[~as_replicates["Metadata_Compound"].isin(combined.index)]
    compound_p = pd.concat(
        [
            pd.DataFrame(
                {"Metadata_Compound": combined.index, "p_value": combined.to_numpy()}
            ),
            untested[["Metadata_Compound", "p_value"]],
        ],
        ignore_index=True,
    ).astype({"p_value": float})
    if len(compound_p):  # then BH over compounds
        compound_p = compound_p.assign(
            q_value=false_discovery_control(compound_p["p_value"], method="bh")
        )
    wells = normalized.loc[roles == "treatment", DOSE_KEYS[:2]].assign(
        activity=score_wells(normalized)
    )
    fits = fit_dose_responses(wells, response="activity").rename(
        columns={"flag": "ec50_flag"}
    )
    summary = (
        treated.groupby("Metadata_Compound")
        .agg(
            n_doses=("Metadata_Concentration", "nunique"),
            n_active_doses=("is_active", "sum"),
            max_activity_z=("activity_z", "max"),
            min_cell_count_ratio=("cell_count_ratio", "min"),
            is_toxic=("is_toxic", "any"),
            replicate_correlation=("replicate_correlation", "median"),
            replicate_map=("replicate_map", "median"),
        )
        .reset_index()
    )
    distance_p = treated.dropna(subset=["mahalanobis_p"])
    distance_p = distance_p.groupby("Metadata_Compound")["mahalanobis_p"].agg(simes)
    summary["distance_q"] = summary["Metadata_Compound"].map(
        pd.Series(
            false_discovery_control(distance_p, method="bh") if len(distance_p) else [],
            index=distance_p.index,
            dtype=float,
        )
    )
    summary["nearest_compounds"] = (
        summary["Metadata_Compound"]
        .map(nearest_compounds(normalized, doses))
        .fillna("")
    )
    hits = summary.merge(compound_p, on="Metadata_Compound", how="left")
    hits = hits.merge(
        as_replicates[["Metadata_Compound", "mean_average_precision"]],
        on="Metadata_Compound",
        how="left",
    )
    hits = hits.merge(
        fits.drop(columns=["n_points", "n_doses"]), on="Metadata_Compound", how="left"
    )
    hits["is_hit"] = hits["q_value"] < fdr
    hits = hits.sort_values(
        ["is_hit", "q_value", "max_activity_z"], ascending=[False, True, False],
        ignore_index=True,
    )  # fmt: skip
    hits.insert(0, "rank", np.arange(1, len(hits) + 1))
    return hits, doses
