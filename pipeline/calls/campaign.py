"""Campaigns of many plates: per-plate trends and before/after diagnostics of the recipe.

A screen is a campaign of plates, often in batches (``Metadata_Batch``). Plate
effects show as DMSO wells that resemble the wells of their own plate more than
those of other plates, and as replicate wells of one compound-dose that agree
within a plate but not across plates. `plate_trends` reports per plate what
drifts over a campaign (DMSO cell count, Z', replicate agreement with the other
plates); `correction_diagnostics` compares profiles before the profile recipe
(`uncorrected_profiles`: one scale for the whole campaign, no per-plate alignment)
with after it, on the same measures the literature uses (DMSO similarity within vs
across plates, replicate mAP, MoA NSC / NSCB when annotations exist).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.calls.moa import KEYS as MOA_KEYS
from pipeline.calls.moa import annotated_rows, moa_table
from pipeline.profiling.activity import replicate_average_precision, unit_rows
from pipeline.profiling.profiles import (
    feature_columns,
    metadata_column,
    metadata_columns,
    normalize_to_controls,
)

DOSE_KEYS = MOA_KEYS  # a compound-dose


def _finite_rows(profiles: pd.DataFrame) -> pd.DataFrame:
    features = feature_columns(profiles)
    finite = np.isfinite(profiles[features].to_numpy(float)).all(axis=1)
    return profiles[finite].reset_index(drop=True)


def uncorrected_profiles(
    raw: pd.DataFrame, *, features: Sequence[str] | None = None
) -> pd.DataFrame:
    """Robust z of every well to the DMSO wells of the whole campaign, plates pooled.

    The "before" of `recipe_diagnostics`: one scale for all plates, so plate and
    batch effects stay in the profiles.

    Parameters
    ----------
    raw : DataFrame
        Well profiles (`pipeline.views.export.read_well_profiles`): ``Metadata_Plate``,
        ``Metadata_Role`` and features.
    features : sequence of str, optional
        Keep only these features (e.g. those the recipe kept); default all.

    Returns
    -------
    DataFrame
        Same rows and metadata; features as by `normalize_to_controls`.

    Raises
    ------
    ValueError
        As `pipeline.profiling.profiles.normalize_to_controls` (e.g. fewer than two DMSO wells).
    """
    if "Metadata_Plate" not in raw.columns:
        raise ValueError("raw lacks the column Metadata_Plate.")
    if features is not None:
        unknown = sorted(set(features) - set(feature_columns(raw)))
        if unknown:
            raise ValueError(f"features not in raw: {unknown[:5]}.")
        raw = raw[[*metadata_columns(raw), *features]]
    pooled = normalize_to_controls(raw.assign(Metadata_Plate="campaign"))
    return pooled.assign(Metadata_Plate=raw["Metadata_Plate"].to_numpy())


def dmso_similarity(normalized: pd.DataFrame) -> dict[str, float]:
    """Mean cosine similarity of DMSO wells on the same plate and on other plates.

    Parameters
    ----------
    normalized : DataFrame
        ``Metadata_Plate``, ``Metadata_Role`` and features.

    Returns
    -------
    dict
        ``within_plates``, ``across_plates`` and their difference
        ``within_minus_across`` (about 0 when plates do not differ); NaN where no
        pair exists.

    Raises
    ------
    ValueError
        If columns are missing.
    """
    missing = {"Metadata_Plate", "Metadata_Role"} - set(normalized.columns)
    if missing:
        raise ValueError(f"normalized lacks columns {sorted(missing)}.")
    dmso = _finite_rows(normalized[normalized["Metadata_Role"] == "negative_control"])
    unit = unit_rows(dmso[feature_columns(dmso)].to_numpy(float))
    # sums of unit vectors give every pair's cosine without the n x n matrix:
    # sum over ordered pairs i != j of u_i.u_j = |sum u|^2 - n
    total_pairs = float(unit.sum(axis=0) @ unit.sum(axis=0)) - len(unit)
    within_pairs, n_within = 0.0, 0
    for rows in dmso.groupby("Metadata_Plate", sort=False).indices.values():
        plate_sum = unit[rows].sum(axis=0)
        within_pairs += float(plate_sum @ plate_sum) - len(rows)
        n_within += len(rows) * (len(rows) - 1)
    n_across = len(unit) * (len(unit) - 1) - n_within
    figures = {
        "within_plates": within_pairs / n_within if n_within else float("nan"),
        "across_plates": (total_pairs - within_pairs) / n_across
        if n_across
        else float("nan"),
    }
    figures["within_minus_across"] = figures["within_plates"] - figures["across_plates"]
    return figures


def replicate_correlation_across_plates(normalized: pd.DataFrame) -> pd.Series:
    """Median correlation of each plate's treatment wells with replicates elsewhere.

    Pearson correlation of every treatment well with the wells of the same
    compound-dose on the other plates, its median per plate.

    Parameters
    ----------
    normalized : DataFrame
        ``Metadata_Plate``, ``Metadata_Role``, ``Metadata_Compound``,
        ``Metadata_Concentration`` and features.

    Returns
    -------
    Series
        Indexed by plate; NaN for a plate none of whose compound-doses recurs
        on another plate.

    Raises
    ------
    ValueError
        If columns are missing.
    """
    needed = {"Metadata_Plate", "Metadata_Role", *DOSE_KEYS}
    missing = needed - set(normalized.columns)
    if missing:
        raise ValueError(f"normalized lacks columns {sorted(missing)}.")
    wells = _finite_rows(normalized[normalized["Metadata_Role"] != "negative_control"])
    values = wells[feature_columns(wells)].to_numpy(float)
    centred = unit_rows(values - values.mean(axis=1, keepdims=True))  # rows: Pearson
    plates = wells["Metadata_Plate"].to_numpy()
    per_plate: dict[object, list[np.ndarray]] = {}
    groups = wells.groupby(DOSE_KEYS, dropna=False, sort=False).indices.values()
    for rows in groups:  # replicates only: memory grows with a group, not the plate
        if len(rows) < 2:
            continue
        correlation = centred[rows] @ centred[rows].T
        other_plate = plates[rows][:, None] != plates[rows][None, :]
        for i, row in enumerate(rows):
            if other_plate[i].any():
                per_plate.setdefault(plates[row], []).append(
                    correlation[i, other_plate[i]]
                )
    result = {
        plate: float(np.median(np.concatenate(per_plate[plate])))
        if plate in per_plate
        else np.nan
        for plate in pd.unique(normalized["Metadata_Plate"])
    }
    return pd.Series(result, name="replicate_correlation_across_plates")


def plate_layouts(wells: pd.DataFrame) -> pd.Series:
    """Return each plate's layout number; plates of one layout are replicate plates.

    Parameters
    ----------
    wells : DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Compound`` and
        ``Metadata_Concentration`` of every well.

    Returns
    -------
    Series
        Indexed by plate: ``layout`` 1, 2, ... in order of first appearance (plates
        sorted); equal numbers hold the same compound-dose in every well.

    Raises
    ------
    ValueError
        If columns are missing.
    """
    needed = {"Metadata_Plate", "Metadata_Well", *DOSE_KEYS}
    missing = needed - set(wells.columns)
    if missing:
        raise ValueError(f"wells lacks columns {sorted(missing)}.")
    keys = wells[["Metadata_Well", *DOSE_KEYS]].map(str).agg("|".join, axis=1)
    signature = keys.groupby(wells["Metadata_Plate"]).agg(
        lambda k: "\n".join(sorted(k))
    )
    numbers: dict[str, int] = {}
    layout = signature.sort_index().map(
        lambda v: numbers.setdefault(v, len(numbers) + 1)
    )
    return layout.rename("layout")


def plate_trends(
    raw: pd.DataFrame, normalized: pd.DataFrame, qc: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per plate of what drifts over a campaign.

    Parameters
    ----------
    raw : DataFrame
        Well profiles with ``Metadata_CellCount`` (`read_well_profiles`).
    normalized : DataFrame
        The same after the run's recipe.
    qc : DataFrame, optional
        `pipeline.views.export.plate_qc_table`; its ``z_prime_activity`` is carried.

    Returns
    -------
    DataFrame
        ``Metadata_Plate``, ``Metadata_Batch`` (when present), ``layout`` (equal
        numbers: replicate plates, `plate_layouts`), ``n_wells``, ``dmso_wells``,
        ``dmso_cell_count`` (median cells per DMSO well), ``z_prime_activity``
        (with `qc`) and ``replicate_correlation_across_plates``, in plate order.

    Raises
    ------
    ValueError
        If columns are missing.
    """
    needed = {"Metadata_Plate", "Metadata_Well", "Metadata_Role", "Metadata_CellCount",
              *DOSE_KEYS}  # fmt: skip
    missing = needed - set(raw.columns)
    if missing:
        raise ValueError(f"raw lacks columns {sorted(missing)}.")
    keys = ["Metadata_Plate", "Metadata_Batch"] if "Metadata_Batch" in raw else [
        "Metadata_Plate"
    ]  # fmt: skip
    dmso = raw["Metadata_Role"] == "negative_control"
    by = [raw[k] for k in keys]  # a plate with a blank batch stays in the table
    trends = pd.DataFrame(
        {
            "n_wells": raw.groupby(by, sort=True, dropna=False).size(),
            "dmso_wells": dmso.groupby(by, sort=True, dropna=False).sum(),
            "dmso_cell_count": raw["Metadata_CellCount"]
            .where(dmso)
            .groupby(by, sort=True, dropna=False)
            .median(),
        }
    ).reset_index()
    trends.insert(len(keys), "layout", trends["Metadata_Plate"].map(plate_layouts(raw)))
    if qc is not None:
        trends = trends.merge(
            qc[["Metadata_Plate", "z_prime_activity"]], on="Metadata_Plate", how="left"
        )
    replicates = replicate_correlation_across_plates(normalized)
    trends["replicate_correlation_across_plates"] = (
        trends["Metadata_Plate"].map(replicates).astype(float)
    )
    return trends


def _n_annotated(profiles: pd.DataFrame, column: str) -> int:
    """Treatments (compounds) with a label in `column`."""
    treated = profiles[profiles["Metadata_Role"] != "negative_control"]
    return treated.loc[annotated_rows(treated, column), "Metadata_Compound"].nunique()


def correction_diagnostics(
    stages: Mapping[str, pd.DataFrame], *, reference_column: str | None = None
) -> pd.DataFrame:
    """Compare profiles at stages of the recipe (e.g. before and after it).

    Parameters
    ----------
    stages : mapping of str to DataFrame
        Stage name -> normalized well profiles (same wells).
    reference_column : str, optional
        An annotation (e.g. ``moa``) for MoA NSC / NSCB (`pipeline.calls.moa.moa_table`);
        not computed when None, absent, or held by fewer than two treatments.

    Returns
    -------
    DataFrame
        One row per stage: ``n_features``, ``dmso_within_plates``,
        ``dmso_across_plates``, ``dmso_within_minus_across``, ``replicate_map`` (mean
        over compound-doses with two or more wells) and, with annotations, ``nsc``
        and ``nscb``.

    Raises
    ------
    ValueError
        If `stages` is empty or a table lacks columns.
    """
    if not stages:
        raise ValueError("stages is empty; give at least one table of profiles.")
    rows = []
    for name, profiles in stages.items():
        similarity = dmso_similarity(profiles)
        replicate = replicate_average_precision(
            _finite_rows(profiles), group_by=DOSE_KEYS
        )
        row = {
            "stage": name,
            "n_features": len(feature_columns(profiles)),
            **{f"dmso_{k}": v for k, v in similarity.items()},
            "replicate_map": float(replicate["replicate_map"].mean())
            if len(replicate)
            else float("nan"),
        }
        column = metadata_column(profiles, reference_column or "")
        if column and _n_annotated(profiles, column) >= 2:
            _, accuracy = moa_table(profiles, reference_column=reference_column)
            row |= {"nsc": accuracy["nsc"], "nscb": accuracy["nscb"]}
        rows.append(row)
    return pd.DataFrame(rows)


#: Stage names of `recipe_diagnostics`.
BEFORE_RECIPE = "one scale, no plate alignment"
AFTER_RECIPE = "the run's profile recipe"


def recipe_diagnostics(
    raw: pd.DataFrame, normalized: pd.DataFrame, *, reference_column: str | None = None
) -> pd.DataFrame:
    """`correction_diagnostics` of a run's profiles before and after its recipe.

    Before: `uncorrected_profiles` of the features the recipe kept (so the two
    stages differ by what the recipe does to those features: per-plate alignment,
    and whitening or scaling to all wells if the recipe asks; not by the feature
    selection); after: `normalized`.

    Parameters
    ----------
    raw : DataFrame
        Well profiles (`pipeline.views.export.read_well_profiles`).
    normalized : DataFrame
        The same after the run's recipe (`pipeline.views.export.read_profiles`).
    reference_column : str, optional
        As `correction_diagnostics`.

    Returns
    -------
    DataFrame
        Rows `BEFORE_RECIPE` and `AFTER_RECIPE` of `correction_diagnostics`.

    Raises
    ------
    ValueError
        As `uncorrected_profiles` and `correction_diagnostics`.
    """
    before = uncorrected_profiles(raw, features=feature_columns(normalized))
    return correction_diagnostics(
        {BEFORE_RECIPE: before, AFTER_RECIPE: normalized},
        reference_column=reference_column,
    )
