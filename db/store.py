"""Bulk writes and streaming reads of the store.

Writes are bulk inserts (binary COPY on PostgreSQL, DB-API executemany on SQLite; no
per-row ORM objects), one transaction per unit of work: registering an experiment,
or one field's cells + vectors + result row. Reads stream plate by plate; nothing
loads all cells of an experiment.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)

from db.schema import (
    Cell,
    CellVector,
    Experiment,
    FeatureSet,
    Field,
    FieldMask,
    FieldResult,
    IlluminationFunction,
    ModelCheckpoint,
    PhenotypeMapPoint,
    Plate,
    Run,
    TableCache,
    TrainingEpoch,
    Well,
    WellAggregate,
    WellProfile,
    utcnow,
)
from db.session import session_scope
from pipeline.platemap import parse_well

logger = logging.getLogger(__name__)

CELL_COLUMNS = (
    "object_number",
    "centroid_y",
    "centroid_x",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_y",
    "bbox_max_x",
    "area_px",
)
_WELL_COLUMNS = {
    "Metadata_Compound": "compound",
    "Metadata_Concentration": "concentration",
    "Metadata_ConcentrationUnit": "concentration_unit",
    "Metadata_Role": "role",
    "Metadata_MoA": "moa",
    "Metadata_SMILES": "smiles",
}


def _none_if_nan(value: Any) -> Any:
    return (
        None
        if value is None or (isinstance(value, float) and np.isnan(value))
        else value
    )


def _well_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {
        column: _none_if_nan(record.get(key)) for key, column in _WELL_COLUMNS.items()
    }
    row["extra"] = {
        key: _none_if_nan(value)
        for key, value in record.items()
        if key.startswith("Metadata_")
        and key not in _WELL_COLUMNS
        and key not in ("Metadata_Plate", "Metadata_Well")
    }
    return row


def register_experiment(
    engine: Engine,
    *,
    name: str,
    image_root: str,
    channels: Mapping[str, str],
    wells: pd.DataFrame,
    fields: pd.DataFrame,
    plate_formats: Mapping[str, int],
) -> tuple[int, pd.DataFrame]:
    """Create or update an experiment's plates, wells and fields in one transaction.

    Well metadata is replaced by the plate map's (a corrected plate map takes effect
    on rerun); new wells and fields are added; nothing is deleted.

    Parameters
    ----------
    engine : Engine
    name : str
        Experiment name, unique in the store.
    image_root : str
        Absolute folder the field file names are relative to.
    channels : mapping of str to str
        Channel name -> token, saved for the record.
    wells : DataFrame
        From `pipeline.platemap.check_platemap_against_fields`.
    fields : DataFrame
        From `pipeline.io.discover_fields`.
    plate_formats : mapping of str to int
        Plate name -> 96, 384 or 1536.

    Returns
    -------
    experiment_id : int
    fields : DataFrame
        `fields` with ``field_id`` and ``plate_id`` columns, same row order.
    """
    file_columns = [c for c in fields.columns if c.startswith("FileName_")]
    with session_scope(engine) as session:
        experiment = session.scalar(select(Experiment).where(Experiment.name == name))
        if experiment is None:
            experiment = Experiment(
                name=name, image_root=image_root, channels=dict(channels)
            )
            session.add(experiment)
            session.flush()
        else:
            experiment.image_root = image_root
            experiment.channels = dict(channels)
        field_ids: dict[tuple[str, str, int], int] = {}
        plate_ids: dict[str, int] = {}
        for plate_name, plate_wells in wells.groupby("Metadata_Plate", sort=True):
            plate_id = session.scalar(
                select(Plate.id).where(
                    Plate.experiment_id == experiment.id, Plate.name == plate_name
                )
            )
            if plate_id is None:
                plate_id = session.scalar(
                    insert(Plate).returning(Plate.id),
                    [
                        {
                            "experiment_id": experiment.id,
                            "name": plate_name,
                            "plate_format": plate_formats[str(plate_name)],
                        }
                    ],
                )
            existing = dict(
                session.execute(
                    select(Well.name, Well.id).where(Well.plate_id == plate_id)
                ).all()
            )
            new_rows, changed_rows = [], []
            for record in plate_wells.to_dict("records"):
                row_index, column_index = parse_well(record["Metadata_Well"])
                row = _well_row(record) | {
                    "row_index": row_index,
                    "column_index": column_index,
                }
                if record["Metadata_Well"] in existing:
                    changed_rows.append(row | {"id": existing[record["Metadata_Well"]]})
                else:
                    new_rows.append(
                        row | {"plate_id": plate_id, "name": record["Metadata_Well"]}
                    )
            if new_rows:
                session.execute(insert(Well), new_rows)
            if changed_rows:
                session.execute(update(Well), changed_rows)
            well_ids = dict(
                session.execute(
                    select(Well.name, Well.id).where(Well.plate_id == plate_id)
                ).all()
            )
            plate_fields = fields[fields["Metadata_Plate"] == plate_name]
            known = {
                (well_id, site): field_id
                for well_id, site, field_id in session.execute(
                    select(Field.well_id, Field.site, Field.id)
                    .join(Well, Field.well_id == Well.id)
                    .where(Well.plate_id == plate_id)
                ).all()
            }
            new_fields, changed_fields = [], []
            for record in plate_fields.to_dict("records"):
                files = {c.removeprefix("FileName_"): record[c] for c in file_columns}
                key = (well_ids[record["Metadata_Well"]], int(record["Metadata_Site"]))
                if key in known:
                    changed_fields.append({"id": known[key], "files": files})
                else:
                    new_fields.append(
                        {"well_id": key[0], "site": key[1], "files": files}
                    )
            if new_fields:
                session.execute(insert(Field), new_fields)
            if changed_fields:
                session.execute(update(Field), changed_fields)
            by_name = {v: k for k, v in well_ids.items()}
            for well_id, site, field_id in session.execute(
                select(Field.well_id, Field.site, Field.id)
                .join(Well, Field.well_id == Well.id)
                .where(Well.plate_id == plate_id)
            ).all():
                field_ids[(str(plate_name), by_name[well_id], site)] = field_id
            plate_ids[str(plate_name)] = plate_id
    keys = zip(
        fields["Metadata_Plate"].astype(str),
        fields["Metadata_Well"],
        fields["Metadata_Site"].astype(int),
        strict=True,
    )
    return experiment.id, fields.assign(
        field_id=[field_ids[key] for key in keys],
        plate_id=fields["Metadata_Plate"].astype(str).map(plate_ids),
    )


def open_run(
    engine: Engine,
    *,
    experiment_id: int,
    analysis_key: str,
    config_toml: str,
    segmenter: str,
    versions: Mapping[str, str],
) -> tuple[int, bool]:
    """Return the run of this experiment and analysis key, creating it if new.

    Returns
    -------
    run_id : int
    resumed : bool
        True when the run existed (a rerun resumes it).
    """
    with session_scope(engine) as session:
        run = session.scalar(
            select(Run).where(
                Run.experiment_id == experiment_id, Run.analysis_key == analysis_key
            )
        )
        resumed = run is not None
        if run is None:
            run = Run(
                experiment_id=experiment_id,
                analysis_key=analysis_key,
                config_toml=config_toml,
                segmenter=segmenter,
                versions=dict(versions),
                timings={},
                status="running",
            )
            session.add(run)
            session.flush()
        else:
            run.status, run.message, run.config_toml = "running", None, config_toml
            run.versions = dict(versions)
        return run.id, resumed


def ensure_feature_set(
    engine: Engine,
    *,
    run_id: int,
    name: str,
    kind: str,
    feature_names: list[str],
    config: Mapping[str, Any],
    model_name: str | None = None,
    weights: str | None = None,
) -> int:
    """Return the id of a run's feature set, creating it if new.

    Raises
    ------
    ValueError
        If the set exists with other feature names (the run's code changed).
    """
    with session_scope(engine) as session:
        existing = session.scalar(
            select(FeatureSet).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        )
        if existing is not None:
            if list(existing.feature_names) != list(feature_names):
                raise ValueError(
                    f"feature set {name!r} of run {run_id} was stored with other feature "
                    "names; results of different code versions cannot be mixed. Use a new "
                    "database or experiment name."
                )
            return existing.id
        return session.scalar(
            insert(FeatureSet).returning(FeatureSet.id),
            [
                {
                    "run_id": run_id,
                    "name": name,
                    "kind": kind,
                    "feature_names": list(feature_names),
                    "config": dict(config),
                    "model_name": model_name,
                    "weights": weights,
                }
            ],
        )


def completed_field_ids(engine: Engine, run_id: int) -> set[int]:
    """Return the ids of the fields this run has finished successfully."""
    with session_scope(engine) as session:
        return set(
            session.scalars(
                select(FieldResult.field_id).where(
                    FieldResult.run_id == run_id, FieldResult.status == "complete"
                )
            )
        )


def _drop_aggregates(session: Any, run_id: int) -> None:
    """Forget a run's cached aggregates and tables (its cells, vectors or flags change)."""
    for table in (WellAggregate, TableCache):
        session.execute(delete(table).where(table.run_id == run_id))


def _clear_field(session: Any, run_id: int, field_id: int) -> None:
    for table in (FieldResult, FieldMask, Cell):
        session.execute(
            delete(table).where(table.run_id == run_id, table.field_id == field_id)
        )
    _drop_aggregates(session, run_id)


def encode_masks(nuclei: np.ndarray, cells: np.ndarray) -> dict[str, Any]:
    """Pack a field's nucleus and cell labels for `write_field_cells`.

    Parameters
    ----------
    nuclei, cells : ndarray of shape (Y, X), integer
        Instance labels (0 = background) of the same field.

    Returns
    -------
    dict
        ``height``, ``width``, ``dtype`` (uint16 when labels fit, else uint32) and
        ``labels``: zlib bytes of the (2, Y, X) stack.

    Raises
    ------
    ValueError
        If the shapes differ, are not 2-D, or a label is negative.
    """
    nuclei, cells = np.asarray(nuclei), np.asarray(cells)
    if nuclei.ndim != 2 or nuclei.shape != cells.shape:
        raise ValueError(
            f"nuclei {nuclei.shape} and cells {cells.shape} must be 2-D label images "
            "of the same shape."
        )
    stack = np.stack([nuclei, cells])
    if stack.size and stack.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background).")
    dtype = "<u2" if not stack.size or stack.max() < 2**16 else "<u4"
    return {
        "height": int(stack.shape[1]),
        "width": int(stack.shape[2]),
        "dtype": dtype,
        "labels": zlib.compress(np.ascontiguousarray(stack, dtype=dtype).tobytes(), 1),
    }


def decode_masks(packed: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Unpack `encode_masks` output into (nuclei, cells), each of shape (Y, X)."""
    shape = (2, int(packed["height"]), int(packed["width"]))
    stack = np.frombuffer(zlib.decompress(packed["labels"]), dtype=packed["dtype"])
    return tuple(stack.reshape(shape))  # type: ignore[return-value]


def _allocate_cell_ids(connection: Connection, n: int) -> list[int]:
    """Reserve `n` consecutive-or-not cell ids inside the current write transaction.

    PostgreSQL draws them from the id sequence (safe with concurrent writers); SQLite
    continues after the largest id, which is safe because the caller already holds
    the database's write lock.
    """
    if connection.dialect.name == "postgresql":
        return list(
            connection.scalars(
                text(
                    "SELECT nextval(pg_get_serial_sequence('cell', 'id')) "
                    "FROM generate_series(1, :n)"
                ),
                {"n": n},
            )
        )
    start = connection.scalar(select(func.coalesce(func.max(Cell.id), 0)))
    return list(range(start + 1, start + n + 1))


def _copy_rows(
    connection: Connection, table: Table, columns: list[str], rows: Iterable[tuple]
) -> None:
    """Bulk-insert rows: binary COPY on PostgreSQL, the driver's executemany on SQLite.

    Binary COPY sends numbers and bytes as they are (text COPY would spell every
    float and hex-encode every vector); its column types are read from the server,
    so they match the table exactly. SQLite gets plain tuples through the DB-API
    ``executemany``, without SQLAlchemy's per-row parameter handling. Other
    databases get SQLAlchemy's generic insert.
    """
    quote = connection.dialect.identifier_preparer.quote
    target = f"{quote(table.name)} ({', '.join(quote(c) for c in columns)})"
    if connection.dialect.name == "postgresql":
        with connection.connection.driver_connection.cursor() as cursor:
            types = dict(
                cursor.execute(
                    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                    (table.name,),
                ).fetchall()
            )
            with cursor.copy(f"COPY {target} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([types[c] for c in columns])
                for row in rows:
                    copy.write_row(row)
        return
    rows = list(rows)
    if not rows:
        return
    if connection.dialect.name == "sqlite":
        marks = ", ".join("?" * len(columns))
        connection.exec_driver_sql(f"INSERT INTO {target} VALUES ({marks})", rows)
        return
    connection.execute(
        insert(table), [dict(zip(columns, row, strict=True)) for row in rows]
    )


def write_field_cells(
    engine: Engine,
    *,
    run_id: int,
    field_id: int,
    feature_set_id: int,
    cells: pd.DataFrame,
    features: np.ndarray,
    qc: Mapping[str, Any],
    seconds: Mapping[str, float],
    masks: Mapping[str, Any] | None = None,
) -> None:
    """Write one field's cells, vectors, masks and result row in one transaction.

    Parameters
    ----------
    engine : Engine
    run_id, field_id, feature_set_id : int
    cells : DataFrame
        `CELL_COLUMNS`, one row per cell.
    features : ndarray of shape (N, F)
        Row i belongs to ``cells.iloc[i]``; stored as float32 bytes.
    qc : mapping
        Per-field QC values (JSON-serializable).
    seconds : mapping of str to float
        Time per step for this field.
    masks : mapping or None
        The field's labels as `encode_masks` packs them.

    Raises
    ------
    ValueError
        If `cells` and `features` differ in length or `cells` lacks columns.
    """
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise ValueError(f"cells lacks columns {missing}.")
    if len(cells) != len(features):
        raise ValueError(
            f"cells has {len(cells)} rows but features has {len(features)}; they must "
            "describe the same cells in the same order."
        )
    vectors = np.ascontiguousarray(features, dtype="<f4")
    n_cells = len(cells)
    columns = [cells[c].to_numpy().tolist() for c in CELL_COLUMNS]  # Python scalars
    with session_scope(engine) as session:
        _clear_field(session, run_id, field_id)  # also takes SQLite's write lock
        if n_cells:
            connection = session.connection()
            cell_ids = _allocate_cell_ids(connection, n_cells)
            _copy_rows(
                connection,
                Cell.__table__,
                ["id", "run_id", "field_id", *CELL_COLUMNS],
                zip(
                    cell_ids,
                    [run_id] * n_cells,
                    [field_id] * n_cells,
                    *columns,
                    strict=True,
                ),
            )
            _copy_rows(
                connection,
                CellVector.__table__,
                ["cell_id", "feature_set_id", "values"],
                (
                    (i, feature_set_id, v.tobytes())
                    for i, v in zip(cell_ids, vectors, strict=True)
                ),
            )
        if masks is not None:
            session.execute(
                insert(FieldMask),
                [{"run_id": run_id, "field_id": field_id, **dict(masks)}],
            )
        session.execute(
            insert(FieldResult),
            [
                {
                    "run_id": run_id,
                    "field_id": field_id,
                    "status": "complete",
                    "n_cells": n_cells,
                    "qc": dict(qc),
                    "seconds": dict(seconds),
                }
            ],
        )


def write_field_failure(
    engine: Engine, *, run_id: int, field_id: int, error: str
) -> None:
    """Record that a field could not be processed (its cells are removed)."""
    with session_scope(engine) as session:
        _clear_field(session, run_id, field_id)
        session.execute(
            insert(FieldResult),
            [
                {
                    "run_id": run_id,
                    "field_id": field_id,
                    "status": "failed",
                    "error": error,
                    "n_cells": 0,
                    "qc": {},
                    "seconds": {},
                }
            ],
        )


def write_illumination(
    engine: Engine,
    *,
    run_id: int,
    plate_id: int,
    channel_names: list[str],
    functions: np.ndarray,
    n_fields: int,
) -> None:
    """Store one plate's illumination functions, shape (C, h, w), in one transaction."""
    if functions.ndim != 3 or functions.shape[0] != len(channel_names):
        raise ValueError(
            f"functions has shape {functions.shape}; expected (C, h, w) with C = "
            f"{len(channel_names)} channels."
        )
    with session_scope(engine) as session:
        session.execute(
            delete(IlluminationFunction).where(
                IlluminationFunction.run_id == run_id,
                IlluminationFunction.plate_id == plate_id,
            )
        )
        session.execute(
            insert(IlluminationFunction),
            [
                {
                    "run_id": run_id,
                    "plate_id": plate_id,
                    "channel": name,
                    "height": plane.shape[0],
                    "width": plane.shape[1],
                    "n_fields": n_fields,
                    "values": np.ascontiguousarray(plane, dtype="<f4").tobytes(),
                }
                for name, plane in zip(channel_names, functions, strict=True)
            ],
        )


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


def write_field_flags(engine: Engine, run_id: int, flags: pd.Series) -> None:
    """Set the QC flags of a run's fields (index: field id) in one transaction."""
    with session_scope(engine) as session:
        _drop_aggregates(session, run_id)
        session.execute(
            update(FieldResult).where(FieldResult.run_id == run_id).values(qc_flags="")
        )
        flagged = flags[flags.astype(bool)]
        for field_id, value in flagged.items():
            session.execute(
                update(FieldResult)
                .where(
                    FieldResult.run_id == run_id, FieldResult.field_id == int(field_id)
                )
                .values(qc_flags=str(value))
            )


def finish_run(
    engine: Engine,
    run_id: int,
    *,
    status: str,
    message: str | None,
    timings: Mapping[str, Any],
) -> None:
    """Set a run's final status, message and timings."""
    with session_scope(engine) as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(
                status=status,
                message=message,
                timings=dict(timings),
                finished_at=utcnow(),
            )
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
        record |= {key: getattr(well, column) for key, column in _WELL_COLUMNS.items()}
        record |= well.extra
        records.append(record)
    columns = ["well_id", "Metadata_Plate", "Metadata_Well", *_WELL_COLUMNS]
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


def read_feature_set(engine: Engine, run_id: int, name: str) -> tuple[int, list[str]]:
    """Return the id and feature names of a run's feature set.

    Raises
    ------
    ValueError
        If the run has no feature set of that name; the message lists those it has.
    """
    with session_scope(engine) as session:
        found = session.execute(
            select(FeatureSet.id, FeatureSet.feature_names).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        ).first()
        if found is None:
            names = session.scalars(
                select(FeatureSet.name).where(FeatureSet.run_id == run_id)
            ).all()
            raise ValueError(
                f"run {run_id} has no feature set {name!r}; it has {', '.join(names) or 'none'}."
            )
        return found[0], list(found[1])


#: Feature-set kind of imported per-well profiles (stored in ``well_profile``).
WELL_PROFILE_KIND = "imported_wells"


#: Feature-set names that stand for the run's latest set of a kind.
FEATURE_SET_ALIASES = {"deep": "embedding", "combined": "combined"}


def resolve_feature_set(
    engine: Engine, run_id: int, name: str | None = None
) -> tuple[str, str]:
    """Return the name and kind of a run's feature set (None: its default one).

    The default is ``classical`` when the run has it, else its first feature set
    (an imported run has only its own). ``deep`` is the run's latest CNN
    embedding, ``combined`` its latest combined (classical + embedding) set.

    Raises
    ------
    ValueError
        If the run has no feature set of that name, or none at all (the message
        lists the available ones).
    """
    with session_scope(engine) as session:
        sets = session.execute(
            select(FeatureSet.name, FeatureSet.kind)
            .where(FeatureSet.run_id == run_id)
            .order_by(FeatureSet.id)
        ).all()
    kinds = dict(sets)
    available = [
        *kinds,
        *(a for a, k in FEATURE_SET_ALIASES.items() if k in kinds.values()),
    ]
    if name is None:
        if not sets:
            raise ValueError(f"run {run_id} has no feature set yet.")
        name = "classical" if "classical" in kinds else sets[0][0]
    elif name in FEATURE_SET_ALIASES and name not in kinds:
        latest = [n for n, k in sets if k == FEATURE_SET_ALIASES[name]]
        if not latest:
            raise ValueError(
                f"run {run_id} has no {name} feature set; it has "
                f"{', '.join(available) or 'none'}. Embed the run first "
                "(phenoscreen embed, or phenoscreen run --embed)."
            )
        name = latest[-1]
    if name not in kinds:
        raise ValueError(
            f"run {run_id} has no feature set {name!r}; it has "
            f"{', '.join(available) or 'none'}."
        )
    return name, kinds[name]


def read_feature_set_config(
    engine: Engine, run_id: int, name: str
) -> tuple[str, dict[str, Any]]:
    """Return the kind and the config (recipe) a run's feature set was made with.

    Raises
    ------
    ValueError
        If the run has no feature set of that name.
    """
    with session_scope(engine) as session:
        found = session.execute(
            select(FeatureSet.kind, FeatureSet.config).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        ).first()
    if found is None:
        raise ValueError(f"run {run_id} has no feature set {name!r}.")
    return found[0], dict(found[1])


def write_well_profiles(
    engine: Engine,
    *,
    run_id: int,
    feature_set_id: int,
    field_ids: Sequence[int],
    well_ids: Sequence[int],
    cell_counts: Sequence[int | None],
    values: np.ndarray,
) -> None:
    """Write imported per-well profiles and their fields' results in one transaction.

    Parameters
    ----------
    engine : Engine
    run_id, feature_set_id : int
    field_ids, well_ids : sequence of int
        The well of each profile and the one field that stands for it.
    cell_counts : sequence of int or None
        Cells behind each profile, when the import says.
    values : ndarray of shape (W, F)
        Row i is the profile of ``well_ids[i]``; stored as float32 bytes.

    Raises
    ------
    ValueError
        If the lengths differ.
    """
    lengths = {len(field_ids), len(well_ids), len(cell_counts), len(values)}
    if len(lengths) != 1:
        raise ValueError(
            "field_ids, well_ids, cell_counts and values differ in length."
        )
    vectors = np.ascontiguousarray(values, dtype="<f4")
    counts = [None if c is None else int(c) for c in cell_counts]
    with session_scope(engine) as session:
        _drop_aggregates(session, run_id)
        session.execute(
            delete(WellProfile).where(WellProfile.feature_set_id == feature_set_id)
        )
        session.execute(delete(FieldResult).where(FieldResult.run_id == run_id))
        if not len(vectors):
            return
        session.execute(
            insert(WellProfile),
            [
                {"run_id": run_id, "feature_set_id": feature_set_id,
                 "well_id": int(w), "cell_count": c, "values": v.tobytes()}
                for w, c, v in zip(well_ids, counts, vectors, strict=True)
            ],
        )  # fmt: skip
        session.execute(
            insert(FieldResult),
            [
                {"run_id": run_id, "field_id": int(f), "status": "complete",
                 "n_cells": c or 0, "qc": {}, "seconds": {}}
                for f, c in zip(field_ids, counts, strict=True)
            ],
        )  # fmt: skip


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


def write_well_aggregates(
    engine: Engine,
    run_id: int,
    feature_set: str,
    *,
    include_flagged: bool,
    profiles: pd.DataFrame,
) -> bool:
    """Cache per-well aggregates of a complete run in one transaction.

    Any later write to the run's cells, vectors or QC flags drops the cache. A
    run that is not complete is not cached (its fields are still changing).

    Parameters
    ----------
    engine : Engine
    run_id : int
    feature_set : str
    include_flagged : bool
        Whether QC-flagged fields were aggregated too.
    profiles : DataFrame
        ``well_id``, ``Metadata_CellCount`` and the feature set's columns, in its
        order.

    Returns
    -------
    bool
        Whether the aggregates were cached.

    Raises
    ------
    ValueError
        If `profiles` lacks a column.
    """
    feature_set_id, names = read_feature_set(engine, run_id, feature_set)
    missing = [c for c in ("well_id", "Metadata_CellCount", *names)
               if c not in profiles.columns]  # fmt: skip
    if missing:
        raise ValueError(f"profiles lacks columns {missing[:5]}.")
    values = np.ascontiguousarray(profiles[names].to_numpy(np.float32), dtype="<f4")
    with session_scope(engine) as session:
        if session.scalar(select(Run.status).where(Run.id == run_id)) != "complete":
            return False
        session.execute(
            delete(WellAggregate).where(
                WellAggregate.feature_set_id == feature_set_id,
                WellAggregate.include_flagged == include_flagged,
            )
        )
        if len(values):
            session.execute(
                insert(WellAggregate),
                [
                    {"run_id": run_id, "feature_set_id": feature_set_id,
                     "include_flagged": include_flagged, "well_id": int(w),
                     "cell_count": int(c), "values": v.tobytes()}
                    for w, c, v in zip(profiles["well_id"],
                                       profiles["Metadata_CellCount"], values,
                                       strict=True)
                ],
            )  # fmt: skip
    return True


def write_cached_tables(
    engine: Engine,
    run_id: int,
    feature_set: str,
    *,
    include_flagged: bool,
    tables: Mapping[str, pd.DataFrame],
) -> bool:
    """Cache tables computed from a complete run's well profiles, in one transaction.

    Stored as Parquet; dropped, like the well aggregates, by any later write to the
    run's cells, vectors, flags or imported profiles. A run that is not complete
    is not cached.

    Returns
    -------
    bool
        Whether the tables were cached.

    Raises
    ------
    ValueError
        If a table name is longer than 50 characters.
    """
    feature_set_id, _ = read_feature_set(engine, run_id, feature_set)
    if any(len(name) > 50 for name in tables):
        raise ValueError(f"table names {list(tables)} must be at most 50 characters.")
    payloads = {}
    for name, table in tables.items():
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        payloads[name] = buffer.getvalue()
    with session_scope(engine) as session:
        if session.scalar(select(Run.status).where(Run.id == run_id)) != "complete":
            return False
        session.execute(
            delete(TableCache).where(
                TableCache.feature_set_id == feature_set_id,
                TableCache.include_flagged == include_flagged,
                TableCache.name.in_(list(payloads)),
            )
        )
        session.execute(
            insert(TableCache),
            [{"run_id": run_id, "feature_set_id": feature_set_id,
              "include_flagged": include_flagged, "name": name, "parquet": payload}
             for name, payload in payloads.items()],
        )  # fmt: skip
    return True


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


def summarize_runs(engine: Engine) -> pd.DataFrame:
    """Return one row per run: experiment, status, fields done/failed/total, cells.

    Returns
    -------
    DataFrame
        ``run_id``, ``experiment``, ``status``, ``n_fields``, ``n_complete``,
        ``n_failed``, ``n_cells``, ``created_at``, ``finished_at``, ``message``,
        ``fields_per_s``.
    """
    with session_scope(engine) as session:
        runs = session.execute(
            select(Run, Experiment.name).join(Experiment).order_by(Run.id)
        ).all()
        totals = dict(
            session.execute(
                select(Plate.experiment_id, func.count(Field.id))
                .join(Well, Well.plate_id == Plate.id)
                .join(Field, Field.well_id == Well.id)
                .group_by(Plate.experiment_id)
            ).all()
        )
        counts = {
            (run_id, status): (n, cells)
            for run_id, status, n, cells in session.execute(
                select(
                    FieldResult.run_id,
                    FieldResult.status,
                    func.count(),
                    func.coalesce(func.sum(FieldResult.n_cells), 0),
                ).group_by(FieldResult.run_id, FieldResult.status)
            ).all()
        }
    records = []
    for run, experiment_name in runs:
        complete, n_cells = counts.get((run.id, "complete"), (0, 0))
        records.append(
            {
                "run_id": run.id,
                "experiment": experiment_name,
                "status": run.status,
                "n_fields": totals.get(run.experiment_id, 0),
                "n_complete": complete,
                "n_failed": counts.get((run.id, "failed"), (0, 0))[0],
                "n_cells": int(n_cells),
                "fields_per_s": run.timings.get("fields_per_s"),
                "created_at": run.created_at,
                "finished_at": run.finished_at,
                "message": run.message,
            }
        )
    return pd.DataFrame.from_records(records)


def resolve_run(engine: Engine, run_id: int | None = None) -> tuple[int, int]:
    """Return (run_id, experiment_id): the given run, or the latest complete one.

    Raises
    ------
    ValueError
        If the run does not exist, or no run is complete; the message lists runs.
    """
    with session_scope(engine) as session:
        runs = session.execute(
            select(Run.id, Run.experiment_id, Run.status).order_by(Run.id)
        ).all()
    listing = ", ".join(f"{r} ({s})" for r, _, s in runs) or "none"
    if run_id is not None:
        for rid, experiment_id, _ in runs:
            if rid == run_id:
                return rid, experiment_id
        raise ValueError(f"run {run_id} does not exist; runs: {listing}.")
    complete = [(rid, eid) for rid, eid, status in runs if status == "complete"]
    if not complete:
        raise ValueError(
            f"no complete run in the store (runs: {listing}); run a plate first."
        )
    return complete[-1]


MAP_COLUMNS = (
    "level", "label", "plate", "well", "compound", "concentration", "role", "moa",
    "activity", "umap_x", "umap_y", "cluster",
)  # fmt: skip


def write_phenotype_map(
    engine: Engine, run_id: int, points: pd.DataFrame, *, feature_set: str | None = None
) -> None:
    """Replace a run's stored phenotype map in one transaction.

    `feature_set` names the feature set the map was computed from (stored with
    every point, read back as the ``feature_set`` column).

    Raises
    ------
    ValueError
        If `points` lacks a column of `MAP_COLUMNS`.
    """
    missing = [c for c in MAP_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"points lacks columns {missing}.")
    records = [
        {key: _none_if_nan(value) for key, value in record.items()}
        for record in points[list(MAP_COLUMNS)].astype(object).to_dict("records")
    ]
    with session_scope(engine) as session:
        session.execute(
            delete(PhenotypeMapPoint).where(PhenotypeMapPoint.run_id == run_id)
        )
        if records:
            session.execute(
                insert(PhenotypeMapPoint),
                [r | {"run_id": run_id, "feature_set": feature_set} for r in records],
            )


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


def write_field_vectors(
    engine: Engine,
    *,
    run_id: int,
    field_id: int,
    feature_set_id: int,
    object_numbers: np.ndarray,
    vectors: np.ndarray,
) -> None:
    """Store one field's vectors of a feature set for its existing cells, atomically.

    Raises
    ------
    ValueError
        If the lengths differ or an object number has no stored cell (the run's
        cells and the vectors would not line up).
    """
    if len(object_numbers) != len(vectors):
        raise ValueError(
            f"{len(object_numbers)} object numbers but {len(vectors)} vectors."
        )
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    with session_scope(engine) as session:
        ids = dict(
            session.execute(
                select(Cell.object_number, Cell.id).where(
                    Cell.run_id == run_id, Cell.field_id == field_id
                )
            ).all()
        )
        missing = [int(k) for k in object_numbers if int(k) not in ids]
        if missing or len(ids) != len(object_numbers):
            raise ValueError(
                f"field {field_id}: {len(object_numbers)} objects to embed but "
                f"{len(ids)} stored cells (missing {missing[:5]}); rerun the field."
            )
        cell_ids = [ids[int(k)] for k in object_numbers]
        _drop_aggregates(session, run_id)
        session.execute(
            delete(CellVector).where(
                CellVector.feature_set_id == feature_set_id,
                CellVector.cell_id.in_(cell_ids),
            )
        )
        if cell_ids:
            _copy_rows(
                session.connection(),
                CellVector.__table__,
                ["cell_id", "feature_set_id", "values"],
                (
                    (i, feature_set_id, v.tobytes())
                    for i, v in zip(cell_ids, rows, strict=True)
                ),
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


#: Columns of a training log (`register_checkpoint`, `read_training_log`).
TRAINING_LOG_COLUMNS = (
    "epoch", "phase", "train_loss", "val_loss", "val_accuracy", "learning_rate",
    "seconds",
)  # fmt: skip


def register_checkpoint(
    engine: Engine,
    *,
    run_id: int,
    model_name: str,
    path: str,
    sha256: str,
    config: Mapping[str, Any],
    classes: Sequence[str],
    metrics: Mapping[str, Any],
    log: pd.DataFrame,
) -> int:
    """Record a fine-tuned checkpoint and its per-epoch log in one transaction.

    Parameters
    ----------
    engine : Engine
    run_id : int
        The run whose cells trained it.
    model_name, path, sha256 : str
    config, metrics : mapping
        JSON-serializable.
    classes : sequence of str
        The labels, in the order of the network's outputs.
    log : DataFrame
        One row per epoch with `TRAINING_LOG_COLUMNS`.

    Returns
    -------
    int
        The checkpoint id.

    Raises
    ------
    ValueError
        If `log` lacks a column.
    """
    missing = [c for c in TRAINING_LOG_COLUMNS if c not in log.columns]
    if missing:
        raise ValueError(f"log lacks columns {missing}.")
    with session_scope(engine) as session:
        checkpoint_id = session.scalar(
            insert(ModelCheckpoint).returning(ModelCheckpoint.id),
            [
                {"run_id": run_id, "model_name": model_name, "path": path,
                 "sha256": sha256, "config": dict(config), "classes": list(classes),
                 "metrics": dict(metrics)}
            ],
        )  # fmt: skip
        if len(log):
            rows = log[list(TRAINING_LOG_COLUMNS)].astype(object).to_dict("records")
            session.execute(
                insert(TrainingEpoch),
                [r | {"checkpoint_id": checkpoint_id} for r in rows],
            )
    return checkpoint_id


def read_training_log(engine: Engine, checkpoint_id: int) -> pd.DataFrame:
    """Return a checkpoint's per-epoch training log (`TRAINING_LOG_COLUMNS`)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(*(getattr(TrainingEpoch, c) for c in TRAINING_LOG_COLUMNS))
            .where(TrainingEpoch.checkpoint_id == checkpoint_id)
            .order_by(TrainingEpoch.epoch)
        ).all()
    return pd.DataFrame(rows, columns=list(TRAINING_LOG_COLUMNS))


def read_run_provenance(engine: Engine, run_id: int) -> dict[str, Any]:
    """Return what made a run's results: config, versions and feature sets.

    Returns
    -------
    dict
        ``config_toml``, ``analysis_key``, ``versions``, ``segmenter``, ``status``,
        ``timings`` and ``feature_sets`` (DataFrame: ``name``, ``kind``,
        ``n_features``, ``model_name``, ``weights``).

    Raises
    ------
    ValueError
        If the run does not exist.
    """
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"run {run_id} does not exist.")
        sets = session.execute(
            select(FeatureSet.name, FeatureSet.kind, FeatureSet.feature_names,
                   FeatureSet.model_name, FeatureSet.weights)
            .where(FeatureSet.run_id == run_id).order_by(FeatureSet.id)
        ).all()  # fmt: skip
        return {
            "config_toml": run.config_toml,
            "analysis_key": run.analysis_key,
            "versions": dict(run.versions),
            "segmenter": run.segmenter,
            "status": run.status,
            "timings": dict(run.timings),
            "feature_sets": pd.DataFrame(
                [(n, k, len(f), m, w) for n, k, f, m, w in sets],
                columns=["name", "kind", "n_features", "model_name", "weights"],
            ),
        }
