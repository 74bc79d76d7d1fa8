"""Per-field image QC (baseline: intensity range, saturation, cell count)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def measure_field_qc(
    image: np.ndarray, *, channel_names: Sequence[str], n_cells: int
) -> dict[str, float]:
    """Return QC values of one field.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        Raw field.
    channel_names : sequence of str
        One per channel.
    n_cells : int
        Objects found.

    Returns
    -------
    dict
        ``n_cells`` and, per channel ``<ch>``: ``mean_<ch>``, ``p01_<ch>``,
        ``p99_<ch>`` and ``saturated_frac_<ch>`` (fraction of pixels at the dtype's
        maximum, or at the image maximum for float images).

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
        low, high = np.percentile(plane, [1, 99])
        qc[f"mean_{name}"] = float(plane.mean())
        qc[f"p01_{name}"] = float(low)
        qc[f"p99_{name}"] = float(high)
        qc[f"saturated_frac_{name}"] = float(np.mean(plane >= ceiling))
    return qc
