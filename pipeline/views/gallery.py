"""Display images of cells and fields: channel compositing, outlines, sampling.

Pure functions on arrays and tables, used by the dashboard's plate view and cell
gallery, and `sample_cell_crops`, which reads a sample of a run's cells back from
the store and the images (`pipeline.cells.stored`). Channels are mixed
additively, each in its own colour, between limits shared by every image shown
together, so brightness compares across cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage.measure import block_reduce
from skimage.segmentation import find_boundaries
from skimage.transform import downscale_local_mean
from sqlalchemy import Engine

from db import store
from pipeline.cells.stored import iter_field_crops

#: RGB colours given to channels in order (blue first: usually the DNA stain).
PALETTE = (
    (0.0, 0.45, 1.0),
    (0.0, 1.0, 0.0),
    (1.0, 0.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 1.0, 0.0),
)


def display_limits(
    images: np.ndarray, *, low: float = 1.0, high: float = 99.8
) -> np.ndarray:
    """Return per-channel display limits from percentiles of the pixels.

    Parameters
    ----------
    images : ndarray of shape (..., C, Y, X)
        One image or a stack sharing the limits.
    low, high : float
        Percentiles (0-100) mapped to black and full colour.

    Returns
    -------
    ndarray of shape (C, 2)
        Lower and upper limit per channel; upper > lower.

    Raises
    ------
    ValueError
        If `images` has fewer than 3 dimensions or the percentiles are not
        0 <= low < high <= 100.
    """
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"images has shape {images.shape}; expected (..., C, Y, X).")
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles low={low}, high={high}: need 0 <= low < high.")
    per_channel = np.moveaxis(images, -3, 0).reshape(images.shape[-3], -1)
    limits = np.nanpercentile(per_channel, [low, high], axis=1).T.astype(float)
    limits = np.nan_to_num(limits)
    limits[:, 1] = np.maximum(limits[:, 1], limits[:, 0] + 1e-6)
    return limits


def composite(
    images: np.ndarray,
    limits: np.ndarray,
    *,
    channels: Sequence[int] | None = None,
    colors: Sequence[Sequence[float]] = PALETTE,
) -> np.ndarray:
    """Mix channels into RGB, each channel scaled to its limits and coloured.

    Parameters
    ----------
    images : ndarray of shape (..., C, Y, X)
    limits : ndarray of shape (C, 2)
        From `display_limits`.
    channels : sequence of int, optional
        Channels to show (default all); channel k gets ``colors[k]``.
    colors : sequence of RGB triples in [0, 1]

    Returns
    -------
    ndarray of shape (..., Y, X, 3), uint8

    Raises
    ------
    ValueError
        If `limits` does not match the channels, a channel index is out of range
        or there are more channels than colours.
    """
    images = np.asarray(images, dtype=np.float32)
    n_channels = images.shape[-3] if images.ndim >= 3 else 0
    if images.ndim < 3 or np.shape(limits) != (n_channels, 2):
        raise ValueError(
            f"images {images.shape} and limits {np.shape(limits)} do not match; "
            "expected (..., C, Y, X) and (C, 2)."
        )
    shown = list(range(n_channels)) if channels is None else [int(c) for c in channels]
    if any(not 0 <= c < n_channels for c in shown) or max(shown, default=0) >= len(
        colors
    ):
        raise ValueError(
            f"channels {shown} out of range for {n_channels} channels and "
            f"{len(colors)} colours."
        )
    rgb = np.zeros((*images.shape[:-3], *images.shape[-2:], 3), np.float32)
    for c in shown:
        lo, hi = limits[c]
        scaled = np.clip((images[..., c, :, :] - lo) / (hi - lo), 0, 1)
        rgb += scaled[..., None] * np.asarray(colors[c], np.float32)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def draw_outlines(
    rgb: np.ndarray,
    labels: np.ndarray,
    *,
    color: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Return `rgb` with the boundaries of the labelled objects painted.

    Parameters
    ----------
    rgb : ndarray of shape (..., Y, X, 3), uint8
    labels : ndarray of shape (..., Y, X), int or bool
        Objects (0 = background); inner boundaries between touching objects too.
    color : RGB triple of 0-255

    Returns
    -------
    ndarray, same shape and dtype as `rgb` (a copy)

    Raises
    ------
    ValueError
        If the shapes do not line up.
    """
    rgb, labels = np.asarray(rgb), np.asarray(labels)
    if rgb.shape[:-1] != labels.shape or rgb.shape[-1:] != (3,):
        raise ValueError(
            f"rgb {rgb.shape} and labels {labels.shape} do not line up; expected "
            "(..., Y, X, 3) and (..., Y, X)."
        )
    out = rgb.copy()
    flat = labels.reshape(-1, *labels.shape[-2:]).astype(np.int64)
    edges = np.stack([find_boundaries(plane, mode="inner") for plane in flat])
    out[edges.reshape(labels.shape)] = np.asarray(color, np.uint8)
    return out


def field_thumbnail(
    image: np.ndarray,
    nuclei: np.ndarray | None,
    cells: np.ndarray | None,
    *,
    limits: np.ndarray,
    channels: Sequence[int] | None = None,
    max_side: int = 512,
) -> np.ndarray:
    """Return a field as RGB with nucleus (yellow) and cell (white) outlines.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
    nuclei, cells : ndarray of shape (Y, X) or None
        Stored labels; None draws no outline.
    limits : ndarray of shape (C, 2)
    channels : sequence of int, optional
    max_side : int
        The thumbnail is block-averaged by an integer factor to at most about this
        side; outlines are found at full resolution and kept where any pixel of a
        block is on them, so they stay closed.

    Returns
    -------
    ndarray of shape (Y', X', 3), uint8

    Raises
    ------
    ValueError
        If `max_side` < 16 or the shapes do not line up.
    """
    if max_side < 16:
        raise ValueError(f"max_side = {max_side} must be >= 16.")
    factor = max(1, int(np.ceil(max(image.shape[-2:]) / max_side)))
    small = image if factor == 1 else downscale_local_mean(image, (1, factor, factor))
    rgb = composite(small, limits, channels=channels)
    for labels, color in ((cells, (255, 255, 255)), (nuclei, (255, 220, 0))):
        if labels is None:
            continue
        if np.shape(labels) != image.shape[-2:]:
            raise ValueError(
                f"labels {np.shape(labels)} do not line up with the image "
                f"{image.shape[-2:]}."
            )
        edges = find_boundaries(np.asarray(labels), mode="inner")
        if factor > 1:  # a block with any boundary pixel is a boundary pixel
            edges = block_reduce(edges, (factor, factor), np.max)
        rgb[edges] = color
    return rgb


def sample_fields(fields: pd.DataFrame, n_fields: int, *, rng: int = 0) -> pd.DataFrame:
    """Pick up to `n_fields` fields with cells at random, spread over their wells.

    Parameters
    ----------
    fields : DataFrame
        ``field_id``, ``Metadata_Plate``, ``Metadata_Well`` and ``n_cells``.
    n_fields : int
    rng : int
        Seed: the same selection shows the same cells on every rerun.

    Returns
    -------
    DataFrame
        The chosen rows: one field per well first (wells in random order), then
        more fields of the same wells when there are fewer wells than `n_fields`.

    Raises
    ------
    ValueError
        If `n_fields` < 1 or a column is missing.
    """
    if n_fields < 1:
        raise ValueError(f"n_fields = {n_fields} must be >= 1.")
    needed = ["field_id", "Metadata_Plate", "Metadata_Well", "n_cells"]
    missing = [c for c in needed if c not in fields.columns]
    if missing:
        raise ValueError(f"fields lacks columns {missing}.")
    with_cells = fields[fields["n_cells"] > 0]
    generator = np.random.default_rng(rng)
    shuffled = with_cells.iloc[generator.permutation(len(with_cells))]
    # rank of each field within its well: all first fields, then all second...
    rank = shuffled.groupby(["Metadata_Plate", "Metadata_Well"]).cumcount()
    order = np.argsort(rank.to_numpy(), kind="stable")
    return shuffled.iloc[order[:n_fields]]


def parse_cell_label(label: str) -> tuple[str, str, int, int]:
    """Split a phenotype-map cell label ``plate/well/s<site>#<object>``.

    Returns
    -------
    plate, well : str
    site, object_number : int

    Raises
    ------
    ValueError
        If `label` is not of that form.
    """
    try:
        plate, well, rest = label.rsplit("/", 2)
        site, number = rest.removeprefix("s").split("#")
        return plate, well, int(site), int(number)
    except ValueError:
        raise ValueError(
            f"cell label {label!r} is not of the form plate/well/s<site>#<object>."
        ) from None


def selection_wells(points: pd.DataFrame, wells: pd.DataFrame) -> pd.DataFrame:
    """Return the wells behind selected phenotype-map points.

    Parameters
    ----------
    points : DataFrame
        Rows of the stored map: ``level``, ``plate``, ``well``, ``compound``,
        ``concentration``.
    wells : DataFrame
        The run's wells: ``Metadata_Plate``, ``Metadata_Well``,
        ``Metadata_Compound``, ``Metadata_Concentration``.

    Returns
    -------
    DataFrame
        Unique ``Metadata_Plate``, ``Metadata_Well``: a well or cell point gives
        its well, a compound-dose point every well of that compound at that dose.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    need = {"points": (points, ["level", "plate", "well", "compound", "concentration"]),
            "wells": (wells, ["Metadata_Plate", "Metadata_Well", "Metadata_Compound",
                              "Metadata_Concentration"])}  # fmt: skip
    for name, (table, columns) in need.items():
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}.")
    direct = points[points["level"] != "compound_dose"]
    parts = [
        pd.DataFrame(
            {"Metadata_Plate": direct["plate"], "Metadata_Well": direct["well"]}
        )
    ]
    doses = points.loc[
        points["level"] == "compound_dose", ["compound", "concentration"]
    ]
    if len(doses):
        keyed = wells.assign(_dose=wells["Metadata_Concentration"].round(9))
        chosen = doses.assign(_dose=doses["concentration"].round(9)).rename(
            columns={"compound": "Metadata_Compound"}
        )
        matched = keyed.merge(chosen[["Metadata_Compound", "_dose"]])
        parts.append(matched[["Metadata_Plate", "Metadata_Well"]])
    return pd.concat(parts, ignore_index=True).drop_duplicates(ignore_index=True)


def sample_cell_crops(
    engine: Engine,
    run_id: int,
    *,
    wells: pd.DataFrame | None = None,
    cells: Sequence[tuple[str, str, int, int]] = (),
    n_cells: int = 24,
    n_fields: int = 8,
    size: int | None = None,
    rng: int = 0,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Return crops and masks of a random sample of cells from some wells, or of cells.

    Only `n_fields` fields are read (one per well first, `sample_fields`), so a
    selection of any size costs a few field reads; fields flagged by QC are left
    out.

    Parameters
    ----------
    engine : Engine
    run_id : int
    wells : DataFrame, optional
        ``Metadata_Plate``, ``Metadata_Well`` of the wells to sample from.
    cells : sequence of (plate, well, site, object number)
        Exact cells to show (e.g. selected on the phenotype map); used instead of
        `wells` when given.
    n_cells, n_fields : int
        At most this many cells, from at most this many fields.
    size : int, optional
        Crop side (default from the nucleus size, as for embedding).
    rng : int
        Seed.

    Returns
    -------
    crops : ndarray of shape (N, C, S, S), float32
        Illumination-corrected.
    masks : ndarray of shape (N, S, S), bool
        Each crop's own cell.
    table : DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
        ``Metadata_ObjectNumber`` of each crop.

    Raises
    ------
    ValueError
        If neither `wells` nor `cells` is given, `n_cells` or `n_fields` < 1, or
        the run does not exist.
    """
    if n_cells < 1 or n_fields < 1:
        raise ValueError(f"n_cells = {n_cells} and n_fields = {n_fields} must be >= 1.")
    if wells is None and not cells:
        raise ValueError("give wells or cells to sample from.")
    _, _, fields = store.read_run_fields(engine, run_id)
    fields = fields[fields["qc_flags"] == ""]
    site_key = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    if cells:
        wanted = pd.DataFrame(
            list(cells), columns=[*site_key, "Metadata_ObjectNumber"]
        ).head(n_cells)
        chosen = fields.merge(wanted[site_key].drop_duplicates(), on=site_key)
    else:
        keys = ["Metadata_Plate", "Metadata_Well"]
        chosen = sample_fields(
            fields.merge(wells[keys].drop_duplicates(), on=keys), n_fields, rng=rng
        )
    parts: list[tuple[np.ndarray, np.ndarray, pd.DataFrame]] = []
    for field in iter_field_crops(
        engine, run_id, size=size, field_ids=set(chosen["field_id"]), with_masks=True
    ):
        table = pd.DataFrame(
            {"Metadata_Plate": field.plate, "Metadata_Well": field.well,
             "Metadata_Site": field.site,
             "Metadata_ObjectNumber": field.object_numbers}
        )  # fmt: skip
        if cells:
            keep = table.merge(wanted, how="left", indicator=True)["_merge"] == "both"
            keep = keep.to_numpy()
        else:
            keep = np.ones(len(table), bool)
        parts.append((field.crops[keep], field.masks[keep], table[keep]))
    if not parts:
        side = size or 64
        return (np.zeros((0, 0, side, side), np.float32),
                np.zeros((0, side, side), bool), pd.DataFrame(columns=[*site_key,
                "Metadata_ObjectNumber"]))  # fmt: skip
    crops = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    table = pd.concat([p[2] for p in parts], ignore_index=True)
    if len(table) > n_cells:
        pick = np.sort(np.random.default_rng(rng).permutation(len(table))[:n_cells])
        crops, masks, table = crops[pick], masks[pick], table.iloc[pick]
    return crops, masks, table.reset_index(drop=True)
