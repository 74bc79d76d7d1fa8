"""Baseline nuclei and cell segmentation (Otsu + distance watershed + expansion).

This is the simplest honest segmenter, kept until the segmentation issue brings
illumination correction, size-adaptive declumping and propagation over a cytoplasm
channel. It is named ``otsu_expand`` in run records.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import expand_labels, relabel_sequential, watershed

SEGMENTER_NAME = "otsu_expand"


def _drop_small(labels: np.ndarray, min_area_px: int) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    small = areas < min_area_px
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return relabel_sequential(out)[0]


def segment_field(
    nuclei: np.ndarray,
    *,
    smoothing_sigma_px: float = 1.0,
    min_nucleus_area_px: int = 20,
    declump_min_distance_px: int = 5,
    cell_expansion_px: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment nuclei by Otsu thresholding and cells by expanding them.

    The threshold is Otsu's, raised to at least the median + 5 robust standard
    deviations of the field so that empty or sparse fields do not yield noise objects.

    Parameters
    ----------
    nuclei : ndarray of shape (Y, X)
        The nuclear-stain plane, any numeric dtype.
    smoothing_sigma_px : float
        Gaussian smoothing before thresholding; 0 for none.
    min_nucleus_area_px : int
        Objects smaller than this are removed as debris.
    declump_min_distance_px : int
        Minimum distance between seeds of the distance-transform watershed that
        splits touching nuclei; 0 turns declumping off.
    cell_expansion_px : int
        Each nucleus grows by this many pixels (without overlap) into its cell.

    Returns
    -------
    nuclei_labels, cell_labels : ndarray of shape (Y, X), int32
        0 is background; label k is the same object in both, numbered 1..N.

    Raises
    ------
    ValueError
        If `nuclei` is not 2-D or holds non-finite values.
    """
    if nuclei.ndim != 2:
        raise ValueError(f"nuclei has shape {nuclei.shape}; expected one (Y, X) plane.")
    plane = nuclei.astype(np.float32, copy=False)
    if not np.isfinite(plane).all():
        raise ValueError("nuclei holds NaN or infinite values; clean the image first.")
    smoothed = (
        ndi.gaussian_filter(plane, smoothing_sigma_px) if smoothing_sigma_px else plane
    )
    empty = np.zeros(plane.shape, dtype=np.int32)
    if smoothed.max() <= smoothed.min():
        return empty, empty.copy()
    # Otsu alone splits background noise when a field has few or no nuclei; the
    # foreground must also stand clear of the background (median + 5 robust sd).
    median = float(np.median(smoothed))
    noise = 1.4826 * float(np.median(np.abs(smoothed - median)))
    threshold = max(float(threshold_otsu(smoothed)), median + 5.0 * noise)
    mask = ndi.binary_fill_holes(smoothed > threshold)
    if declump_min_distance_px:
        distance = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
        components, _ = ndi.label(mask)
        peaks = peak_local_max(
            distance,
            min_distance=declump_min_distance_px,
            labels=components,
            exclude_border=False,
        )
        markers = np.zeros(plane.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-distance, markers, mask=mask)
    else:
        labels, _ = ndi.label(mask)
    nuclei_labels = _drop_small(labels.astype(np.int32), min_nucleus_area_px)
    cell_labels = expand_labels(nuclei_labels, cell_expansion_px).astype(np.int32)
    return nuclei_labels, cell_labels
