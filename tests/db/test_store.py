import sqlite3
import threading
import time
from functools import partial

import numpy as np
import pandas as pd
import pytest
import sqlalchemy
from sqlalchemy import func, select, text

from db import store, writers
from db.schema import (
    CELL_CASCADES,
    SCHEMA_VERSION,
    Cell,
    CellVector,
    Experiment,
    FieldResult,
    SchemaInfo,
    Well,
    WellAggregate,
    make_old_cell_tables,
)
from db.session import make_engine, session_scope, shown_url
from pipeline.images.platemap import with_well_positions


def register(engine, *, compound="x"):
    wells = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1"],
            "Metadata_Well": ["A01", "B02"],
            "Metadata_Compound": ["DMSO", compound],
            "Metadata_Concentration": [np.nan, 1.0],
            "Metadata_ConcentrationUnit": ["uM", "uM"],
            "Metadata_Role": ["negative_control", "treatment"],
            "Metadata_batch": ["b1", "b1"],
        }
    )
    fields = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P1"],
            "Metadata_Well": ["A01", "A01", "B02"],
            "Metadata_Site": [1, 2, 1],
            "FileName_DNA": ["a1.tif", "a2.tif", "b1.tif"],
        }
    )
    return store.register_experiment(
        engine,
        name="exp",
        image_root="/data",
        channels={"DNA": "w1"},
        wells=with_well_positions(wells),
        fields=fields,
        plate_formats={"P1": 96},
    )


def cells_of(n, start=0.0):
    rng = np.random.default_rng(n)
    cells = pd.DataFrame(
        {
            "object_number": np.arange(1, n + 1),
            "centroid_y": rng.uniform(0, 100, n),
            "centroid_x": rng.uniform(0, 100, n),
            "bbox_min_y": np.zeros(n, int),
            "bbox_min_x": np.zeros(n, int),
            "bbox_max_y": np.full(n, 5),
            "bbox_max_x": np.full(n, 5),
            "area_px": np.full(n, 25),
        }
    )
    return cells, (np.arange(n * 3, dtype=np.float32).reshape(n, 3) + start)


def open_run(engine, experiment_id):
    run_id, _ = store.open_run(
        engine,
        experiment_id=experiment_id,
        analysis_key="k",
        config_toml="",
        segmenter="otsu_expand",
        versions={},
    )
    fs = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name="classical_baseline",
        kind="classical",
        feature_names=["a", "b", "c"],
        config={},
    )
    return run_id, fs


def test_register_write_and_stream_roundtrip(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    assert fields["field_id"].is_unique and len(fields) == 3
    run_id, fs = open_run(engine, experiment_id)
    for i, field_id in enumerate(fields["field_id"]):
        cells, features = cells_of(4 + i, start=100 * i)
        store.write_field_cells(
            engine,
            run_id=run_id,
            field_id=int(field_id),
            feature_set_id=fs,
            cells=cells,
            features=features,
            qc={"n_cells": 4 + i},
            seconds={"read": 0.1},
        )
    assert store.completed_field_ids(engine, run_id) == set(fields["field_id"])
    plates = list(store.iter_plate_cells(engine, run_id, "classical_baseline"))
    assert len(plates) == 1
    plate, cells, features = plates[0]
    assert plate == "P1" and len(cells) == 4 + 5 + 6
    assert list(features.columns) == ["a", "b", "c"]
    assert list(cells["Metadata_Well"].unique()) == ["A01", "B02"]
    first = cells_of(4, 0.0)[1]
    np.testing.assert_array_equal(features.to_numpy()[:4], first)
    assert features.dtypes.eq(np.float32).all()
    chunks = list(
        store.iter_plate_cells(engine, run_id, "classical_baseline", chunk_cells=2)
    )
    chunk_wells = [set(c["Metadata_Well"]) for _, c, _ in chunks]
    assert len(chunks) == 2 and chunk_wells == [{"A01"}, {"B02"}]  # wells whole
    pd.testing.assert_frame_equal(
        pd.concat([f for _, _, f in chunks], ignore_index=True), features
    )
    with pytest.raises(ValueError, match="chunk_cells"):
        next(
            store.iter_plate_cells(engine, run_id, "classical_baseline", chunk_cells=0)
        )
    wells = store.read_wells(engine, experiment_id)
    assert (
        wells.loc[1, "Metadata_Compound"] == "x"
        and wells.loc[1, "Metadata_batch"] == "b1"
    )
    summary = store.summarize_runs(engine)
    assert summary.loc[0, "n_complete"] == 3 and summary.loc[0, "n_cells"] == 15


def test_register_experiment_is_idempotent_and_updates_metadata(db_url):
    engine = make_engine(db_url)
    _, first = register(engine)
    _, second = register(engine, compound="renamed")
    assert list(first["field_id"]) == list(second["field_id"])
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Well)) == 2
        assert (
            session.scalar(select(Well.compound).where(Well.name == "B02")) == "renamed"
        )


def test_register_experiment_rejects_wells_without_positions(db_url):
    engine = make_engine(db_url)
    wells = pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["A01"]})
    fields = wells.assign(Metadata_Site=1, FileName_DNA="a.tif")
    with pytest.raises(ValueError, match="with_well_positions"):
        store.register_experiment(
            engine, name="exp", image_root="/data", channels={"DNA": "w1"},
            wells=wells, fields=fields, plate_formats={"P1": 96},
        )  # fmt: skip
    with session_scope(engine) as session:  # nothing half-written
        assert session.scalar(select(func.count()).select_from(Well)) == 0
        assert session.scalar(select(func.count()).select_from(Experiment)) == 0


def test_rewriting_a_field_replaces_its_cells(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    field_id = int(fields["field_id"].iloc[0])
    store.write_field_failure(
        engine, run_id=run_id, field_id=field_id, error="bad file x.tif"
    )
    for n in (5, 3):
        cells, features = cells_of(n)
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
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Cell)) == 3
        assert session.scalar(select(func.count()).select_from(CellVector)) == 3
        assert session.scalar(select(FieldResult.status)) == "complete"


def test_write_field_cells_rejects_mismatched_rows(sqlite_url):
    engine = make_engine(sqlite_url)
    cells, features = cells_of(3)
    with pytest.raises(ValueError, match="cells has 3 rows but features has 2"):
        store.write_field_cells(
            engine,
            run_id=1,
            field_id=1,
            feature_set_id=1,
            cells=cells,
            features=features[:2],
            qc={},
            seconds={},
        )
    with pytest.raises(ValueError, match="lacks columns"):
        store.write_field_cells(
            engine,
            run_id=1,
            field_id=1,
            feature_set_id=1,
            cells=cells.drop(columns="area_px"),
            features=features,
            qc={},
            seconds={},
        )


def cell_counts(engine):
    """Cells, vectors and vectors without a cell in the store."""
    orphans = (
        select(func.count())
        .select_from(CellVector)
        .where(CellVector.cell_id.not_in(select(Cell.id)))
    )
    with session_scope(engine) as session:
        return tuple(
            session.scalar(query)
            for query in (select(func.count()).select_from(Cell),
                          select(func.count()).select_from(CellVector), orphans)
        )  # fmt: skip


@pytest.mark.parametrize("old_store", [False, True], ids=["new", "made before"])
def test_cell_tables_without_keys_check_parents_and_cascade_deletes(db_url, old_store):
    """The per-cell tables have no foreign keys: the writers refuse an unknown run,
    feature set or field (writing nothing), and deleting a cell (a rerun field's),
    field, feature set or run deletes its cells and their vectors of every feature
    set, as the keys' cascades did. A store made before 2026-12-06 (the keys, no
    triggers) behaves the same."""
    engine = make_engine(db_url)
    if old_store:
        with engine.begin() as connection:
            make_old_cell_tables(connection)
    inspector = sqlalchemy.inspect(engine)
    for table in ("cell", "cell_vector"):
        assert bool(inspector.get_foreign_keys(table)) == old_store
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    other_run, _ = store.open_run(
        engine, experiment_id=experiment_id, analysis_key="k2", config_toml="",
        segmenter="otsu_expand", versions={},
    )  # fmt: skip
    ids = [int(i) for i in fields["field_id"]]
    batch = field_batch(ids[:2], [3, 2])
    for kwargs, message in (
        ({"run_id": 999, "feature_set_id": fs}, "run 999 is not in the store"),
        ({"run_id": run_id, "feature_set_id": 999}, "999 is not one of run .*not in"),
        ({"run_id": other_run, "feature_set_id": fs}, f"of run {run_id}\\)"),
    ):
        with pytest.raises(ValueError, match=message):
            store.write_fields_cells(engine, fields=batch, **kwargs)
    with pytest.raises(ValueError, match="fields \\[999\\] are not in the store"):
        store.write_fields_cells(
            engine, run_id=run_id, feature_set_id=fs,
            fields=[batch[0], batch[1] | {"field_id": 999}],
        )  # fmt: skip
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Cell)) == 0
        assert session.scalar(select(func.count()).select_from(FieldResult)) == 0
    store.write_fields_cells(engine, run_id=run_id, feature_set_id=fs, fields=batch)
    with (
        pytest.raises(ValueError, match="cell table holds rows"),
        engine.begin() as connection,
    ):
        make_old_cell_tables(connection)
    deep = store.ensure_feature_set(
        engine, run_id=run_id, name="deep", kind="embedding",
        feature_names=["d0"], config={},
    )  # fmt: skip
    vectors = [{"field_id": f["field_id"], "object_numbers": np.arange(1, n + 1),
                "vectors": np.ones((n, 1), np.float32)}
               for f, n in zip(batch, (3, 2), strict=True)]  # fmt: skip
    with pytest.raises(ValueError, match=f"999 is not one of run {run_id}'s"):
        store.write_fields_vectors(
            engine, run_id=run_id, feature_set_id=999, fields=vectors
        )
    store.write_fields_vectors(
        engine, run_id=run_id, feature_set_id=deep, fields=vectors
    )
    store.write_fields_cells(  # a rerun of field 1 with one cell, then field 2 fails
        engine, run_id=run_id, feature_set_id=fs, fields=field_batch(ids[:1], [1])
    )
    store.write_field_failure(engine, run_id=run_id, field_id=ids[1], error="x")
    assert cell_counts(engine) == (1, 1, 0)
    one = {"field_id": ids[0], "object_numbers": np.array([1]),
           "vectors": np.ones((1, 1), np.float32)}  # fmt: skip
    store.write_fields_vectors(engine, run_id=run_id, feature_set_id=deep, fields=[one])

    def delete_from(table, row_id):
        with engine.begin() as connection:
            connection.execute(text(f"DELETE FROM {table} WHERE id = {row_id}"))

    assert cell_counts(engine)[:2] == (1, 2)
    delete_from("feature_set", deep)
    assert cell_counts(engine)[:2] == (1, 1)
    store.write_fields_cells(
        engine, run_id=run_id, feature_set_id=fs, fields=field_batch(ids[2:], [2])
    )
    assert cell_counts(engine)[:2] == (3, 3)
    delete_from("field", ids[0])
    assert cell_counts(engine)[:2] == (2, 2)
    delete_from("run", run_id)
    assert cell_counts(engine) == (0, 0, 0)


def field_and_embedding(url, width):
    """A store whose first field has 3 cells, and an embedding feature set "deep" of
    `width` features: (engine, experiment id, run id, classical feature set id,
    field id, "deep" id)."""
    engine = make_engine(url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    field_id = int(fields["field_id"].iloc[0])
    store.write_fields_cells(
        engine, run_id=run_id, feature_set_id=fs, fields=field_batch([field_id], [3])
    )
    deep = store.ensure_feature_set(
        engine, run_id=run_id, name="deep", kind="embedding",
        feature_names=[f"d{i}" for i in range(width)], config={},
    )  # fmt: skip
    return engine, experiment_id, run_id, fs, field_id, deep


def wait_until_blocked(engine, thread):
    """Return once `thread`'s transaction waits for a lock (PostgreSQL: seen in
    pg_stat_activity, within 20 s; SQLite: after 1 s); fail if it ended instead."""
    deadline = time.monotonic() + (20 if engine.dialect.name == "postgresql" else 1)
    while time.monotonic() < deadline and thread.is_alive():
        if engine.dialect.name == "postgresql":
            with engine.connect() as connection:
                waiting = connection.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                    "'Lock' AND datname = current_database()"
                ))  # fmt: skip
            if waiting:
                return
        time.sleep(0.05)
    assert thread.is_alive(), "the rerun did not wait for the vectors' transaction"


@pytest.mark.parametrize(
    ("hook", "cached_aggregate"),
    [("_copy_rows", False), ("_check_parents", True)],
    ids=["while copying", "before reading the cells"],
)
def test_a_field_rerun_while_its_vectors_are_written_waits_and_removes_them(
    db_url, monkeypatch, hook, cached_aggregate
):
    """Without foreign keys, vectors being written must still not outlive their
    cells: a rerun of the field that starts meanwhile waits for the vectors' commit
    and then deletes them with its old cells. While copying: PostgreSQL locks the
    cells as a key would. Before the cells are read, with an aggregate cached:
    SQLite's write lock is already taken, and both writers lock the aggregates
    before the cells (the other order deadlocked on PostgreSQL)."""
    engine, experiment_id, run_id, fs, field_id, deep = field_and_embedding(db_url, 1)
    if cached_aggregate:
        with session_scope(engine) as session:
            session.add(WellAggregate(
                run_id=run_id, feature_set_id=fs, include_flagged=False,
                well_id=int(store.read_wells(engine, experiment_id)["well_id"].iloc[0]),
                cell_count=3, values=b"",
            ))  # fmt: skip
    real, reruns, errors = getattr(writers, hook), [], []

    def rerun_field():
        try:
            store.write_fields_cells(engine, run_id=run_id, feature_set_id=fs,
                                     fields=field_batch([field_id], [2]))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def during_a_rerun(*args, **kwargs):
        result = real(*args, **kwargs)  # a parent check or the rerun's own copies
        vectors = hook == "_copy_rows" and args[1].name == "cell_vector"
        if not reruns and (vectors or not kwargs.get("field_ids", ())):
            reruns.append(threading.Thread(target=rerun_field))
            reruns[0].start()
            wait_until_blocked(engine, reruns[0])
        return result

    monkeypatch.setattr(writers, hook, during_a_rerun)
    store.write_fields_vectors(
        engine, run_id=run_id, feature_set_id=deep,
        fields=[{"field_id": field_id, "object_numbers": np.arange(1, 4),
                 "vectors": np.ones((3, 1), np.float32)}],
    )  # fmt: skip
    reruns[0].join(timeout=60)
    assert not reruns[0].is_alive() and not errors
    assert cell_counts(engine) == (2, 2, 0)  # the rerun's cells and their features
    assert store.embedded_field_ids(engine, run_id, deep) == set()  # embed it again


def field_batch(field_ids, sizes, start=0.0):
    out = []
    for field_id, n in zip(field_ids, sizes, strict=True):
        cells, features = cells_of(n, start=start + 100 * n)
        out.append({"field_id": int(field_id), "cells": cells, "features": features,
                    "qc": {"n": n}, "seconds": {"read": 0.1}})  # fmt: skip
    return out


def test_write_fields_cells_in_one_batch_equals_one_field_at_a_time(
    db_url, tmp_path, monkeypatch
):
    """Batched and per-field writes store the same cells; rewriting a field in a later
    batch replaces its cells, vectors and masks; masks may come for some fields."""
    monkeypatch.setattr(writers, "_IN_LIST", 1)  # every IN list split into chunks
    stored = []
    for batched in (True, False):
        engine = make_engine(
            db_url if batched else f"sqlite:///{tmp_path}/one_at_a_time.db"
        )
        experiment_id, fields = register(engine)
        run_id, fs = open_run(engine, experiment_id)
        batch = field_batch(fields["field_id"], [4, 0, 6])  # a field without cells
        masks = store.encode_masks(np.ones((4, 4), int), np.ones((4, 4), int))
        batch[0]["masks"] = masks
        if batched:
            first = [batch[0] | {"cells": cells_of(9)[0], "features": cells_of(9)[1],
                                 "masks": None}, batch[1]]  # fmt: skip
            store.write_fields_cells(
                engine, run_id=run_id, feature_set_id=fs, fields=first
            )
            store.write_fields_cells(  # field 1 again, with the others
                engine, run_id=run_id, feature_set_id=fs, fields=batch
            )
        else:
            for field in batch:
                store.write_field_cells(
                    engine, run_id=run_id, feature_set_id=fs, **field
                )
        assert store.completed_field_ids(engine, run_id) == set(fields["field_id"])
        _, cells, features = next(
            store.iter_plate_cells(engine, run_id, "classical_baseline")
        )
        stored.append((cells, features))
        saved = store.read_field_masks(engine, run_id, fields["field_id"])
        assert list(saved) == [int(fields["field_id"].iloc[0])]
        with session_scope(engine) as session:
            assert session.scalar(select(func.count()).select_from(Cell)) == 10
            assert session.scalar(select(func.count()).select_from(CellVector)) == 10
            counts = dict(session.execute(select(FieldResult.field_id,
                                                 FieldResult.n_cells)).all())  # fmt: skip
        assert sorted(counts.values()) == [0, 4, 6]
        engine.dispose()
    pd.testing.assert_frame_equal(stored[0][1], stored[1][1])
    pd.testing.assert_frame_equal(stored[0][0], stored[1][0])


def test_write_fields_vectors_stores_a_second_feature_set_and_replaces_it(
    db_url, monkeypatch
):
    monkeypatch.setattr(writers, "_IN_LIST", 1)
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    ids = [int(i) for i in fields["field_id"]]
    store.write_fields_cells(
        engine, run_id=run_id, feature_set_id=fs, fields=field_batch(ids, [4, 0, 6])
    )
    deep = store.ensure_feature_set(
        engine, run_id=run_id, name="deep", kind="embedding",
        feature_names=["d0", "d1"], config={},
    )  # fmt: skip

    def vectors_of(field_id, n, start):
        numbers = np.arange(n, 0, -1)  # any order of the stored cells
        return {"field_id": field_id, "object_numbers": numbers,
                "vectors": np.c_[numbers + start, -numbers].astype(np.float32)}  # fmt: skip

    for start in (0.0, 100.0):  # the second write replaces the first
        store.write_fields_vectors(
            engine, run_id=run_id, feature_set_id=deep,
            fields=[vectors_of(ids[0], 4, start), vectors_of(ids[1], 0, start),
                    vectors_of(ids[2], 6, start)],
        )  # fmt: skip
    got = {f: (n, v) for f, n, v in store.iter_field_vectors(engine, run_id, "deep")}
    assert sorted(got) == [ids[0], ids[2]]
    numbers, values = got[ids[2]]
    np.testing.assert_array_equal(numbers, np.arange(1, 7))
    np.testing.assert_array_equal(values, np.c_[numbers + 100.0, -numbers])
    assert store.embedded_field_ids(engine, run_id, deep) == {ids[0], ids[2]}
    classical = {f: v for f, _, v in
                 store.iter_field_vectors(engine, run_id, "classical_baseline")}  # fmt: skip
    np.testing.assert_array_equal(classical[ids[0]], cells_of(4, start=400.0)[1])
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(CellVector)) == 20


@pytest.mark.parametrize("sizes", [[5], [3, 2, 1]], ids=["one field", "a batch"])
def test_writing_fields_is_all_or_nothing(db_url, monkeypatch, sizes):
    """A failure midway (after cells, before vectors) commits none of the fields."""
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    real_copy = writers._copy_rows

    def failing_copy(connection, table, columns, rows):
        if table.name == "cell_vector":
            raise RuntimeError("disk full")
        return real_copy(connection, table, columns, rows)

    monkeypatch.setattr(writers, "_copy_rows", failing_copy)
    batch = field_batch(fields["field_id"][: len(sizes)], sizes)
    write = (
        partial(store.write_field_cells, **batch[0])
        if len(batch) == 1
        else partial(store.write_fields_cells, fields=batch)
    )
    with pytest.raises(RuntimeError, match="disk full"):
        write(engine, run_id=run_id, feature_set_id=fs)
    assert store.completed_field_ids(engine, run_id) == set()
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Cell)) == 0
        assert session.scalar(select(func.count()).select_from(FieldResult)) == 0


def test_write_fields_cells_rejects_bad_batches(sqlite_url):
    engine = make_engine(sqlite_url)
    batch = field_batch([1, 2], [3, 2])
    write = lambda fields: store.write_fields_cells(  # noqa: E731
        engine, run_id=1, feature_set_id=1, fields=fields
    )
    with pytest.raises(ValueError, match="name a field twice"):
        write([batch[0], batch[0]])
    with pytest.raises(ValueError, match="field 2: cells has 2 rows but features"):
        write([batch[0], batch[1] | {"features": batch[1]["features"][:1]}])
    with pytest.raises(ValueError, match="field 1: cells lacks columns"):
        write([batch[0] | {"cells": batch[0]["cells"].drop(columns="centroid_x")}])
    with pytest.raises(ValueError, match="widths \\[3, 4\\]"):
        write([batch[0], batch[1] | {"features": np.zeros((2, 4), np.float32)}])
    with pytest.raises(ValueError, match="must be 2-D"):
        write([batch[0] | {"features": np.zeros(3, np.float32)}])


def test_write_fields_vectors_rejects_bad_batches(sqlite_url):
    engine = make_engine(sqlite_url)

    def write(*fields):
        store.write_fields_vectors(engine, run_id=1, feature_set_id=1, fields=fields)

    one = {
        "field_id": 1,
        "object_numbers": np.array([1, 2]),
        "vectors": np.zeros((2, 3)),
    }
    with pytest.raises(ValueError, match="name a field twice"):
        write(one, one)
    with pytest.raises(ValueError, match="field 1: 2 object numbers but 1 vectors"):
        write(one | {"vectors": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="widths \\[3, 4\\]"):
        write(one, one | {"field_id": 2, "vectors": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="must be 2-D"):
        write(one | {"vectors": np.zeros(2)})


def test_ensure_feature_set_rejects_changed_names(sqlite_url):
    engine = make_engine(sqlite_url)
    experiment_id, _ = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    assert (
        store.ensure_feature_set(
            engine,
            run_id=run_id,
            name="classical_baseline",
            kind="classical",
            feature_names=["a", "b", "c"],
            config={},
        )
        == fs
    )
    with pytest.raises(ValueError, match="other feature names"):
        store.ensure_feature_set(
            engine,
            run_id=run_id,
            name="classical_baseline",
            kind="classical",
            feature_names=["a"],
            config={},
        )


def test_resolve_run_and_rejects(sqlite_url):
    engine = make_engine(sqlite_url)
    with pytest.raises(ValueError, match="no complete run"):
        store.resolve_run(engine)
    experiment_id, _ = register(engine)
    run_id, _ = open_run(engine, experiment_id)
    store.finish_run(engine, run_id, status="complete", message=None, timings={})
    assert store.resolve_run(engine) == (run_id, experiment_id)
    with pytest.raises(ValueError, match="run 99 does not exist"):
        store.resolve_run(engine, 99)


def test_read_feature_set_rejects_unknown(sqlite_url):
    engine = make_engine(sqlite_url)
    experiment_id, _ = register(engine)
    run_id, _ = open_run(engine, experiment_id)
    with pytest.raises(
        ValueError, match="has no feature set 'resnet'; it has classical_baseline"
    ):
        store.read_feature_set(engine, run_id, "resnet")


def test_resolve_feature_set_aliases_name_the_latest_of_a_kind(sqlite_url):
    engine = make_engine(sqlite_url)
    experiment_id, _ = register(engine)
    run_id, _ = open_run(engine, experiment_id)
    with pytest.raises(
        ValueError, match="no deep feature set; it has classical_baseline"
    ):
        store.resolve_feature_set(engine, run_id, "deep")
    for name, kind in (("cnn_a", "embedding"), ("cnn_b", "embedding"),
                       ("combined_cnn_b", "combined")):  # fmt: skip
        store.ensure_feature_set(
            engine, run_id=run_id, name=name, kind=kind, feature_names=[],
            config={"aggregate": "mean"},
        )  # fmt: skip
    assert store.resolve_feature_set(engine, run_id, "deep") == ("cnn_b", "embedding")
    assert store.resolve_feature_set(engine, run_id, "combined")[0] == "combined_cnn_b"
    assert store.resolve_feature_set(engine, run_id, "cnn_a") == ("cnn_a", "embedding")
    assert store.read_feature_set_config(engine, run_id, "cnn_a") == (
        "embedding", {"aggregate": "mean"}
    )  # fmt: skip
    with pytest.raises(ValueError, match="it has classical_baseline, cnn_a, .*deep"):
        store.resolve_feature_set(engine, run_id, "resnet")
    with pytest.raises(ValueError, match="no feature set 'resnet'"):
        store.read_feature_set_config(engine, run_id, "resnet")


def test_sqlite_store_uses_wal_and_16k_pages(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA page_size")).scalar() == 16384
    old = tmp_path / "old.db"  # a store begun with 4 KiB pages keeps them
    connection = sqlite3.connect(old)
    connection.execute("PRAGMA page_size=4096")
    connection.execute("PRAGMA journal_mode=WAL")  # writes the file's header
    connection.close()
    with make_engine(f"sqlite:///{old}").connect() as connection:
        assert connection.execute(text("PRAGMA page_size")).scalar() == 4096
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_postgres_store_compresses_wide_vectors_with_lz4(postgres_url):
    engine, _, run_id, _, field_id, wide = field_and_embedding(postgres_url, 1280)
    with engine.connect() as connection:
        has_lz4 = connection.execute(
            text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                 "WHERE name = 'default_toast_compression'")
        ).scalar()  # fmt: skip
        compression = connection.execute(text(
            "SELECT setting, source FROM pg_settings "
            "WHERE name = 'default_toast_compression'"
        )).one()  # fmt: skip
        assert tuple(compression) == (
            ("lz4", "session") if has_lz4 else ("pglz", "default")
        )  # set by the store's connections, not by the server's configuration
    rng = np.random.default_rng(0)  # rectified, as pooled CNN features: compressible
    vectors = np.maximum(rng.normal(size=(3, 1280)) - 0.5, 0).astype(np.float32)
    store.write_fields_vectors(
        engine, run_id=run_id, feature_set_id=wide,
        fields=[{"field_id": field_id, "object_numbers": np.arange(1, 4),
                 "vectors": vectors}],
    )  # fmt: skip
    with engine.connect() as connection:
        stored = connection.execute(
            text('SELECT pg_column_compression("values"), pg_column_size("values") '
                 "FROM cell_vector WHERE feature_set_id = :fs"), {"fs": wide},
        ).all()  # fmt: skip
    assert {method for method, _ in stored} == {"lz4" if has_lz4 else "pglz"}
    assert all(size < vectors[0].nbytes for _, size in stored)
    (_, _, got), = store.iter_field_vectors(engine, run_id, "deep")  # fmt: skip
    np.testing.assert_array_equal(got, vectors)


def test_store_versions_are_opened_or_refused_with_the_fix(db_url):
    engine = make_engine(db_url)  # a new store: no per-cell keys, version 7

    def version(value=None):
        with engine.begin() as connection:
            if value is not None:
                connection.execute(sqlalchemy.update(SchemaInfo).values(version=value))
            return connection.scalar(select(SchemaInfo.version))

    def triggers():
        query = (
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cascade%'"
            if engine.dialect.name == "postgresql"
            else "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'"
        )
        with engine.connect() as connection:
            return connection.execute(text(query)).scalar()

    assert version() == SCHEMA_VERSION == 7
    assert triggers() == len(CELL_CASCADES)
    with engine.begin() as connection:  # as made before the version was raised (and,
        make_old_cell_tables(connection)  # for a while, before the triggers came):
        for table in (CellVector.__table__, Cell.__table__):  # no keys, no triggers
            table.drop(connection)
        for table in (Cell.__table__, CellVector.__table__):
            table.create(connection)
    assert version() == 6 and triggers() == 0
    make_engine(db_url, create=False).dispose()  # opened, not written
    assert version() == 6
    make_engine(db_url).dispose()  # a writer's open marks it 7, as it is, with triggers
    assert version() == 7 and triggers() == len(CELL_CASCADES)
    with engine.begin() as connection:
        make_old_cell_tables(connection)  # as a store made before: keys, version 6
    assert version() == 6
    make_engine(db_url).dispose()  # opened as before
    assert version() == 6
    for value, fix in ((5, "use a new database file"), (8, "upgrade PhenoScreen")):
        version(value)
        with pytest.raises(ValueError, match=f"schema version {value} .*opens "
                           f"versions 6, 7; .*{fix}"):  # fmt: skip
            make_engine(db_url)
    with engine.begin() as connection:  # its making was interrupted: no version
        connection.execute(sqlalchemy.delete(SchemaInfo))
    with pytest.raises(ValueError, match="schema version None .*new database file"):
        make_engine(db_url)
    engine.dispose()


def test_a_postgres_server_that_refuses_lz4_is_used_as_it_is(
    postgres_url, monkeypatch, caplog
):
    monkeypatch.setattr("db.session._LZ4_TOAST", "SELECT 1 / 0")  # any refusal
    engine = make_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
        assert connection.connection.driver_connection.autocommit is False
    assert "kept its TOAST compression (division by zero)" in caplog.text
    engine.dispose()


def test_make_engine_rejects(tmp_path):
    with pytest.raises(ValueError, match="not a database URL"):
        make_engine("phenoscreen.db")
    with pytest.raises(ValueError, match="no such file"):
        make_engine(f"sqlite:///{tmp_path}/missing.db", create=False)


def test_phenotype_map_roundtrip_replaces_previous(db_url):
    engine = make_engine(db_url)
    experiment_id, _ = register(engine)
    run_id, _ = open_run(engine, experiment_id)
    points = pd.DataFrame(
        {
            "level": ["well", "compound_dose"],
            "label": ["P1/A01", "x @ 1"],
            "plate": ["P1", None],
            "well": ["A01", None],
            "compound": ["DMSO", "x"],
            "concentration": [np.nan, 1.0],
            "role": ["negative_control", "treatment"],
            "moa": [None, "m"],
            "activity": [0.9, 3.0],
            "umap_x": [0.0, 1.0],
            "umap_y": [1.0, 0.0],
            "cluster": [0, -1],
        }
    )
    store.write_phenotype_map(engine, run_id, points)
    store.write_phenotype_map(engine, run_id, points.iloc[1:], feature_set="deep_x")
    stored = store.read_phenotype_map(engine, run_id)
    assert len(stored) == 1 and stored.loc[0, "label"] == "x @ 1"
    assert stored.loc[0, "feature_set"] == "deep_x"
    assert stored.loc[0, "cluster"] == -1 and stored.loc[0, "plate"] is None
    with pytest.raises(ValueError, match="lacks columns"):
        store.write_phenotype_map(engine, run_id, points.drop(columns="cluster"))


def test_masks_are_stored_with_the_field_and_removed_with_it(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    field_id = int(fields["field_id"].iloc[0])
    nuclei = np.zeros((40, 50), np.int32)
    nuclei[5:10, 5:10], nuclei[20:30, 20:30] = 1, 2
    cells = np.where(nuclei > 0, nuclei, 0)
    cells[3:12, 3:12] = 1
    packed = store.encode_masks(nuclei, cells)
    assert packed["dtype"] == "<u2" and len(packed["labels"]) < nuclei.nbytes / 10
    table, features = cells_of(2)
    store.write_field_cells(
        engine, run_id=run_id, field_id=field_id, feature_set_id=fs, cells=table,
        features=features, qc={}, seconds={}, masks=packed,
    )  # fmt: skip
    got = store.read_field_masks(engine, run_id, [field_id, 999])
    assert list(got) == [field_id]
    np.testing.assert_array_equal(got[field_id][0], nuclei)
    np.testing.assert_array_equal(got[field_id][1], cells)
    store.write_field_failure(engine, run_id=run_id, field_id=field_id, error="x")
    assert store.read_field_masks(engine, run_id, [field_id]) == {}


def test_encode_masks_keeps_large_labels_and_rejects_bad_input():
    big = np.full((3, 4), 70_000, np.int64)
    packed = store.encode_masks(big, big)
    assert packed["dtype"] == "<u4"
    np.testing.assert_array_equal(store.decode_masks(packed)[1], big)
    with pytest.raises(ValueError, match="same shape"):
        store.encode_masks(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        store.encode_masks(-big, big)


def test_well_aggregates_are_cached_for_complete_runs_and_dropped_on_writes(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    wells = store.read_wells(engine, experiment_id)
    profiles = pd.DataFrame(
        {"well_id": wells["well_id"], "Metadata_CellCount": [3, 4],
         "a": [1.0, 2.0], "b": [3.0, 4.0], "c": [5.0, 6.0]}
    )  # fmt: skip
    cache = dict(include_flagged=False, profiles=profiles)
    assert not store.write_well_aggregates(
        engine, run_id, "classical_baseline", **cache
    )
    store.finish_run(engine, run_id, status="complete", message=None, timings={})
    assert store.write_well_aggregates(engine, run_id, "classical_baseline", **cache)
    got = store.read_well_aggregates(
        engine, run_id, "classical_baseline", include_flagged=False
    )
    np.testing.assert_array_equal(got[["a", "b", "c"]], profiles[["a", "b", "c"]])
    assert got["Metadata_CellCount"].tolist() == [3, 4]
    assert (
        store.read_well_aggregates(
            engine, run_id, "classical_baseline", include_flagged=True
        )
        is None
    )
    store.write_field_flags(engine, run_id, pd.Series(dtype=str))  # QC re-flagged
    assert (
        store.read_well_aggregates(
            engine, run_id, "classical_baseline", include_flagged=False
        )
        is None
    )
    with pytest.raises(ValueError, match="lacks columns"):
        store.write_well_aggregates(
            engine, run_id, "classical_baseline", include_flagged=False,
            profiles=profiles.drop(columns="b"),
        )  # fmt: skip


def test_iter_plate_cells_of_some_wells(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    for i, field_id in enumerate(fields["field_id"]):
        table, features = cells_of(3 + i)
        store.write_field_cells(
            engine, run_id=run_id, field_id=int(field_id), feature_set_id=fs,
            cells=table, features=features, qc={}, seconds={},
        )  # fmt: skip
    wells = store.read_wells(engine, experiment_id)
    b02 = wells.loc[wells["Metadata_Well"] == "B02", "well_id"].tolist()
    chunks = list(
        store.iter_plate_cells(engine, run_id, "classical_baseline", well_ids=b02)
    )
    assert len(chunks) == 1 and set(chunks[0][1]["Metadata_Well"]) == {"B02"}
    assert len(chunks[0][1]) == 5
    assert not list(
        store.iter_plate_cells(engine, run_id, "classical_baseline", well_ids=[])
    )


def test_count_flagged_fields_per_well(db_url):
    engine = make_engine(db_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    for field_id in fields["field_id"]:
        table, features = cells_of(2)
        store.write_field_cells(
            engine, run_id=run_id, field_id=int(field_id), feature_set_id=fs,
            cells=table, features=features, qc={}, seconds={},
        )  # fmt: skip
    first = int(fields["field_id"].iloc[0])
    store.write_field_flags(engine, run_id, pd.Series({first: "blurred"}))
    counts = store.count_flagged_fields(engine, run_id).set_index("Metadata_Well")
    assert counts["Metadata_FlaggedFields"].to_dict() == {"A01": 1, "B02": 0}
    assert store.count_flagged_fields(engine, 999).empty


def test_field_batches_commit_alone_unless_more_are_ready(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(writers.time, "monotonic", lambda: now[0])
    batches = store.FieldBatches(max_cells=10, every_s=1.0)
    assert batches.add("a", 5) == ["a"]  # nothing else ready: at once
    assert batches.add("b", 4, more_ready=True) == []
    now[0] = 0.5
    assert batches.add("c", 4, more_ready=True) == []  # 8 cells, 0.5 s
    assert batches.add("d", 4, more_ready=True) == ["b", "c", "d"]  # 12 >= 10
    now[0] = 10.0
    assert batches.add("e", 1, more_ready=True) == []
    now[0] = 10.9
    assert batches.add("f", 1, more_ready=True) == []  # the group waited 0.9 s
    now[0] = 11.0
    assert batches.add("g", 1, more_ready=True) == ["e", "f", "g"]  # 1 s: due
    assert batches.add("h", 1, more_ready=True) == []
    assert batches.take() == ["h"] and batches.take() == []


def test_field_batches_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_cells 0 must be >= 1"):
        store.FieldBatches(max_cells=0)
    with pytest.raises(ValueError, match="every_s -1"):
        store.FieldBatches(every_s=-1)


def test_copy_rows_round_trips_every_column_type(db_url):
    """Bulk inserts (binary COPY with the server's column types on PostgreSQL,
    executemany on SQLite) store numbers and vectors bit for bit."""
    from sqlalchemy import (
        REAL,
        BigInteger,
        Column,
        Float,
        Integer,
        LargeBinary,
        MetaData,
        SmallInteger,
        Table,
        create_engine,
    )

    table = Table(
        "copy_probe", MetaData(),
        Column("a", Integer, primary_key=True), Column("b", BigInteger),
        Column("c", SmallInteger), Column("d", Float), Column("e", REAL),
        Column("v", LargeBinary),
    )  # fmt: skip
    engine = create_engine(db_url)
    table.create(engine)
    rng = np.random.default_rng(0)
    n = 3000
    columns = {
        "a": np.arange(n) - 5, "b": rng.integers(-(2**62), 2**62, n),
        "c": rng.integers(-(2**15), 2**15, n), "d": rng.normal(size=n) * 1e300,
        "e": rng.normal(size=n).astype(np.float32),
        "v": rng.normal(size=(n, 1280)).astype("<f4"),
    }  # fmt: skip
    columns["d"][:2] = [np.nan, np.inf]  # SQLite keeps NaN as NULL
    with engine.begin() as connection:
        writers._copy_rows(
            connection, table, list(columns),
            zip(*[c.tolist() for c in list(columns.values())[:5]],
                [v.tobytes() for v in columns["v"]], strict=True),
        )  # fmt: skip
        stored = connection.execute(select(table).order_by(table.c.a)).all()
    engine.dispose()
    assert len(stored) == n
    for k, name in enumerate("abcde"):
        got = np.array([row[k] for row in stored], columns[name].dtype)
        np.testing.assert_array_equal(got, columns[name])
    vectors = np.stack([np.frombuffer(row[5], "<f4") for row in stored])
    np.testing.assert_array_equal(vectors, columns["v"])


def test_cell_ids_without_their_sequence_are_refused_clearly(postgres_url):
    """A PostgreSQL store whose cell ids draw from no sequence of their own (not
    made by PhenoScreen) gets a clear error, and nothing is written."""
    engine = make_engine(postgres_url)
    experiment_id, fields = register(engine)
    run_id, fs = open_run(engine, experiment_id)
    with engine.begin() as connection:
        connection.execute(text("ALTER SEQUENCE cell_id_seq OWNED BY NONE"))
    batch = field_batch(fields["field_id"][:1], [3])
    with pytest.raises(ValueError, match="no sequence of its own"):
        store.write_fields_cells(engine, run_id=run_id, feature_set_id=fs, fields=batch)
    assert store.completed_field_ids(engine, run_id) == set()
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:pw@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        (
            "postgresql+psycopg://u@h/db?password=pw&sslpassword=x",
            "postgresql+psycopg://u@h/db?password=***&sslpassword=***",
        ),
        # not parseable: masked by pattern
        ("postgresql+psycopg://u:pw@h:notaport/db", "postgresql+psycopg://u:***@h:notaport/db"),
        ("postgresql+psycopg//u:pa/ss@h/db", "postgresql+psycopg//u:***@h/db"),
        # no password: shown as given
        ("sqlite:////tmp/my store:1@x.db", "sqlite:////tmp/my store:1@x.db"),
        ("postgresql+psycopg://u@[::1]:5432/db", "postgresql+psycopg://u@[::1]:5432/db"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_shown_url_masks_every_password(url, shown):
    assert shown_url(url) == shown
