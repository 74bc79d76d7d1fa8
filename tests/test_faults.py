"""Faults of a real run: a lost database connection, a killed worker, a lost scheduler.

Each runs the small demo plate with real servers and processes (PostgreSQL, Dask
scheduler and worker processes) and compares the finished store with an
uninterrupted run on SQLite.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pandas as pd
import psycopg
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from db import store
from db.schema import FieldResult
from db.session import (
    StoreConnectionLost,
    make_engine,
    retry_lost_connection,
    session_scope,
    transient_cause,
)
from db.store import resolve_run
from models.embed import embed_run
from pipeline.run import run_experiment
from tests.conftest import free_port
from tests.models.test_embed import FAST_RECIPE
from tests.pipeline.test_run import demo_config
from tests.test_cli import cell_table

CHANNELS = "DNA=w1,Actin=w2,Mito=w3"


def lost(message="server closed the connection unexpectedly"):
    """What SQLAlchemy raises when the server drops the connection mid-transaction."""
    return OperationalError(
        "INSERT ...", {}, Exception(message), connection_invalidated=True
    )


def test_a_lost_connection_is_retried_until_the_work_goes_through():
    attempts = []

    def work():
        attempts.append(1)
        if len(attempts) < 3:
            raise lost()
        return "written"

    assert retry_lost_connection(work, what="field 7", delays=[0, 0, 0]) == "written"
    assert len(attempts) == 3


def test_a_store_that_stays_away_is_a_clear_error_and_other_errors_are_not_retried():
    def down():
        raise lost("connection refused")

    with pytest.raises(StoreConnectionLost, match="field 7: the database connection"):
        retry_lost_connection(down, what="field 7", delays=[0, 0])

    def locked():
        raise OperationalError(
            "INSERT ...", {}, sqlite3.OperationalError("database is locked")
        )

    with pytest.raises(StoreConnectionLost, match="stayed locked by another program"):
        retry_lost_connection(locked, what="field 7", delays=[0])

    def deadlocked():
        raise OperationalError(
            "DELETE ...", {}, psycopg.errors.DeadlockDetected("deadlock detected")
        )

    with pytest.raises(StoreConnectionLost, match="aborted in conflicts .deadlocks"):
        retry_lost_connection(deadlocked, what="field 7", delays=[0])
    for error in (
        IntegrityError("INSERT ...", {}, Exception("duplicate key")),
        OperationalError("INSERT ...", {}, sqlite3.OperationalError("disk I/O error")),
        OperationalError(
            "INSERT ...", {}, sqlite3.OperationalError("no such table: cell")
        ),
    ):
        attempts = []

        def fails(error=error, attempts=attempts):
            attempts.append(1)
            raise error

        with pytest.raises(type(error)):
            retry_lost_connection(fails, what="field 7", delays=[0, 0])
        assert len(attempts) == 1  # not a lost connection: raised at once
    assert transient_cause(ValueError("x")) is None
    assert transient_cause(psycopg.errors.SerializationFailure("x")) == "conflict"
    assert transient_cause(psycopg.errors.QueryCanceled("x")) is None


def test_a_refused_connection_is_retried_like_a_lost_one():
    """psycopg gives a refused connection (a server restarting) no SQLSTATE."""
    closed = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    attempts = []

    def work():
        attempts.append(1)
        if len(attempts) == 1:
            with closed.connect():
                pass
        return "written"

    assert retry_lost_connection(work, what="field 7", delays=[0]) == "written"
    assert len(attempts) == 2
    with pytest.raises(OperationalError) as refused:
        closed.connect()
    assert transient_cause(refused.value) == "lost"
    with pytest.raises(StoreConnectionLost, match="(?s)connection was lost.*then try"):
        retry_lost_connection(closed.connect, what="cells", delays=[0], then="try")


def test_a_connection_the_server_refuses_for_good_is_not_retried(postgres_url):
    """A wrong database name (or password) gets no SQLSTATE from psycopg at
    connect either, but is not worth retrying; the server's other refusals at
    connect (starting up, too many clients) are."""
    wrong = create_engine(postgres_url.rsplit("/", 1)[0] + "/no_such_database")
    attempts = []

    def work():
        attempts.append(1)
        with wrong.connect():
            pass

    with pytest.raises(OperationalError, match="does not exist"):
        retry_lost_connection(work, what="field 7", delays=[0, 0])
    assert len(attempts) == 1
    failed = 'connection failed: connection to server at "h", port 5432 failed: '
    for reason in ("the database system is starting up", "too many clients already"):
        assert transient_cause(psycopg.OperationalError(f"{failed}FATAL:  {reason}"))
    wrong_password = f'{failed}FATAL:  password authentication failed for user "u"'
    assert transient_cause(psycopg.OperationalError(wrong_password)) is None


def test_a_deadlock_between_two_writers_is_retried(postgres_url):
    """Two transactions lock two rows in opposite orders: PostgreSQL aborts one
    (deadlock detected), which runs again and goes through."""
    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE pair (id int PRIMARY KEY, n int)"))
        connection.execute(text("INSERT INTO pair VALUES (1, 0), (2, 0)"))
    both_hold_one = threading.Barrier(2, timeout=30)
    attempts, errors = [], []

    def work(first, second):
        attempts.append(first)
        with engine.begin() as connection:
            for row in (first, second):
                connection.execute(
                    text("UPDATE pair SET n = n + 1 WHERE id = :id"), {"id": row}
                )
                if row == first and attempts.count(first) == 1:
                    both_hold_one.wait()  # the first attempts cross: a deadlock

    def writer(first, second):
        try:
            retry_lost_connection(partial(work, first, second), what=f"writer {first}",
                                  delays=[0.1, 0.1])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(attempts) == 3  # one writer was aborted once and ran again
    with engine.connect() as connection:
        assert connection.execute(text("SELECT n FROM pair ORDER BY id")).all() == [
            (2,), (2,)
        ]  # fmt: skip
    engine.dispose()


def kill_a_waiting_transaction(admin, table, mode="EXCLUSIVE"):
    """Lock `table` until a transaction waits for it (60 s at most), then kill that
    transaction's connection and release the lock; whether one was killed.

    The ``EXCLUSIVE`` mode stops writers only, ``ACCESS EXCLUSIVE`` readers too."""
    with admin.connect() as connection, connection.begin():
        connection.execute(text(f"LOCK TABLE {table} IN {mode} MODE"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # statistics are a snapshot per transaction unless cleared
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            waiting = connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid()"
                )
            ).scalar()
            if waiting is not None:
                return connection.execute(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting}
                ).scalar()
            time.sleep(0.02)
    return False


def fields_done(url):
    try:
        engine = make_engine(url, create=False)
    except ValueError:  # no store yet
        return 0
    try:
        with session_scope(engine) as session:
            return session.scalar(select(func.count()).select_from(FieldResult))
    except Exception:  # noqa: BLE001 - no run yet
        return 0
    finally:
        engine.dispose()  # no idle connection left for the killer to find


def wait_for_fields(url, n, timeout=120):
    deadline = time.monotonic() + timeout
    while fields_done(url) < n:
        assert time.monotonic() < deadline, f"the run stored fewer than {n} fields"
        time.sleep(0.05)


@pytest.fixture
def reference(demo_plate, tmp_path_factory):
    """The demo plate run once, uninterrupted, on SQLite."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reference')}/reference.db"
    run_experiment(demo_plate["images"], demo_plate["platemap"],
                   config=demo_config(), db_url=url)  # fmt: skip
    return cell_table(url)


@pytest.mark.slow
def test_a_run_survives_its_database_connections_being_killed(
    demo_plate, postgres_url, reference, monkeypatch
):
    """Twice, the run's write transaction is killed while it waits for a lock; the
    field's transaction is retried and the run ends with the uninterrupted cells."""
    # each field its own transaction, so a field's write is always still to come
    monkeypatch.setattr(store, "FieldBatches", partial(store.FieldBatches, max_cells=1))
    admin = create_engine(postgres_url, poolclass=NullPool)
    killed = []

    def kill_a_writer():
        for after in (20, 50):
            wait_for_fields(postgres_url, after)
            killed.append(kill_a_waiting_transaction(admin, "field_result"))

    killer = threading.Thread(target=kill_a_writer, daemon=True)
    killer.start()
    run_experiment(demo_plate["images"], demo_plate["platemap"],
                   config=demo_config(), db_url=postgres_url)  # fmt: skip
    killer.join(timeout=60)
    admin.dispose()
    # two writes died inside their transaction: without the retry the run would
    # have raised; it finished with the same cells as the uninterrupted run
    assert killed == [True, True]
    pd.testing.assert_frame_equal(cell_table(postgres_url), reference)


def embedded(url):
    """Embed a stored run with the fast test recipe; its vectors per field, keyed by
    plate, well and site: {key: (object numbers, vectors)}."""
    engine = make_engine(url, create=False)
    run_id, _ = resolve_run(engine)
    name = embed_run(engine, run_id, FAST_RECIPE)["feature_set"]
    fields = store.read_run_fields(engine, run_id)[2].set_index("field_id")
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    vectors = {
        tuple(fields.loc[field_id, keys]): (numbers, values)
        for field_id, numbers, values in store.iter_field_vectors(engine, run_id, name)
    }
    engine.dispose()
    return vectors


@pytest.mark.slow
def test_an_embedding_survives_its_database_connections_being_killed(
    demo_plate, postgres_url, tmp_path, monkeypatch
):
    """A read of the crops' masks is killed while it waits for a lock, then a write
    of the embedding's vectors and its first retry; each is run again, and the
    vectors equal those of an uninterrupted embedding."""
    url = f"sqlite:///{tmp_path}/reference.db"
    for db_url in (url, postgres_url):
        run_experiment(demo_plate["images"], demo_plate["platemap"],
                       config=demo_config(), db_url=db_url)  # fmt: skip
    reference = embedded(url)
    # each field its own write: the first is queued soon after the model is loaded
    monkeypatch.setattr(store, "FieldBatches", partial(store.FieldBatches, max_cells=1))
    admin = create_engine(postgres_url, poolclass=NullPool)
    killed = []

    def kill_a_reader_and_a_writer():
        killed.append(
            kill_a_waiting_transaction(admin, "field_mask", "ACCESS EXCLUSIVE")
        )
        for _ in range(2):  # locked again at once: the retry (0.5 s later) waits
            killed.append(kill_a_waiting_transaction(admin, "cell_vector"))

    killer = threading.Thread(target=kill_a_reader_and_a_writer, daemon=True)
    killer.start()
    got = embedded(postgres_url)
    killer.join(timeout=60)
    admin.dispose()
    assert killed == [True, True, True]  # without the retries the embedding fails
    assert got.keys() == reference.keys()
    for key, (numbers, values) in reference.items():
        np.testing.assert_array_equal(got[key][0], numbers)
        np.testing.assert_allclose(got[key][1], values, rtol=1e-5, atol=1e-6)


@pytest.fixture
def processes():
    """Processes a test starts (each in its own group), killed at teardown."""
    started = []
    yield started
    stop(*started)


def start(args, started):
    process = subprocess.Popen([sys.executable, "-m", "dask", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    started.append(process)
    return process


def stop(*processes):
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cluster(port, started):
    """A scheduler and two single-threaded worker processes (with nannies)."""
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                       "--dashboard-address", ":0"], started)  # fmt: skip
    workers = [start(["worker", address, "--nthreads", "1", "--name", f"w{i}",
                      "--dashboard-address", ":0"], started) for i in range(2)]  # fmt: skip
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    return address, scheduler, workers


def run_command(demo_plate, url, address):
    return [sys.executable, "-m", "pipeline.cli", "run", str(demo_plate["images"]),
            "--platemap", str(demo_plate["platemap"]), "--layout", "imagexpress",
            "--channels", CHANNELS, "--scheduler", address, "--db", url]  # fmt: skip


def start_run(command, started):
    """`phenoscreen run` in the background, its output piped, killed at teardown."""
    run = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own group: stop()
    started.append(run)
    return run


@pytest.mark.slow
def test_a_killed_worker_machine_leaves_its_fields_to_the_others(
    demo_plate, tmp_path, reference, processes
):
    address, _, workers = cluster(free_port(), processes)
    url = f"sqlite:///{tmp_path}/s.db"
    run = start_run(run_command(demo_plate, url, address), processes)
    wait_for_fields(url, 20)
    stop(workers[0])  # the worker and its nanny: a machine gone
    assert fields_done(url) < 96  # the kill landed mid-run
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert "96 processed" in output and "0 failed" in output
    pd.testing.assert_frame_equal(cell_table(url), reference)


@pytest.mark.slow
def test_a_lost_scheduler_stops_the_run_and_a_rerun_resumes_it(
    demo_plate, tmp_path, reference, processes
):
    port = free_port()
    address, scheduler, workers = cluster(port, processes)
    url = f"sqlite:///{tmp_path}/s.db"
    run = start_run(run_command(demo_plate, url, address), processes)
    wait_for_fields(url, 20)
    stop(scheduler, *workers)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 1, output
    assert "lost the connection to tcp://" in output and "Traceback" not in output
    done = fields_done(url)
    assert 20 <= done < 96
    assert f"after {done} of 96 fields were stored" in output  # all it had, written
    with session_scope(make_engine(url, create=False)) as session:
        complete = session.scalar(  # a field whose task died with the scheduler
            select(func.count())  # is stored as failed, and retried by the rerun
            .select_from(FieldResult)
            .where(FieldResult.status == "complete")
        )
    address, _, _ = cluster(port, processes)  # restarted
    rerun = subprocess.run(run_command(demo_plate, url, address),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{96 - complete} processed, {complete} already done" in rerun.stdout
    pd.testing.assert_frame_equal(cell_table(url), reference)
