"""Faults of a real run: a lost database connection, a killed worker, a lost scheduler.

Each runs the small demo plate with real servers and processes (PostgreSQL, Dask
scheduler and worker processes) and compares the finished store with an
uninterrupted run on SQLite.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from db.schema import FieldResult
from db.session import (
    StoreConnectionLost,
    make_engine,
    retry_lost_connection,
    session_scope,
)
from pipeline.run import run_experiment
from tests.pipeline.test_run import demo_config
from tests.test_cli import cell_table

CHANNELS = "DNA=w1,Actin=w2,Mito=w3"


def lost(message="server closed the connection unexpectedly"):
    return OperationalError("INSERT ...", {}, Exception(message))


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
    attempts = []

    def duplicate():
        attempts.append(1)
        raise IntegrityError("INSERT ...", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        retry_lost_connection(duplicate, what="field 7", delays=[0, 0])
    assert len(attempts) == 1  # a real error is not a lost connection


def fields_done(url):
    try:
        with session_scope(make_engine(url, create=False)) as session:
            return session.scalar(select(func.count()).select_from(FieldResult))
    except Exception:  # noqa: BLE001 - no store yet
        return 0


@pytest.fixture
def reference(demo_plate, tmp_path_factory):
    """The demo plate run once, uninterrupted, on SQLite."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reference')}/reference.db"
    run_experiment(demo_plate["images"], demo_plate["platemap"],
                   config=demo_config(), db_url=url)  # fmt: skip
    return cell_table(url)


@pytest.mark.slow
def test_a_run_survives_its_database_connections_being_killed(
    demo_plate, postgres_url, reference
):
    """PostgreSQL backends of the run are terminated twice mid-run; it retries."""
    admin = create_engine(postgres_url, poolclass=NullPool)
    killed = []

    def kill_backends():
        for after in (20, 50):
            deadline = time.monotonic() + 120
            while fields_done(postgres_url) < after and time.monotonic() < deadline:
                time.sleep(0.05)
            with admin.connect() as connection:
                killed.append(connection.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).scalar())  # fmt: skip

    killer = threading.Thread(target=kill_backends)
    killer.start()
    run_experiment(demo_plate["images"], demo_plate["platemap"],
                   config=demo_config(), db_url=postgres_url)  # fmt: skip
    killer.join()
    admin.dispose()
    assert len(killed) == 2 and all(n >= 1 for n in killed)  # connections did drop
    pd.testing.assert_frame_equal(cell_table(postgres_url), reference)


def start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "dask", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)  # fmt: skip


def stop(*processes):
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cluster(port):
    """A scheduler and two single-threaded worker processes (with nannies)."""
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                       "--dashboard-address", ":0"])  # fmt: skip
    workers = [start(["worker", address, "--nthreads", "1", "--name", f"w{i}",
                      "--dashboard-address", ":0"]) for i in range(2)]  # fmt: skip
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    return address, scheduler, workers


def run_command(demo_plate, url, address):
    return [sys.executable, "-m", "pipeline.cli", "run", str(demo_plate["images"]),
            "--platemap", str(demo_plate["platemap"]), "--layout", "imagexpress",
            "--channels", CHANNELS, "--scheduler", address, "--db", url]  # fmt: skip


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_killed_worker_machine_leaves_its_fields_to_the_others(
    demo_plate, tmp_path, reference
):
    address, scheduler, workers = cluster(free_port())
    url = f"sqlite:///{tmp_path}/s.db"
    try:
        run = subprocess.Popen(run_command(demo_plate, url, address),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while fields_done(url) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop(workers[0])  # the worker and its nanny: a machine gone
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        assert "96 processed" in output and "0 failed" in output
    finally:
        stop(*workers, scheduler)
    pd.testing.assert_frame_equal(cell_table(url), reference)


@pytest.mark.slow
def test_a_lost_scheduler_stops_the_run_and_a_rerun_resumes_it(
    demo_plate, tmp_path, reference
):
    port = free_port()
    address, scheduler, workers = cluster(port)
    url = f"sqlite:///{tmp_path}/s.db"
    try:
        run = subprocess.Popen(run_command(demo_plate, url, address),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while fields_done(url) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop(scheduler, *workers)
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 1, output
        assert "scheduler" in output.lower() and "Traceback" not in output
        done = fields_done(url)
        assert 20 <= done < 96
        address, scheduler, workers = cluster(port)  # restarted
        rerun = subprocess.run(run_command(demo_plate, url, address),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert f"{96 - done} processed, {done} already done" in rerun.stdout
    finally:
        stop(*workers, scheduler)
    pd.testing.assert_frame_equal(cell_table(url), reference)
