"""Image input: file-name layouts, field discovery and TIFF reading.

A *field* is one site of one well: one TIFF per channel (ImageXpress, Phenix, any
regex with a ``channel`` group) or one multi-channel TIFF/OME-TIFF (a regex without a
``channel`` group). `discover_fields` lists the fields of a folder without reading
pixels; `read_field` reads one field into a ``(C, Y, X)`` array and `load_field`
also divides it by its plate's illumination function.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from pipeline.errors import InputError
from pipeline.images.illumination import correct as correct_illumination
from pipeline.images.platemap import format_well, normalize_well

logger = logging.getLogger(__name__)

#: File-name presets. Channel tokens are what ``--channels NAME=TOKEN`` maps.
LAYOUTS: dict[str, str] = {
    # <plate>_<well>_s<site>_w<channel>[<uuid>].tif; site optional; thumbnails ignored.
    "imagexpress": (
        r"^(?P<plate>.+?)_(?P<well>[A-Za-z]{1,2}\d{1,2})(?:_s(?P<site>\d+))?"
        r"_(?P<channel>w\d+)(?:[0-9A-Fa-f-]{36})?\.tiff?$"
    ),
    # r01c01f01p01-ch1sk1fk1fl1.tiff (Opera / Operetta Phenix, Harmony export).
    "phenix": (
        r"^r(?P<row>\d{2})c(?P<column>\d{2})f(?P<site>\d{2})p(?P<plane>\d{2})"
        r"-(?P<channel>ch\d+)sk\d+fk\d+fl\d+\.tiff?$"
    ),
    # [<plate>_]<well>[_s<site>].tif / .ome.tif: one multi-channel file per field.
    "multichannel": (
        r"^(?:(?P<plate>.+?)_)?(?P<well>[A-Za-z]{1,2}\d{1,2})(?:_s(?P<site>\d+))?"
        r"\.(?:ome\.)?tiff?$"
    ),
}
_TIFF_SUFFIXES = (".tif", ".tiff")
_THUMB_RE = re.compile(r"_thumb", re.IGNORECASE)


def compile_pattern(*, layout: str | None, pattern: str | None) -> re.Pattern[str]:
    """Return the file-name regex of a preset layout or a user pattern.

    Parameters
    ----------
    layout : str or None
        One of `LAYOUTS`.
    pattern : str or None
        A regex with named groups ``well`` (or ``row`` and ``column``), optional
        ``plate`` and ``site``, and ``channel`` for one-file-per-channel layouts.
        Exactly one of `layout` and `pattern` is given.

    Returns
    -------
    re.Pattern
        Case-insensitive, matched against file names (not paths).

    Raises
    ------
    ValueError
        If both or neither are given, the layout is unknown, or the regex is invalid
        or lacks the well groups.
    """
    if (layout is None) == (pattern is None):
        raise ValueError("give exactly one of layout and pattern.")
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}."
            )
        pattern = LAYOUTS[layout]
    assert pattern is not None  # for the type checker: set just above
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}.") from exc
    groups = set(regex.groupindex)
    if "well" not in groups and not {"row", "column"} <= groups:
        raise ValueError(
            f"pattern {pattern!r} needs a named group 'well' (e.g. (?P<well>[A-P]\\d{{2}})) "
            "or both 'row' and 'column'."
        )
    return regex


def _well_from_match(match: re.Match[str]) -> str:
    groups = match.groupdict()
    if groups.get("well"):
        return normalize_well(groups["well"])
    row_text, column = groups["row"], int(groups["column"])
    row = int(row_text) - 1 if row_text.isdigit() else ord(row_text.upper()) - 65
    return format_well(row, column - 1)


def parse_channels(text: str | None) -> dict[str, str] | None:
    """Parse ``DNA=w1,Actin=w2`` into ``{"DNA": "w1", "Actin": "w2"}``.

    Raises
    ------
    ValueError
        If an item has no ``=``, a name repeats, or a token repeats.
    """
    if text is None or not text.strip():
        return None
    channels: dict[str, str] = {}
    for item in text.split(","):
        name, sep, token = item.partition("=")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise ValueError(
                f"channels item {item!r} is not NAME=TOKEN; write e.g. DNA=w1,Actin=w2 "
                "(for multi-channel files the token is the 0-based channel index)."
            )
        if name in channels:
            raise ValueError(f"channels names {name!r} twice.")
        channels[name] = token
    if len(set(channels.values())) != len(channels):
        raise ValueError(f"channels {text!r} maps two names to the same token.")
    return channels


def discover_fields(
    images_dir: str | Path,
    *,
    regex: re.Pattern[str],
    channels: Mapping[str, str],
) -> pd.DataFrame:
    """List the fields of an image folder from the file names alone.

    Parameters
    ----------
    images_dir : str or Path
        Searched recursively for ``.tif``/``.tiff`` files; ``_thumb`` files are ignored.
    regex : re.Pattern
        From `compile_pattern`. Without a ``plate`` group, a file's plate is the name
        of the folder that holds it.
    channels : mapping of str to str
        Channel name -> token (the ``channel`` group's text, e.g. ``w1``, ``ch5``), or,
        for a regex without a ``channel`` group, the 0-based channel index in the file.

    Returns
    -------
    fields : DataFrame
        One row per field, sorted by plate, well and site: ``Metadata_Plate``,
        ``Metadata_Well``, ``Metadata_Site`` (int, 1 when the name has none) and one
        ``FileName_<channel>`` column per channel (path relative to `images_dir`).

    Raises
    ------
    FileNotFoundError
        If `images_dir` is not a folder.
    InputError
        If no file matches, two files claim the same field and channel, or a field
        lacks a channel's file; every such problem is listed.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {str(root)!r} does not exist.")
    if not channels:
        raise ValueError("channels is empty; map at least one channel, e.g. DNA=w1.")
    per_channel = "channel" in regex.groupindex
    token_to_name = {str(t).lower(): n for n, t in channels.items()}
    rows: dict[tuple[str, str, int], dict[str, str]] = {}
    problems: list[str] = []
    unmatched: list[str] = []
    seen_tokens: set[str] = set()
    n_tiffs = 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in _TIFF_SUFFIXES or _THUMB_RE.search(path.name):
            continue
        n_tiffs += 1
        match = regex.match(path.name)
        if match is None:
            unmatched.append(path.name)
            continue
        groups = match.groupdict()
        relative = path.relative_to(root)
        plate = groups.get("plate") or (relative.parent.name or root.resolve().name)
        try:
            well = _well_from_match(match)
        except ValueError as exc:
            problems.append(f"{relative}: {exc}")
            continue
        site = int(groups["site"]) if groups.get("site") else 1
        files = rows.setdefault((plate, well, site), {})
        if per_channel:
            seen_tokens.add(groups["channel"])
            names = [token_to_name.get(groups["channel"].lower())]
        else:
            names = list(channels)
        for name in names:
            if name is None:
                continue
            if name in files and files[name] != str(relative):
                problems.append(
                    f"plate {plate} well {well} site {site} channel {name}: both "
                    f"{files[name]} and {relative} match; make the pattern more specific "
                    "(e.g. select one z-plane)."
                )
            files[name] = str(relative)
    if not rows:
        examples = ", ".join(unmatched[:3]) or "none"
        raise InputError(
            f"no file name matches the pattern {regex.pattern!r} ({n_tiffs} TIFF files, "
            f"e.g. {examples}); choose --layout or give --pattern.",
            source=str(root),
        )
    if unmatched:
        logger.warning(
            "%d TIFF files do not match the pattern and are ignored, e.g. %s",
            len(unmatched),
            ", ".join(unmatched[:3]),
        )
    for (plate, well, site), files in sorted(rows.items()):
        missing = [name for name in channels if name not in files]
        if len(missing) == len(channels):
            continue  # only unmapped channels: handled below
        for name in missing:
            problems.append(
                f"plate {plate} well {well} site {site}: no file for channel {name} "
                f"(token {channels[name]}); found {', '.join(sorted(files.values()))}."
            )
    if not any(rows.values()):
        raise InputError(
            "no file carries a mapped channel token "
            f"({', '.join(map(str, channels.values()))}); the files have tokens "
            f"{', '.join(sorted(seen_tokens))}. Map them with --channels NAME=TOKEN.",
            source=str(root),
        )
    if problems:
        raise InputError(problems, source=str(root))
    records = [
        {
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": site,
            **{f"FileName_{name}": files[name] for name in channels},
        }
        for (plate, well, site), files in sorted(rows.items())
        if files
    ]
    return pd.DataFrame.from_records(records)


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """Read a TIFF's first series with its axes string, naming the file on failure."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.asarray(), series.axes
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: file not found; was it moved?") from exc
    except Exception as exc:  # noqa: BLE001 - codecs raise many types; all mean "unreadable"
        raise ValueError(
            f"{path}: cannot read the TIFF ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt or not a TIFF. Re-export or remove it."
        ) from exc


def _plane(data: np.ndarray, axes: str, index: int | None, path: Path) -> np.ndarray:
    """Pick one 2-D (Y, X) plane: the whole image, or channel `index`."""
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    squeezed = data.reshape([data.shape[i] for i in keep])
    kept_axes = "".join(axes[i] for i in keep)
    if index is None:
        if squeezed.ndim != 2:
            raise ValueError(
                f"{path}: expected one 2-D plane but the TIFF has shape {data.shape} "
                f"(axes {axes}); for multi-channel files use a pattern without a "
                "channel group and map channels by index."
            )
        return squeezed
    channel_axes = [i for i, a in enumerate(kept_axes) if a in "CS"]
    other = [a for a in kept_axes if a not in "CSYX"]
    if len(channel_axes) != 1 or other:
        raise ValueError(
            f"{path}: expected a multi-channel image (C, Y, X) but the TIFF has shape "
            f"{data.shape} (axes {axes}); z-stacks and time series are not supported, "
            "export a projection."
        )
    axis = channel_axes[0]
    if not 0 <= index < squeezed.shape[axis]:
        raise ValueError(
            f"{path}: channel index {index} does not exist; the file has "
            f"{squeezed.shape[axis]} channels (0-{squeezed.shape[axis] - 1})."
        )
    return np.take(squeezed, index, axis=axis)


def read_field(
    paths: Sequence[str | Path], *, channel_indexes: Sequence[int | None] | None = None
) -> np.ndarray:
    """Read one field of view into a ``(C, Y, X)`` array.

    Parameters
    ----------
    paths : sequence of str or Path
        One path per channel, in channel order; a path may repeat when several
        channels come from one multi-channel file (it is read once).
    channel_indexes : sequence of int or None, optional
        Per channel, the index inside a multi-channel file, or None for a
        single-plane file. None means all single-plane.

    Returns
    -------
    image : ndarray of shape (C, Y, X)
        The files' dtype (uint8, uint16 or float).

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If a file is unreadable or truncated, has the wrong number of planes, or the
        channels differ in shape or dtype; the message names the file(s).
    """
    if len(paths) == 0:
        raise ValueError("paths is empty; a field needs at least one channel file.")
    indexes = (
        list(channel_indexes) if channel_indexes is not None else [None] * len(paths)
    )
    if len(indexes) != len(paths):
        raise ValueError(
            f"channel_indexes has {len(indexes)} entries but paths has {len(paths)}."
        )
    cache: dict[Path, tuple[np.ndarray, str]] = {}
    planes = []
    for raw_path, index in zip(paths, indexes, strict=True):
        path = Path(raw_path)
        if path not in cache:
            cache[path] = _read_tiff(path)
        planes.append(_plane(*cache[path], index, path))
    listing = "; ".join(
        f"{p}: {plane.shape} {plane.dtype.name}"
        for p, plane in zip(paths, planes, strict=True)
    )
    if len({plane.shape for plane in planes}) > 1:
        raise ValueError(
            f"the channels of one field differ in size ({listing}); all channels of "
            "a field must have the same height and width."
        )
    if len({plane.dtype.name for plane in planes}) > 1:
        raise ValueError(
            f"the channels of one field differ in bit depth ({listing}); save every "
            "channel with the same pixel type (e.g. all uint16)."
        )
    return np.stack(planes)


def resolve_under(root: str | Path, relative: str) -> Path:
    """Resolve a stored file name under an experiment's image root, refusing escapes.

    Parameters
    ----------
    root : str or Path
        The experiment's image root.
    relative : str
        A file name as the store holds it (relative to `root`).

    Returns
    -------
    Path
        The resolved absolute path; it lies under `root`.

    Raises
    ------
    ValueError
        If `relative` is absolute or leads outside `root` (e.g. ``../``, a link
        out of the root): the store was altered, the file is not read.
    """
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(base):
        raise ValueError(
            f"stored file name {relative!r} lies outside the image root {base}; "
            "only files under the root are read (re-register the experiment)."
        )
    return path


def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Write an instance-label image as a compressed TIFF, atomically.

    Parameters
    ----------
    path : str or Path
    labels : ndarray of shape (Y, X), int
        0 = background; stored as uint16 when the labels fit, else int32.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        If `labels` is not a 2-D integer array with values >= 0.
    """
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(
            f"labels must be a 2-D integer array, got {labels.shape} {labels.dtype}."
        )
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background).")
    path = Path(path)
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
    partial = path.with_name(path.name + ".partial")
    tifffile.imwrite(partial, labels.astype(dtype), compression="zlib")
    partial.replace(path)
    return path


def load_field(
    paths: list[str],
    *,
    channel_indexes: list[int | None],
    illumination: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a field and divide it by its plate's illumination function.

    Returns
    -------
    raw : ndarray of shape (C, Y, X)
        As stored.
    corrected : ndarray of shape (C, Y, X), float32
        ``raw`` / illumination function, or ``raw`` as float32 without one.

    Raises
    ------
    OSError, ValueError
        If a file cannot be read or the planes disagree (the message names the
        file).
    """
    raw = read_field(paths, channel_indexes=channel_indexes)
    if illumination is None:
        return raw, raw.astype(np.float32)
    return raw, correct_illumination(raw, illumination)
