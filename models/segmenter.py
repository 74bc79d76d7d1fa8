"""A compact learned nuclei segmenter: U-Net maps plus seeded watershed.

Segmentation as pixel prediction (the U-Net / DeepCell idea): a small U-Net sees the
nuclear stain at a fixed scale (the typical nucleus diameter rescaled to
``target_diameter_px``) and predicts two maps, the probability that a pixel lies in a
nucleus and its distance to the nucleus edge divided by the nucleus' largest such
distance (0 at edges and between touching nuclei, 1 at each centre). Instances are
the foreground, cut by a watershed on the distance map from seeds at its maxima that
rise enough above the saddles to their neighbours (h-maxima).

Input scale is normalized by the nucleus diameter (given, or estimated from the
image as in the ``classical`` segmenter) so that one network serves every
magnification; large fields are predicted in overlapping tiles blended with a
smooth window; flips can be averaged at test time.

Weights are a plain dictionary of tensors and settings loaded with
``weights_only=True``; the default ones (trained only on the CC0 DSB2018 images, see
``models/weights/MODEL_CARD.md``) ship with the package.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import find_boundaries, relabel_sequential, watershed
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.config import check_unet_precision, network_precision
from pipeline.errors import InputError
from pipeline.images.planes import (
    check_plane,
    estimate_nucleus_diameter,
    pixel_noise_sd,
    resize_linear,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "nuclei_unet_dsb2018.pt"
FORMAT = "phenoscreen-nuclei-unet/1"
_REFINE_RATIO = 1.25
_MIN_NUCLEI_TO_REFINE = 5


@dataclass(frozen=True, kw_only=True)
class UNetSpec:
    """Shape of the network and how its input is scaled (saved with the weights).

    Attributes
    ----------
    widths : tuple of int
        Channels per resolution level, finest first; each level halves the size.
    target_diameter_px : float
        Nuclei are rescaled to this diameter before the network sees them.
    fg_threshold : float
        Post-processing: foreground probability threshold.
    seed_height : float
        Post-processing: a nucleus is seeded at each maximum of the distance map
        that rises at least this much above the saddle towards a higher one
        (h-maxima), so touching nuclei separated by a shallow dip stay apart.
    min_area_fraction : float
        Objects smaller than this fraction of a disc of the target diameter are
        dropped (at network scale).
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    target_diameter_px: float = 20.0
    fg_threshold: float = 0.5
    seed_height: float = 0.2
    min_area_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths {self.widths} must be positive channel counts.")
        if not 4 <= self.target_diameter_px <= 200:
            raise ValueError(
                f"target_diameter_px {self.target_diameter_px} must lie in [4, 200]."
            )
        for name in ("fg_threshold", "seed_height", "min_area_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1].")

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this (one halving per extra level)."""
        return 2 ** (len(self.widths) - 1)


def _block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(n_out, n_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
    )


def _encode(down: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of every encoder level, finest first (halving between levels)."""
    skips = []
    for i, block in enumerate(down):
        x = block(x if i == 0 else F.max_pool2d(x, 2))
        skips.append(x)
    return skips


class NucleiUNet(nn.Module):
    """U-Net with two output maps: foreground logit and edge-distance logit.

    Parameters
    ----------
    widths : sequence of int
        Channels per level, finest first.
    """

    def __init__(self, widths: Sequence[int] = UNetSpec.widths) -> None:
        super().__init__()
        widths = tuple(widths)
        self.down = nn.ModuleList(
            _block(n_in, n_out)
            for n_in, n_out in zip((1, *widths), widths, strict=False)
        )
        self.up = nn.ModuleList(
            _block(coarse + fine, fine)
            for coarse, fine in zip(widths[:0:-1], widths[-2::-1], strict=True)
        )
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images of shape (B, 1, H, W) to logits of shape (B, 2, H, W).

        H and W must be multiples of ``2 ** (levels - 1)``.
        """
        skips = _encode(self.down, x)
        x = skips[-1]
        for block, skip in zip(self.up, skips[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def normalize_intensity(
    plane: np.ndarray, low: float = 1, high: float = 99.8
) -> np.ndarray:
    """Scale a plane so its `low` and `high` percentiles become 0 and 1.

    Parameters
    ----------
    plane : ndarray of shape (Y, X), numeric and finite

    Returns
    -------
    ndarray of shape (Y, X), float32
        Not clipped; a constant plane gives zeros.

    Raises
    ------
    ValueError
        If `plane` is not 2-D or the percentiles are not ordered within [0, 100].
    """
    if plane.ndim != 2:
        raise ValueError(f"plane has shape {plane.shape}; expected (Y, X).")
    if not 0 <= low < high <= 100:
        raise ValueError(
            f"percentiles ({low}, {high}) must satisfy 0 <= low < high <= 100."
        )
    values = plane.astype(np.float32, copy=False)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = values.max()
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def label_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training targets of an instance-label image.

    Parameters
    ----------
    labels : ndarray of shape (Y, X), int
        0 = background.

    Returns
    -------
    foreground : ndarray of shape (Y, X), float32
        1 inside nuclei.
    distance : ndarray of shape (Y, X), float32
        Distance to the nucleus edge (touching nuclei count as edge), divided by its
        maximum within each nucleus: 0 outside, 1 at each centre.

    Raises
    ------
    ValueError
        If `labels` is not a 2-D integer array of non-negative labels.
    """
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}."
        )
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background).")
    inside = (labels > 0) & ~find_boundaries(labels, mode="inner")
    distance = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    peak = ndi.maximum(
        distance, labels, index=np.arange(int(labels.max(initial=0)) + 1)
    )
    peak = np.asarray(peak, dtype=np.float64)
    scale = np.where(peak > 0, peak, 1.0)[labels]
    return (labels > 0).astype(np.float32), (distance / scale).astype(np.float32)


def median_diameter(labels: np.ndarray) -> float:
    """Equivalent diameter of the median-area object of a label image, in pixels.

    Raises
    ------
    ValueError
        If `labels` holds no object.
    """
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if not len(areas):
        raise ValueError("the label image holds no object.")
    return float(2 * np.sqrt(np.median(areas) / np.pi))


def drop_faint_objects(
    labels: np.ndarray,
    plane: np.ndarray,
    min_snr: float = 3.0,
    min_z: float = 30.0,
) -> np.ndarray:
    """Remove objects that do not stand out of the background noise.

    Percentile normalization stretches an empty field's noise to full contrast, and
    the network then finds "nuclei" in it. An object is kept when its mean is at
    least `min_snr` noise SDs above the background *and* at least `min_z` standard
    errors of a mean over its area (noise SD / sqrt(area)). Noise blobs are small:
    on an empty, illumination-corrected demo field they reached 5 SDs but 18
    standard errors; dim real nuclei (StarDist's sample image) 3-6 SDs but >= 48.
    The background is the median of the pixels outside all objects, the noise SD
    `pipeline.images.planes.pixel_noise_sd`.

    Parameters
    ----------
    labels : ndarray of shape (Y, X), int
    plane : ndarray of shape (Y, X)
        The image the labels were found in.
    min_snr, min_z : float
        Minimum (object mean - background) in noise SDs, and in standard errors.

    Returns
    -------
    ndarray of shape (Y, X), int32
        Kept objects relabelled 1..N.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if labels.shape != plane.shape:
        raise ValueError(
            f"labels {labels.shape} and plane {plane.shape} shapes differ."
        )
    n = int(labels.max(initial=0))
    if n == 0 or (labels > 0).all():
        return labels.astype(np.int32)
    values = plane.astype(np.float64, copy=False)
    background = float(np.median(values[labels == 0]))
    noise = pixel_noise_sd(values)
    flat = labels.ravel().astype(np.intp, copy=False)  # as ndi.mean counts and sums
    areas = np.bincount(flat, minlength=n + 1)[1:]
    means = np.bincount(flat, weights=values.ravel(), minlength=n + 1)[1:] / areas
    contrast = means - background
    faint = (contrast <= min_snr * noise) | (contrast * np.sqrt(areas) <= min_z * noise)
    faint = np.concatenate([[False], faint])
    if not faint.any():
        return labels.astype(np.int32)
    return relabel_sequential(np.where(faint[labels], 0, labels).astype(np.int32))[0]


def labels_from_maps(
    foreground: np.ndarray,
    distance: np.ndarray,
    *,
    fg_threshold: float = 0.5,
    seed_height: float = 0.2,
    smooth_px: float = 0.0,
    min_area_px: float = 0,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Instance labels from predicted foreground and distance maps.

    The distance map is smoothed, its h-maxima of height `seed_height` inside the
    foreground become seeds, and a watershed on the negative distance grows them
    over the foreground. Foreground regions without a seed become objects of their
    own. With `shape`, seeds are found on the maps as given (the network's scale:
    fewer pixels for big nuclei) and the watershed runs on the maps resized to
    `shape` (the plane's scale, for exact boundaries).

    Parameters
    ----------
    foreground, distance : ndarray of shape (Y, X)
        Probabilities in [0, 1].
    fg_threshold, seed_height : float
        See `UNetSpec`.
    smooth_px : float
        Gaussian sigma applied to the distance map first, in pixels of the maps
        (0: none).
    min_area_px : float
        Smaller objects are dropped (pixels of the labels).
    shape : tuple of int, optional
        Shape of the labels; that of the maps by default.

    Returns
    -------
    ndarray of `shape`, int32
        Labels 1..N.

    Raises
    ------
    ValueError
        If the maps differ in shape or are not 2-D, or `seed_height` is not > 0.
    """
    if foreground.ndim != 2 or foreground.shape != distance.shape:
        raise ValueError(
            f"foreground {foreground.shape} and distance {distance.shape} must be "
            "2-D maps of one shape."
        )
    if not seed_height > 0:
        raise ValueError(f"seed_height {seed_height} must be > 0.")
    distance = np.asarray(distance, np.float32)
    if smooth_px > 0:
        distance = ndi.gaussian_filter(distance, smooth_px)
    mask = foreground > fg_threshold
    seeds, n_seeds = ndi.label(_h_maxima_in(distance, mask, seed_height))
    shape = tuple(shape or foreground.shape)
    if shape != foreground.shape:
        # every seed pixel is carried to its place at the labels' scale
        ys, xs = np.nonzero(seeds)
        markers = np.zeros(shape, np.int32)
        markers[
            ((ys + 0.5) * shape[0] / foreground.shape[0]).astype(int),
            ((xs + 0.5) * shape[1] / foreground.shape[1]).astype(int),
        ] = seeds[ys, xs]
        mask = resize_linear(foreground, shape) > fg_threshold
        distance = resize_linear(distance, shape)
        seeds = markers * mask
    labels = watershed(-distance, seeds, mask=mask) if n_seeds else seeds
    orphans, _ = ndi.label(mask & (labels == 0))
    labels = np.where(orphans > 0, orphans + n_seeds, labels)
    if min_area_px > 0 and labels.any():
        areas = np.bincount(labels.ravel())
        labels[(areas < min_area_px)[labels]] = 0
    return relabel_sequential(labels.astype(np.int32))[0]


def _h_maxima_in(values: np.ndarray, mask: np.ndarray, height: float) -> np.ndarray:
    """`skimage.morphology.h_maxima` of float `values` inside `mask`, zero outside.

    Each object (4-connected) gets the h-maxima of its bounding box padded with
    zeros, the other objects zeroed: ~3x faster than over the whole plane on
    fields that nuclei cover sparsely (where objects touching diagonally would
    join). The boxes are packed into one mosaic (`_shelf_pack`) and transformed at
    once, 1.4x faster than one call per box on the bench fields: each box is
    enclosed by its zero padding, whose seeds are -`height`, and between boxes lies
    a lower gap, across which the reconstruction carries nothing.
    """
    objects, _ = ndi.label(mask)
    boxes = ndi.find_objects(objects)
    peaks = np.zeros(mask.shape, bool)
    if not boxes:
        return peaks
    crops = [
        np.pad(np.where(objects[box] == k, values[box], 0), 1)  # zeros, as outside
        for k, box in enumerate(boxes, 1)
    ]
    corners, shape = _shelf_pack([crop.shape for crop in crops])
    gap = -2 * height - 1  # below the zero padding's seed, -height: carries nothing
    mosaic = np.full(shape, gap, values.dtype)
    for crop, (y, x) in zip(crops, corners, strict=True):
        mosaic[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    found = h_maxima(mosaic, height).astype(bool)
    for k, (box, crop, (y, x)) in enumerate(zip(boxes, crops, corners, strict=True), 1):
        if height > np.ptp(crop):  # h_maxima finds none in such a box alone
            continue
        inside = found[y + 1 : y + crop.shape[0] - 1, x + 1 : x + crop.shape[1] - 1]
        peaks[box] |= inside & (objects[box] == k)
    return peaks


def _shelf_pack(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple]:
    """Place rectangles in rows (shelves), tallest first, one pixel apart.

    Returns each rectangle's top-left corner (y, x) and the mosaic's shape; rows
    are about as wide as the mosaic is high.
    """
    heights, widths = np.array(shapes).T
    width = max(int(widths.max()), int(np.sqrt(((heights + 1) * (widths + 1)).sum())))
    corners: list[tuple[int, int]] = [(0, 0)] * len(shapes)
    y = x = shelf = 0
    for i in np.argsort(-heights, kind="stable"):
        if x + widths[i] > width:  # a new shelf
            y, x, shelf = y + shelf + 1, 0, 0
        corners[i] = (y, x)
        x += widths[i] + 1
        shelf = max(shelf, heights[i])
    return corners, (y + shelf, width)


def labels_for_spec(
    foreground: np.ndarray,
    distance: np.ndarray,
    spec: UNetSpec,
    shape: tuple[int, int],
) -> np.ndarray:
    """`labels_from_maps` with a spec's settings, from maps at the network's scale.

    Parameters
    ----------
    foreground, distance : ndarray of shape (Y', X')
        Maps of a plane rescaled to the network's scale (`predict_field_maps`).
    spec : UNetSpec
    shape : tuple of int
        The plane's shape (Y, X): that of the labels.

    Returns
    -------
    ndarray of shape (Y, X), int32

    Raises
    ------
    ValueError
        If `shape` is not two positive sizes, or as `labels_from_maps`.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be two positive sizes.")
    scale = np.sqrt(shape[0] * shape[1] / (foreground.shape[0] * foreground.shape[1]))
    diameter = spec.target_diameter_px * scale  # of nuclei in the plane, px
    return labels_from_maps(
        foreground,
        distance,
        fg_threshold=spec.fg_threshold,
        seed_height=spec.seed_height,
        smooth_px=1.0,  # one network pixel
        min_area_px=spec.min_area_fraction * np.pi / 4 * diameter**2,
        shape=shape,
    )


def uses_bfloat16(device: str | torch.device, precision: str | None = None) -> bool:
    """Whether the U-Net runs in bfloat16 autocast on `device`.

    By default on CUDA only (`pipeline.config.DEVICE_PRECISION`). On CPUs, bfloat16 is
    fast on some (AMX tiles) and slow or emulated on others, so it is never chosen
    per CPU, which would let a run resumed on another machine, or spread over mixed
    Dask workers, mix precisions silently; it is the run's choice
    (``segment.precision``, `pipeline.config.network_precision`).

    Parameters
    ----------
    device : str or torch.device
        Where the network runs (``cpu``, ``cuda``, ``cuda:1``).
    precision : {"float32", "bfloat16"}, optional
        None: the device's default.

    Returns
    -------
    bool

    Raises
    ------
    RuntimeError
        If `device` is not a device name.
    InputError
        If `precision` is unknown.
    """
    return network_precision(torch.device(device).type, precision) == "bfloat16"


def _window(size: int, ramp: int) -> np.ndarray:
    """Return a 1-D blending weight: linear ramps of `ramp` pixels at both ends."""
    weight = np.ones(size, np.float32)
    if ramp > 0:
        edge = (np.arange(ramp, dtype=np.float32) + 1) / (ramp + 1)
        weight[:ramp] = edge
        weight[-ramp:] = edge[::-1]
    return weight


def tile_side(length: int, tile_px: int, overlap_px: int, multiple: int) -> int:
    """Return the tile side along an axis: as few tiles as `tile_px` needs, no bigger.

    A 1080 px field cut into 1024 px tiles would run the network over four
    1024 px tiles (3.6x its area); two 576 px tiles per axis cover it, overlapping
    by at least the overlap, at 1.14x.

    Parameters
    ----------
    length : int
        Axis length (>= 1), a multiple of `multiple`.
    tile_px, overlap_px : int
        Largest tile side (a multiple of `multiple`, more than twice the overlap)
        and the overlap between neighbouring tiles.
    multiple : int
        Tile sides are multiples of this.

    Returns
    -------
    int
        `length` when it fits one tile, else the smallest multiple of `multiple`,
        above twice the overlap, with which ``ceil((length - overlap_px) /
        (tile_px - overlap_px))`` tiles overlapping by at least `overlap_px`
        cover `length`.

    Raises
    ------
    ValueError
        If `tile_px` is not a multiple of `multiple` above twice the overlap, or
        `length` is not a positive multiple of `multiple` (>= 1).
    """
    if (
        multiple < 1
        or tile_px % multiple
        or tile_px <= 2 * overlap_px
        or overlap_px < 0
    ):
        raise ValueError(
            f"tile_px {tile_px} must be a multiple of {multiple} (>= 1) and exceed "
            f"twice overlap_px {overlap_px} (>= 0)."
        )
    if length < 1 or length % multiple:
        raise ValueError(f"length {length} must be a positive multiple of {multiple}.")
    if length <= tile_px:
        return length
    n_tiles = -(-(length - overlap_px) // (tile_px - overlap_px))
    side = max(-(-(length + (n_tiles - 1) * overlap_px) // n_tiles), 2 * overlap_px + 1)
    return min(-(-side // multiple) * multiple, tile_px)


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


@torch.inference_mode()
def predict_maps(
    model: nn.Module,
    image: np.ndarray,
    *,
    multiple: int,
    tile_px: int = 1024,
    overlap_px: int = 64,
    flips: bool = False,
    device: str | torch.device = "cpu",
    precision: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and distance probabilities of a normalized image, tile by tile.

    Parameters
    ----------
    model : nn.Module
        A `NucleiUNet` or its `fold_batch_norms` copy, in eval mode, on `device`.
    image : ndarray of shape (Y, X), float32
        Already at network scale and intensity-normalized.
    multiple : int
        Tiles are padded to multiples of this (`UNetSpec.multiple`).
    tile_px, overlap_px : int
        Largest tile side and the overlap; tiles (`tile_side`) are blended with
        linear ramps over the overlap.
    flips : bool
        Average the four horizontal/vertical flips (4x slower).
    device : str or torch.device
    precision : {"float32", "bfloat16"}, optional
        The network's arithmetic (`uses_bfloat16`); None: the device's default.

    Returns
    -------
    foreground, distance : ndarray of shape (Y, X), float32

    Raises
    ------
    ValueError
        If the tile is not larger than twice the overlap, or not a multiple, or
        `precision` is unknown (an `InputError`).
    """
    height, width = image.shape
    pad_y, pad_x = (-height) % multiple, (-width) % multiple
    padded = np.pad(image, ((0, pad_y), (0, pad_x)), mode="symmetric")
    big_y, big_x = padded.shape
    tile_y, tile_x = (
        tile_side(n, tile_px, overlap_px, multiple) for n in (big_y, big_x)
    )
    total = np.zeros((2, big_y, big_x), np.float32)
    weight = np.zeros((big_y, big_x), np.float32)
    window = np.outer(
        _window(tile_y, overlap_px if big_y > tile_y else 0),
        _window(tile_x, overlap_px if big_x > tile_x else 0),
    )
    kind = torch.device(device).type
    use_amp = uses_bfloat16(device, precision)
    for y in _tile_starts(big_y, tile_y, tile_y - overlap_px):
        for x in _tile_starts(big_x, tile_x, tile_x - overlap_px):
            crop = torch.from_numpy(
                np.ascontiguousarray(padded[y : y + tile_y, x : x + tile_x])
            )
            batch = (
                crop[None, None]
                .to(device)
                .contiguous(memory_format=torch.channels_last)
            )
            if flips:
                batch = torch.cat(
                    [batch, batch.flip(-1), batch.flip(-2), batch.flip(-1, -2)]
                )
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=use_amp):
                probs = torch.sigmoid(model(batch).float())
            if flips:
                probs = (
                    probs[0]
                    + probs[1].flip(-1)
                    + probs[2].flip(-2)
                    + probs[3].flip(-1, -2)
                ) / 4
            else:
                probs = probs[0]
            total[:, y : y + tile_y, x : x + tile_x] += probs.cpu().numpy() * window
            weight[y : y + tile_y, x : x + tile_x] += window
    maps = total[:, :height, :width] / weight[:height, :width]
    return maps[0], maps[1]


def predict_field_maps(
    model: nn.Module,
    spec: UNetSpec,
    plane: np.ndarray,
    diameter: float,
    *,
    tile_px: int = 1024,
    flips: bool = False,
    device: str | torch.device = "cpu",
    precision: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and distance maps of a raw plane, at the network's scale.

    The plane is intensity-normalized, rescaled so that `diameter` becomes the
    network's target diameter and predicted tile by tile; `labels_for_spec` turns
    the maps into labels at the plane's size.

    Parameters
    ----------
    model : nn.Module
        A `NucleiUNet` or its `fold_batch_norms` copy.
    spec : UNetSpec
    plane : ndarray of shape (Y, X), float32
    diameter : float
        Typical nucleus diameter in `plane`, pixels (> 0).
    tile_px, flips, device, precision
        See `predict_maps`.

    Returns
    -------
    foreground, distance : ndarray of shape (Y', X'), float32
        (Y', X') = (Y, X) x target diameter / `diameter`, rounded.

    Raises
    ------
    ValueError
        If `diameter` is not positive, or as `predict_maps`.
    """
    if not diameter > 0:
        raise ValueError(f"diameter {diameter} must be > 0.")
    scale = spec.target_diameter_px / diameter
    shape = tuple(max(1, round(n * scale)) for n in plane.shape)
    image = normalize_intensity(plane)
    if shape != plane.shape:
        image = resize_linear(image, shape)
    return predict_maps(
        model,
        image.astype(np.float32),
        multiple=spec.multiple,
        tile_px=tile_px,
        flips=flips,
        device=device,
        precision=precision,
    )


def segmenter_sha256(state: dict[str, torch.Tensor], spec: UNetSpec) -> str:
    """SHA-256 of a segmenter for provenance: its tensors and its spec.

    The spec counts: the same network with other post-processing settings
    segments differently.

    Parameters
    ----------
    state : dict of str to Tensor
        State dict (names, shapes and values are hashed).
    spec : UNetSpec

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    return digest.hexdigest()


def save_segmenter(
    path: str | Path, model: NucleiUNet, spec: UNetSpec, extra: dict[str, Any]
) -> Path:
    """Write weights (float16), their spec and `extra` (metrics, log, provenance).

    Returns
    -------
    Path
        The written file (its parent is created).

    Raises
    ------
    ValueError
        If `extra` uses a reserved key.
    """
    reserved = {"format", "spec", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"extra may not use the keys {sorted(reserved)}.")
    state = {
        name: tensor.detach().cpu().half()
        if tensor.is_floating_point()
        else tensor.cpu()
        for name, tensor in model.state_dict().items()
    }
    payload = {
        "format": FORMAT,
        "spec": {**asdict(spec), "widths": list(spec.widths)},
        "state_dict": state,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_segmenter(path: str | Path | None = None) -> tuple[NucleiUNet, UNetSpec, dict]:
    """Load segmenter weights saved by `save_segmenter` (``weights_only=True``).

    Parameters
    ----------
    path : str or Path, optional
        Defaults to the shipped DSB2018 weights.

    Returns
    -------
    model : NucleiUNet
        float32, eval mode, on the CPU.
    spec : UNetSpec
    info : dict
        Everything else stored with the weights, plus ``path`` and ``sha256``.

    Raises
    ------
    InputError
        If the file is missing, unreadable, or not segmenter weights.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        hint = (
            "reinstall PhenoScreen (the default weights ship with it)"
            if path == DEFAULT_WEIGHTS
            else "train some with `phenoscreen train-segmenter` or fix the path"
        )
        raise InputError(f"segmenter weights {path} not found; {hint}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file
        raise InputError(
            f"segmenter weights {path} cannot be read ({type(exc).__name__}: {exc}); "
            "the file is corrupt or not a PhenoScreen segmenter checkpoint."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(
            f"{path} is not PhenoScreen segmenter weights (format {FORMAT!r} expected); "
            "use a file written by `phenoscreen train-segmenter`."
        )
    spec_fields = dict(payload["spec"])
    # files trained before h-maxima seeds carry a seed threshold: default height
    spec_fields.pop("seed_threshold", None)
    spec = UNetSpec(**{**spec_fields, "widths": tuple(spec_fields["widths"])})
    model = NucleiUNet(spec.widths)
    state = {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in payload["state_dict"].items()
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(
            f"segmenter weights {path} do not fit their spec: {exc}"
        ) from exc
    model.eval().to(memory_format=torch.channels_last)  # ~30 % faster on CPU
    info = {
        k: v for k, v in payload.items() if k not in ("format", "spec", "state_dict")
    }
    info.update(path=str(path), sha256=segmenter_sha256(payload["state_dict"], spec))
    return model, spec, info


@lru_cache(maxsize=4)
def cached_segmenter(path: str | None = None) -> tuple[nn.Module, UNetSpec, dict]:
    """`load_segmenter` for inference, once per path and process.

    The network is shared and has its batch norms folded into the convolutions
    (`fold_batch_norms`): it cannot be trained.
    """
    model, spec, info = load_segmenter(path)
    return fold_batch_norms(model), spec, info


class _InferenceUNet(nn.Module):
    """A folded `NucleiUNet`: decoders convolve the upsampled and skip maps apart.

    ``conv([up, skip]) = conv_up(up) + conv_skip(skip)``: the sum replaces the
    channel concatenation, a slow copy in channels-last layout on CPU.
    """

    def __init__(
        self, down: nn.ModuleList, up: list[tuple[nn.Module, ...]], head: nn.Module
    ) -> None:
        super().__init__()
        self.down = down
        self.up_conv = nn.ModuleList(nn.ModuleList(parts[:2]) for parts in up)
        self.up_rest = nn.ModuleList(parts[2] for parts in up)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images of shape (B, 1, H, W) to logits of shape (B, 2, H, W)."""
        skips = _encode(self.down, x)
        x = skips[-1]
        for (conv_up, conv_skip), rest, skip in zip(
            self.up_conv, self.up_rest, skips[-2::-1], strict=True
        ):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear")
            x = rest(conv_up(x).add_(conv_skip(skip)))
        return self.head(x)


def _fold(block: nn.Sequential) -> list[nn.Module]:
    layers = list(block)
    return [
        fuse_conv_bn_eval(layer, layers[k + 1])
        if isinstance(layer, nn.Conv2d)
        else layer
        for k, layer in enumerate(layers)
        if not isinstance(layer, nn.BatchNorm2d)
    ]


def _split_input(conv: nn.Conv2d, first: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Two convolutions over input channels ``[:first]`` (with the bias) and the rest."""
    parts = []
    for weight, bias in (
        (conv.weight[:, :first], conv.bias),
        (conv.weight[:, first:], None),
    ):
        part = nn.Conv2d(
            weight.shape[1], conv.out_channels, conv.kernel_size,
            padding=conv.padding, bias=bias is not None,
        )  # fmt: skip
        part.weight.data.copy_(weight)
        if bias is not None:
            part.bias.data.copy_(bias)
        parts.append(part)
    return parts[0], parts[1]


def fold_batch_norms(model: NucleiUNet) -> nn.Module:
    """Return a copy for inference with each batch norm folded into its convolution.

    Same outputs (to float rounding) with one pass less over every feature map;
    each decoder also convolves its two inputs apart and sums them instead of
    concatenating them (`_InferenceUNet`).

    Parameters
    ----------
    model : NucleiUNet
        In eval mode (the running statistics are folded).

    Returns
    -------
    nn.Module
        In eval mode, channels-last; its blocks are convolution + ReLU only.

    Raises
    ------
    ValueError
        If `model` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (model.eval()).")
    source = copy.deepcopy(model)
    down = nn.ModuleList(nn.Sequential(*_fold(block)) for block in source.down)
    up = []
    for block in source.up:
        first, *rest = _fold(block)  # in: coarse + fine channels, out: fine
        coarse = first.in_channels - first.out_channels
        up.append((*_split_input(first, coarse), nn.Sequential(*rest)))
    folded = _InferenceUNet(down, up, source.head).eval()
    return folded.to(memory_format=torch.channels_last)


def segment_nuclei_unet(
    plane: np.ndarray,
    nucleus_diameter_px: float | None = None,
    *,
    weights: str | Path | None = None,
    model: nn.Module | None = None,
    spec: UNetSpec | None = None,
    tile_px: int = 1024,
    flips: bool = False,
    refine: bool = True,
    device: str | torch.device = "cpu",
    precision: str | None = None,
) -> np.ndarray:
    """Segment nuclei with the learned U-Net (the ``unet`` segmenter).

    Objects that do not stand out of the noise are dropped
    (`drop_faint_objects`): an empty field gives no nuclei.

    Parameters
    ----------
    plane : ndarray of shape (Y, X)
        Nuclear stain, finite, any numeric dtype.
    nucleus_diameter_px : float, optional
        Typical nucleus diameter; estimated from the plane when None.
    weights : str or Path, optional
        Weights file; the shipped DSB2018 weights when None.
    model, spec : optional
        An already loaded network and its spec (then `weights` is ignored).
    tile_px : int
        Tile side at network scale.
    flips : bool
        Test-time flip averaging.
    refine : bool
        When the diameter was estimated and the nuclei found have a median diameter
        more than 1.25x off it, segment once more at the found diameter.
    device : str or torch.device
    precision : {"float32", "bfloat16"}, optional
        The network's arithmetic; None: the device's default (`uses_bfloat16`).

    Returns
    -------
    ndarray of shape (Y, X), int32
        Nuclei labelled 1..N.

    Raises
    ------
    InputError
        If the weights are missing or corrupt.
    ValueError
        If `plane` is not a finite numeric 2-D array, or `precision` is unknown
        (an `InputError`).
    """
    values = check_plane(plane, "nuclei plane")
    check_unet_precision("unet", precision)  # on any plane, with or without nuclei
    if model is None or spec is None:
        model, spec, _ = cached_segmenter(None if weights is None else str(weights))
        model = model.to(device)
    if values.size == 0 or values.max() <= values.min():
        return np.zeros(values.shape, np.int32)
    predict = {"tile_px": tile_px, "flips": flips, "device": device,
               "precision": precision}  # fmt: skip
    diameter = nucleus_diameter_px or estimate_nucleus_diameter(values)
    labels = _segment_at(model, spec, values, diameter, **predict)
    labels = drop_faint_objects(labels, values)
    if nucleus_diameter_px is None and refine and labels.max() >= _MIN_NUCLEI_TO_REFINE:
        # the estimate was off when the nuclei found are much bigger or smaller
        found = median_diameter(labels)
        if abs(np.log(found / diameter)) > np.log(_REFINE_RATIO):
            labels = _segment_at(model, spec, values, found, **predict)
            labels = drop_faint_objects(labels, values)
    return labels


def _segment_at(
    model: nn.Module,
    spec: UNetSpec,
    values: np.ndarray,
    diameter: float,
    **predict: Any,
) -> np.ndarray:
    foreground, distance = predict_field_maps(model, spec, values, diameter, **predict)
    return labels_for_spec(foreground, distance, spec, values.shape)
