"""Engines and sessions: SQLite (WAL) by default, PostgreSQL through the same code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from db.schema import SCHEMA_VERSION, Base, SchemaInfo


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str, *, create: bool = True) -> Engine:
    """Open the store at `url`, creating the schema if `create`.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///path/to/phenoscreen.db`` (WAL mode, foreign keys
        on) or ``postgresql+psycopg://user@host:5432/db``.
    create : bool
        Create missing tables (and the SQLite file's folder). With False, a store
        without tables is an error.

    Returns
    -------
    Engine

    Raises
    ------
    ValueError
        If `url` is not a database URL, the store has no schema and `create` is
        False, or its schema version differs from this code's.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(
            f"db URL {url!r} is not a database URL; use sqlite:///PATH.db or "
            "postgresql+psycopg://USER@HOST:PORT/DB."
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                raise ValueError(
                    f"db {url!r}: no such file {str(path)!r}; run a plate first."
                )
        engine = create_engine(parsed)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(parsed, pool_pre_ping=True)
    has_schema = inspect(engine).has_table("schema_info")
    if not has_schema:
        if not create:
            raise ValueError(
                f"db {url!r} holds no PhenoScreen store; run a plate first."
            )
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
    else:
        with Session(engine) as session:
            version = session.scalar(select(SchemaInfo.version))
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"db {url!r} has schema version {version} but this PhenoScreen expects "
                f"{SCHEMA_VERSION}; use a new database file."
            )
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Yield a session inside one transaction: committed on success, else rolled back."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
