"""Fixed-size single-cell crops centred on nuclei, with their cell masks.

Crops are cut from a field in one vectorized gather (no per-cell loop), zero-padded
where a cell sits at the border, and are meant to be streamed to the embedding step
field by field rather than written to disk.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_CROP_PX, MAX_CROP_PX = 16, 512


def default_crop_size(nucleus_areas: np.ndarray) -> int:
    """Crop side for cells whose nuclei have these areas: 4 median diameters.

    Rounded up to a multiple of 8 and clipped to [16, 512] px; 64 when there are no
    nuclei.

    Raises
    ------
    ValueError
        If an area is negative.
    """
    areas = np.asarray(nucleus_areas, dtype=float)
    if (areas < 0).any():
        raise ValueError("nucleus areas must be >= 0.")
    areas = areas[areas > 0]
    if not len(areas):
        return 64
    diameter = np.sqrt(4 * np.median(areas) / np.pi)
    size = int(np.ceil(4 * diameter / 8) * 8)
    return int(np.clip(size, MIN_CROP_PX, MAX_CROP_PX))


def crop_cells(
    image: np.ndarray,
    centroids: np.ndarray,
    size: int,
    *,
    cell_labels: np.ndarray | None = None,
    object_numbers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cut a size x size crop of every channel around each centroid.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
    centroids : ndarray of shape (N, 2)
        (y, x) of each nucleus; rounded to the nearest pixel.
    size : int
        Crop side in pixels (even sizes put the centre just below and right of the
        middle).
    cell_labels : ndarray of shape (Y, X), optional
        Cell labels; with `object_numbers`, a mask of each crop's own cell is
        returned.
    object_numbers : ndarray of shape (N,), optional
        Label of each centroid's cell in `cell_labels`.

    Returns
    -------
    crops : ndarray of shape (N, C, size, size)
        Same dtype as `image`; zero outside the field.
    masks : ndarray of shape (N, size, size), bool, or None
        True on the pixels of the crop's own cell.

    Raises
    ------
    ValueError
        If shapes disagree, `size` is outside [1, 4096] or only one of
        `cell_labels` and `object_numbers` is given.
    """
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected (C, Y, X).")
    centroids = np.asarray(centroids, dtype=float).reshape(-1, 2)
    if not 1 <= size <= 4096:
        raise ValueError(f"crop size {size} must lie in [1, 4096] px.")
    if (cell_labels is None) != (object_numbers is None):
        raise ValueError("give both cell_labels and object_numbers, or neither.")
    half = size // 2
    pad = ((0, 0), (half, size - half), (half, size - half))
    padded = np.pad(image, pad)
    ys = np.rint(centroids[:, 0]).astype(np.int64)
    xs = np.rint(centroids[:, 1]).astype(np.int64)
    ys = np.clip(ys, 0, image.shape[1] - 1)
    xs = np.clip(xs, 0, image.shape[2] - 1)
    windows = sliding_window_view(padded, (size, size), axis=(1, 2))
    crops = np.ascontiguousarray(windows[:, ys, xs].transpose(1, 0, 2, 3))
    if cell_labels is None:
        return crops, None
    if cell_labels.shape != image.shape[1:]:
        raise ValueError(
            f"cell_labels {cell_labels.shape} and image {image.shape} differ in (Y, X)."
        )
    numbers = np.asarray(object_numbers).reshape(-1)
    if len(numbers) != len(centroids):
        raise ValueError(
            f"{len(numbers)} object numbers for {len(centroids)} centroids."
        )
    label_windows = sliding_window_view(np.pad(cell_labels, pad[1:]), (size, size))
    masks = label_windows[ys, xs] == numbers[:, None, None]
    return crops, masks
