"""Plate QC statistics: Z' factor (classic and robust) and the edge effect."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.images.platemap import PLATE_FORMATS, infer_plate_format, parse_well
from pipeline.profiling.profiles import MAD_SCALE


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


#: Ways `edge_effect` compares the rings.
EDGE_STATISTICS = ("ratio", "difference")


def edge_effect(
    wells: pd.DataFrame, value: str, *, statistic: str = "ratio"
) -> pd.DataFrame:
    """Compare a per-well value in the outer ring of wells with the inner wells.

    Negative-control wells are used when at least two sit on the edge and two
    inside, so compound effects do not confound it; otherwise (e.g. DMSO only in
    the edge columns) all wells with a value except positive controls, which in a
    screen are mostly inactive. The ring is that of the plate format (96, 384,
    1536) inferred from the plate's wells.

    Parameters
    ----------
    wells : DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Role`` and `value`.
    value : str
        E.g. ``Metadata_CellCount`` or an activity column.
    statistic : {"ratio", "difference"}
        ``edge_effect`` as edge median / inner median (1 = none; for counts) or
        edge median - inner median (0 = none; for activity).

    Returns
    -------
    DataFrame
        Per plate: ``edge_median``, ``inner_median``, ``edge_effect`` and
        ``edge_wells`` (``negative controls`` or ``all wells``, or why the effect
        is NaN: ``no values``, ``no inner wells``, ``no edge wells``).

    Raises
    ------
    ValueError
        If columns are missing or `statistic` is unknown.
    """
    needed = ("Metadata_Plate", "Metadata_Well", "Metadata_Role", value)
    missing = [c for c in needed if c not in wells]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    if statistic not in EDGE_STATISTICS:
        raise ValueError(
            f"statistic {statistic!r} is unknown; use {' or '.join(EDGE_STATISTICS)}."
        )
    rows = []
    for plate, group in wells.groupby("Metadata_Plate", sort=True):
        n_rows, n_cols = PLATE_FORMATS[infer_plate_format(group["Metadata_Well"])]
        positions = np.array([parse_well(w) for w in group["Metadata_Well"]])
        on_edge = (
            (positions[:, 0] == 0) | (positions[:, 1] == 0)
            | (positions[:, 0] == n_rows - 1) | (positions[:, 1] == n_cols - 1)
        )  # fmt: skip
        values = group[value].to_numpy(float)
        finite = np.isfinite(values)
        role = group["Metadata_Role"].to_numpy()
        control = finite & (role == "negative_control")
        if (control & on_edge).sum() >= 2 and (control & ~on_edge).sum() >= 2:
            used, label = control, "negative controls"
        else:
            used, label = finite & (role != "positive_control"), "all wells"
        edge = np.median(values[used & on_edge]) if (used & on_edge).any() else np.nan
        inner = (
            np.median(values[used & ~on_edge]) if (used & ~on_edge).any() else np.nan
        )
        if not finite.any():
            label = "no values"
        elif np.isnan(inner):
            label = "no inner wells"
        elif np.isnan(edge):
            label = "no edge wells"
        ratio = edge / inner if inner else np.nan
        effect = edge - inner if statistic == "difference" else ratio
        rows.append(
            {
                "Metadata_Plate": plate,
                "edge_median": edge,
                "inner_median": inner,
                "edge_effect": effect,
                "edge_wells": label,
            }
        )
    return pd.DataFrame(
        rows,
        columns=["Metadata_Plate", "edge_median", "inner_median", "edge_effect",
                 "edge_wells"],
    )  # fmt: skip
