"""Streaming reads of the store.

Cells, vectors and masks stream plate by plate or field group by field group;
nothing loads all cells of an experiment. Also a run's completed fields (with its
config and image root), the wells, field QC, illumination
functions, well aggregates and cached tables of a run.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    Engine,
    Row,
    case,
    func,
    select,
)

from db.runs import read_feature_set
from db.schema import (
    MAP_COLUMNS,
    WELL_COLUMNS,
    Cell,
    CellVector,
    Experiment,
    Field,
    FieldMask,
    FieldResult,
    IlluminationFunction,
    PhenotypeMapPoint,
    Plate,
    Run,
    TableCache,
    Well,
    WellAggregate,
    WellProfile,
)
from db.session import session_scope


def decode_masks(packed: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Unpack `db.writers.encode_masks` output into (nuclei, cells), each of shape (Y, X)."""
    shape = (2, int(packed["height"]), int(packed["width"]))
    stack = np.frombuffer(zlib.decompress(packed["labels"]), dtype=packed["dtype"])
    return tuple(stack.reshape(shape))  # type: ignore[return-value]


def read_illumination(
    engine: Engine, run_id: int, channel_names: list[str]
) -> dict[int, np.ndarray]:
    """Return a run's illumination functions: plate id -> (C, h, w) float32.

    Plates missing any of `channel_names` are left out (they are recomputed).
    """
    with session_scope(engine) as session:
        rows = session.execute(
            select(
                IlluminationFunction.plate_id,
                IlluminationFunction.channel,
                IlluminationFunction.height,
                IlluminationFunction.width,
                IlluminationFunction.values,
            ).where(IlluminationFunction.run_id == run_id)
        ).all()
    planes: dict[int, dict[str, np.ndarray]] = {}
    for plate_id, channel, height, width, values in rows:
        planes.setdefault(plate_id, {})[channel] = np.frombuffer(
            values, dtype="<f4"
        ).reshape(height, width)
    return {
        plate_id: np.stack([found[c] for c in channel_names])
        for plate_id, found in planes.items()
        if all(c in found for c in channel_names)
    }


_FIELD_COLUMNS = [
    "field_id",
    "plate_id",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "qc_flags",
    "n_cells",
]


def _completed_fields(session: Any, run_id: int, extra: Any) -> pd.DataFrame:
    """Return a run's completed fields (`_FIELD_COLUMNS` + `extra`), in plate order."""
    rows = session.execute(
        select(
            Field.id,
            Plate.id,
            Plate.name,
            Well.name,
            Field.site,
            FieldResult.qc_flags,
            FieldResult.n_cells,
            extra,
        )
        .join(FieldResult, FieldResult.field_id == Field.id)
        .join(Well, Well.id == Field.well_id)
        .join(Plate, Plate.id == Well.plate_id)
        .where(FieldResult.run_id == run_id, FieldResult.status == "complete")
        .order_by(Plate.name, Well.row_index, Well.column_index, Field.site)
    ).all()
    return pd.DataFrame(rows, columns=[*_FIELD_COLUMNS, extra.key])


def read_run_fields(engine: Engine, run_id: int) -> tuple[str, str, pd.DataFrame]:
    """Return a run's config TOML, image root and completed fields.

    Returns
    -------
    config_toml : str
    image_root : str
    fields : DataFrame
        ``field_id``, ``plate_id``, ``Metadata_Plate``, ``Metadata_Well``,
        ``Metadata_Site``, ``qc_flags``, ``n_cells`` and ``files`` (dict channel ->
        file name relative to the image root), ordered by plate, well and site.

    Raises
    ------
    ValueError
        If the run does not exist.
    """
    with session_scope(engine) as session:
        found = session.execute(
            select(Run.config_toml, Experiment.image_root)
            .join(Experiment, Experiment.id == Run.experiment_id)
            .where(Run.id == run_id)
        ).first()
        if found is None:
            raise ValueError(f"run {run_id} does not exist; see `phenoscreen status`.")
        fields = _completed_fields(session, run_id, Field.files)
    return found[0], found[1], fields


def read_field_qc(engine: Engine, run_id: int) -> pd.DataFrame:
    """Return the QC values and flags of a run's completed fields.

    Returns
    -------
    DataFrame
        ``field_id``, ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
        ``qc_flags`` and one column per QC value.
    """
    with session_scope(engine) as session:
        meta = _completed_fields(session, run_id, FieldResult.qc)
    values = pd.DataFrame(meta.pop("qc").tolist(), index=meta.index)
    return pd.concat([meta.drop(columns=["plate_id", "n_cells"]), values], axis=1)


def count_flagged_fields(engine: Engine, run_id: int) -> pd.DataFrame:
    """Return, per well with completed fields, how many QC flagged.

    Returns
    -------
    DataFrame
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_FlaggedFields``.
    """
    flagged = func.sum(case((FieldResult.qc_flags != "", 1), else_=0))
    with engine.connect() as connection:
        rows = connection.execute(
            select(Plate.name, Well.name, flagged)
            .join(Field, Field.id == FieldResult.field_id)
            .join(Well, Well.id == Field.well_id)
            .join(Plate, Plate.id == Well.plate_id)
            .where(FieldResult.run_id == run_id, FieldResult.status == "complete")
            .group_by(Plate.name, Well.name)
        ).all()
    return pd.DataFrame(
        [(a, b, int(c)) for a, b, c in rows],
        columns=["Metadata_Plate", "Metadata_Well", "Metadata_FlaggedFields"],
    )


def read_wells(engine: Engine, experiment_id: int) -> pd.DataFrame:
    """Return the plate-map metadata of every well of an experiment.

    Returns
    -------
    DataFrame
        ``well_id``, ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Compound``,
        ``Metadata_Concentration``, ``Metadata_ConcentrationUnit``, ``Metadata_Role``,
        ``Metadata_MoA``, ``Metadata_SMILES`` and the plate map's other columns;
        sorted by plate and well.
    """
    with session_scope(engine) as session:
        rows = session.execute(
            select(Well, Plate.name)
            .join(Plate, Well.plate_id == Plate.id)
            .where(Plate.experiment_id == experiment_id)
            .order_by(Plate.name, Well.row_index, Well.column_index)
        ).all()
    records = []
    for well, plate_name in rows:
        record = {
            "well_id": well.id,
            "Metadata_Plate": plate_name,
            "Metadata_Well": well.name,
        }
        record |= {key: getattr(well, column) for key, column in WELL_COLUMNS.items()}
        record |= well.extra
        records.append(record)
    columns = ["well_id", "Metadata_Plate", "Metadata_Well", *WELL_COLUMNS]
    wells = pd.DataFrame.from_records(records, columns=None if records else columns)
    wells["Metadata_Concentration"] = wells["Metadata_Concentration"].astype(float)
    return wells


def read_completed_field_counts(
    engine: Engine, run_id: int, *, include_flagged: bool = False
) -> pd.DataFrame:
    """Return, per well, how many of its fields this run completed (and passed QC).

    Returns
    -------
    DataFrame
        ``well_id``, ``Metadata_FieldCount``; wells without a completed field are
        absent.
    """
    with session_scope(engine) as session:
        rows = session.execute(
            select(Field.well_id, func.count())
            .join(FieldResult, FieldResult.field_id == Field.id)
            .where(FieldResult.run_id == run_id, FieldResult.status == "complete")
            .where(include_flagged or FieldResult.qc_flags == "")
            .group_by(Field.well_id)
        ).all()
    return pd.DataFrame(rows, columns=["well_id", "Metadata_FieldCount"])


def read_well_profile_vectors(
    engine: Engine, run_id: int, feature_set: str
) -> pd.DataFrame:
    """Return a run's imported per-well profiles.

    Returns
    -------
    DataFrame
        ``well_id``, ``Metadata_CellCount`` (NaN where the import gave none) and
        float32 feature columns named by the feature set.
    """
    feature_set_id, names = read_feature_set(engine, run_id, feature_set)
    with session_scope(engine) as session:
        rows = session.execute(
            select(WellProfile.well_id, WellProfile.cell_count, WellProfile.values)
            .where(WellProfile.feature_set_id == feature_set_id)
            .order_by(WellProfile.well_id)
        ).all()
    return _well_vector_frame(rows, names)


def _well_vector_frame(rows: Sequence[Row], names: list[str]) -> pd.DataFrame:
    """(well id, cell count, float32 bytes) rows -> well_id, count, features."""
    matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(
        len(rows), len(names)
    )
    meta = pd.DataFrame(
        {
            "well_id": [r[0] for r in rows],
            "Metadata_CellCount": np.array(
                [np.nan if r[1] is None else r[1] for r in rows], dtype=float
            ),
        }
    )
    return pd.concat([meta, pd.DataFrame(matrix, columns=names)], axis=1)


def read_well_aggregates(
    engine: Engine, run_id: int, feature_set: str, *, include_flagged: bool
) -> pd.DataFrame | None:
    """Return the cached per-well aggregates of a feature set, None when not cached.

    Returns
    -------
    DataFrame or None
        As `read_well_profile_vectors`: ``well_id``, ``Metadata_CellCount`` and the
        features, one row per well with cells; None also for a run without cells
        (nothing to cache).
    """
    feature_set_id, names = read_feature_set(engine, run_id, feature_set)
    with session_scope(engine) as session:
        rows = session.execute(
            select(WellAggregate.well_id, WellAggregate.cell_count,
                   WellAggregate.values)
            .where(WellAggregate.feature_set_id == feature_set_id,
                   WellAggregate.include_flagged == include_flagged)
            .order_by(WellAggregate.well_id)
        ).all()  # fmt: skip
    if not rows:
        return None
    return _well_vector_frame(rows, names)


def read_cached_tables(
    engine: Engine,
    run_id: int,
    feature_set: str,
    *,
    include_flagged: bool,
    names: Sequence[str],
) -> dict[str, pd.DataFrame] | None:
    """Return cached tables by name, or None unless every one of `names` is cached."""
    feature_set_id, _ = read_feature_set(engine, run_id, feature_set)
    with session_scope(engine) as session:
        rows = dict(
            session.execute(
                select(TableCache.name, TableCache.parquet).where(
                    TableCache.feature_set_id == feature_set_id,
                    TableCache.include_flagged == include_flagged,
                    TableCache.name.in_(list(names)),
                )
            ).all()
        )
    if set(rows) != set(names):
        return None
    return {name: pd.read_parquet(io.BytesIO(rows[name])) for name in names}


def read_field_masks(
    engine: Engine, run_id: int, field_ids: Iterable[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Return the stored (nuclei, cells) label images of several fields.

    Returns
    -------
    dict of int to (ndarray (Y, X), ndarray (Y, X))
        Only fields whose masks were stored (runs store them for every field).
    """
    ids = [int(i) for i in field_ids]
    with engine.connect() as connection:
        rows = connection.execute(
            select(FieldMask.field_id, FieldMask.height, FieldMask.width,
                   FieldMask.dtype, FieldMask.labels)
            .where(FieldMask.run_id == run_id, FieldMask.field_id.in_(ids))
        ).all()  # fmt: skip
    return {r.field_id: decode_masks(r._mapping) for r in rows}


#: Cells per chunk streamed by `iter_plate_cells` (whole wells; bounds memory).
CHUNK_CELLS = 50_000


def _cell_chunk(
    plate_name: str, rows: Sequence[Row], n_features: int, names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    columns = list(zip(*rows, strict=True))
    cells = pd.DataFrame(
        {
            "Metadata_Plate": plate_name,
            "Metadata_Well": columns[0],
            "Metadata_Site": columns[1],
            "Metadata_ObjectNumber": columns[2],
            "Metadata_CentroidY": columns[3],
            "Metadata_CentroidX": columns[4],
            "Metadata_AreaPx": columns[5],
            "well_id": columns[6],
        }
    )
    matrix = np.frombuffer(b"".join(columns[7]), dtype="<f4").reshape(
        len(rows), n_features
    )
    return cells, pd.DataFrame(matrix, columns=names)


def iter_plate_cells(
    engine: Engine,
    run_id: int,
    feature_set: str,
    *,
    include_flagged: bool = False,
    chunk_cells: int = CHUNK_CELLS,
    well_ids: Iterable[int] | None = None,
) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Stream a run's cells plate by plate in chunks of whole wells.

    Rows are fetched with a server-side cursor and cut at well boundaries, so
    memory is bounded by `chunk_cells` (or the largest well), not by the plate or the
    run. Fields flagged by QC are left out unless `include_flagged`.

    Parameters
    ----------
    engine : Engine
    run_id : int
    feature_set : str
    include_flagged : bool
    chunk_cells : int
        Cells fetched per database round trip; a chunk holds every cell of each of
        its wells and about this many cells.
    well_ids : iterable of int, optional
        Only the cells of these wells.

    Yields
    ------
    plate : str
    cells : DataFrame
        One row per cell, ordered by well, site and object number:
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
        ``Metadata_ObjectNumber``, ``Metadata_CentroidY``, ``Metadata_CentroidX``,
        ``Metadata_AreaPx``, ``well_id``. A well is never split across chunks.
    features : DataFrame
        Same rows; float32 columns named by the feature set.

    Raises
    ------
    ValueError
        If `chunk_cells` < 1 or the feature set does not exist.
    """
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells = {chunk_cells} must be >= 1.")
    feature_set_id, names = read_feature_set(engine, run_id, feature_set)
    with session_scope(engine) as session:
        plates = session.execute(
            select(Plate.id, Plate.name)
            .join(Run, Run.experiment_id == Plate.experiment_id)
            .where(Run.id == run_id)
            .order_by(Plate.name)
        ).all()
    for plate_id, plate_name in plates:
        stmt = (
            select(
                Well.name,
                Field.site,
                Cell.object_number,
                Cell.centroid_y,
                Cell.centroid_x,
                Cell.area_px,
                Well.id,
                CellVector.values,
            )
            .join(Field, Cell.field_id == Field.id)
            .join(Well, Field.well_id == Well.id)
            .join(
                FieldResult,
                (FieldResult.field_id == Cell.field_id)
                & (FieldResult.run_id == Cell.run_id),
            )
            .join(
                CellVector,
                (CellVector.cell_id == Cell.id)
                & (CellVector.feature_set_id == feature_set_id),
            )
            .where(Cell.run_id == run_id, Well.plate_id == plate_id)
            .where(FieldResult.status == "complete")
            .where(include_flagged or FieldResult.qc_flags == "")
            .order_by(Well.row_index, Well.column_index, Field.site, Cell.object_number)
        )
        if well_ids is not None:
            stmt = stmt.where(Well.id.in_([int(i) for i in well_ids]))
        pending: list[Row] = []
        with engine.connect() as connection:
            result = connection.execution_options(yield_per=chunk_cells).execute(stmt)
            for partition in result.partitions():
                pending.extend(partition)
                if len(pending) < chunk_cells:
                    continue
                last_well = pending[-1][6]
                cut = len(pending)
                while cut and pending[cut - 1][6] == last_well:
                    cut -= 1
                if cut:  # whole wells ready; the last well may go on
                    ready, pending = pending[:cut], pending[cut:]
                    yield plate_name, *_cell_chunk(plate_name, ready, len(names), names)
        if pending:
            yield plate_name, *_cell_chunk(plate_name, pending, len(names), names)


def read_phenotype_map(engine: Engine, run_id: int) -> pd.DataFrame:
    """Return a run's stored phenotype map (empty when none was made).

    Columns: `MAP_COLUMNS` and ``feature_set`` (what the map was computed from).
    """
    columns = [*MAP_COLUMNS, "feature_set"]
    with session_scope(engine) as session:
        rows = session.execute(
            select(*(getattr(PhenotypeMapPoint, c) for c in columns))
            .where(PhenotypeMapPoint.run_id == run_id)
            .order_by(PhenotypeMapPoint.id)
        ).all()
    return pd.DataFrame(rows, columns=columns)


def embedded_field_ids(engine: Engine, run_id: int, feature_set_id: int) -> set[int]:
    """Return the fields of a run whose cells already have vectors in a feature set."""
    with session_scope(engine) as session:
        return set(
            session.scalars(
                select(Cell.field_id)
                .join(CellVector, CellVector.cell_id == Cell.id)
                .where(
                    Cell.run_id == run_id, CellVector.feature_set_id == feature_set_id
                )
                .distinct()
            ).all()
        )


def iter_field_vectors(
    engine: Engine, run_id: int, feature_set: str, *, chunk_cells: int = CHUNK_CELLS
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Stream a feature set's vectors field by field (completed fields only).

    Yields
    ------
    field_id : int
    object_numbers : ndarray of shape (N,)
    vectors : ndarray of shape (N, F), float32
    """
    feature_set_id, names = read_feature_set(engine, run_id, feature_set)
    stmt = (
        select(Cell.field_id, Cell.object_number, CellVector.values)
        .join(CellVector, CellVector.cell_id == Cell.id)
        .where(Cell.run_id == run_id, CellVector.feature_set_id == feature_set_id)
        .order_by(Cell.field_id, Cell.object_number)
    )

    def field_of(rows: Sequence[Row]) -> tuple[int, np.ndarray, np.ndarray]:
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4")
        numbers = np.array([r[1] for r in rows])
        return int(rows[0][0]), numbers, vectors.reshape(len(rows), len(names))

    with engine.connect() as connection:
        result = connection.execution_options(yield_per=chunk_cells).execute(stmt)
        current: list[Row] = []
        for partition in result.partitions():
            for row in partition:
                if current and row[0] != current[0][0]:
                    yield field_of(current)
                    current = []
                current.append(row)
        if current:
            yield field_of(current)


def read_field_cells(
    engine: Engine, run_id: int, field_ids: Iterable[int]
) -> dict[int, pd.DataFrame]:
    """Return the stored cells of several fields in one query.

    Returns
    -------
    dict of int to DataFrame
        Field id -> ``object_number``, ``centroid_y``, ``centroid_x``, ``area_px``
        ordered by object number; an empty frame for a field without cells.
    """
    ids = [int(i) for i in field_ids]
    columns = ["object_number", "centroid_y", "centroid_x", "area_px"]
    with engine.connect() as connection:
        rows = connection.execute(
            select(Cell.field_id, Cell.object_number, Cell.centroid_y, Cell.centroid_x,
                   Cell.area_px)
            .where(Cell.run_id == run_id, Cell.field_id.in_(ids))
            .order_by(Cell.field_id, Cell.object_number)
        ).all()  # fmt: skip
    table = pd.DataFrame(rows, columns=["field_id", *columns])
    groups = dict(iter(table.groupby("field_id")[columns]))
    empty = pd.DataFrame(columns=columns)
    return {i: groups[i].reset_index(drop=True) if i in groups else empty for i in ids}
