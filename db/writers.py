"""Bulk writes of the store, one transaction per unit of work.

Bulk inserts (binary COPY on PostgreSQL, DB-API executemany on SQLite; no per-row
ORM objects): fields' cells + vectors + masks + result rows, fields' embedding
vectors (a field, or a group of them, `FieldBatches`, per transaction), well
aggregates and profiles, cached tables, the phenotype map.
"""

from __future__ import annotations

import io
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    delete,
    func,
    insert,
    select,
    text,
    update,
)

from db.runs import read_feature_set
from db.schema import (
    CELL_COLUMNS,
    MAP_COLUMNS,
    Cell,
    CellVector,
    FeatureSet,
    Field,
    FieldMask,
    FieldResult,
    IlluminationFunction,
    PhenotypeMapPoint,
    Run,
    TableCache,
    WellAggregate,
    WellProfile,
    none_if_nan,
)
from db.session import session_scope

#: Field ids per ``IN (...)`` list of one statement (SQLite 3.32+ allows 32,766
#: variables).
_IN_LIST = 10_000


class FieldBatches:
    """Group a stream of finished fields into transactions.

    A field is committed together with the fields waiting before it as soon as no
    other finished field is ready to join them, the group has waited `every_s`
    seconds (since its first field) or it holds `max_cells` cells. A slow stream
    commits each field as it comes; a fast one (many workers, a GPU), whose fields
    queue up, writes fewer and larger transactions (`write_fields_cells`,
    `write_fields_vectors`); a process killed mid-stream loses at most the fields
    of `every_s` seconds.

    Parameters
    ----------
    max_cells : int
        Cells a group may hold before it is committed, >= 1.
    every_s : float
        Seconds a group may wait for more fields, >= 0 (0: no waiting).

    Raises
    ------
    ValueError
        If `max_cells` < 1 or `every_s` < 0.
    """

    def __init__(self, max_cells: int = 20_000, every_s: float = 1.0) -> None:
        if max_cells < 1 or every_s < 0:
            raise ValueError(
                f"max_cells {max_cells} must be >= 1 and every_s {every_s} >= 0."
            )
        self.max_cells, self.every_s = max_cells, every_s
        self._items: list[Any] = []
        self._cells = 0
        self._since = 0.0

    def add(self, item: Any, n_cells: int, *, more_ready: bool = False) -> list[Any]:
        """Add a finished field; return the group to commit now (empty: not yet).

        `more_ready`: another finished field is waiting to be added at once.
        """
        if not self._items:
            self._since = time.monotonic()
        self._items.append(item)
        self._cells += n_cells
        due = (
            not more_ready
            or self._cells >= self.max_cells
            or time.monotonic() - self._since >= self.every_s
        )
        return self.take() if due else []

    def take(self) -> list[Any]:
        """Return and forget the waiting fields (to commit them, e.g. at the end)."""
        items, self._items, self._cells = self._items, [], 0
        return items


def _drop_aggregates(session: Any, run_id: int) -> None:
    """Forget a run's cached aggregates and tables (its cells, vectors or flags change)."""
    for table in (WellAggregate, TableCache):
        session.execute(delete(table).where(table.run_id == run_id))


def _clear_fields(session: Any, run_id: int, field_ids: Sequence[int]) -> None:
    """Delete the fields' results, masks and cells, and so their cells' vectors.

    The vectors go by the triggers of `db.schema.CELL_CASCADES` (in stores made
    before 2026-12-06, by their foreign keys' cascades). The run's cached aggregates
    are dropped first: every writer locks them before cells, so that a field rerun
    and a vector write of the same run wait for each other instead of deadlocking.
    """
    _drop_aggregates(session, run_id)
    for start in range(0, len(field_ids), _IN_LIST):
        chunk = list(field_ids[start : start + _IN_LIST])
        for table in (FieldResult, FieldMask, Cell):
            session.execute(
                delete(table).where(table.run_id == run_id, table.field_id.in_(chunk))
            )


def _check_parents(
    session: Any, *, run_id: int, feature_set_id: int, field_ids: Sequence[int] = ()
) -> None:
    """Raise ValueError unless the run, its feature set and the fields are stored.

    Once per transaction, for the per-cell tables, which have no foreign keys (see
    `db.schema.Cell`). On PostgreSQL the rows found are locked as foreign-key
    checks lock them (``FOR KEY SHARE``): deleting them waits for this transaction,
    then deletes what it wrote (`db.schema.CELL_CASCADES`).
    """
    run = session.scalar(
        select(Run.id)
        .where(Run.id == run_id)
        .with_for_update(read=True, key_share=True)
    )
    if run is None:
        raise ValueError(f"run {run_id} is not in the store; start the run first.")
    owner = session.scalar(
        select(FeatureSet.run_id)
        .where(FeatureSet.id == feature_set_id)
        .with_for_update(read=True, key_share=True)
    )
    if owner != run_id:
        whose = "not in the store" if owner is None else f"of run {owner}"
        raise ValueError(
            f"feature set {feature_set_id} is not one of run {run_id}'s ({whose})."
        )
    found: set[int] = set()
    for start in range(0, len(field_ids), _IN_LIST):
        chunk = list(field_ids[start : start + _IN_LIST])
        found.update(
            session.scalars(
                select(Field.id)
                .where(Field.id.in_(chunk))
                .with_for_update(read=True, key_share=True)
            )
        )
    missing = sorted(set(field_ids) - found)
    if missing:
        raise ValueError(
            f"fields {missing[:5]} are not in the store; register the plate's fields "
            "before writing their cells."
        )


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


def _check_one_width(arrays: Sequence[Any], name: str) -> None:
    """Reject per-field (cells x features) arrays that are not 2-D or differ in width.

    Fields without cells are skipped.
    """
    widths = {a.shape[1] if a.ndim == 2 else -1
              for a in map(np.asarray, arrays) if len(a)}  # fmt: skip
    if -1 in widths:
        raise ValueError(f"{name} must be 2-D (cells x features) for every field.")
    if len(widths) > 1:
        raise ValueError(
            f"the fields' {name} have widths {sorted(widths)}; one feature set has "
            "one width."
        )


def _allocate_cell_ids(connection: Connection, n: int) -> list[int]:
    """Reserve `n` consecutive-or-not cell ids inside the current write transaction.

    PostgreSQL draws them from the id sequence (safe with concurrent writers). The
    sequence is looked up once: as ``nextval``'s argument, ``pg_get_serial_sequence``
    would run once per id, which made the allocation ~6x slower (0.31 against
    0.05 s for 60,000 cells). SQLite continues after the largest id, which is safe
    because the caller already holds the database's write lock.
    """
    if connection.dialect.name == "postgresql":  # one row: an array of n ids
        sequence = connection.scalar(
            text("SELECT pg_get_serial_sequence('cell', 'id')")
        )
        if sequence is None:
            raise ValueError(
                "the store's cell.id column draws from no sequence of its own; the "
                "store was not created by PhenoScreen. Use a new database."
            )
        return connection.scalar(
            text(
                "SELECT array_agg(nextval(CAST(:sequence AS regclass))) "
                "FROM generate_series(1, :n)"
            ),
            {"sequence": sequence, "n": n},
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
        If `cells` and `features` differ in length, `cells` lacks columns, or
        the run, the feature set (of the run) or the field is not in the store.
    """
    write_fields_cells(
        engine,
        run_id=run_id,
        feature_set_id=feature_set_id,
        fields=[
            {"field_id": field_id, "cells": cells, "features": features, "qc": qc,
             "seconds": seconds, "masks": masks}
        ],
    )  # fmt: skip


def write_fields_cells(
    engine: Engine,
    *,
    run_id: int,
    feature_set_id: int,
    fields: Sequence[Mapping[str, Any]],
) -> None:
    """Write several fields' cells, vectors, masks and result rows in one transaction.

    The fields are committed together or not at all: a run killed before the
    commit finds none of them done and segments them again. One bulk insert per
    table serves all the fields, so a batch costs a few statements however many
    fields it holds (`benchmarks/bench_sql_insert.py`).

    Parameters
    ----------
    engine : Engine
    run_id, feature_set_id : int
    fields : sequence of mapping
        One per field, each with the arguments of `write_field_cells`:
        ``field_id``, ``cells`` (DataFrame of `CELL_COLUMNS`), ``features``
        (ndarray of shape (N, F), row i for ``cells.iloc[i]``), ``qc``,
        ``seconds`` and optionally ``masks``.

    Raises
    ------
    ValueError
        If a field's `cells` and `features` differ in length, its `cells` lacks
        columns, its `features` are not 2-D or have another width than the others',
        a field appears twice, or the run, the feature set (of the run) or a field
        is not in the store.
    """
    ids = [int(f["field_id"]) for f in fields]
    if len(set(ids)) != len(ids):
        raise ValueError(f"fields {sorted(ids)} name a field twice; write it once.")
    if not ids:
        return
    for field in fields:
        cells, features = field["cells"], field["features"]
        missing = [c for c in CELL_COLUMNS if c not in cells.columns]
        if missing:
            raise ValueError(
                f"field {field['field_id']}: cells lacks columns {missing}."
            )
        if len(cells) != len(features):
            raise ValueError(
                f"field {field['field_id']}: cells has {len(cells)} rows but features "
                f"has {len(features)}; they must describe the same cells in the same "
                "order."
            )
    _check_one_width([f["features"] for f in fields], "features")
    n_cells = sum(len(f["cells"]) for f in fields)
    if n_cells:
        cells = pd.concat(
            [f["cells"][list(CELL_COLUMNS)] for f in fields if len(f["cells"])]
        )
        vectors = np.ascontiguousarray(
            np.concatenate([np.asarray(f["features"]) for f in fields
                            if len(f["cells"])]),
            dtype="<f4",
        )  # fmt: skip
        field_of_cell = np.repeat(ids, [len(f["cells"]) for f in fields]).tolist()
        columns = [cells[c].to_numpy().tolist() for c in CELL_COLUMNS]  # Python scalars
    with session_scope(engine) as session:
        _clear_fields(session, run_id, ids)  # also takes SQLite's write lock
        _check_parents(
            session, run_id=run_id, feature_set_id=feature_set_id, field_ids=ids
        )
        if n_cells:
            connection = session.connection()
            cell_ids = _allocate_cell_ids(connection, n_cells)
            _copy_rows(
                connection,
                Cell.__table__,
                ["id", "run_id", "field_id", *CELL_COLUMNS],
                zip(cell_ids, [run_id] * n_cells, field_of_cell, *columns, strict=True),
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
        masks = [
            {"run_id": run_id, "field_id": i, **dict(f["masks"])}
            for i, f in zip(ids, fields, strict=True)
            if f.get("masks") is not None
        ]
        if masks:
            session.execute(insert(FieldMask), masks)
        session.execute(
            insert(FieldResult),
            [
                {
                    "run_id": run_id,
                    "field_id": i,
                    "status": "complete",
                    "n_cells": len(f["cells"]),
                    "qc": dict(f["qc"]),
                    "seconds": dict(f["seconds"]),
                }
                for i, f in zip(ids, fields, strict=True)
            ],
        )


def write_field_failure(
    engine: Engine, *, run_id: int, field_id: int, error: str
) -> None:
    """Record that a field could not be processed (its cells are removed)."""
    with session_scope(engine) as session:
        _clear_fields(session, run_id, [field_id])
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
        {key: none_if_nan(value) for key, value in record.items()}
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


def write_fields_vectors(
    engine: Engine,
    *,
    run_id: int,
    feature_set_id: int,
    fields: Sequence[Mapping[str, Any]],
) -> None:
    """Store several fields' vectors of a feature set for their stored cells, atomically.

    Parameters
    ----------
    engine : Engine
    run_id, feature_set_id : int
    fields : sequence of mapping
        One per field: ``field_id``, ``object_numbers`` (ndarray of shape (N,),
        every stored cell of the field) and ``vectors`` (ndarray of shape (N, F),
        row i for object ``object_numbers[i]``; stored as float32 bytes).

    Raises
    ------
    ValueError
        If a field appears twice, its lengths differ, its vectors are not 2-D or
        have another width than the others', its object numbers are not its
        stored cells (the run's cells and the vectors would not line up), or the
        run or the feature set (of the run) is not in the store.
    """
    ids = [int(f["field_id"]) for f in fields]
    if len(set(ids)) != len(ids):
        raise ValueError(f"fields {sorted(ids)} name a field twice; write it once.")
    for field in fields:
        if len(field["object_numbers"]) != len(field["vectors"]):
            raise ValueError(
                f"field {field['field_id']}: {len(field['object_numbers'])} object "
                f"numbers but {len(field['vectors'])} vectors."
            )
    _check_one_width([f["vectors"] for f in fields], "vectors")
    if not ids:
        return
    with session_scope(engine) as session:
        # a write first: SQLite's write lock, so no rerun replaces the cells read next
        _drop_aggregates(session, run_id)
        _check_parents(session, run_id=run_id, feature_set_id=feature_set_id)
        stored: dict[int, dict[int, int]] = {i: {} for i in ids}
        for start in range(0, len(ids), _IN_LIST):
            chunk = ids[start : start + _IN_LIST]
            cells = (  # PostgreSQL: locked as a key would lock them
                select(Cell.field_id, Cell.object_number, Cell.id)
                .where(Cell.run_id == run_id, Cell.field_id.in_(chunk))
                .with_for_update(read=True, key_share=True)
            )
            for field_id, number, cell_id in session.execute(cells):
                stored[field_id][number] = cell_id
        cell_ids: list[int] = []
        for field_id, field in zip(ids, fields, strict=True):
            numbers = [int(k) for k in field["object_numbers"]]
            missing = [k for k in numbers if k not in stored[field_id]]
            if missing or len(stored[field_id]) != len(numbers):
                raise ValueError(
                    f"field {field_id}: {len(numbers)} objects to embed but "
                    f"{len(stored[field_id])} stored cells (missing {missing[:5]}): "
                    "the field was segmented again since its crops were read; embed "
                    "the run again."
                )
            cell_ids += [stored[field_id][k] for k in numbers]
        for start in range(0, len(ids), _IN_LIST):
            of_fields = select(Cell.id).where(
                Cell.run_id == run_id, Cell.field_id.in_(ids[start : start + _IN_LIST])
            )
            session.execute(
                delete(CellVector).where(
                    CellVector.feature_set_id == feature_set_id,
                    CellVector.cell_id.in_(of_fields),
                )
            )
        if cell_ids:
            rows = np.ascontiguousarray(
                np.concatenate([np.asarray(f["vectors"]) for f in fields
                                if len(f["vectors"])]),
                dtype="<f4",
            )  # fmt: skip
            _copy_rows(
                session.connection(),
                CellVector.__table__,
                ["cell_id", "feature_set_id", "values"],
                (
                    (i, feature_set_id, v.tobytes())
                    for i, v in zip(cell_ids, rows, strict=True)
                ),
            )
