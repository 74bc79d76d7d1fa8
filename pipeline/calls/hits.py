"""Hit calling: phenotypic activity with FDR, potency and toxicity per compound.

One rule for every screen design (README: How hits are called):

1. **Each compound-dose gets one test**, named in its ``test`` column:
   ``mAP`` when it has at least 3 replicate wells and the smallest p-value its
   permutation test can give (`map_p_floor`, or 1 / (null size + 1)) times the
   most doses of a compound times the compounds stays below the FDR level, so
   that even a lone active dose could be called (`choose_tests`); otherwise
   ``distance``: the Mahalanobis distance of its wells to the negative controls
   (`dose_distances`; one well, duplicates, or too few controls for the mAP
   permutation to reach the FDR level).
2. **A compound is a hit when at least one of its doses is active**: its doses'
   p-values are combined with Simes' method and Benjamini-Hochberg-corrected over
   compounds (the compound's ``q_value``); in each hit compound, doses are then
   called active by Benjamini-Hochberg within the compound at level
   ``fdr * R / m`` (R hits among m compounds; Benjamini & Bogomolov 2014, as
   copairs' ``hierarchical_by``). Simes guarantees every hit has an active dose.
   A dose's ``q_value`` is below the FDR level exactly when it is active at that
   level; it depends on the number of hits, so it holds only at the run's FDR
   (call hits again with another ``--fdr`` rather than filtering q at another
   level).
3. **Activity** is `pipeline.profiling.profiles.well_activity` everywhere.

Also per compound: the 4PL EC50 of well activity (`pipeline.calls.doseresponse`; blank
unless the fit's flag is ``ok``), toxicity (cell count below a fraction of DMSO),
replicate consistency (median correlation of replicate wells against the JUMP null)
and the most similar other compounds above a cosine cut-off.

Wells without cells (NaN features) cannot be tested; they count for toxicity.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy import stats
from scipy.stats import false_discovery_control

from pipeline.calls.doseresponse import fit_dose_responses
from pipeline.profiling.activity import (
    average_precision,
    leave_out_null,
    mahalanobis_to_controls,
    mean_average_precision,
    percent_replicating,
    replicate_average_precision,
)
from pipeline.profiling.profiles import feature_columns, rank_compounds, well_activity

logger = logging.getLogger(__name__)

DOSE_KEYS = ["Metadata_Compound", "Metadata_Concentration", "Metadata_Role"]
#: Columns of the compound hit list shown to users, in display order.
HIT_COLUMNS = [
    "rank", "Metadata_Compound", "is_hit", "q_value", "test", "n_active_doses",
    "n_doses", "max_activity", "ec50", "ec50_flag", "min_cell_count_ratio",
    "is_toxic", "replicate_correlation", "nearest_compounds",
]  # fmt: skip
#: Columns of the compound-dose table shown to users, in display order.
DOSE_COLUMNS = [
    "Metadata_Compound", "Metadata_Concentration", "Metadata_Role", "n_wells",
    "test", "p_value", "q_value", "is_active", "activity", "mean_average_precision",
    "map_p", "mahalanobis", "mahalanobis_p", "replicate_correlation",
    "is_replicating", "replicate_map", "cell_count_ratio", "is_toxic",
]  # fmt: skip
#: Similar compounds listed per compound, and the cosine they must reach.
N_NEAREST = 3
MIN_SIMILARITY = 0.5
#: Negative-control wells (with cells) the distance test needs per fit.
MIN_DISTANCE_CONTROLS = 4


def simes(p_values: np.ndarray) -> float:
    """Combine p-values with Simes' method: min over i of n p_(i) / i.

    Computed as the smallest Benjamini-Hochberg-adjusted p-value (the same
    number, with scipy's arithmetic), so a compound's combined p equals the
    adjusted p of its best dose exactly and `call_hits`' dose calls agree with
    its compound calls to the last bit.

    Raises
    ------
    ValueError
        If `p_values` is empty.
    """
    values = np.asarray(p_values, dtype=float)
    if len(values) == 0:
        raise ValueError("p_values is empty.")
    return float(false_discovery_control(values, method="bh").min())


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


def map_p_floor(n_replicates: int, n_controls: int) -> float:
    """Return the smallest p-value the mAP permutation test can give a dose.

    Each of k replicate wells queries its k - 1 other replicates among them and
    the n controls; mAP = 1 (every replicate ranked first) has null probability
    1 / C(k - 1 + n, k - 1), the floor of the permutation p-value.

    Raises
    ------
    ValueError
        If `n_replicates` < 2 or `n_controls` < 1.

    Examples
    --------
    >>> round(1 / map_p_floor(2, 32))
    33
    """
    if n_replicates < 2 or n_controls < 1:
        raise ValueError(
            f"need n_replicates >= 2 (got {n_replicates}) and n_controls >= 1 "
            f"(got {n_controls})."
        )
    return 1 / math.comb(n_replicates - 1 + n_controls, n_replicates - 1)


def lower_median(values: np.ndarray) -> np.ndarray:
    """Return the lower median of each row: the k // 2 + 1 -th largest of k values.

    For one value itself, for two the smaller, for three the middle one: at least
    half of a dose's wells lie at or beyond it, so one aberrant well cannot make
    a dose look active.

    Parameters
    ----------
    values : ndarray of shape (N, k)

    Returns
    -------
    ndarray of shape (N,)

    Raises
    ------
    ValueError
        If `values` is not 2-D with at least one column.

    Examples
    --------
    >>> lower_median(np.array([[1.0, 9.0], [3.0, 1.0]])).tolist()
    [1.0, 1.0]
    """
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"values has shape {values.shape}; expected (N, k >= 1).")
    return np.sort(values, axis=1)[:, (values.shape[1] - 1) // 2]


def _log_t_p_value(statistic: float, null: np.ndarray, n_controls: int) -> float:
    """Upper-tail p of log(statistic) under a t prediction from log(null).

    Degrees of freedom (n_controls - 1) / 2: the null's values share their
    controls, so they carry less information than n independent draws; with
    n - 1, real DMSO splits gave up to 8 % false hits at FDR 0.05
    (benchmarks/bench_calibration.py), with (n - 1) / 2 about 3 %.
    """
    logs = np.log(np.maximum(null, 1e-300))
    scale = logs.std(ddof=1) * np.sqrt(1 + 1 / n_controls)
    if not scale > 0:  # a null without spread: its empirical p-value
        return float((1 + (null >= statistic).sum()) / (1 + len(null)))
    t = (np.log(max(statistic, 1e-300)) - logs.mean()) / scale
    return float(stats.t.sf(t, df=max((n_controls - 1) / 2, 1)))


def dose_distances(
    normalized: pd.DataFrame,
    *,
    null_size: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> pd.DataFrame:
    """Return the Mahalanobis distance of each compound-dose to DMSO, with a p-value.

    The distance test of `call_hits`. A compound-dose's statistic is the
    `lower_median` of its wells' squared distances to their plates' negative
    controls (`pipeline.profiling.activity.mahalanobis_to_controls`): with two wells the
    smaller, so a dose is active only when its replicates agree that it is far
    from DMSO. Its null is sampled from the controls themselves: each control's
    leave-one-out distance (one well), or as many controls left out of the fit
    together (`pipeline.profiling.activity.leave_out_null`) on each of the dose's plates.
    The p-value is the upper tail of log(statistic) under a t distribution
    ((n_controls - 1) / 2 degrees of freedom) centred and scaled by the log null,
    widened as a prediction interval: unlike an empirical p-value, which cannot go below
    1 / (1 + n_controls) (0.06 with 16 DMSO wells), it can reach any FDR level;
    on DMSO-only splits of real plates it stays calibrated
    (benchmarks/bench_calibration.py). When a plate has fewer than
    `MIN_DISTANCE_CONTROLS` controls with cells, one fit on all plates' controls
    is used (profiles are already scaled to each plate's controls).

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with the `DOSE_KEYS` columns and
        ``Metadata_Plate``.
    null_size : int
        Null samples per replicate layout.
    rng : Generator, int or None
        Seed of the null.

    Returns
    -------
    DataFrame
        One row per non-negative-control compound-dose with a finite well: the
        `DOSE_KEYS`, ``mahalanobis`` (the tested distance: the square root of the
        lower median of its wells' squared distances) and ``mahalanobis_p``;
        empty (with a logged warning) when fewer than `MIN_DISTANCE_CONTROLS`
        controls have cells in all.

    Raises
    ------
    ValueError
        If columns are missing or `null_size` < 2.
    """
    columns = [*DOSE_KEYS, "mahalanobis", "mahalanobis_p"]
    missing = [c for c in [*DOSE_KEYS, "Metadata_Plate"] if c not in normalized.columns]
    if missing:
        raise ValueError(f"normalized lacks columns {missing}.")
    if null_size < 2:
        raise ValueError(f"null_size = {null_size} must be >= 2.")
    values = normalized[feature_columns(normalized)].to_numpy(np.float64)
    finite = np.isfinite(values).all(axis=1)
    is_control = (normalized["Metadata_Role"] == "negative_control").to_numpy()
    per_plate = (
        pd.Series(is_control & finite)
        .groupby(normalized["Metadata_Plate"].to_numpy())
        .sum()
    )
    if per_plate.sum() < MIN_DISTANCE_CONTROLS:
        logger.warning(
            "no distance test: %d negative-control wells have cells; it needs %d.",
            per_plate.sum(), MIN_DISTANCE_CONTROLS,
        )  # fmt: skip
        return pd.DataFrame(columns=columns)
    if per_plate.min() < MIN_DISTANCE_CONTROLS:
        logger.info("distance test fitted on the controls of all plates together")
        normalized = normalized.assign(Metadata_Plate="all plates")
    try:
        wells = mahalanobis_to_controls(normalized)
    except ValueError as exc:
        if "varies" not in str(exc):
            raise
        logger.warning("no distance test: %s", exc)
        return pd.DataFrame(columns=columns)
    table = normalized[[*DOSE_KEYS, "Metadata_Plate"]].join(wells)
    table = table.dropna(subset=["mahalanobis"])
    control_table = table[table["Metadata_Role"] == "negative_control"]
    controls = {
        plate: values[normalized.index.get_indexer(group.index)]
        for plate, group in control_table.groupby("Metadata_Plate")
    }
    loo = {
        plate: group["mahalanobis"].to_numpy() ** 2
        for plate, group in control_table.groupby("Metadata_Plate")
    }
    generator = np.random.default_rng(rng)
    nulls: dict[tuple[str, int], np.ndarray] = {}

    def plate_null(plate: str, k: int) -> np.ndarray:
        """(null_size, k) squared distances of k controls of `plate` left out."""
        k = min(k, len(controls[plate]) - 3)
        if (plate, k) not in nulls:
            nulls[(plate, k)] = (
                generator.choice(loo[plate], size=(null_size, 1))
                if k == 1
                else leave_out_null(
                    controls[plate], k, null_size=null_size, rng=generator
                )
            )
        return generator.permutation(nulls[(plate, k)])

    rows = []
    treated = table[table["Metadata_Role"] != "negative_control"]
    for keys, group in treated.groupby(DOSE_KEYS, dropna=False, sort=True):
        counts = group.groupby("Metadata_Plate").size()
        if len(counts) == 1 and counts.iloc[0] == 1:
            null = loo[counts.index[0]]  # the controls' own leave-one-out distances
        else:
            null = lower_median(
                np.hstack([plate_null(plate, k) for plate, k in counts.items()])
            )
        n_controls = int(min(len(loo[plate]) for plate in counts.index))
        statistic = float(lower_median(group["mahalanobis"].to_numpy()[None] ** 2)[0])
        p_value = _log_t_p_value(statistic, null, n_controls)
        rows.append((*keys, float(np.sqrt(statistic)), p_value))
    return pd.DataFrame(rows, columns=columns)


def replicate_consistency(normalized: pd.DataFrame) -> pd.DataFrame:
    """Return each compound-dose's replicate consistency.

    `pipeline.profiling.activity.percent_replicating` per compound-dose: the median Pearson
    correlation of its replicate wells against the 95th percentile of a null of
    wells of different compound-doses (JUMP's Percent Replicating); and its
    replicate mAP (`pipeline.profiling.activity.replicate_average_precision`: its wells
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
    normalized: pd.DataFrame,
    doses: pd.DataFrame,
    *,
    k: int = N_NEAREST,
    min_similarity: float = MIN_SIMILARITY,
) -> pd.Series:
    """Return, per compound, its `k` most similar other compounds as text.

    Each compound is represented by the consensus profile (median of normalized
    wells over plates) of its most active dose; similarity is cosine, and only
    compounds at or above `min_similarity` are listed (unrelated profiles reach
    0.1-0.3 by chance). When the wells carry a MoA annotation (``Metadata_MoA``,
    any case), only annotated compounds are listed, with their MoA:
    ``"Mitoglow (uncoupler) 0.91; ..."``.

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with the `DOSE_KEYS` columns.
    doses : DataFrame
        The `DOSE_KEYS` and ``activity`` (from `call_hits`' compound-dose table).
    k : int
        Compounds listed per compound.
    min_similarity : float
        Cosine cut-off in [-1, 1].

    Returns
    -------
    Series
        Indexed by compound (name ``Metadata_Compound``); "" when none qualifies.

    Raises
    ------
    ValueError
        If `k` < 1, `min_similarity` is outside [-1, 1] or columns are missing.
    """
    if k < 1:
        raise ValueError(f"k = {k} must be >= 1.")
    if not -1 <= min_similarity <= 1:
        raise ValueError(f"min_similarity = {min_similarity} must lie in [-1, 1].")
    missing = [c for c in [*DOSE_KEYS, "activity"] if c not in doses.columns]
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
        doses.dropna(subset=["activity"])
        .sort_values("activity", ascending=False)
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
        order = [
            j
            for j in np.argsort(-similarity[i])
            if j != i and candidate[j] and similarity[i, j] >= min_similarity
        ][:k]
        result.iloc[i] = "; ".join(
            names[j]
            + (f" ({labels.iloc[j]})" if labels is not None else "")
            + f" {similarity[i, j]:.2f}"
            for j in order
        )
    return result


def choose_tests(
    n_wells: pd.Series,
    *,
    n_controls: int,
    multiplier: int,
    fdr: float,
    null_size: int = 100_000,
) -> pd.Series:
    """Return the test each compound-dose is called on: ``mAP`` or ``distance``.

    ``mAP`` when a dose has at least 3 wells with cells and the smallest p-value
    its permutation test can give (the larger of `map_p_floor` and
    1 / (`null_size` + 1)) times `multiplier` stays below `fdr`, so that a lone
    active dose could still be called; ``distance`` otherwise.

    Parameters
    ----------
    n_wells : Series
        Wells with cells per compound-dose.
    n_controls : int
        Negative-control wells with cells (the mAP's negatives).
    multiplier : int
        What a lone active dose's p is multiplied by on its way to a q-value:
        the most doses of a compound (Simes) times the compounds (BH).
    fdr : float
        False discovery rate.
    null_size : int
        Samples of the mAP permutation null.

    Returns
    -------
    Series
        Same index, ``"mAP"`` or ``"distance"``.

    Raises
    ------
    ValueError
        If `multiplier` or `null_size` < 1, or `fdr` is not in (0, 1).
    """
    if multiplier < 1 or null_size < 1 or not 0 < fdr < 1:
        raise ValueError(
            f"need multiplier >= 1 (got {multiplier}), null_size >= 1 (got "
            f"{null_size}) and fdr in (0, 1) (got {fdr})."
        )
    floors = n_wells.map(
        lambda k: (
            max(map_p_floor(int(k), n_controls), 1 / (null_size + 1))
            if k >= 3 and n_controls
            else 1.0
        )
    )
    return pd.Series(
        np.where(floors * multiplier < fdr, "mAP", "distance"), index=n_wells.index
    )


def _hierarchical_calls(
    doses: pd.DataFrame, fdr: float
) -> tuple[pd.DataFrame, pd.Series]:
    """Compound q (Simes + BH) and dose q within hit compounds at fdr R / m.

    `doses` are treatment compound-doses with ``p_value``. Returns them with
    ``q_value`` and the compounds' q (indexed by compound). A dose's q is
    max(its compound's q, its BH-adjusted p within the compound x m / R), with R
    the hits at `fdr`: it is below `fdr` exactly when the dose is active at
    `fdr`. Simes' p of a compound is its smallest within-adjusted p, and both
    products use scipy's arithmetic (p x (m / j)), so the best dose of every hit
    is active without rounding slips.
    """
    tested = doses.dropna(subset=["p_value"])
    if tested.empty:
        return doses.assign(q_value=np.nan), pd.Series(dtype=float)
    within = tested.groupby("Metadata_Compound")["p_value"].transform(
        lambda p: false_discovery_control(p.to_numpy(), method="bh")
    )
    combined = within.groupby(tested["Metadata_Compound"]).min()  # = Simes
    compound_q = pd.Series(
        false_discovery_control(combined.to_numpy(), method="bh"), index=combined.index
    )
    n_hits = max(int((compound_q < fdr).sum()), 1)
    dose_q = np.maximum(
        tested["Metadata_Compound"].map(compound_q).to_numpy(),
        np.minimum(within.to_numpy() * (len(compound_q) / n_hits), 1.0),
    )
    q = pd.Series(np.nan, index=doses.index)
    q[tested.index] = dose_q
    return doses.assign(q_value=q), compound_q


def call_hits(
    normalized: pd.DataFrame,
    *,
    fdr: float = 0.05,
    toxic_ratio: float = 0.5,
    null_size: int = 100_000,
    rng: np.random.Generator | int | None = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Call hits per compound and score every compound-dose (the module's rule).

    Parameters
    ----------
    normalized : DataFrame
        Well profiles after the run's recipe (`pipeline.profiling.profiles.normalize_profiles`),
        with ``Metadata_Plate``, ``Metadata_Compound``, ``Metadata_Concentration``
        (may be all NaN: one dose per compound), ``Metadata_Role`` and
        ``Metadata_CellCount``.
    fdr : float
        False discovery rate of ``is_hit`` and ``is_active``.
    toxic_ratio : float
        A compound-dose whose median cell count is below this fraction of the
        negative controls' is toxic; a compound is toxic if any of its doses is.
    null_size : int
        Permutation-null samples of mAP (smallest p-value 1 / (null_size + 1)).
    rng : Generator, int or None
        Seed of the nulls, for reproducible p-values.

    Returns
    -------
    hits : DataFrame
        One row per treatment compound, hits first (by q, then activity):
        `HIT_COLUMNS` plus ``p_value`` (Simes over its doses), ``replicate_map``
        (median over doses), ``hill``, ``ec50_ci_low``, ``ec50_ci_high``, ``top``,
        ``bottom``, ``fdr`` and ``toxicity_threshold`` (the settings it was called
        with). ``ec50`` and its interval are NaN unless ``ec50_flag`` is ``ok``.
    compound_doses : DataFrame
        One row per non-negative-control compound-dose (positive controls
        included, BH-corrected among themselves, for QC), sorted by activity:
        `DOSE_COLUMNS` plus ``rank``. ``p_value`` is that of its ``test``.

    Raises
    ------
    ValueError
        If columns are missing, there are no treatments, `fdr` is not in (0, 1),
        or a dose has a single well while fewer than `MIN_DISTANCE_CONTROLS`
        negative controls have cells (the message names the fix).
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
    n_controls = int((finite & (roles == "negative_control")).sum())
    with_cells = (
        normalized[finite & (roles != "negative_control")]
        .groupby(DOSE_KEYS, dropna=False)
        .size()
        .rename("n_tested")
        .reset_index()
    )
    doses = doses.merge(with_cells, on=DOSE_KEYS, how="left").fillna({"n_tested": 0})
    mean_ap = _activity(
        normalized[finite], DOSE_KEYS, null_size=null_size, fdr=fdr, rng=rng
    )[[*DOSE_KEYS, "mean_average_precision", "p_value"]].astype(
        {"mean_average_precision": float, "p_value": float}
    )
    doses = doses.merge(
        mean_ap.rename(columns={"p_value": "map_p"}), on=DOSE_KEYS, how="left"
    )
    doses = doses.merge(dose_distances(normalized, rng=rng), on=DOSE_KEYS, how="left")
    doses = doses.merge(
        replicate_consistency(normalized[roles != "negative_control"]),
        on=DOSE_KEYS,
        how="left",
    )
    is_tested = doses["n_tested"] > 0
    tested_treatments = doses[is_tested & (doses["Metadata_Role"] == "treatment")]
    per_compound = tested_treatments.groupby("Metadata_Compound").size()
    multiplier = (
        max(int(per_compound.max()) * len(per_compound), 1) if len(per_compound) else 1
    )
    test = choose_tests(
        doses["n_tested"], n_controls=n_controls, multiplier=multiplier, fdr=fdr,
        null_size=null_size,
    )  # fmt: skip
    no_distance = doses["mahalanobis_p"].isna() & is_tested
    test[no_distance & (doses["n_tested"] >= 2)] = "mAP"  # too few controls for it
    lacking = doses[
        no_distance & (doses["n_tested"] < 2) & (doses["Metadata_Role"] == "treatment")
    ]
    if len(lacking):
        raise ValueError(
            f"{len(lacking)} compound-doses have a single well, e.g. "
            f"{lacking['Metadata_Compound'].iloc[0]!r}; they are tested by their "
            f"distance to the negative controls, which needs at least "
            f"{MIN_DISTANCE_CONTROLS} negative-control wells with cells; you have "
            f"{n_controls}. Add DMSO wells (Metadata_Role = negative_control) to the "
            "plate map, or replicate wells of each compound-dose."
        )
    doses["test"] = np.where(is_tested, test, "")
    doses["p_value"] = np.where(
        doses["test"] == "mAP",
        doses["map_p"].astype(float),
        np.where(
            doses["test"] == "distance", doses["mahalanobis_p"].astype(float), np.nan
        ),
    )
    is_treated = doses["Metadata_Role"] == "treatment"
    treated, compound_q = _hierarchical_calls(doses[is_treated], fdr)
    controls = doses[~is_treated].copy()
    controls["q_value"] = np.nan
    has_p = controls["p_value"].notna()
    if has_p.any():
        controls.loc[has_p, "q_value"] = false_discovery_control(
            controls.loc[has_p, "p_value"].to_numpy(), method="bh"
        )
    doses = pd.concat([treated, controls]).sort_values(
        "activity", ascending=False, ignore_index=True
    )
    doses["rank"] = np.arange(1, len(doses) + 1)
    doses["is_active"] = doses["q_value"] < fdr
    doses["is_toxic"] = doses["cell_count_ratio"] < toxic_ratio
    doses = doses.drop(columns="n_tested")

    wells = normalized.loc[roles == "treatment", DOSE_KEYS[:2]].assign(
        activity=well_activity(normalized)
    )
    fits = fit_dose_responses(wells, response="activity").rename(
        columns={"flag": "ec50_flag"}
    )
    unreliable = fits["ec50_flag"] != "ok"
    fits.loc[unreliable, ["ec50", "ec50_ci_low", "ec50_ci_high"]] = np.nan
    treated = doses[doses["Metadata_Role"] == "treatment"]
    summary = (
        treated.groupby("Metadata_Compound")
        .agg(
            n_doses=("Metadata_Concentration", "size"),
            n_active_doses=("is_active", "sum"),
            max_activity=("activity", "max"),
            min_cell_count_ratio=("cell_count_ratio", "min"),
            is_toxic=("is_toxic", "any"),
            replicate_correlation=("replicate_correlation", "median"),
            replicate_map=("replicate_map", "median"),
            test=("test", lambda t: "+".join(sorted(set(t) - {""}))),
        )
        .reset_index()
    )
    tested = treated.dropna(subset=["p_value"])
    summary["p_value"] = summary["Metadata_Compound"].map(
        tested.groupby("Metadata_Compound")["p_value"].agg(simes)
    )
    summary["q_value"] = summary["Metadata_Compound"].map(compound_q)
    summary["nearest_compounds"] = (
        summary["Metadata_Compound"]
        .map(nearest_compounds(normalized, doses))
        .fillna("")
    )
    hits = summary.merge(
        fits.drop(columns=["n_points", "n_doses"]), on="Metadata_Compound", how="left"
    )
    hits["ec50_flag"] = hits["ec50_flag"].astype(object).fillna("too_few_doses")
    hits["is_hit"] = hits["q_value"] < fdr
    hits = hits.sort_values(
        ["is_hit", "q_value", "max_activity"], ascending=[False, True, False],
        ignore_index=True,
    )  # fmt: skip
    hits.insert(0, "rank", np.arange(1, len(hits) + 1))
    return hits.assign(fdr=fdr, toxicity_threshold=toxic_ratio), doses
