"""Plate QC statistics: Z' factor (classic and robust) and the edge effect."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.platemap import PLATE_FORMATS, infer_plate_format, parse_well
from pipeline.profiles import MAD_SCALE


def z_prime(
    positive: np.ndarray, negative: np.ndarray, *, robust: bool = False
) -> float:
    """Return Z' = 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg| (Zhang et al. 1999).

    Parameters
    ----------
    positive, negative : ndarray of shape (N,)
        One value per positive / negative control well (e.g. an activity score or a
        feature); NaN values are ignored.
    robust : bool
        Use median and 1.4826 MAD instead of mean and standard deviation.

    Returns
    -------
    float
        > 0.5 is the usual bar for a screening-quality assay; -inf when the means
        coincide.

    Raises
    ------
    ValueError
        If either group has fewer than two finite values.
    """
    pos = np.asarray(positive, dtype=float)
    neg = np.asarray(negative, dtype=float)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(
            f"Z' needs at least two finite values per control group; got {len(pos)} "
            f"positive and {len(neg)} negative."
        )
    if robust:
        centre_pos, centre_neg = np.median(pos), np.median(neg)
        spread = MAD_SCALE * (
            np.median(np.abs(pos - centre_pos)) + np.median(np.abs(neg - centre_neg))
        )
    else:
        centre_pos, centre_neg = pos.mean(), neg.mean()
        spread = pos.std(ddof=1) + neg.std(ddof=1)
    gap = abs(centre_pos - centre_neg)
    return float(1 - 3 * spread / gap) if gap > 0 else float("-inf")


def plate_z_prime(wells: pd.DataFrame, value: str) -> pd.DataFrame:
    """Return Z' and robust Z' of one per-well value for every plate.

    Parameters
    ----------
    wells : DataFrame
        ``Metadata_Plate``, ``Metadata_Role`` and the `value` column.
    value : str
        Column to assess (an activity score, the cell count, any feature).

    Returns
    -------
    DataFrame
        One row per plate with both control groups: ``Metadata_Plate``, ``value``,
        ``z_prime``, ``robust_z_prime``, ``n_positive``, ``n_negative``.

    Raises
    ------
    ValueError
        If columns are missing or no plate has both kinds of controls.
    """
    missing = [c for c in ("Metadata_Plate", "Metadata_Role", value) if c not in wells]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    rows = []
    for plate, group in wells.groupby("Metadata_Plate", sort=True):
        pos = group.loc[group["Metadata_Role"] == "positive_control", value].to_numpy(
            float
        )
        neg = group.loc[group["Metadata_Role"] == "negative_control", value].to_numpy(
            float
        )
        if len(pos) < 2 or len(neg) < 2:
            continue
        rows.append(
            {
                "Metadata_Plate": plate,
                "value": value,
                "z_prime": z_prime(pos, neg),
                "robust_z_prime": z_prime(pos, neg, robust=True),
                "n_positive": len(pos),
                "n_negative": len(neg),
            }
        )
    if not rows:
        raise ValueError(
            "no plate has at least two positive_control and two negative_control wells; "
            "Z' needs both."
        )
    return pd.DataFrame(rows)


def edge_effect(wells: pd.DataFrame, value: str) -> pd.DataFrame:
    """Compare a per-well value in the outer ring of wells with the inner wells.

    Only negative-control wells are used, so compound effects do not confound it. The
    ring is that of the plate format (96, 384, 1536) inferred from the plate's wells.

    Parameters
    ----------
    wells : DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Role`` and `value`.
    value : str
        E.g. ``Metadata_CellCount``.

    Returns
    -------
    DataFrame
        Per plate: ``edge_median``, ``inner_median``, ``edge_to_inner_ratio`` (NaN when
        either ring has no control well).

    Raises
    ------
    ValueError
        If columns are missing.
    """
    needed = ("Metadata_Plate", "Metadata_Well", "Metadata_Role", value)
    missing = [c for c in needed if c not in wells]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    controls = wells[wells["Metadata_Role"] == "negative_control"]
    rows = []
    for plate, group in controls.groupby("Metadata_Plate", sort=True):
        plate_wells = wells.loc[wells["Metadata_Plate"] == plate, "Metadata_Well"]
        n_rows, n_cols = PLATE_FORMATS[infer_plate_format(plate_wells)]
        positions = np.array([parse_well(w) for w in group["Metadata_Well"]])
        on_edge = (
            (positions[:, 0] == 0) | (positions[:, 1] == 0)
            | (positions[:, 0] == n_rows - 1) | (positions[:, 1] == n_cols - 1)
        )  # fmt: skip
        values = group[value].to_numpy(float)
        edge = np.median(values[on_edge]) if on_edge.any() else np.nan
        inner = np.median(values[~on_edge]) if (~on_edge).any() else np.nan
        rows.append(
            {
                "Metadata_Plate": plate,
                "edge_median": edge,
                "inner_median": inner,
                "edge_to_inner_ratio": edge / inner if inner else np.nan,
            }
        )
    return pd.DataFrame(rows)
