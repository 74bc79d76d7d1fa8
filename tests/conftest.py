"""Shared fixtures: synthetic fields, a small demo plate, stores, real data paths."""

from __future__ import annotations

import os
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk
from sqlalchemy import create_engine, text

from pipeline.config import config_from_dict
from pipeline.images.demo import CHANNELS
from pipeline.run import run_experiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PG_URL = os.environ.get(
    "PHENOSCREEN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shared_data(relative: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(
            f"real data {path} is absent (../shared/data is not beside this clone)"
        )
    return path


def make_field(
    n_cells: int = 5,
    *,
    shape: tuple[int, int] = (128, 128),
    n_channels: int = 2,
    rng: int = 0,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A (C, Y, X) uint16 field of bright disks (radius 6) at known, separated centres."""
    generator = np.random.default_rng(rng)
    image = generator.normal(100, 5, (n_channels, *shape)).clip(0).astype(np.uint16)
    centres: list[tuple[int, int]] = []
    while len(centres) < n_cells:
        y, x = (int(v) for v in generator.integers(12, np.array(shape) - 12))
        if all((y - a) ** 2 + (x - b) ** 2 > 30**2 for a, b in centres):
            centres.append((y, x))
    for i, (y, x) in enumerate(centres):
        rr, cc = disk((y, x), 6, shape=shape)
        image[0, rr, cc] = 1000 + 50 * i
        for c in range(1, n_channels):
            rr, cc = disk((y, x), 12, shape=shape)
            image[c, rr, cc] = np.maximum(image[c, rr, cc], 400 * c)
    return image, centres


@pytest.fixture(scope="session")
def demo_plate(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small demo plate (96 wells x 1 field of 128 px), made once per session."""
    from pipeline.images.demo import write_demo_plate

    out = tmp_path_factory.mktemp("demo")
    return write_demo_plate(
        out, n_plates=1, fields_per_well=1, field_size_px=128, cells_per_field=8, seed=1
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/t.db"


def _postgres_available() -> bool:
    try:
        with create_engine(PG_URL).connect():
            return True
    except Exception:  # noqa: BLE001 - any connection failure means "not available"
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards.

    Skips when no server answers, except under CI (CI=true), where it fails: .ci/run
    starts a server, so its absence there is a defect.
    """
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} does not answer under CI")
        pytest.skip(f"no PostgreSQL server at {PG_URL} (set PHENOSCREEN_TEST_PG_URL)")
    name = f"phenoscreen_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def demo_run(demo_plate, tmp_path_factory):
    """The small demo plate analysed into SQLite once per session: (url, summary).

    Shared by the model and dashboard tests; tests that change what the views show
    work on a copy (`copy_store`).
    """
    url = f"sqlite:///{tmp_path_factory.mktemp('demo_run')}/t.db"
    config = config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    summary = run_experiment(
        demo_plate["images"], demo_plate["platemap"], config=config, db_url=url
    )
    return url, summary


def copy_store(url: str, directory: Path) -> str:
    """Copy a SQLite store (WAL included, via SQLite's backup API); return its URL."""
    source = sqlite3.connect(url.removeprefix("sqlite:///"))
    target_path = directory / "copy.db"
    target = sqlite3.connect(target_path)
    with target:
        source.backup(target)
    source.close()
    target.close()
    return f"sqlite:///{target_path}"
