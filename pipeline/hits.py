"""Hit calling: phenotypic activity with FDR, potency and toxicity per compound.

From DMSO-normalized well profiles, two tables:

* **compound-doses**: mAP of the replicate wells of each compound-dose against the
  plate's negative controls, permutation p and Benjamini-Hochberg q
  (`pipeline.activity`); the distance score of `pipeline.profiles.rank_compounds`
  (for single-replicate designs); the cell-count ratio to DMSO and a toxicity flag.
* **hits**, one row per compound: is it active at any dose? Its doses' p-values are
  combined with Simes' method and BH-corrected over compounds (the first stage of
  Yekutieli's hierarchical FDR, as copairs' ``hierarchical_by``), so a compound
  active only at its top doses is not diluted by its inactive low doses. Without
  replicate wells, the compound's doses serve as its replicates (copairs' convention).
  Also: the mAP with doses as replicates, the 4PL EC50 of well activity
  (`pipeline.doseresponse`), the largest activity and the toxicity flag.

Wells without cells (NaN features) cannot be ranked; they count for toxicity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from pipeline.activity import average_precision, mean_average_precision
from pipeline.doseresponse import fit_dose_responses
from pipeline.profiles import feature_columns, rank_compounds, score_wells

DOSE_KEYS = ["Metadata_Compound", "Metadata_Concentration", "Metadata_Role"]
#: Columns of the compound hit list shown to users, in display order.
HIT_COLUMNS = [
    "rank", "Metadata_Compound", "is_hit", "q_value", "n_active_doses", "n_doses",
    "max_activity_z", "ec50", "ec50_flag", "min_cell_count_ratio", "is_toxic",
]  # fmt: skip
#: Columns of the compound-dose table shown to users, in display order.
DOSE_COLUMNS = [
    "Metadata_Compound", "Metadata_Concentration", "Metadata_Role", "n_wells",
    "mean_average_precision", "q_value", "is_active", "activity", "activity_z",
    "cell_count_ratio", "is_toxic",
]  # fmt: skip


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
        replicates), ``hill``, ``ec50_ci_low``, ``ec50_ci_high``, ``top``.
    compound_doses : DataFrame
        One row per non-negative-control compound-dose (positive controls included,
        for QC), sorted by activity: `DOSE_COLUMNS` plus ``p_value`` and ``rank``;
        mAP, p and q are NaN for a dose with a single replicate well.

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
    doses["is_active"] = doses["is_active"].astype("boolean").fillna(False).astype(bool)
    doses["is_toxic"] = doses["cell_count_ratio"] < toxic_ratio

    treatment_rows = normalized[finite & (roles != "positive_control")]
    as_replicates = _activity(treatment_rows, ["Metadata_Compound"], **options)
    treated = doses[doses["Metadata_Role"] == "treatment"]
    tested = treated.dropna(subset=["p_value"])
    if len(tested):  # replicate wells: is any dose active? (Simes, then BH)
        combined = tested.groupby("Metadata_Compound")["p_value"].agg(simes)
        compound_p = combined.rename("p_value").reset_index()
    else:  # one well per dose: the doses are the replicates
        compound_p = as_replicates[["Metadata_Compound", "p_value"]]
    if len(compound_p):
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
        )
        .reset_index()
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
