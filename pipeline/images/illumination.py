"""Illumination correction, CellProfiler-style: a robust average of a plate's fields.

For each plate and channel, fields are block-averaged to a small image (longer side
``size_px``), averaged pixel-wise over fields with the top and bottom 5% of values
trimmed (cells average out, uneven illumination stays, a few debris or empty fields
do not count), smoothed by a wide Gaussian and scaled to median 1.
Each field is divided by the function resized to its shape, so corrected
intensities keep the raw scale.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import trim_mean
from skimage.transform import resize

_FLOOR = 1e-3


def downsample(image: np.ndarray, size_px: int) -> np.ndarray:
    """Block-average a field so that its longer side is at most `size_px`.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
    size_px : int
        Wanted longer side, >= 1.

    Returns
    -------
    ndarray of shape (C, Y // f, X // f), float32
        With block size ``f = ceil(max(Y, X) / size_px)``.

    Raises
    ------
    ValueError
        If `image` is not 3-D, is smaller than one block, or `size_px` < 1.
    """
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected (C, Y, X).")
    if size_px < 1:
        raise ValueError(f"size_px {size_px} must be >= 1.")
    factor = max(1, math.ceil(max(image.shape[1:]) / size_px))
    height, width = image.shape[1] // factor, image.shape[2] // factor
    if not height or not width:
        raise ValueError(f"image {image.shape} is too small for blocks of {factor} px.")
    blocks = image[:, : height * factor, : width * factor].astype(np.float32)
    return blocks.reshape(image.shape[0], height, factor, width, factor).mean((2, 4))


def illumination_function(
    fields: np.ndarray, *, smoothing_frac: float = 0.06
) -> np.ndarray:
    """Combine downsampled fields of one plate into illumination functions.

    Parameters
    ----------
    fields : ndarray of shape (F, C, h, w)
        Output of `downsample` for F fields.
    smoothing_frac : float
        Gaussian sigma as a fraction of the longer side.

    Returns
    -------
    ndarray of shape (C, h, w), float32
        Per channel, median 1 and at least 1e-3.

    Raises
    ------
    ValueError
        If `fields` is not 4-D with at least one field, or holds non-finite values.
    """
    if fields.ndim != 4 or fields.shape[0] == 0:
        raise ValueError(f"fields has shape {fields.shape}; expected (F>=1, C, h, w).")
    if not np.isfinite(fields).all():
        raise ValueError("fields hold NaN or infinite values.")
    average = trim_mean(fields, 0.05, axis=0)
    sigma = smoothing_frac * max(fields.shape[2:])
    out = np.empty(average.shape, dtype=np.float32)
    for c, plane in enumerate(average):
        smooth = ndi.gaussian_filter(plane, sigma, mode="nearest") if sigma else plane
        scale = float(np.median(smooth))
        out[c] = np.maximum(smooth / scale, _FLOOR) if scale > 0 else 1.0
    return out


def correct(image: np.ndarray, function: np.ndarray) -> np.ndarray:
    """Divide a field by its plate's illumination functions.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
    function : ndarray of shape (C, h, w)
        From `illumination_function`; resized bilinearly to (Y, X).

    Returns
    -------
    ndarray of shape (C, Y, X), float32

    Raises
    ------
    ValueError
        If the channel counts differ.
    """
    if image.ndim != 3 or function.ndim != 3 or image.shape[0] != function.shape[0]:
        raise ValueError(
            f"image {image.shape} and illumination function {function.shape} must be "
            "(C, Y, X) and (C, h, w) with the same C."
        )
    full = _resized(function.tobytes(), function.shape, function.dtype.str, image.shape)
    return image.astype(np.float32) / full


@lru_cache(maxsize=16)
def _resized(
    data: bytes, shape: tuple[int, ...], dtype: str, target: tuple[int, ...]
) -> np.ndarray:
    """Resize a function to a field's shape (cached: once per plate and shape)."""
    function = np.frombuffer(data, dtype=dtype).reshape(shape)
    full = resize(function, target, order=1, mode="edge", anti_aliasing=False)
    full = full.astype(np.float32)
    full.flags.writeable = False
    return full
