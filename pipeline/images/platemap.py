"""Plate maps: well names, reading and validating the plate-map CSV.

A plate map is a CSV with one row per well and the columns ``well``, ``compound``,
``concentration`` and ``role``; ``plate``, ``moa``, ``smiles``, a concentration unit
and any other columns are optional. `read_platemap` returns a DataFrame of
pycytominer-style ``Metadata_*`` columns; `check_platemap_against_fields` compares it
with the images found on disk. Both collect every problem before raising.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import PLATE_FORMATS
from pipeline.errors import InputError

ROLES = ("negative_control", "positive_control", "treatment")
_ROLE_ALIASES = {
    "negative_control": "negative_control",
    "negcon": "negative_control",
    "negative": "negative_control",
    "neg_control": "negative_control",
    "positive_control": "positive_control",
    "poscon": "positive_control",
    "positive": "positive_control",
    "pos_control": "positive_control",
    "treatment": "treatment",
    "trt": "treatment",
    "compound": "treatment",
    "vehicle": "negative_control",
}


def canonical_role(value: str) -> str | None:
    """Return the role a plate-map or profile value names, or None if unknown.

    Accepts the `ROLES` and aliases such as ``negcon``, ``poscon_cp``, ``trt``,
    ``vehicle``; case, spaces and hyphens are ignored.
    """
    key = str(value).strip().lower().replace(" ", "_").replace("-", "_")
    if key.startswith("poscon"):
        return "positive_control"
    return _ROLE_ALIASES.get(key)


_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,2})$")
_UNIT_HEADER_RE = re.compile(
    r"^concentration\s*(?:[_\s]|\(|\[)\s*(?P<unit>[a-zA-Zµμ]+)\s*[\)\]]?$",
    re.IGNORECASE,
)
REQUIRED_COLUMNS = ("well", "compound", "concentration", "role")
_OPTIONAL_LABELS = {
    "moa": "Metadata_MoA",
    "smiles": "Metadata_SMILES",
    "batch": "Metadata_Batch",
}


def parse_well(name: str) -> tuple[int, int]:
    """Return the zero-based (row, column) of a well name.

    Parameters
    ----------
    name : str
        ``A01``, ``A1``, ``p24`` or, on 1536-well plates, ``AA01``..``AF48``.

    Returns
    -------
    row, column : tuple of int
        Zero-based; row ``A`` is 0, ``Z`` is 25, ``AA`` is 26, ``AF`` is 31.

    Raises
    ------
    ValueError
        If `name` is not a well name of a 96-, 384- or 1536-well plate.
    """
    match = _WELL_RE.match(str(name).strip())
    if match is None:
        raise ValueError(
            f"well {name!r} is not a well name; expected a row letter (A-Z, AA-AF) "
            "and a column number, e.g. A01, B7 or AF48."
        )
    letters, digits = match.group(1).upper(), int(match.group(2))
    row = (
        ord(letters[-1])
        - 65
        + (26 * (ord(letters[0]) - 64) if len(letters) == 2 else 0)
    )
    max_rows, max_cols = PLATE_FORMATS[1536]
    if row >= max_rows or not 1 <= digits <= max_cols:
        raise ValueError(
            f"well {name!r} lies outside a 1536-well plate (rows A-AF, columns 1-48)."
        )
    return row, digits - 1


def format_well(row: int, column: int) -> str:
    """Return the canonical name (``A01``, ``AF48``) of a zero-based (row, column).

    Raises
    ------
    ValueError
        If `row` or `column` lies outside a 1536-well plate.
    """
    max_rows, max_cols = PLATE_FORMATS[1536]
    if not (0 <= row < max_rows and 0 <= column < max_cols):
        raise ValueError(
            f"row {row}, column {column} lies outside a 1536-well plate "
            f"(0-{max_rows - 1}, 0-{max_cols - 1})."
        )
    letters = chr(65 + row) if row < 26 else "A" + chr(65 + row - 26)
    return f"{letters}{column + 1:02d}"


def normalize_well(name: str) -> str:
    """Return the canonical well name: ``a1`` -> ``A01``.

    Raises
    ------
    ValueError
        If `name` is not a well name (see `parse_well`).
    """
    return format_well(*parse_well(name))


def with_well_positions(wells: pd.DataFrame) -> pd.DataFrame:
    """Return `wells` with each well's zero-based ``row_index`` and ``column_index``.

    The store takes well positions in this form (`db.runs.register_experiment`), so
    well naming stays here.

    Parameters
    ----------
    wells : DataFrame
        One row per well with a ``Metadata_Well`` column.

    Returns
    -------
    DataFrame
        A copy with integer ``row_index`` and ``column_index`` columns added.

    Raises
    ------
    ValueError
        If ``Metadata_Well`` is missing or holds a name that is no well.
    """
    if "Metadata_Well" not in wells.columns:
        raise ValueError(
            f"wells have no Metadata_Well column (columns: {list(wells.columns)})."
        )
    positions = np.array(
        [parse_well(w) for w in wells["Metadata_Well"]], dtype=int
    ).reshape(-1, 2)
    return wells.assign(row_index=positions[:, 0], column_index=positions[:, 1])


def infer_plate_format(wells: pd.Series) -> int:
    """Return the smallest plate format (96, 384, 1536) holding all `wells`.

    Raises
    ------
    ValueError
        If `wells` is empty or holds a name that is no well.
    """
    if len(wells) == 0:
        raise ValueError("wells is empty; cannot infer a plate format.")
    positions = np.array([parse_well(w) for w in wells])
    n_rows, n_cols = positions.max(axis=0) + 1
    for n_wells, (rows, cols) in PLATE_FORMATS.items():
        if n_rows <= rows and n_cols <= cols:
            return n_wells
    raise ValueError(f"wells reach row {n_rows}, column {n_cols}; beyond 1536 wells.")


def _concentration_unit(columns: list[str]) -> tuple[str | None, str | None]:
    """Find the concentration column and its unit from the header."""
    for column in columns:
        if column.strip().lower() == "concentration":
            return column, None
        match = _UNIT_HEADER_RE.match(column.strip())
        if match:
            return column, match.group("unit").replace("μ", "µ")
    return None, None


def read_platemap(path: str | Path) -> pd.DataFrame:
    """Read and validate a plate-map CSV.

    Parameters
    ----------
    path : str or Path
        CSV with columns ``well``, ``compound``, ``concentration`` (or
        ``concentration_uM`` / ``concentration (nM)``: the unit in the header), ``role``
        in {negative_control, positive_control, treatment} (aliases negcon, poscon, trt
        accepted); optional ``plate``, ``concentration_unit``, ``moa``, ``smiles`` and
        any other columns, kept as ``Metadata_<name>``. Column names are
        case-insensitive.

    Returns
    -------
    platemap : DataFrame
        One row per (plate, well): ``Metadata_Plate`` (None when the CSV has no plate
        column: the map then applies to every plate), ``Metadata_Well`` (canonical,
        ``A01``), ``Metadata_Compound``, ``Metadata_Concentration`` (float, NaN where
        empty), ``Metadata_ConcentrationUnit``, ``Metadata_Role`` and the optional
        columns.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    InputError
        Listing every problem at once: missing columns, unknown or duplicate wells,
        non-numeric, infinite, negative or missing treatment concentrations,
        unknown roles, plates without negative controls.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"plate map {str(path)!r} does not exist; pass --platemap CSV."
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read as CSV ({exc}).", source=str(path)) from exc
    raw.columns = [c.strip() for c in raw.columns]
    lower = {c.lower(): c for c in raw.columns}
    conc_column, header_unit = _concentration_unit(list(raw.columns))
    missing = [c for c in ("well", "compound", "role") if c not in lower]
    if conc_column is None:
        missing.append("concentration")
    if missing:
        raise InputError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(raw.columns)}. "
            "A plate map needs well, compound, concentration and role.",
            source=str(path),
        )
    problems: list[str] = []
    has_plate = "plate" in lower

    def line(i: int) -> str:
        return f"line {i + 2}"

    wells: list[str | None] = []
    for i, name in enumerate(raw[lower["well"]]):
        try:
            wells.append(normalize_well(name))
        except ValueError as exc:
            problems.append(f"{line(i)}: column 'well': {exc}")
            wells.append(None)

    roles: list[str | None] = []
    for i, role in enumerate(raw[lower["role"]]):
        canonical = canonical_role(role)
        if canonical is None:
            problems.append(
                f"{line(i)}: column 'role': {role!r} is not one of {', '.join(ROLES)}."
            )
        roles.append(canonical)

    text = raw[conc_column].str.strip()
    concentration = pd.to_numeric(text.replace("", np.nan), errors="coerce")
    for i in np.flatnonzero(concentration.isna() & (text != "")):
        problems.append(
            f"{line(i)}: column {conc_column!r}: {text.iloc[i]!r} is not a number; "
            "write the value alone and put the unit in the header or a "
            "concentration_unit column."
        )
    for i in np.flatnonzero(~np.isfinite(concentration) & concentration.notna()):
        problems.append(
            f"{line(i)}: column {conc_column!r}: {text.iloc[i]!r} is not a finite "
            "number."
        )
    for i in np.flatnonzero(concentration < 0):
        problems.append(
            f"{line(i)}: column {conc_column!r}: {text.iloc[i]!r} is negative; "
            "concentrations are 0 or more."
        )
    for i in np.flatnonzero(
        (text == "") & (np.array(roles, dtype=object) == "treatment")
    ):
        problems.append(
            f"{line(i)}: column {conc_column!r} is empty for a treatment well; "
            "treatments need a concentration."
        )
    if "concentration_unit" in lower:
        unit = raw[lower["concentration_unit"]].str.strip().replace("", None)
    else:
        unit = pd.Series(header_unit, index=raw.index, dtype=object)

    compound = raw[lower["compound"]].str.strip()
    for i in np.flatnonzero(compound == ""):
        problems.append(f"{line(i)}: column 'compound' is empty; name it (e.g. DMSO).")

    platemap = pd.DataFrame(
        {
            "Metadata_Plate": raw[lower["plate"]].str.strip() if has_plate else None,
            "Metadata_Well": wells,
            "Metadata_Compound": compound,
            "Metadata_Concentration": concentration.astype(float),
            "Metadata_ConcentrationUnit": unit,
            "Metadata_Role": roles,
        }
    )
    consumed = {
        "plate",
        "well",
        "compound",
        "role",
        "concentration_unit",
        conc_column.lower(),
    }
    for column in raw.columns:
        if column.lower() in consumed:
            continue
        label = _OPTIONAL_LABELS.get(column.lower(), f"Metadata_{column}")
        platemap[label] = raw[column].str.strip()

    if "Metadata_Batch" in platemap.columns:
        platemap["Metadata_Batch"] = platemap["Metadata_Batch"].replace("", None)
        plates = (
            platemap["Metadata_Plate"] if has_plate else pd.Series("", platemap.index)
        )
        batches = platemap["Metadata_Batch"].fillna("(blank)").groupby(plates).unique()
        for plate, names in batches[batches.map(len) > 1].items():
            which = f"plate {plate} is" if has_plate else "the plates are"
            problems.append(
                f"{which} in batches {', '.join(map(str, names))}; a plate belongs to "
                "one batch, so give all its rows the same batch."
            )

    keys = platemap[["Metadata_Plate", "Metadata_Well"]].astype(str)
    duplicated = keys.duplicated(keep=False) & platemap["Metadata_Well"].notna()
    for (plate, well), group in keys[duplicated].groupby(list(keys.columns)):
        where = f"plate {plate} " if has_plate else ""
        lines = ", ".join(str(i + 2) for i in group.index)
        problems.append(f"{where}well {well} appears more than once (lines {lines}).")

    for plate, group in platemap.groupby(
        platemap["Metadata_Plate"].fillna(""), sort=True
    ):
        if not (group["Metadata_Role"] == "negative_control").any():
            where = f"plate {plate!r}" if has_plate else "the plate map"
            problems.append(
                f"{where} has no negative_control wells; profiles are normalized to "
                "them (mark the DMSO wells role=negative_control)."
            )
    if problems:
        raise InputError(problems, source=str(path))
    return platemap.reset_index(drop=True)


def expand_platemap(platemap: pd.DataFrame, plates: list[str]) -> pd.DataFrame:
    """Return the plate map with one row per (plate, well) for the given plates.

    A plate map without a plate column (``Metadata_Plate`` all None) is repeated for
    every plate; one with a plate column is returned unchanged.

    Parameters
    ----------
    platemap : DataFrame
        From `read_platemap`.
    plates : list of str
        Plate names found among the images.

    Returns
    -------
    DataFrame
        Same columns, ``Metadata_Plate`` filled.

    Raises
    ------
    ValueError
        If `platemap` lacks ``Metadata_Plate`` or `plates` is empty.
    """
    if "Metadata_Plate" not in platemap.columns:
        raise ValueError(
            "platemap has no Metadata_Plate column; read it with read_platemap."
        )
    if not plates:
        raise ValueError("plates is empty; no images were found.")
    if platemap["Metadata_Plate"].notna().any():
        return platemap.copy()
    copies = [platemap.assign(Metadata_Plate=plate) for plate in sorted(plates)]
    return pd.concat(copies, ignore_index=True)


def _format_extent(n_wells: int) -> str:
    """Describe a plate format's rows and columns: ``rows A-H, columns 1-12``."""
    rows, cols = PLATE_FORMATS[n_wells]
    return f"rows A-{format_well(rows - 1, 0)[:-2]}, columns 1-{cols}"


def _outside_format(wells: list[str], n_wells: int) -> list[str]:
    """Return the `wells` that lie outside an `n_wells` plate."""
    rows, cols = PLATE_FORMATS[n_wells]
    positions = [parse_well(w) for w in wells]
    return [
        w for w, (r, c) in zip(wells, positions, strict=True) if r >= rows or c >= cols
    ]


def check_platemap_against_fields(
    platemap: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    allow_unimaged_wells: bool = False,
    plate_format: int | None = None,
) -> pd.DataFrame:
    """Join the plate map to the imaged wells, listing every mismatch.

    Parameters
    ----------
    platemap : DataFrame
        From `read_platemap`.
    fields : DataFrame
        From `pipeline.images.io.discover_fields`: ``Metadata_Plate``, ``Metadata_Well``,
        ``Metadata_Site`` and one path column per channel.
    allow_unimaged_wells : bool
        Accept plate-map wells with no images (e.g. excluded outer wells); they are
        left out of the result.
    plate_format : {96, 384, 1536} or None
        The plates' well count; None infers each plate's from its imaged wells.
        Plate-map wells outside the format are refused even with
        `allow_unimaged_wells` (a typo such as ``I13`` on a 96-well plate is not an
        excluded well).

    Returns
    -------
    wells : DataFrame
        The plate-map rows of the imaged wells, ``Metadata_Plate`` filled.

    Raises
    ------
    InputError
        Listing wells with images but no plate-map row, plate-map rows without images
        (unless `allow_unimaged_wells`), wells outside the plate format, and plates
        missing from the plate map.
    ValueError
        If `plate_format` is not 96, 384 or 1536.
    """
    if plate_format is not None and plate_format not in PLATE_FORMATS:
        raise ValueError(
            f"plate_format = {plate_format!r}; choose one of "
            f"{', '.join(map(str, PLATE_FORMATS))} or None."
        )
    required = {"Metadata_Plate", "Metadata_Well"}
    if not required <= set(fields.columns):
        raise ValueError(
            f"fields lacks columns {sorted(required - set(fields.columns))}."
        )
    plates = sorted(fields["Metadata_Plate"].unique())
    expanded = expand_platemap(platemap, plates)
    mapped = set(
        zip(expanded["Metadata_Plate"], expanded["Metadata_Well"], strict=True)
    )
    imaged = set(zip(fields["Metadata_Plate"], fields["Metadata_Well"], strict=True))
    problems = []
    known_plates = set(expanded["Metadata_Plate"])
    for plate in plates:
        if plate not in known_plates:
            problems.append(
                f"plate {plate!r} has images but is not in the plate map's plate column "
                f"(which has {', '.join(sorted(known_plates))})."
            )
    for plate, well in sorted(imaged - mapped):
        if plate in known_plates:
            problems.append(
                f"plate {plate!r} well {well} has images but no plate-map row; add it."
            )
    outside = set()
    for plate in plates:
        on_plate = fields.loc[fields["Metadata_Plate"] == plate, "Metadata_Well"]
        n_wells = plate_format or infer_plate_format(on_plate)
        how = "declared" if plate_format else "its images fill"
        fix = (
            "fix the well name, or correct --plate-format"
            if plate_format
            else "fix the well name, or declare the format with --plate-format "
            "(input.plate_format) if only part of a larger plate was imaged"
        )
        if plate_format:
            for well in _outside_format(sorted(set(on_plate)), n_wells):
                problems.append(
                    f"plate {plate!r} well {well} has images but lies outside the "
                    f"declared {n_wells}-well plate ({_format_extent(n_wells)}); {fix}."
                )
        listed = sorted(w for p, w in mapped if p == plate)
        for well in _outside_format(listed, n_wells):
            outside.add((plate, well))
            problems.append(
                f"plate {plate!r} plate-map well {well} lies outside the {n_wells}-well "
                f"plate {how} ({_format_extent(n_wells)}); {fix}."
            )
    unimaged = sorted((p, w) for p, w in mapped - imaged - outside if p in set(plates))
    if unimaged and not allow_unimaged_wells:
        shown = ", ".join(f"{p}/{w}" for p, w in unimaged[:20])
        more = f" and {len(unimaged) - 20} more" if len(unimaged) > 20 else ""
        problems.append(
            f"{len(unimaged)} plate-map well(s) have no images: {shown}{more}; remove "
            "those rows, or pass --allow-unimaged-wells if they were not imaged on purpose."
        )
    pairs = zip(expanded["Metadata_Plate"], expanded["Metadata_Well"], strict=True)
    wells = expanded[[pair in imaged for pair in pairs]].reset_index(drop=True)
    for plate in plates:
        roles = wells.loc[wells["Metadata_Plate"] == plate, "Metadata_Role"]
        if plate in known_plates and not (roles == "negative_control").any():
            problems.append(
                f"plate {plate!r} has no imaged negative_control well; profiles are "
                "normalized to them, so image at least one."
            )
    if problems:
        raise InputError(problems, source="plate map vs images")
    return wells
