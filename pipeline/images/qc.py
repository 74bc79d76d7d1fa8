"""Per-field image QC: focus, saturation, intensity range, cell count, and flags.

`measure_field_qc` runs on each raw field; `flag_fields` compares fields with
their plate at the end of a run (a blurred field is one whose focus score is far
below its plate's, whatever the assay's typical score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.config import QCConfig


def power_log_log_slope(plane: np.ndarray) -> float:
    """Slope of the radially averaged power spectrum in log-log axes.

    CellProfiler's ``PowerLogLogSlope`` focus score: sharp images keep power at high
    spatial frequencies, blurred ones lose it (more negative slope). The line is
    fitted over the band from 5% to 50% of the highest radial frequency: above it,
    camera noise makes the spectrum flat whatever the focus (a blurred, noisy demo
    field scored as sharp as a focused one over the full range).

    Parameters
    ----------
    plane : ndarray of shape (Y, X)

    Returns
    -------
    float
        NaN for a constant plane or one smaller than 4 x 4.

    Raises
    ------
    ValueError
        If `plane` is not 2-D.
    """
    if plane.ndim != 2:
        raise ValueError(f"plane has shape {plane.shape}; expected (Y, X).")
    if min(plane.shape) < 4:
        return float("nan")
    values = plane.astype(np.float64)
    values = values - values.mean()
    if not values.any():
        return float("nan")
    power = np.abs(np.fft.rfft2(values)) ** 2
    fy = np.fft.fftfreq(values.shape[0])[:, None]
    fx = np.fft.rfftfreq(values.shape[1])[None, :]
    radius = np.round(np.hypot(fy, fx) * min(values.shape)).astype(np.int64)
    n = min(values.shape) // 2
    low, high = max(1, int(0.05 * n)), max(2, int(0.5 * n))
    keep = (radius >= low) & (radius < high)
    sums = np.bincount(radius[keep], power[keep], minlength=high)[low:high]
    counts = np.bincount(radius[keep], minlength=high)[low:high]
    valid = (counts > 0) & (sums > 0)
    if valid.sum() < 2:
        return float("nan")
    freq = np.arange(low, high)[valid]
    return float(np.polyfit(np.log(freq), np.log(sums[valid] / counts[valid]), 1)[0])


def measure_field_qc(
    image: np.ndarray, *, channel_names: Sequence[str], n_cells: int
) -> dict[str, float]:
    """Return QC values of one raw field.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        Raw field (before illumination correction).
    channel_names : sequence of str
        One per channel.
    n_cells : int
        Objects found.

    Returns
    -------
    dict
        ``n_cells`` and, per channel ``<ch>``: ``mean_<ch>``, ``median_<ch>``,
        ``p01_<ch>``, ``p99_<ch>``, ``saturated_frac_<ch>`` (fraction of pixels at
        the dtype's maximum, or at the image maximum for float images) and
        ``focus_<ch>`` (`power_log_log_slope`).

    Raises
    ------
    ValueError
        If `image` is not 3-D or `channel_names` does not match its channels.
    """
    if image.ndim != 3 or image.shape[0] != len(channel_names):
        raise ValueError(
            f"image has shape {image.shape} but {len(channel_names)} channel names were "
            "given; expected (C, Y, X) with one name per channel."
        )
    qc: dict[str, float] = {"n_cells": int(n_cells)}
    for plane, name in zip(image, channel_names, strict=True):
        ceiling = np.iinfo(plane.dtype).max if plane.dtype.kind in "ui" else plane.max()
        low, median, high = np.percentile(plane, [1, 50, 99])
        qc[f"mean_{name}"] = float(plane.mean())
        qc[f"median_{name}"] = float(median)
        qc[f"p01_{name}"] = float(low)
        qc[f"p99_{name}"] = float(high)
        qc[f"saturated_frac_{name}"] = float(np.mean(plane >= ceiling))
        qc[f"focus_{name}"] = power_log_log_slope(plane)
    return qc


def _robust_z(values: pd.Series) -> pd.Series:
    median = values.median()
    mad = 1.4826 * (values - median).abs().median()
    if not np.isfinite(mad) or mad == 0:
        return pd.Series(0.0, index=values.index)
    return (values - median) / mad


def flag_fields(
    qc: pd.DataFrame,
    *,
    channel_names: Sequence[str],
    nuclei_channel: str,
    config: QCConfig | None = None,
) -> pd.Series:
    """Flag fields beyond the QC thresholds, comparing each with its plate.

    Parameters
    ----------
    qc : DataFrame
        One row per field: ``Metadata_Plate`` and the keys of `measure_field_qc`.
    channel_names : sequence of str
    nuclei_channel : str
        Whose focus score is checked.
    config : QCConfig, optional
        Thresholds; defaults if None.

    Returns
    -------
    Series of str, same index as `qc`
        Comma-separated flags (``saturated_<ch>``, ``blurred``, ``intensity_<ch>``,
        ``few_cells``); empty for a field that passes.

    Raises
    ------
    ValueError
        If a needed column is missing (the message names it).
    """
    cfg = config or QCConfig()
    needed = ["Metadata_Plate", "n_cells", f"focus_{nuclei_channel}"]
    needed += [f"saturated_frac_{c}" for c in channel_names]
    needed += [f"median_{c}" for c in channel_names]
    missing = [c for c in needed if c not in qc.columns]
    if missing:
        raise ValueError(f"QC table lacks columns {missing}; use measure_field_qc.")
    flags = pd.DataFrame(index=qc.index)
    for ch in channel_names:
        flags[f"saturated_{ch}"] = qc[f"saturated_frac_{ch}"] > cfg.max_saturated_frac
    by_plate = qc.groupby("Metadata_Plate")
    if cfg.focus_mad:
        focus = by_plate[f"focus_{nuclei_channel}"].transform(_robust_z)
        flags["blurred"] = focus < -cfg.focus_mad
    if cfg.intensity_mad:
        for ch in channel_names:
            z = by_plate[f"median_{ch}"].transform(_robust_z)
            flags[f"intensity_{ch}"] = z.abs() > cfg.intensity_mad
    if cfg.min_cells:
        flags["few_cells"] = qc["n_cells"] < cfg.min_cells
    names = np.array(flags.columns, dtype=object)
    values = flags.fillna(False).to_numpy(bool)
    return pd.Series(
        [",".join(names[row]) for row in values], index=qc.index, dtype=object
    )
