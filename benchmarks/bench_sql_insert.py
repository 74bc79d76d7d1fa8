"""Cells/s of the store's bulk writes, SQLite and PostgreSQL, side by side.

Writes N fields of C cells with F float32 features each in several ways: ``batched``,
as `phenoscreen run` commits a fast stream of fields (`db.store.write_fields_cells`,
one transaction per group of fields holding the `db.store.FieldBatches` cell cap,
20,000); ``bulk``, one field per transaction (`db.store.write_field_cells`: cells,
vectors, result row); and, as a reference, one ORM object per row, one commit per
field. Also ``batched_old_keys``, in the same run: batched into a store with the
per-cell tables of stores made before 2026-12-06
(`db.schema.make_old_cell_tables`: four foreign keys, checked row by row).
Each PostgreSQL method writes into a new database, after a checkpoint. On
PostgreSQL, ``batched_pglz`` too: batched with the vectors compressed by the
server's default, pglz, instead of LZ4 (`db.session`: values over ~2 KiB are
compressed as they are stored).
And ``field_blob``, the bound of a packed layout: each field's vectors as one
float32 blob in a scratch table, no cell rows (`bench_field_blob`).

The vectors are ``dense`` (normal numbers, as classical features: nothing to
compress) and, for the batched writes and ``field_blob``, ``rectified`` as a CNN's
pooled features are: ``max(z - t, 0)`` of normal ``z`` with ``t`` set to make
``--zeros`` of them zero (0.69: `tf_efficientnet_lite0`'s pooled features of the
BBBC021 crops in ../shared/data are 69 % zeros). Each batched store is then read
back (``read_cells_per_s``: `db.readers.iter_field_vectors`, every vector).

For the batched writes and ``field_blob`` it also counts the bytes the store wrote
per cell (`bytes_written`) and measures the disk's sequential write bandwidth
(`disk_write_bytes_per_s`, the median of three probes in the temporary folder where
the SQLite stores live); their ratio bounds the cells/s the disk allows once the
page cache is full (a short run can beat it: the operating system takes writes into
memory first; and the probe writes sequentially, while checkpoints write scattered
pages, so the bound is optimistic). PostgreSQL's data directory may lie on another
disk; here both are on the machine's one disk. On a tmpfs (memory) no bound is
given.

    python benchmarks/bench_sql_insert.py [--fields 120] [--cells 500] \
        [--features 60 1280] [--zeros 0.69] [--no-postgres] [--methods ...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    create_engine,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from db import store  # noqa: E402
from db.readers import iter_field_vectors  # noqa: E402
from db.schema import Cell, CellVector, make_old_cell_tables  # noqa: E402
from db.session import make_engine  # noqa: E402
from pipeline.images.platemap import with_well_positions  # noqa: E402

PG_URL = os.environ.get(
    "PHENOSCREEN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def setup(
    url: str,
    n_fields: int,
    n_features: int,
    *,
    old_keys: bool = False,
    compression: str | None = None,
) -> tuple:
    """A store with one run of `n_fields` fields; `old_keys`: with the per-cell
    tables of stores made before 2026-12-06 (`db.schema.make_old_cell_tables`);
    `compression`: the vectors' own PostgreSQL compression (not the session's)."""
    engine = make_engine(url)
    if old_keys:
        with engine.begin() as connection:
            make_old_cell_tables(connection)
    if compression:
        with engine.begin() as connection:
            connection.execute(
                text(
                    'ALTER TABLE cell_vector ALTER COLUMN "values" '
                    f"SET COMPRESSION {compression}"
                )
            )
    wells = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": ["A01"],
            "Metadata_Compound": ["DMSO"],
            "Metadata_Concentration": [0.0],
            "Metadata_Role": ["negative_control"],
        }
    )
    fields = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": "A01",
            "Metadata_Site": range(1, n_fields + 1),
            "FileName_DNA": [f"f{i}.tif" for i in range(n_fields)],
        }
    )
    experiment_id, fields = store.register_experiment(
        engine,
        name="bench",
        image_root="/",
        channels={"DNA": "w1"},
        wells=with_well_positions(wells),
        fields=fields,
        plate_formats={"P1": 96},
    )
    run_id, _ = store.open_run(
        engine,
        experiment_id=experiment_id,
        analysis_key="b",
        config_toml="",
        segmenter="x",
        versions={},
    )
    fs = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name="f",
        kind="classical",
        feature_names=[f"f{i}" for i in range(n_features)],
        config={},
    )
    return engine, run_id, fs, [int(f) for f in fields["field_id"]]


def make_cells(
    n_cells: int, n_features: int, rng: np.random.Generator, zeros: float = 0.0
) -> tuple:
    """Cells and their (n_cells, n_features) float32 vectors: normal numbers, or
    with `zeros` > 0 rectified, ``max(z - t, 0)`` with `zeros` of them 0."""
    cells = pd.DataFrame(
        {
            "object_number": np.arange(1, n_cells + 1),
            "centroid_y": rng.uniform(0, 1080, n_cells),
            "centroid_x": rng.uniform(0, 1080, n_cells),
            "bbox_min_y": np.zeros(n_cells, int),
            "bbox_min_x": np.zeros(n_cells, int),
            "bbox_max_y": np.full(n_cells, 20),
            "bbox_max_x": np.full(n_cells, 20),
            "area_px": rng.integers(100, 400, n_cells),
        }
    )
    values = rng.normal(size=(n_cells, n_features))
    if zeros:
        values = np.maximum(values - norm.ppf(zeros), 0)
    return cells, values.astype(np.float32)


def bench_bulk(
    url: str, n_fields: int, n_cells: int, n_features: int, zeros: float = 0.0
) -> dict[str, float]:
    engine, run_id, fs, field_ids = setup(url, n_fields, n_features)
    rng = np.random.default_rng(0)
    batches = [make_cells(n_cells, n_features, rng, zeros) for _ in field_ids]
    start = time.perf_counter()
    for field_id, (cells, features) in zip(field_ids, batches, strict=True):
        store.write_field_cells(
            engine,
            run_id=run_id,
            field_id=field_id,
            feature_set_id=fs,
            cells=cells,
            features=features,
            qc={},
            seconds={},
        )
    elapsed = time.perf_counter() - start
    engine.dispose()
    return {"cells_per_s": n_fields * n_cells / elapsed}


def disk_write_bytes_per_s(folder: str, total_mib: int = 512) -> float:
    """Sequential write bandwidth of `folder`'s disk: 8 MiB blocks, then ``fsync``."""
    block = np.random.default_rng(0).bytes(8 << 20)  # incompressible
    path = Path(folder) / "disk_probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as out:
        for _ in range(total_mib // 8):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return (total_mib << 20) / elapsed


def bytes_written(engine: Engine) -> Callable[[], int | None]:
    """Start counting the bytes the store writes; call the result for the count.

    SQLite: this process's writes towards the disk (``write_bytes`` less
    ``cancelled_write_bytes`` of ``/proc/self/io``: WAL frames and the checkpoints
    that copy them into the database; 0 on a tmpfs, which is memory). PostgreSQL:
    the server's WAL (the whole cluster's: other sessions and autovacuum count too)
    plus the database's growth (its pages reach the disk at checkpoints). None where
    it cannot be read.
    """
    if engine.dialect.name == "postgresql":
        query = text(
            "SELECT pg_current_wal_lsn(), pg_database_size(current_database())"
        )
        with engine.connect() as connection:
            lsn, size = connection.execute(query).one()

        def count() -> int:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        text(
                            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :lsn) "
                            "+ pg_database_size(current_database()) - :size"
                        ),
                        {"lsn": lsn, "size": size},
                    ).scalar()
                )

        return count
    io = Path("/proc/self/io")
    if not io.exists():
        return lambda: None

    def process_writes() -> int:
        counts = dict(line.split(": ") for line in io.read_text().splitlines())
        return int(counts["write_bytes"]) - int(counts["cancelled_write_bytes"])

    before = process_writes()
    return lambda: process_writes() - before


def bench_batched(
    url: str,
    n_fields: int,
    n_cells: int,
    n_features: int,
    zeros: float = 0.0,
    *,
    old_keys: bool = False,
    compression: str | None = None,
) -> dict[str, float]:
    """Fields committed in batches of `FieldBatches().max_cells` cells, as runs do.

    Returns ``cells_per_s``, ``read_cells_per_s`` (reading every vector back) and
    ``bytes_per_cell`` (written; `bytes_written`), None where unknown.
    """
    engine, run_id, fs, field_ids = setup(
        url, n_fields, n_features, old_keys=old_keys, compression=compression
    )
    rng = np.random.default_rng(0)
    fields = [
        {"field_id": field_id, "cells": cells, "features": features, "qc": {},
         "seconds": {}}
        for field_id, (cells, features) in zip(
            field_ids, (make_cells(n_cells, n_features, rng, zeros) for _ in field_ids),
            strict=True,
        )
    ]  # fmt: skip
    per_batch = max(store.FieldBatches().max_cells // max(n_cells, 1), 1)
    written = bytes_written(engine)
    start = time.perf_counter()
    for i in range(0, n_fields, per_batch):
        store.write_fields_cells(
            engine, run_id=run_id, feature_set_id=fs, fields=fields[i : i + per_batch]
        )
    elapsed = time.perf_counter() - start
    engine.dispose()  # SQLite's last connection checkpoints its WAL as it closes
    n_bytes = written()
    start = time.perf_counter()
    read = sum(len(v) for _, _, v in iter_field_vectors(engine, run_id, "f"))
    read_s = time.perf_counter() - start
    engine.dispose()
    n = n_fields * n_cells
    assert read == n, (read, n)
    return {
        "cells_per_s": n / elapsed,
        "read_cells_per_s": n / read_s,
        "bytes_per_cell": None if n_bytes is None else n_bytes / n,
    }


def bench_orm_rows(
    url: str, n_fields: int, n_cells: int, n_features: int, zeros: float = 0.0
) -> dict[str, float]:
    """Reference: one ORM object per cell and per vector, one commit per field."""
    engine, run_id, fs, field_ids = setup(url, n_fields, n_features)
    rng = np.random.default_rng(0)
    batches = [make_cells(n_cells, n_features, rng, zeros) for _ in field_ids]
    start = time.perf_counter()
    for field_id, (cells, features) in zip(field_ids, batches, strict=True):
        with Session(engine) as session, session.begin():
            objects = [
                Cell(run_id=run_id, field_id=field_id, **row)
                for row in cells.astype(object).to_dict("records")
            ]
            session.add_all(objects)
            session.flush()
            session.add_all(
                CellVector(cell_id=o.id, feature_set_id=fs, values=v.tobytes())
                for o, v in zip(objects, features, strict=True)
            )
    elapsed = time.perf_counter() - start
    engine.dispose()
    return {"cells_per_s": n_fields * n_cells / elapsed}


def bench_field_blob(
    url: str, n_fields: int, n_cells: int, n_features: int, zeros: float = 0.0
) -> dict[str, float]:
    """Bound of a packed layout: each field's vectors as one blob, nothing else.

    The (n_cells, n_features) float32 bytes of a field in one row of a scratch table
    ``field_blob`` (field id, bytes) of the same store, committed in the batches of
    `bench_batched`: no cell rows, no row per vector. What a store holding one
    packed vector blob per field would reach at best.

    Returns ``cells_per_s`` and ``bytes_per_cell`` (written; `bytes_written`), None
    where unknown.
    """
    engine, _, _, field_ids = setup(url, n_fields, n_features)
    table = Table(
        "field_blob",
        MetaData(),
        Column("field_id", Integer, primary_key=True),
        Column("values", LargeBinary),
    )
    table.create(engine)
    rng = np.random.default_rng(0)
    rows = [
        {"field_id": field_id, "values": make_cells(n_cells, n_features, rng, zeros)[1]}
        for field_id in field_ids
    ]
    per_batch = max(store.FieldBatches().max_cells // max(n_cells, 1), 1)
    written = bytes_written(engine)
    start = time.perf_counter()
    for i in range(0, n_fields, per_batch):
        with engine.begin() as connection:
            connection.execute(
                table.insert(),
                [
                    r | {"values": r["values"].tobytes()}
                    for r in rows[i : i + per_batch]
                ],
            )
    elapsed = time.perf_counter() - start
    engine.dispose()
    n_bytes = written()
    n = n_fields * n_cells
    return {
        "cells_per_s": n / elapsed,
        "bytes_per_cell": None if n_bytes is None else n_bytes / n,
    }


def fresh_pg_database() -> tuple[str, callable]:
    """A new database and the function that drops it.

    A checkpoint first (where the role may), so that no method pays for the WAL
    that the one before it left: 1,280-d runs write ~0.7 GB of it each, and the
    order of the methods then decided which one a checkpoint fell into.
    """
    name = f"phenoscreen_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            connection.execute(text("CHECKPOINT"))
        except DBAPIError as exc:  # not a superuser nor pg_checkpoint
            print(f"no checkpoint between runs: {exc.orig}")

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return PG_URL.rsplit("/", 1)[0] + f"/{name}", drop


METHODS = {
    "batched": bench_batched,
    "bulk": bench_bulk,
    "orm_rows": bench_orm_rows,
    "batched_old_keys": partial(bench_batched, old_keys=True),
    "batched_pglz": partial(bench_batched, compression="pglz"),
    "field_blob": bench_field_blob,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fields", type=int, default=120)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--features", type=int, nargs="+", default=[60, 1280])
    parser.add_argument(
        "--zeros",
        type=float,
        default=0.69,
        help="fraction of zeros in the rectified vectors",
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS)
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        probes = [disk_write_bytes_per_s(tmp) / 1e6 for _ in range(3)]  # noisy
        disk = float(np.median(probes)) * 1e6
        print(f"disk: {[round(p) for p in probes]} MB/s written and synced ({tmp})")
        for backend in ["sqlite"] + ([] if args.no_postgres else ["postgresql"]):
            for n_features, (vectors, zeros) in itertools.product(
                args.features, (("dense", 0.0), ("rectified", args.zeros))
            ):
                for method in METHODS:
                    if (
                        (method not in args.methods)
                        or (
                            vectors == "rectified"
                            and method not in ("batched", "batched_pglz", "field_blob")
                        )
                        or (backend == "sqlite" and method == "batched_pglz")
                    ):
                        continue
                    if backend == "sqlite":
                        url, drop = (
                            f"sqlite:///{tmp}/{uuid.uuid4().hex}.db",
                            (lambda: None),
                        )
                    else:
                        url, drop = fresh_pg_database()
                    n_fields = (
                        max(args.fields // 4, 2)
                        if method == "orm_rows"
                        else args.fields
                    )
                    try:
                        result = METHODS[method](
                            url, n_fields, args.cells, n_features, zeros
                        )
                    finally:
                        drop()
                    rows.append(
                        {
                            "backend": backend,
                            "features": n_features,
                            "vectors": vectors,
                            "method": method,
                            "fields": n_fields,
                            "cells_per_field": args.cells,
                            "cells_per_s": round(result["cells_per_s"]),
                        }
                    )
                    if "read_cells_per_s" in result:
                        rows[-1]["read_cells_per_s"] = round(result["read_cells_per_s"])
                    if per_cell := result.get("bytes_per_cell"):  # 0: tmpfs
                        rows[-1] |= {  # what the disk allows at that size
                            "bytes_written_per_cell": round(per_cell),
                            "disk_bound_cells_per_s": round(disk / per_cell),
                        }
                    print(rows[-1])
    if not rows:
        sys.exit(
            f"no measurement: --methods {' '.join(args.methods)} on these backends"
        )
    table = pd.DataFrame(rows)
    wide = table.pivot_table(
        index=["backend", "features", "vectors"], columns="method",
        values="cells_per_s",
    )  # fmt: skip
    for ratio, (a, b, digits) in {
        "bulk_vs_orm_rows": ("bulk", "orm_rows", 1),
        "batched_vs_bulk": ("batched", "bulk", 2),
        "batched_vs_old_keys": ("batched", "batched_old_keys", 2),
        "batched_vs_pglz": ("batched", "batched_pglz", 2),
        "field_blob_vs_batched": ("field_blob", "batched", 2),
    }.items():
        if a in wide and b in wide:
            wide[ratio] = (wide[a] / wide[b]).round(digits)
    print(wide.to_string())
    methods = [m for m in METHODS if m in args.methods]
    subset = methods != list(METHODS)  # the full record stays as it is
    save(
        "sql_insert_" + "-".join(methods) if subset else "sql_insert",
        {
            "methods": methods,
            "disk_write_mb_per_s": round(disk / 1e6),  # the median of three
            "disk_write_mb_per_s_probes": [round(p) for p in probes],
            "rows": rows,
            "summary": wide.reset_index().to_dict("records"),
        },
    )


if __name__ == "__main__":
    main()
