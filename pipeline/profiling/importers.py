"""Import existing profiles into the store: CellProfiler, pycytominer, DeepProfiler.

Users arrive with what they have. Three sources are read:

* **tables** (CSV, TSV, gzip, Parquet, or one table of a SQLite file) with
  ``Metadata_*`` columns and feature columns: pycytominer's per-well profiles (one
  row per well) or per-cell tables (several rows per well);
* **CellProfiler output**: a SQLite file (``Image``/``Per_Image`` and
  ``Cells``/``Cytoplasm``/``Nuclei`` tables, as ExportToDatabase or CytoTable write
  them) or a folder of ExportToSpreadsheet CSVs (``Image.csv``, ``Cells.csv``, ...,
  one folder per site is fine); compartments are merged per object as pycytominer
  does (cytoplasm -> parent cell and parent nucleus);
* **DeepProfiler** feature files: a folder of per-site ``.npz`` (``features``,
  ``locations``, ``metadata``).

Treatment metadata come from the source's columns or from ``--platemap`` (our
plate-map CSV, joined on plate and well; it wins where both say). Negative controls
come from a role column (``Metadata_Role``, ``Metadata_control_type``; values like
``negative_control``, ``negcon``) or from `ImportOptions.negative_control`. Every
problem is reported before anything is written. Per-cell imports become cells of
one field per site, written one field per transaction (a rerun resumes); per-well
imports become ``well_profile`` rows in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import sqlite3
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from sqlalchemy import Engine

from db import store
from db.session import check_store, make_engine
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.images.platemap import (
    canonical_role,
    expand_platemap,
    infer_plate_format,
    normalize_well,
    read_platemap,
    with_well_positions,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "table", "cellprofiler", "deepprofiler")
LEVELS = ("auto", "wells", "cells")
COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei")
#: Candidate source columns, first match wins (case-insensitive).
PLATE_COLUMNS = ("Metadata_Plate", "Image_Metadata_Plate", "Metadata_Barcode")
WELL_COLUMNS = ("Metadata_Well", "Image_Metadata_Well", "Metadata_pert_well")
SITE_COLUMNS = (
    "Metadata_Site", "Image_Metadata_Site", "Metadata_Field", "Metadata_FieldID",
    "ImageNumber",
)  # fmt: skip
COMPOUND_COLUMNS = (
    "Metadata_Compound", "Metadata_pert_iname", "Metadata_broad_sample",
    "Metadata_pert_id", "Metadata_JCP2022", "Metadata_Treatment",
)  # fmt: skip
CONCENTRATION_COLUMNS = (
    "Metadata_Concentration", "Metadata_mmoles_per_liter", "Metadata_dose",
    "Metadata_Dose_uM", "Metadata_concentration_uM",
)  # fmt: skip
ROLE_COLUMNS = ("Metadata_Role", "Metadata_control_type")
MOA_COLUMNS = ("Metadata_MoA",)
CELL_COUNT_COLUMNS = (
    "Metadata_CellCount", "Metadata_Count_Cells", "Metadata_Object_Count",
    "Metadata_Cells_Count", "Metadata_Count_Nuclei",
)  # fmt: skip
#: Texts that mean a missing value in a feature column (as pandas reads CSVs).
MISSING_TOKENS = ("", "nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>")
#: Non-feature columns of CellProfiler tables: ids, parents, object positions.
_NOT_FEATURE = re.compile(
    r"(^|_)(ImageNumber|ObjectNumber|TableNumber)$|_Parent_|_Number_Object_Number$"
    r"|_(Location|AreaShape)_Center_[XYZ]$"
)
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


@dataclass(frozen=True)
class ImportOptions:
    """How to read a source and find its metadata.

    Parameters
    ----------
    format : {"auto", "table", "cellprofiler", "deepprofiler"}
        ``auto`` decides from the path (folder of .npz, folder with Image.csv,
        SQLite with an Image table, else a table).
    level : {"auto", "wells", "cells"}
        ``auto``: cells when a (plate, well) has several rows.
    table : str or None
        Table of a SQLite file holding one table of profiles.
    compound_column, concentration_column, role_column : str or None
        Source columns to use instead of the first of `COMPOUND_COLUMNS`,
        `CONCENTRATION_COLUMNS`, `ROLE_COLUMNS` found.
    negative_control : str or None
        Compound whose rows are the negative controls (e.g. DMSO), whatever a role
        column says.
    platemap : str or None
        Plate-map CSV joined on plate and well.
    feature_set : str
        Name of the feature set the profiles are stored as.
    """

    format: str = "auto"
    level: str = "auto"
    table: str | None = None
    compound_column: str | None = None
    concentration_column: str | None = None
    role_column: str | None = None
    negative_control: str | None = None
    platemap: str | None = None
    feature_set: str = "imported"


@dataclass(frozen=True)
class ImportedProfiles:
    """A validated import, ready to store.

    Attributes
    ----------
    level : {"wells", "cells"}
    metadata : DataFrame
        One row per profile: ``Metadata_Plate``, ``Metadata_Well`` (``A01``),
        ``Metadata_Site``, ``Metadata_ObjectNumber``, ``Metadata_Compound``,
        ``Metadata_Concentration``, ``Metadata_Role``, ``Metadata_CellCount``
        (wells; NaN when unknown), ``Metadata_CentroidX/Y`` (cells) and every other
        ``Metadata_*`` column of the source.
    features : DataFrame
        Same rows; finite float32 features.
    dropped_features : list of str
        Feature columns left out because they hold missing or infinite values.
    """

    level: str
    metadata: pd.DataFrame
    features: pd.DataFrame
    dropped_features: list[str]


def _find(columns: pd.Index, candidates: tuple[str, ...] | list[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


# ----------------------------------------------------------------------- reading


def _read_table_file(path: Path, table: str | None) -> pd.DataFrame:
    """One table: CSV/TSV (gzip too), Parquet, or a table of a SQLite file."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _SQLITE_SUFFIXES:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            names = [
                r[0]
                for r in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            ]
            if table is None and len(names) != 1:
                raise InputError(
                    f"holds tables {', '.join(names)}; name the one with the profiles "
                    "with --table.",
                    source=str(path),
                )
            name = table or names[0]
            if name not in names:
                raise InputError(
                    f"has no table {name!r}; it has {', '.join(names)}.",
                    source=str(path),
                )
            return pd.read_sql_query(f'SELECT * FROM "{name}"', connection)
    if ".parquet" in suffixes or ".pq" in suffixes:
        return pd.read_parquet(path)
    if any(s in suffixes for s in (".csv", ".tsv", ".txt")):
        sep = "\t" if ".tsv" in suffixes else ","
        try:
            return pd.read_csv(path, sep=sep, low_memory=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise InputError(
                f"cannot be read as a table ({exc}).", source=str(path)
            ) from exc
    raise InputError(
        f"is not a table this import reads; use CSV/TSV (optionally .gz), Parquet or "
        f"SQLite ({', '.join(_TABLE_SUFFIXES + _SQLITE_SUFFIXES)}).",
        source=str(path),
    )


def _compartment_table(table: pd.DataFrame, compartment: str) -> pd.DataFrame:
    """Prefix a compartment's columns (``Cells_...``) and name its object number."""
    renamed = {
        c: c if c.startswith(f"{compartment}_") or c in ("ImageNumber", "TableNumber")
        else f"{compartment}_{c}"
        for c in table.columns
    }  # fmt: skip
    out = table.rename(columns=renamed)
    number = _find(
        out.columns,
        [f"{compartment}_ObjectNumber", f"{compartment}_Number_Object_Number"],
    )
    if number is None:
        raise InputError(
            f"the {compartment} table has no ObjectNumber column; export the objects' "
            "numbers with CellProfiler."
        )
    return out.rename(columns={number: f"{compartment}_ObjectNumber"})


def merge_compartments(
    image: pd.DataFrame, compartments: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Merge CellProfiler image and compartment tables into one row per object.

    As pycytominer's ``SingleCells``: cytoplasm objects join their parent cell and
    parent nucleus (``Cytoplasm_Parent_Cells`` / ``_Parent_Nuclei``); without a
    cytoplasm table, cells join their parent nucleus; otherwise objects join on
    their number.

    Parameters
    ----------
    image : DataFrame
        The image table: ``ImageNumber`` and ``Image_Metadata_*`` or ``Metadata_*``.
    compartments : dict of str to DataFrame
        Some of ``Cells``, ``Cytoplasm``, ``Nuclei``: ``ImageNumber``, an object
        number and measurements (prefixed with the compartment or not).

    Returns
    -------
    DataFrame
        ``Metadata_*`` of the image, ``ObjectNumber``, ``ImageNumber`` and the
        compartment-prefixed measurements.

    Raises
    ------
    InputError
        If a table lacks ``ImageNumber`` or an object number, or none is given.
    """
    if not compartments:
        raise InputError(
            "no Cells, Cytoplasm or Nuclei table was found next to the image table."
        )
    for name, table in [("Image", image), *compartments.items()]:
        if "ImageNumber" not in table.columns:
            raise InputError(f"the {name} table has no ImageNumber column.")
    tables = {n: _compartment_table(t, n) for n, t in compartments.items()}
    if "Cytoplasm" in tables and {"Cells", "Nuclei"} <= set(tables):
        base, links = "Cytoplasm", {"Cells": "Cytoplasm_Parent_Cells",
                                    "Nuclei": "Cytoplasm_Parent_Nuclei"}  # fmt: skip
    elif "Cells" in tables and "Nuclei" in tables:
        base, links = "Cells", {"Nuclei": "Cells_Parent_Nuclei"}
    else:
        base = next(n for n in ("Cells", "Cytoplasm", "Nuclei") if n in tables)
        links = {n: f"{base}_ObjectNumber" for n in tables if n != base}
    merged = tables[base]
    for name, link in links.items():
        if link not in merged.columns:
            link = f"{base}_ObjectNumber"
        merged = merged.merge(
            tables[name].drop(columns="TableNumber", errors="ignore"),
            left_on=["ImageNumber", link],
            right_on=["ImageNumber", f"{name}_ObjectNumber"],
            how="inner",
        )
    meta = {
        c: "Metadata_" + c.split("Metadata_", 1)[1]
        for c in image.columns
        if c.startswith(("Image_Metadata_", "Metadata_"))
    }
    image_meta = image[["ImageNumber", *meta]].rename(columns=meta)
    merged = image_meta.merge(
        merged.drop(columns="TableNumber", errors="ignore"), on="ImageNumber"
    )
    return merged.rename(columns={f"{base}_ObjectNumber": "ObjectNumber"})


def _read_cellprofiler_sqlite(path: Path) -> pd.DataFrame:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        names = {
            r[0]
            for r in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }

        def read(name: str) -> pd.DataFrame | None:
            for table in (name, f"Per_{name}"):
                if table in names:
                    return pd.read_sql_query(f'SELECT * FROM "{table}"', connection)
            return None

        image = read("Image")
        compartments = {n: t for n in COMPARTMENTS if (t := read(n)) is not None}
    if image is None:
        raise InputError(
            "has no Image or Per_Image table; is it a CellProfiler database?",
            source=str(path),
        )
    try:
        return merge_compartments(image, compartments)
    except InputError as exc:
        raise InputError(exc.problems, source=str(path)) from exc


def _read_cellprofiler_csvs(folder: Path) -> pd.DataFrame:
    """Every ``Image.csv`` under `folder`, merged with its sibling compartment CSVs."""
    sites = []
    for image_file in sorted(folder.rglob("Image.csv*")):
        siblings = {
            name: next(iter(sorted(image_file.parent.glob(f"{name}.csv*"))), None)
            for name in COMPARTMENTS
        }
        compartments = {n: pd.read_csv(p) for n, p in siblings.items() if p}
        if not compartments:
            continue  # image-only folder (e.g. QC exports)
        try:
            merged = merge_compartments(pd.read_csv(image_file), compartments)
        except InputError as exc:
            raise InputError(exc.problems, source=str(image_file.parent)) from exc
        # image numbers restart in every folder: keep them apart
        merged["ImageNumber"] = f"{image_file.parent.name}:" + merged[
            "ImageNumber"
        ].astype(str)
        sites.append(merged)
    if not sites:
        raise InputError(
            "holds no Image.csv with Cells/Cytoplasm/Nuclei CSVs beside it.",
            source=str(folder),
        )
    return pd.concat(sites, ignore_index=True)


def _site_number(value: object) -> int:
    digits = re.findall(r"\d+", str(value))
    return int(digits[-1]) if digits else 1


#: The only globals a DeepProfiler metadata pickle may name: plain containers and
#: numpy's array and scalar reconstruction (nothing that can run code).
_SAFE_PICKLE_GLOBALS = frozenset(
    [("builtins", name) for name in ("dict", "list", "tuple", "str", "int", "float",
                                      "bool")]
    + [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")]
)  # fmt: skip


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle plain data only (Python docs: Restricting Globals)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which PhenoScreen does not load: a "
                "crafted file could run code"
            )
        return super().find_class(module, name)


def read_npz_metadata(file: Path) -> dict[str, Any]:
    """Return the ``metadata`` dict of a DeepProfiler ``.npz`` without unsafe pickle.

    DeepProfiler stores the metadata as a pickled object array; it is read with an
    unpickler that only rebuilds plain values (strings, numbers, lists, dicts,
    numpy arrays), so a crafted file cannot run code (``np.load(...,
    allow_pickle=True)`` would run it).

    Returns
    -------
    dict
        Empty when the file has no ``metadata``.

    Raises
    ------
    InputError
        If the file is not a zip of ``.npy`` arrays, or its metadata names anything
        but plain values (the message says how to make a safe file).
    """
    try:
        with zipfile.ZipFile(file) as archive:
            if "metadata.npy" not in archive.namelist():
                return {}
            with archive.open("metadata.npy") as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                _, _, dtype = read_header(stream)
                if dtype.hasobject:
                    value = _SafeUnpickler(stream).load()
                else:
                    return {}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(
            f"is not a DeepProfiler feature file ({exc}).", source=str(file)
        ) from exc
    except Exception as exc:  # noqa: BLE001 - anything a crafted pickle raises
        raise InputError(
            f"its metadata is refused: {exc}. Save the metadata as plain values "
            "(strings and numbers in a dict), or drop it and pass the treatments "
            "with --platemap.",
            source=str(file),
        ) from exc
    value = value.item() if isinstance(value, np.ndarray) else value
    if not isinstance(value, dict):
        raise InputError(
            f"its metadata is a {type(value).__name__}, not a dict of values.",
            source=str(file),
        )
    return value


def _read_deepprofiler(folder: Path) -> pd.DataFrame:
    """Per-site DeepProfiler ``.npz`` files under `folder` into one per-cell table."""
    files = sorted(folder.rglob("*.npz"))
    if not files:
        raise InputError("holds no DeepProfiler .npz files.", source=str(folder))
    parts = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as data:
                features = np.asarray(data["features"], dtype=np.float32)
                locations = (
                    np.asarray(data["locations"]) if "locations" in data else None
                )
            metadata = read_npz_metadata(file)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"is not a DeepProfiler feature file (needs 'features' and 'metadata': "
                f"{exc}).",
                source=str(file),
            ) from exc
        if features.ndim != 2:
            raise InputError(
                f"'features' has shape {features.shape}; expected (cells, dims).",
                source=str(file),
            )
        columns = {
            (k if k.startswith("Metadata_") else f"Metadata_{k}"): v
            for k, v in dict(metadata).items()
            if not str(v).lower().endswith((".tif", ".tiff", ".png"))  # image paths
        }
        part = pd.DataFrame(
            features,
            columns=[f"DeepProfiler_{i:04d}" for i in range(features.shape[1])],
        )
        for key, value in columns.items():
            part.insert(0, key, value)
        part.insert(0, "ObjectNumber", np.arange(1, len(part) + 1))
        if locations is not None and len(locations) == len(part):
            part.insert(0, "Metadata_CentroidX", locations[:, 0].astype(float))
            part.insert(0, "Metadata_CentroidY", locations[:, 1].astype(float))
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def detect_format(path: Path) -> str:
    """Return the source format of `path` (see `ImportOptions.format`).

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    """
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    if path.is_dir():
        return "deepprofiler" if next(path.rglob("*.npz"), None) else "cellprofiler"
    if path.suffix.lower() in _SQLITE_SUFFIXES:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            names = {
                r[0]
                for r in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
        if names & {"Image", "Per_Image"}:
            return "cellprofiler"
    return "table"


def read_source(path: str | Path, options: ImportOptions) -> pd.DataFrame:
    """Read a source into one raw table (columns as the source names them).

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    InputError
        If it cannot be read in the chosen format.
    """
    path = Path(path)
    if options.format not in FORMATS:
        raise InputError(f"format {options.format!r} is unknown; use {FORMATS}.")
    fmt = detect_format(path) if options.format == "auto" else options.format
    if fmt == "deepprofiler":
        return _read_deepprofiler(path)
    if fmt == "cellprofiler":
        return (
            _read_cellprofiler_csvs(path)
            if path.is_dir()
            else _read_cellprofiler_sqlite(path)
        )
    if path.is_dir():
        raise InputError("is a folder; a table import needs a file.", source=str(path))
    return _read_table_file(path, options.table)


# ---------------------------------------------------------------- standardizing


def _role_column(
    raw: pd.DataFrame, options: ImportOptions, compound: pd.Series, problems: list[str]
) -> pd.Series:
    column = options.role_column or _find(raw.columns, ROLE_COLUMNS)
    if options.role_column and options.role_column not in raw.columns:
        problems.append(f"role column {options.role_column!r} is not in the source.")
        column = None
    roles = pd.Series("treatment", index=raw.index, dtype=object)
    if column is not None:
        text = raw[column].astype("string").fillna("").str.strip()
        mapped = text.astype(object).map(
            lambda v: "treatment" if v == "" else canonical_role(v)
        )
        unknown = sorted(set(text[mapped.isna()]))
        if unknown:
            problems.append(
                f"column {column!r}: values {unknown[:5]} are not a role; use "
                "negative_control/negcon, positive_control/poscon, treatment/trt, or "
                "pass --negative-control COMPOUND."
            )
        roles = mapped.fillna("treatment")
    if options.negative_control is not None:
        is_control = compound == options.negative_control
        if not is_control.any():
            examples = ", ".join(map(str, compound.dropna().unique()[:8]))
            problems.append(
                f"--negative-control {options.negative_control!r} matches no row of "
                f"the compound column; compounds include {examples}."
            )
        roles = roles.where(~is_control, "negative_control")
    elif column is None:
        examples = ", ".join(map(str, compound.dropna().unique()[:8]))
        problems.append(
            f"no role column ({' or '.join(ROLE_COLUMNS)}) says which rows are "
            "negative controls; add one, pass --role-column, or pass "
            f"--negative-control COMPOUND (compounds include {examples})."
        )
    return roles


def _python(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if isinstance(value, float) and np.isnan(value) else value


def standardize(
    raw: pd.DataFrame,
    options: ImportOptions,
    *,
    source: str,
    platemap: pd.DataFrame | None = None,
) -> ImportedProfiles:
    """Validate a raw table and map it onto the store's metadata and features.

    Parameters
    ----------
    raw : DataFrame
        From `read_source`.
    options : ImportOptions
    source : str
        Shown in error messages (the path).
    platemap : DataFrame or None
        From `pipeline.images.platemap.read_platemap`: joined on plate and well, its
        columns replace the source's.

    Returns
    -------
    ImportedProfiles

    Raises
    ------
    InputError
        Listing every problem found: no rows, missing plate/well/compound columns,
        bad well names, non-numeric concentrations or features, unknown roles,
        plates without negative controls, no finite feature.
    """
    if options.level not in LEVELS:
        raise InputError(f"level {options.level!r} is unknown; use {LEVELS}.")
    if raw.empty:
        raise InputError(
            "holds no rows (a header only, or nothing); export the profiles again.",
            source=source,
        )
    problems: list[str] = []
    plate_col, well_col = (
        _find(raw.columns, PLATE_COLUMNS),
        _find(raw.columns, WELL_COLUMNS),
    )
    if plate_col is None or well_col is None:
        missing = [
            n for n, c in (("plate", plate_col), ("well", well_col)) if c is None
        ]
        raise InputError(
            f"no {' and no '.join(missing)} column ({', '.join(PLATE_COLUMNS)} / "
            f"{', '.join(WELL_COLUMNS)}); add Metadata_Plate and Metadata_Well.",
            source=source,
        )
    meta = pd.DataFrame(index=raw.index)
    meta["Metadata_Plate"] = raw[plate_col].astype(str).str.strip()
    wells = []
    for value in raw[well_col].astype(str):
        try:
            wells.append(normalize_well(value.strip()))
        except ValueError:
            wells.append(None)
    meta["Metadata_Well"] = wells
    bad = raw.loc[meta["Metadata_Well"].isna(), well_col].unique()
    if len(bad):
        problems.append(
            f"column {well_col!r}: {len(bad)} values are not well names (e.g. "
            f"{', '.join(map(repr, bad[:5]))}); use A01-style names."
        )
    site_col = _find(raw.columns, SITE_COLUMNS)
    used = {plate_col, well_col, site_col, "Metadata_CentroidX", "Metadata_CentroidY",
            "Metadata_ObjectNumber"}  # fmt: skip
    meta["Metadata_Site"] = (
        raw[site_col].map(_site_number) if site_col is not None else 1
    )
    if platemap is not None:
        plates = sorted(meta["Metadata_Plate"].unique())
        mapped = expand_platemap(platemap, plates)
        joined = meta[["Metadata_Plate", "Metadata_Well"]].merge(
            mapped, on=["Metadata_Plate", "Metadata_Well"], how="left"
        )
        unmapped = joined["Metadata_Compound"].isna()
        if unmapped.any():
            examples = (
                joined.loc[unmapped, ["Metadata_Plate", "Metadata_Well"]]
                .drop_duplicates().head(5).agg("/".join, axis=1)
            )  # fmt: skip
            problems.append(
                f"{int(unmapped.sum())} rows have no plate-map row (e.g. "
                f"{', '.join(examples)}); add those wells to --platemap."
            )
        joined.index = raw.index
        for column in joined.columns.drop(["Metadata_Plate", "Metadata_Well"]):
            meta[column] = joined[column]
    else:
        compound_col = options.compound_column or _find(raw.columns, COMPOUND_COLUMNS)
        if compound_col is None or compound_col not in raw.columns:
            raise InputError(
                [*problems, f"no compound column ({', '.join(COMPOUND_COLUMNS)}); pass "
                 "--compound-column NAME or --platemap CSV."],
                source=source,
            )  # fmt: skip
        compound = raw[compound_col].astype("string").str.strip()
        meta["Metadata_Role"] = _role_column(raw, options, compound, problems)
        missing = compound.isna() | (compound == "")
        controls = meta["Metadata_Role"] == "negative_control"
        if (missing & ~controls).any():
            problems.append(
                f"column {compound_col!r} is empty in {int((missing & ~controls).sum())} "
                "treatment rows; name every compound."
            )
        meta["Metadata_Compound"] = compound.where(
            ~missing, options.negative_control or "negative control"
        ).astype(object)
        conc_col = options.concentration_column or _find(
            raw.columns, CONCENTRATION_COLUMNS
        )
        if conc_col is not None and conc_col in raw.columns:
            concentration = pd.to_numeric(raw[conc_col], errors="coerce")
            bad = raw.loc[concentration.isna() & raw[conc_col].notna(), conc_col]
            if len(bad):
                problems.append(
                    f"column {conc_col!r}: {len(bad)} values are not numbers (e.g. "
                    f"{', '.join(map(repr, bad.unique()[:5]))})."
                )
            invalid = concentration[(concentration < 0) | np.isinf(concentration)]
            if len(invalid):
                problems.append(
                    f"column {conc_col!r}: {len(invalid)} values are negative or "
                    f"infinite (e.g. {', '.join(map(repr, invalid.unique()[:5]))}); "
                    "concentrations are finite and 0 or more."
                )
            meta["Metadata_Concentration"] = concentration.astype(float)
        else:
            if options.concentration_column:
                problems.append(
                    f"concentration column {options.concentration_column!r} is not in "
                    "the source."
                )
            meta["Metadata_Concentration"] = np.nan
        moa_col = _find(raw.columns, MOA_COLUMNS)
        if moa_col is not None:
            meta["Metadata_MoA"] = raw[moa_col].astype("string").astype(object)
        used |= {compound_col, conc_col, moa_col}
    for column in raw.columns:
        if column.startswith("Metadata_") and column not in used and column not in meta:
            meta[column] = raw[column].map(_python)
    for plate, roles in meta.groupby("Metadata_Plate")["Metadata_Role"]:
        if not (roles == "negative_control").any():
            problems.append(
                f"plate {plate!r} has no negative-control rows; profiles are "
                "normalized to them."
            )
    feature_cols = [
        c for c in raw.columns
        if not c.startswith("Metadata_") and not _NOT_FEATURE.search(c)
    ]  # fmt: skip
    numeric = raw[feature_cols].apply(pd.to_numeric, errors="coerce")
    not_numbers = {
        c: raw[c][
            numeric[c].isna()
            & ~raw[c].astype("string").str.strip().str.lower().isin(MISSING_TOKENS)
        ].dropna()
        for c in feature_cols
        if not pd.api.types.is_numeric_dtype(raw[c])
    }
    text = [c for c, bad in not_numbers.items() if len(bad)]
    if text:
        examples = ", ".join(
            f"{not_numbers[c].iloc[0]!r} in {c!r} (row {not_numbers[c].index[0] + 2})"
            for c in text[:3]
        )
        problems.append(
            f"columns {text[:5]} hold text ({examples}) but are not Metadata_ "
            "columns; fix those values, rename the columns Metadata_<name>, or drop "
            "them."
        )
    values = numeric.drop(columns=text).astype(np.float32)
    finite = np.isfinite(values.to_numpy())
    dropped = [
        c for c, ok in zip(values.columns, finite.all(axis=0), strict=True) if not ok
    ]
    features = values.drop(columns=dropped)
    if features.shape[1] == 0:
        problems.append(
            "no feature column with finite values in every row; features are the "
            "numeric columns not named Metadata_*."
        )
    if problems:
        raise InputError(problems, source=source)
    duplicated = meta.duplicated(["Metadata_Plate", "Metadata_Well"]).any()
    level = (
        options.level
        if options.level != "auto"
        else ("cells" if duplicated else "wells")
    )
    if level == "wells" and duplicated:
        raise InputError(
            "--level wells, but some (plate, well) pairs have several rows.",
            source=source,
        )
    if level == "wells":
        count_col = _find(raw.columns, CELL_COUNT_COLUMNS)
        meta["Metadata_CellCount"] = (
            pd.to_numeric(raw[count_col], errors="coerce") if count_col else np.nan
        )
        meta["Metadata_Site"] = 1
    else:
        number = raw["ObjectNumber"] if "ObjectNumber" in raw.columns else None
        keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
        meta["Metadata_ObjectNumber"] = (
            number.to_numpy()
            if number is not None
            and not meta.assign(o=number).duplicated([*keys, "o"]).any()
            else meta.groupby(keys).cumcount().to_numpy() + 1
        )
        for axis in ("X", "Y"):
            column = _find(
                raw.columns,
                [f"Metadata_Centroid{axis}", f"Nuclei_Location_Center_{axis}",
                 f"Nuclei_AreaShape_Center_{axis}", f"Cells_AreaShape_Center_{axis}"],
            )  # fmt: skip
            meta[f"Metadata_Centroid{axis}"] = (
                pd.to_numeric(raw[column], errors="coerce").fillna(0.0)
                if column
                else 0.0
            )
    if dropped:
        logger.warning(
            "%s: %d feature columns with missing or infinite values left out (e.g. %s)",
            source, len(dropped), ", ".join(dropped[:3]),
        )  # fmt: skip
    return ImportedProfiles(
        level=level,
        metadata=meta.reset_index(drop=True),
        features=features.reset_index(drop=True),
        dropped_features=dropped,
    )


# ---------------------------------------------------------------------- storing


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    )
    for file in files:
        digest.update(
            str(file.relative_to(path) if path.is_dir() else file.name).encode()
        )
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def import_profiles(
    engine: Engine | str,
    path: str | Path,
    options: ImportOptions = ImportOptions(),
    *,
    experiment: str | None = None,
    config: RunConfig | None = None,
) -> dict[str, Any]:
    """Read, validate and store a profile source as a complete run.

    Parameters
    ----------
    engine : Engine or str
        The store, or its URL: then the store is checked first
        (`db.session.check_store`) and opened (created if new) only once the
        source is valid, so a bad source leaves no new store behind.
    path : str or Path
        Table file, CellProfiler SQLite/CSV folder, or DeepProfiler folder.
    options : ImportOptions
    experiment : str or None
        Experiment name (default: the file or folder name without suffixes).
    config : RunConfig, optional
        Its ``[profile]`` recipe and ``[hits]`` settings are saved with the run and
        used by every command that reads it, as for an analysed run (default:
        `RunConfig` defaults).

    Returns
    -------
    dict
        ``run_id``, ``experiment``, ``level``, ``n_plates``, ``n_wells``,
        ``n_profiles``, ``n_features``, ``n_dropped_features``, ``feature_set``,
        ``resumed``.

    Raises
    ------
    FileNotFoundError
        If `path` or the plate map does not exist.
    InputError
        Listing every problem; nothing is written then.
    """
    path = Path(path)
    config = config or RunConfig()
    if isinstance(engine, str):
        check_store(engine)
    platemap = read_platemap(options.platemap) if options.platemap else None
    imported = standardize(
        read_source(path, options), options, source=str(path), platemap=platemap
    )
    if isinstance(engine, str):
        engine = make_engine(engine)
    meta = imported.metadata
    wells = meta.drop_duplicates(["Metadata_Plate", "Metadata_Well"]).drop(
        columns=[c for c in ("Metadata_Site", "Metadata_ObjectNumber", "Metadata_CellCount",
                             "Metadata_CentroidX", "Metadata_CentroidY") if c in meta]
    )  # fmt: skip
    fields = meta[
        ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    ].drop_duplicates()
    plate_formats = {
        plate: infer_plate_format(group["Metadata_Well"])
        for plate, group in wells.groupby("Metadata_Plate")
    }
    name = experiment or path.name.split(".")[0]
    experiment_id, fields = store.register_experiment(
        engine,
        name=name,
        image_root="",
        channels={},
        wells=with_well_positions(wells),
        fields=fields.reset_index(drop=True),
        plate_formats=plate_formats,
    )
    settings = {"source": str(path.resolve()), "level": imported.level} | {
        k: v for k, v in asdict(options).items() if v is not None
    }
    key = hashlib.sha256(
        (_digest(path) + json.dumps(settings, sort_keys=True)).encode()
    ).hexdigest()
    run_id, resumed = store.open_run(
        engine,
        experiment_id=experiment_id,
        analysis_key=key,
        config_toml=tomli_w.dumps(
            {
                "import": settings,
                "profile": asdict(config.profile),
                "hits": asdict(config.hits),
            }
        ),  # fmt: skip
        segmenter="imported",
        versions={},
    )
    feature_set_id = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name=options.feature_set,
        kind=store.WELL_PROFILE_KIND if imported.level == "wells" else "imported_cells",
        feature_names=list(imported.features.columns),
        config={"source": str(path), "dropped_features": imported.dropped_features},
    )
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    field_ids = meta[keys].merge(fields[[*keys, "field_id"]], on=keys, how="left")
    values = imported.features.to_numpy(np.float32)
    if imported.level == "wells":
        counts = meta["Metadata_CellCount"]
        store.write_well_profiles(
            engine,
            run_id=run_id,
            feature_set_id=feature_set_id,
            field_ids=field_ids["field_id"].tolist(),
            well_ids=meta[["Metadata_Plate", "Metadata_Well"]]
            .merge(
                store.read_wells(engine, experiment_id)[
                    ["Metadata_Plate", "Metadata_Well", "well_id"]
                ],
                how="left",
            )["well_id"]
            .tolist(),
            cell_counts=[None if pd.isna(c) else int(c) for c in counts],
            values=values,
        )
    else:
        done = store.completed_field_ids(engine, run_id)
        rows = field_ids.groupby("field_id").indices
        for field_id, index in rows.items():
            if int(field_id) in done:
                continue
            part = meta.iloc[index]
            cells = pd.DataFrame(
                {
                    "object_number": part["Metadata_ObjectNumber"].astype(int).to_numpy(),
                    "centroid_y": part["Metadata_CentroidY"].astype(float).to_numpy(),
                    "centroid_x": part["Metadata_CentroidX"].astype(float).to_numpy(),
                    "bbox_min_y": 0, "bbox_min_x": 0, "bbox_max_y": 0, "bbox_max_x": 0,
                    "area_px": 0,
                }
            )  # fmt: skip
            store.write_field_cells(
                engine,
                run_id=run_id,
                field_id=int(field_id),
                feature_set_id=feature_set_id,
                cells=cells,
                features=values[index],
                qc={},
                seconds={},
            )
    store.finish_run(engine, run_id, status="complete", message=None, timings={})
    return {
        "run_id": run_id,
        "experiment": name,
        "level": imported.level,
        "n_plates": len(plate_formats),
        "n_wells": len(wells),
        "n_profiles": len(meta),
        "n_features": imported.features.shape[1],
        "n_dropped_features": len(imported.dropped_features),
        "feature_set": options.feature_set,
        "resumed": resumed,
    }
