"""Baseline per-cell features: shape and intensity of nuclei and cells.

Names follow CellProfiler (``Nuclei_AreaShape_Area``,
``Cells_Intensity_MeanIntensity_DNA``) so users recognise them. The segmentation
issue extends this set (texture, radial distribution, neighbours, cytoplasm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

FEATURE_SET_NAME = "classical_baseline"
_SHAPE = {
    "area": "Area",
    "perimeter": "Perimeter",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "axis_major_length": "MajorAxisLength",
    "axis_minor_length": "MinorAxisLength",
}
_QUANTILE_NAMES = {
    0.25: "LowerQuartileIntensity",
    0.5: "MedianIntensity",
    0.75: "UpperQuartileIntensity",
}


def _quantile_name(q: float) -> str:
    return _QUANTILE_NAMES.get(q, f"Quantile{round(q * 100):02d}Intensity")


def _label_quantiles(
    values: np.ndarray, labels: np.ndarray, n_labels: int, quantiles: Sequence[float]
) -> np.ndarray:
    """Per-label quantiles (lower interpolation) of `values`; shape (n_labels, len(q))."""
    inside = labels > 0
    lab, val = labels[inside], values[inside]
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    counts = np.bincount(lab, minlength=n_labels + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((n_labels, len(quantiles)), np.nan, dtype=np.float32)
    present = counts > 0
    for j, q in enumerate(quantiles):
        index = starts + np.floor(q * (counts - 1)).astype(np.int64)
        out[present, j] = val[index[present]]
    return out


def _compartment(
    prefix: str,
    labels: np.ndarray,
    image: np.ndarray,
    channel_names: Sequence[str],
    n_labels: int,
    quantiles: Sequence[float],
) -> dict[str, np.ndarray]:
    """Shape and intensity columns of one compartment, rows = labels 1..n_labels."""
    table = regionprops_table(
        labels,
        intensity_image=np.moveaxis(image, 0, -1),
        properties=[
            "label",
            *_SHAPE,
            "intensity_mean",
            "intensity_std",
            "intensity_max",
        ],
    )
    rows = np.searchsorted(np.arange(1, n_labels + 1), table["label"])
    columns: dict[str, np.ndarray] = {}

    def put(name: str, values: np.ndarray) -> None:
        full = np.full(n_labels, np.nan, dtype=np.float32)
        full[rows] = values
        columns[name] = full

    for prop, name in _SHAPE.items():
        put(f"{prefix}_AreaShape_{name}", table[prop])
    area = table["area"]
    perimeter = np.maximum(table["perimeter"], 1e-6)
    put(f"{prefix}_AreaShape_FormFactor", 4 * np.pi * area / perimeter**2)
    for c, channel in enumerate(channel_names):
        mean = table[f"intensity_mean-{c}"]
        put(f"{prefix}_Intensity_MeanIntensity_{channel}", mean)
        put(f"{prefix}_Intensity_StdIntensity_{channel}", table[f"intensity_std-{c}"])
        put(f"{prefix}_Intensity_MaxIntensity_{channel}", table[f"intensity_max-{c}"])
        put(f"{prefix}_Intensity_IntegratedIntensity_{channel}", mean * area)
        per_label = _label_quantiles(image[c], labels, n_labels, quantiles)
        for j, q in enumerate(quantiles):
            columns[f"{prefix}_Intensity_{_quantile_name(q)}_{channel}"] = per_label[
                :, j
            ]
    return columns


def feature_names(
    channel_names: Sequence[str],
    *,
    intensity_quantiles: Sequence[float] = (0.25, 0.5, 0.75),
) -> list[str]:
    """Return the feature names `measure_cells` produces, in its column order.

    Raises
    ------
    ValueError
        If `channel_names` is empty or repeats a name.
    """
    if not channel_names or len(set(channel_names)) != len(channel_names):
        raise ValueError(
            f"channel_names {list(channel_names)} must be non-empty and unique."
        )
    names = []
    for prefix in ("Nuclei", "Cells"):
        names += [f"{prefix}_AreaShape_{name}" for name in _SHAPE.values()]
        names.append(f"{prefix}_AreaShape_FormFactor")
        for channel in channel_names:
            names += [
                f"{prefix}_Intensity_{kind}_{channel}"
                for kind in (
                    "MeanIntensity",
                    "StdIntensity",
                    "MaxIntensity",
                    "IntegratedIntensity",
                )
            ]
            names += [
                f"{prefix}_Intensity_{_quantile_name(q)}_{channel}"
                for q in intensity_quantiles
            ]
    return [*names, "Nuclei_AreaShape_NucleusCellAreaRatio"]


def measure_cells(
    image: np.ndarray,
    nuclei_labels: np.ndarray,
    cell_labels: np.ndarray,
    *,
    channel_names: Sequence[str],
    intensity_quantiles: Sequence[float] = (0.25, 0.5, 0.75),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every cell of a field: position, nucleus and cell shape and intensity.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        The field, any numeric dtype.
    nuclei_labels, cell_labels : ndarray of shape (Y, X), int
        From `pipeline.segment.segment_field`: labels 1..N, the same object in both.
    channel_names : sequence of str
        One name per channel of `image`, used in feature names.
    intensity_quantiles : sequence of float
        Per-compartment intensity quantiles in [0, 1].

    Returns
    -------
    cells : DataFrame
        One row per object 1..N: ``object_number``, ``centroid_y``, ``centroid_x``,
        ``bbox_min_y``, ``bbox_min_x``, ``bbox_max_y``, ``bbox_max_x``, ``area_px``
        (nucleus).
    features : DataFrame
        Same rows, float32 feature columns named ``<Compartment>_<Category>_<Name>``.

    Raises
    ------
    ValueError
        If shapes disagree, `channel_names` does not match C, or the labels are not
        numbered 1..N.
    """
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected (C, Y, X).")
    if nuclei_labels.shape != image.shape[1:] or cell_labels.shape != image.shape[1:]:
        raise ValueError(
            f"labels have shapes {nuclei_labels.shape} and {cell_labels.shape} but image "
            f"is {image.shape}; labels must match image in (Y, X)."
        )
    if len(channel_names) != image.shape[0]:
        raise ValueError(
            f"channel_names has {len(channel_names)} names but image has "
            f"{image.shape[0]} channels."
        )
    n_labels = int(nuclei_labels.max())
    present = np.unique(nuclei_labels)
    if n_labels and len(present[present > 0]) != n_labels:
        raise ValueError(
            "nuclei_labels must be numbered 1..N without gaps (relabel them)."
        )
    values = image.astype(np.float32, copy=False)
    nucleus = regionprops_table(
        nuclei_labels, properties=["label", "centroid", "bbox", "area"]
    )
    cells = pd.DataFrame(
        {
            "object_number": nucleus["label"].astype(np.int64),
            "centroid_y": nucleus["centroid-0"],
            "centroid_x": nucleus["centroid-1"],
            "bbox_min_y": nucleus["bbox-0"],
            "bbox_min_x": nucleus["bbox-1"],
            "bbox_max_y": nucleus["bbox-2"],
            "bbox_max_x": nucleus["bbox-3"],
            "area_px": nucleus["area"].astype(np.int64),
        }
    )
    columns = _compartment(
        "Nuclei", nuclei_labels, values, channel_names, n_labels, intensity_quantiles
    )
    columns |= _compartment(
        "Cells", cell_labels, values, channel_names, n_labels, intensity_quantiles
    )
    cell_area = columns["Cells_AreaShape_Area"]
    columns["Nuclei_AreaShape_NucleusCellAreaRatio"] = columns[
        "Nuclei_AreaShape_Area"
    ] / np.where(cell_area > 0, cell_area, np.nan)
    features = pd.DataFrame(columns).astype(np.float32)
    return cells, features
