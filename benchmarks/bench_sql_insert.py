"""Cells/s of the store's bulk writes, SQLite and PostgreSQL, side by side.

Writes N fields of C cells with F float32 features each three ways: ``batched``,
as `phenoscreen run` commits a fast stream of fields (`db.store.write_fields_cells`,
one transaction per group of fields holding the `db.store.FieldBatches` cell cap,
20,000); ``bulk``, one field per transaction (`db.store.write_field_cells`: cells,
vectors, result row); and, as a reference, one ORM object per row, one commit per
field.

    python benchmarks/bench_sql_insert.py [--fields 120] [--cells 500] [--features 60 1280]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from db import store  # noqa: E402
from db.schema import Cell, CellVector  # noqa: E402
from db.session import make_engine  # noqa: E402
from pipeline.images.platemap import with_well_positions  # noqa: E402

PG_URL = os.environ.get(
    "PHENOSCREEN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def setup(url: str, n_fields: int, n_features: int) -> tuple:
    engine = make_engine(url)
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


def make_cells(n_cells: int, n_features: int, rng: np.random.Generator) -> tuple:
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
    return cells, rng.normal(size=(n_cells, n_features)).astype(np.float32)


def bench_bulk(url: str, n_fields: int, n_cells: int, n_features: int) -> float:
    engine, run_id, fs, field_ids = setup(url, n_fields, n_features)
    rng = np.random.default_rng(0)
    batches = [make_cells(n_cells, n_features, rng) for _ in field_ids]
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
    return n_fields * n_cells / elapsed


def bench_batched(url: str, n_fields: int, n_cells: int, n_features: int) -> float:
    """Fields committed in batches of `FieldBatches().max_cells` cells, as runs do."""
    engine, run_id, fs, field_ids = setup(url, n_fields, n_features)
    rng = np.random.default_rng(0)
    fields = [
        {"field_id": field_id, "cells": cells, "features": features, "qc": {},
         "seconds": {}}
        for field_id, (cells, features) in zip(
            field_ids, (make_cells(n_cells, n_features, rng) for _ in field_ids),
            strict=True,
        )
    ]  # fmt: skip
    per_batch = max(store.FieldBatches().max_cells // max(n_cells, 1), 1)
    start = time.perf_counter()
    for i in range(0, n_fields, per_batch):
        store.write_fields_cells(
            engine, run_id=run_id, feature_set_id=fs, fields=fields[i : i + per_batch]
        )
    elapsed = time.perf_counter() - start
    engine.dispose()
    return n_fields * n_cells / elapsed


def bench_orm_rows(url: str, n_fields: int, n_cells: int, n_features: int) -> float:
    """Reference: one ORM object per cell and per vector, one commit per field."""
    engine, run_id, fs, field_ids = setup(url, n_fields, n_features)
    rng = np.random.default_rng(0)
    batches = [make_cells(n_cells, n_features, rng) for _ in field_ids]
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
    return n_fields * n_cells / elapsed


def fresh_pg_database() -> tuple[str, callable]:
    name = f"phenoscreen_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return PG_URL.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fields", type=int, default=120)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--features", type=int, nargs="+", default=[60, 1280])
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ["sqlite"] + ([] if args.no_postgres else ["postgresql"]):
            for n_features in args.features:
                for method, bench in (
                    ("batched", bench_batched),
                    ("bulk", bench_bulk),
                    ("orm_rows", bench_orm_rows),
                ):
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
                        cells_per_s = bench(url, n_fields, args.cells, n_features)
                    finally:
                        drop()
                    rows.append(
                        {
                            "backend": backend,
                            "features": n_features,
                            "method": method,
                            "fields": n_fields,
                            "cells_per_field": args.cells,
                            "cells_per_s": round(cells_per_s),
                        }
                    )
                    print(rows[-1])
    table = pd.DataFrame(rows)
    wide = table.pivot_table(
        index=["backend", "features"], columns="method", values="cells_per_s"
    )
    wide["bulk_vs_orm_rows"] = (wide["bulk"] / wide["orm_rows"]).round(1)
    wide["batched_vs_bulk"] = (wide["batched"] / wide["bulk"]).round(2)
    print(wide.to_string())
    save("sql_insert", {"rows": rows, "summary": wide.reset_index().to_dict("records")})


if __name__ == "__main__":
    main()
