"""Nuclei and cell segmentation: a size-adaptive classical segmenter, and adapters.

The ``classical`` segmenter needs no per-image tuning: it estimates the
typical nucleus diameter ``d`` of each field from the scale-normalized Laplacian of
Gaussian and scales everything else by it: a local background (grey opening of
width ``d``) is subtracted; nuclei are seeded above 0.8 of the Otsu threshold and
each is cut at 0.3 of its own (smoothed) peak, so dim nuclei next to bright ones
are kept whole and halos do not join neighbours; touching nuclei are split by a
watershed whose markers combine the distance transform and the smoothed
intensity, at least ``0.2 d`` apart. Cells grow from the nuclei over a cytoplasm
channel by watershed (CellProfiler's "propagation"), or as a ring around each
nucleus when there is none. The cytoplasm is the cell minus its nucleus.

``unet``, the default, is PhenoScreen's own learned segmenter (`models.segmenter`): a
compact U-Net trained on CC0 images, whose weights ship with the package (offline),
or weights trained by ``phenoscreen train-segmenter`` (``segment.weights``); cells
grow from its nuclei as above.
``cellpose`` and ``stardist`` are used only when those packages and their weights
are installed; otherwise choosing them is an error that says how to install them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import apply_hysteresis_threshold, threshold_li, threshold_otsu
from skimage.segmentation import (
    clear_border,
    expand_labels,
    relabel_sequential,
    watershed,
)

from pipeline.config import SEGMENTERS, check_unet_precision
from pipeline.errors import InputError
from pipeline.images.planes import (
    check_plane,
    estimate_nucleus_diameter,
    fill_holes,
    pixel_noise_sd,
    square_opening,
)

DEFAULT_SEGMENTER = "unet"  # measured better than "classical" on DSB2018 and the demo


def _smoothed_noise(plane: np.ndarray, sigma: float) -> float:
    """Return the standard deviation of pixel noise after smoothing by `sigma`.

    Estimated from differences of horizontally adjacent pixels (robust to the
    objects, which are smooth), scaled by the noise reduction of the smoothing.
    """
    return pixel_noise_sd(plane) / (2 * np.sqrt(np.pi) * sigma)


def _nuclei_mask(
    signal: np.ndarray,
    intensity: np.ndarray,
    d: float,
    noise: float,
    seed_fraction: float,
    edge_fraction: float,
) -> np.ndarray:
    """Foreground of nuclei, each cut at a fraction of its own peak (Y, X) bool.

    Candidates grow from pixels above ``seed_fraction`` of the Otsu threshold down
    to 3 noise SDs; they are split at valleys of `intensity` between its peaks (at
    least ``0.3 d`` apart), and each part keeps the pixels above ``edge_fraction``
    of its own peak (of `signal` smoothed by ``0.15 d``, so a bright speck does not
    set it), so dim and bright nuclei are both cut near their edges.
    """
    median = float(np.median(signal))
    high = median + max(
        seed_fraction * (float(threshold_otsu(signal)) - median), 6 * noise
    )
    candidate = apply_hysteresis_threshold(signal, median + 3 * noise, high)
    regions, n = ndi.label(candidate)
    if n == 0:
        return candidate
    peaks = peak_local_max(
        intensity,
        min_distance=max(1, int(round(0.3 * d))),
        labels=regions,
        exclude_border=False,
    )
    markers = np.zeros(signal.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    parts = watershed(-intensity, markers, mask=candidate)
    peak = np.zeros(len(peaks) + 1)
    smooth_signal = ndi.gaussian_filter(signal, max(1.0, 0.15 * d))
    inside = parts > 0  # the candidates' pixels only (half the time on a JUMP field)
    if len(peaks):
        peak[1:] = ndi.maximum(
            smooth_signal[inside], parts[inside], np.arange(1, len(peaks) + 1)
        )
    level = median + edge_fraction * (peak - median)
    level[0] = np.inf
    return fill_holes((signal > level[parts]) & (peak[parts] > high))


def segment_nuclei(
    plane: np.ndarray,
    *,
    nucleus_diameter_px: float | None = None,
    background_diameters: float = 1.0,
    seed_fraction: float = 0.8,
    edge_fraction: float = 0.3,
    declump_min_distance_diameters: float = 0.2,
    intensity_weight: float = 0.5,
    min_nucleus_area_fraction: float = 0.1,
    exclude_border_nuclei: bool = False,
) -> np.ndarray:
    """Segment nuclei in a nuclear-stain plane (the ``classical`` segmenter).

    Parameters
    ----------
    plane : ndarray of shape (Y, X)
        Nuclear stain, any real dtype, finite.
    nucleus_diameter_px : float
        Typical nucleus diameter ``d``; None estimates it per plane
        (`estimate_nucleus_diameter`).
    background_diameters : float
        Width of the grey opening, in units of ``d``, whose result is subtracted as
        local background; 0 subtracts the plane's median instead.
    seed_fraction : float
        A nucleus must peak above this fraction of the Otsu threshold (measured
        from the background, and at least 6 standard deviations of the smoothed
        pixel noise); lower finds dimmer nuclei next to bright ones.
    edge_fraction : float
        Each nucleus ends where its intensity falls below this fraction of its
        own peak above background.
    declump_min_distance_diameters : float
        Minimum distance between the seeds of touching nuclei, in units of ``d``;
        0 turns declumping off.
    intensity_weight : float
        Weight of the smoothed intensity against the distance transform in the
        declumping landscape; 0 is purely shape-based.
    min_nucleus_area_fraction : float
        Objects smaller than this fraction of a disc of diameter ``d`` are debris.
    exclude_border_nuclei : bool
        Remove nuclei touching the image border.

    Returns
    -------
    ndarray of shape (Y, X), int32
        Labels 1..N, 0 = background.

    Raises
    ------
    ValueError
        If `plane` is not a finite numeric 2-D array or an option is out of range.
    """
    values = check_plane(plane, "nuclei plane")
    if not (0 < seed_fraction <= 1 and 0 <= edge_fraction < 1):
        raise ValueError(
            f"seed_fraction {seed_fraction} must be in (0, 1] and edge_fraction "
            f"{edge_fraction} in [0, 1)."
        )
    if (nucleus_diameter_px is not None and nucleus_diameter_px <= 0) or (
        background_diameters < 0
    ):
        raise ValueError(
            "nucleus_diameter_px must be > 0 (or None) and background_diameters >= 0."
        )
    empty = np.zeros(values.shape, dtype=np.int32)
    if values.size == 0 or values.max() <= values.min():
        return empty
    d = nucleus_diameter_px or estimate_nucleus_diameter(values)
    smoothed = ndi.gaussian_filter(values, max(1.0, 0.05 * d))
    if background_diameters:
        width = max(3, int(round(background_diameters * d)))
        background = ndi.uniform_filter(square_opening(smoothed, width), width)
        signal = smoothed - background
    else:
        signal = smoothed - np.median(smoothed)
    noise = _smoothed_noise(values, max(1.0, 0.05 * d))
    intensity = ndi.gaussian_filter(values, max(1.0, 0.15 * d))
    mask = _nuclei_mask(signal, intensity, d, noise, seed_fraction, edge_fraction)
    components, n = ndi.label(mask)
    if n == 0:
        return empty
    if declump_min_distance_diameters:
        distance = ndi.gaussian_filter(
            ndi.distance_transform_edt(mask), max(1.0, 0.1 * d)
        )
        landscape = distance / (d / 2)
        if intensity_weight:
            scale = float(np.percentile(intensity[mask], 95)) or 1.0
            landscape = landscape + intensity_weight * intensity / scale
        peaks = peak_local_max(
            landscape,
            min_distance=max(1, int(round(declump_min_distance_diameters * d))),
            labels=components,
            exclude_border=False,
        )
        markers = np.zeros(values.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-landscape, markers, mask=mask)
    else:
        labels = components
    areas = np.bincount(labels.ravel())
    drop = areas < min_nucleus_area_fraction * np.pi * (d / 2) ** 2
    if exclude_border_nuclei:
        border = np.unique(
            np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        )
        drop[border] = True
    drop[0] = False
    labels[drop[labels]] = 0
    return relabel_sequential(labels.astype(np.int32))[0]


def segment_cells(
    nuclei: np.ndarray,
    cytoplasm: np.ndarray | None = None,
    *,
    ring_width_px: float | None = None,
) -> np.ndarray:
    """Grow cells from nuclei over a cytoplasm plane, or as rings without one.

    With `cytoplasm`, the cell foreground is the smoothed plane above its minimum
    cross-entropy (Li) threshold, which keeps dim cell bodies that Otsu's drops, joined
    with the nuclei; each foreground pixel joins the nucleus it reaches by a
    watershed on the inverted intensity, so borders between touching cells follow
    dim valleys. Without, each nucleus grows by `ring_width_px` without overlap.

    Parameters
    ----------
    nuclei : ndarray of shape (Y, X), int
        Labels 1..N.
    cytoplasm : ndarray of shape (Y, X), optional
        A cytoplasm or cell-body stain.
    ring_width_px : float
        Ring width when `cytoplasm` is None; None uses half the median nucleus
        equivalent diameter.

    Returns
    -------
    ndarray of shape (Y, X), int32
        Cell labels; cell k contains nucleus k.

    Raises
    ------
    ValueError
        If shapes differ or `cytoplasm` is not a finite numeric plane.
    """
    if nuclei.ndim != 2:
        raise ValueError(f"nuclei has shape {nuclei.shape}; expected (Y, X) labels.")
    if nuclei.max(initial=0) == 0:
        return np.zeros(nuclei.shape, dtype=np.int32)
    if cytoplasm is None:
        if not ring_width_px:
            areas = np.bincount(nuclei.ravel())[1:]
            ring_width_px = 0.5 * np.sqrt(4 * np.median(areas[areas > 0]) / np.pi)
        return expand_labels(nuclei, int(round(ring_width_px))).astype(np.int32)
    values = check_plane(cytoplasm, "cytoplasm plane")
    if values.shape != nuclei.shape:
        raise ValueError(
            f"cytoplasm plane {values.shape} and nuclei {nuclei.shape} shapes differ."
        )
    smoothed = ndi.gaussian_filter(values, 1.0)
    threshold = smoothed.max()
    if smoothed.max() > smoothed.min():
        step = 2 if smoothed.size > 2**18 else 1  # a subsample sets the threshold
        threshold = float(threshold_li(smoothed[::step, ::step]))
    foreground = fill_holes((smoothed > threshold) | (nuclei > 0))
    return watershed(-smoothed, nuclei, mask=foreground).astype(np.int32)


def _require(package: str, segmenter: str, how: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise InputError(
            f"segmenter {segmenter!r} needs the {package!r} package, which is not "
            f'installed: {how}. Or choose method = "unet" (the default) or "classical".'
        )


def _cellpose_nuclei(
    plane: np.ndarray, nucleus_diameter_px: float | None
) -> np.ndarray:
    _require("cellpose", "cellpose", "pip install cellpose (its model downloads once)")
    from cellpose import models  # noqa: PLC0415 - optional dependency

    try:
        model = models.CellposeModel(model_type="nuclei")
    except Exception as exc:  # noqa: BLE001 - any failure to get weights
        raise InputError(
            f"cellpose could not load its 'nuclei' model ({exc}); download it once "
            "with internet access or copy it into ~/.cellpose/models."
        ) from exc
    masks = model.eval(plane, diameter=nucleus_diameter_px or None)[0]
    return relabel_sequential(np.asarray(masks, dtype=np.int32))[0]


def _stardist_nuclei(
    plane: np.ndarray, nucleus_diameter_px: float | None
) -> np.ndarray:
    _require("stardist", "stardist", "pip install stardist tensorflow")
    from csbdeep.utils import normalize  # noqa: PLC0415 - optional dependency
    from stardist.models import StarDist2D  # noqa: PLC0415

    try:
        model = StarDist2D.from_pretrained("2D_versatile_fluo")
    except Exception as exc:  # noqa: BLE001 - any failure to get weights
        raise InputError(
            f"stardist could not load '2D_versatile_fluo' ({exc}); download it once "
            "with internet access (it is cached in ~/.keras/models)."
        ) from exc
    labels = model.predict_instances(normalize(plane, 1, 99.8))[0]
    return relabel_sequential(np.asarray(labels, dtype=np.int32))[0]


def _unet_nuclei(
    plane: np.ndarray,
    nucleus_diameter_px: float | None,
    weights: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> np.ndarray:
    import torch  # noqa: PLC0415 - loads torch

    from models.segmenter import segment_nuclei_unet  # noqa: PLC0415

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            'segment.device = "cuda" but this process sees no CUDA device (check the '
            'driver and CUDA_VISIBLE_DEVICES on every worker), or set device = "cpu".'
        )
    return segment_nuclei_unet(
        plane, nucleus_diameter_px, weights=weights, device=device, precision=precision
    )


_LEARNED: dict[str, Callable[..., np.ndarray]] = {
    "unet": _unet_nuclei,
    "cellpose": _cellpose_nuclei,
    "stardist": _stardist_nuclei,
}


def check_segmenter(
    method: str, weights: str | None = None, precision: str | None = None
) -> None:
    """Raise InputError unless `method` can run: known, installed, weights readable.

    Parameters
    ----------
    method : str
        One of `SEGMENTERS`.
    weights : str, optional
        Weights file of the ``unet`` segmenter (its shipped weights when None);
        refused for the other segmenters.
    precision : {"float32", "bfloat16"}, optional
        Arithmetic of the ``unet`` segmenter; refused for the other segmenters.

    Raises
    ------
    InputError
        If `method` is unknown or not installed, its weights are missing or
        corrupt, or `weights` or `precision` are given for another segmenter or
        `precision` is unknown.
    """
    if method not in SEGMENTERS:
        raise InputError(
            f"unknown segmenter {method!r}; choose one of {', '.join(SEGMENTERS)}."
        )
    if weights is not None and method != "unet":
        raise InputError(
            f"segment.weights ({weights}) applies to the 'unet' segmenter only, "
            f'not {method!r}; remove it or choose method = "unet".'
        )
    check_unet_precision(method, precision)
    if method == "unet":
        from models.segmenter import cached_segmenter  # noqa: PLC0415 - loads torch

        cached_segmenter(None if weights is None else str(weights))
    if method == "cellpose":
        _require("cellpose", method, "pip install cellpose")
    if method == "stardist":
        _require("stardist", method, "pip install stardist tensorflow")


def segmenter_weights_sha256(method: str, weights: str | None = None) -> str | None:
    """SHA-256 of the ``unet`` segmenter's weights (None for the other segmenters).

    Raises
    ------
    InputError
        If the unet weights are missing or corrupt.
    """
    if method != "unet":
        return None
    from models.segmenter import cached_segmenter  # noqa: PLC0415 - loads torch

    return cached_segmenter(None if weights is None else str(weights))[2]["sha256"]


def segment_field(
    nuclei_plane: np.ndarray,
    cytoplasm_plane: np.ndarray | None = None,
    *,
    method: str = DEFAULT_SEGMENTER,
    nucleus_diameter_px: float | None = None,
    background_diameters: float = 1.0,
    seed_fraction: float = 0.8,
    edge_fraction: float = 0.3,
    declump_min_distance_diameters: float = 0.2,
    intensity_weight: float = 0.5,
    min_nucleus_area_fraction: float = 0.1,
    exclude_border_nuclei: bool = False,
    ring_width_px: float | None = None,
    weights: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment the nuclei and cells of one field.

    Parameters
    ----------
    nuclei_plane : ndarray of shape (Y, X)
        Nuclear stain.
    cytoplasm_plane : ndarray of shape (Y, X), optional
        Cytoplasm stain for cell propagation; rings around nuclei without it.
    method : str
        ``unet`` (default: the learned segmenter shipped with PhenoScreen,
        `models.segmenter`), ``classical`` (`segment_nuclei`), ``cellpose`` or
        ``stardist`` for the nuclei.
    nucleus_diameter_px, background_diameters, seed_fraction, edge_fraction, \
declump_min_distance_diameters, intensity_weight, min_nucleus_area_fraction, \
exclude_border_nuclei
        See `segment_nuclei` (the learned segmenters use only the diameter and
        the border option).
    ring_width_px : float
        See `segment_cells`.
    weights : str, optional
        Weights file of the ``unet`` segmenter; its shipped weights when None.
    device : {"cpu", "cuda"}
        Where the ``unet`` segmenter runs (by default in bfloat16 on CUDA;
        `pipeline.config.DEVICE_PRECISION`).
    precision : {"float32", "bfloat16"}, optional
        The ``unet`` segmenter's arithmetic; None: the device's default
        (`models.segmenter.uses_bfloat16`).

    Returns
    -------
    nuclei_labels, cell_labels : ndarray of shape (Y, X), int32
        Label k is the same object in both, numbered 1..N.

    Raises
    ------
    InputError
        As `check_segmenter`: `method` unknown, its package or weights missing,
        `weights` or `precision` given for another segmenter, `precision` unknown;
        or a `device` other than the CPU for another segmenter than ``unet``.
    ValueError
        If a plane is not a finite numeric 2-D array or the shapes differ.
    """
    check_segmenter(method, weights, precision)
    if device != "cpu" and method != "unet":
        raise InputError(
            f'device {device!r} runs the "unet" segmenter only (method is {method!r}); '
            'use device = "cpu" or method = "unet".'
        )
    if method == "classical":
        nuclei = segment_nuclei(
            nuclei_plane,
            nucleus_diameter_px=nucleus_diameter_px,
            background_diameters=background_diameters,
            seed_fraction=seed_fraction,
            edge_fraction=edge_fraction,
            declump_min_distance_diameters=declump_min_distance_diameters,
            intensity_weight=intensity_weight,
            min_nucleus_area_fraction=min_nucleus_area_fraction,
            exclude_border_nuclei=exclude_border_nuclei,
        )
    else:
        plane = check_plane(nuclei_plane, "nuclei plane")
        extra = (
            {"weights": weights, "device": device, "precision": precision}
            if method == "unet"
            else {}
        )
        nuclei = _LEARNED[method](plane, nucleus_diameter_px, **extra)
        if exclude_border_nuclei:
            nuclei = relabel_sequential(clear_border(nuclei))[0].astype(np.int32)
    cells = segment_cells(nuclei, cytoplasm_plane, ring_width_px=ring_width_px)
    return nuclei, cells
