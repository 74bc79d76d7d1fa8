"""Engines and sessions: SQLite (WAL) by default, PostgreSQL through the same code."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, event, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
)
from sqlalchemy.orm import Session, sessionmaker

from db.schema import (
    OPENED_VERSIONS,
    SCHEMA_VERSION,
    Base,
    SchemaInfo,
    create_cell_cascades,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Waits (s) before each new attempt of a unit of work after a lost connection.
RECONNECT_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)


class StoreConnectionLost(RuntimeError):
    """The store stayed unreachable (locked, in conflict) through every attempt."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # 16 KiB pages for new stores (existing ones keep theirs): a 1,280-d vector
    # (5 KiB) fits one page instead of spilling over two; writes of vectors
    # ~1.2x faster, reads unchanged (benchmarks/bench_sql_insert.py)
    cursor.execute("PRAGMA page_size=16384")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: Sets the session's TOAST compression to LZ4 where the server has it
#: (PostgreSQL 14 or later built with lz4); a no-op elsewhere.
_LZ4_TOAST = (
    "SELECT set_config('default_toast_compression', 'lz4', false) FROM pg_settings "
    "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
)


def _postgres_session(dbapi_connection: Any, _record: Any) -> None:
    # Values over ~2 KiB (vectors of 500 floats or more, masks) are compressed as
    # they are stored; pooled CNN features are ~70 % zeros, which PostgreSQL's
    # default pglz compressed 6-7x slower than LZ4 (benchmarks/bench_sql_insert.py).
    # Columns without a compression of their own, in stores old and new. Only
    # speed depends on it: a server that refuses it is used as it is.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(_LZ4_TOAST)
    except Exception as exc:  # noqa: BLE001 - any refusal leaves pglz, slower
        logger.warning("PostgreSQL kept its TOAST compression (%s)", exc)
    finally:
        dbapi_connection.autocommit = autocommit


def _sqlite_path(url: str, database: str, *, create: bool) -> None:
    """Check a SQLite store's path without writing anything."""
    path = Path(database)
    if path.is_dir():
        raise ValueError(
            f"db {url!r}: {str(path)!r} is a folder; name a .db file in it."
        )
    if not create and not path.exists():
        raise ValueError(f"db {url!r}: no such file {str(path)!r}; run a plate first.")
    if create:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing != path and not existing.is_dir():
            raise ValueError(
                f"db {url!r}: cannot create a store under {str(existing)!r}, which is "
                "a file; choose a path in a folder."
            )
        folder = existing if existing.is_dir() else existing.parent
        for target in {existing, folder}:  # SQLite writes -wal/-shm files beside it
            if not os.access(target, os.W_OK):
                raise ValueError(
                    f"db {url!r}: {str(target)!r} is not writable; choose a path "
                    "you can write to."
                )
    if path.is_file() and path.stat().st_size:
        _check_tables(url, _sqlite_tables(url, path))


def _sqlite_tables(url: str, path: Path) -> list[str]:
    """Table names of an existing SQLite file, read-only (the file is not touched)."""
    try:
        with closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return [name for (name,) in rows]
    except sqlite3.DatabaseError as exc:
        raise ValueError(
            f"db {url!r}: {str(path)!r} is not a SQLite database ({exc}); name a new "
            "file or a PhenoScreen store."
        ) from exc


def _check_tables(url: str, tables: list[str]) -> None:
    """Refuse a database that holds other tables but no PhenoScreen store."""
    if tables and "schema_info" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise ValueError(
            f"db {shown_url(url)!r} holds {len(tables)} tables of another program "
            f"({shown}) and no PhenoScreen store; nothing was added to it. Use a new "
            "database file or an empty database."
        )


def shown_url(url: str) -> str:
    """Return `url` as messages show it, its password masked.

    Parameters
    ----------
    url : str
        A database URL, parseable or not.

    Returns
    -------
    str
        The URL with ``***`` for the password after the user name and for
        ``password`` and ``sslpassword`` query parameters; an unparseable URL gets
        the same masking by pattern.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # e.g. a port that is not a number
        shown = _PASSWORD_IN_URL.sub(r"\1***@", url)
    else:  # rendered only to mask: rendering re-quotes paths
        shown = url if parsed.password is None else parsed.render_as_string()
    return _PASSWORD_PARAMETER.sub(r"\1***", shown)


#: ``user:password@`` of a URL that cannot be parsed (not ``scheme://``), up to
#: its last ``@``.
_PASSWORD_IN_URL = re.compile(r"([^\s:/@]+:)(?!//)\S*@")
#: A ``password=`` or ``sslpassword=`` query parameter (libpq takes both).
_PASSWORD_PARAMETER = re.compile(r"(?i)(\b(?:ssl)?password=)[^&\s]*")


def _engine(url: str, *, create: bool) -> Engine:
    """Check `url` (`_sqlite_path` for SQLite) and create its engine; no writes."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port not a number
        raise ValueError(
            f"db URL {shown_url(url)!r} is not a database URL ({exc}); use "
            "sqlite:///PATH.db or postgresql+psycopg://USER@HOST:PORT/DB."
        ) from exc
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _sqlite_path(url, parsed.database, create=create)
            engine = create_engine(parsed)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        engine = create_engine(parsed, pool_pre_ping=True)
        if parsed.get_backend_name() == "postgresql":
            event.listen(engine, "connect", _postgres_session)
        return engine
    except (ImportError, NoSuchModuleError) as exc:
        raise ValueError(
            f"db URL {shown_url(url)!r}: no driver for {parsed.drivername!r} is "
            f"installed ({exc}); PhenoScreen stores run on sqlite:///PATH.db or "
            "postgresql+psycopg://USER@HOST:PORT/DB."
        ) from exc


def _tables(url: str, engine: Engine) -> list[str]:
    """Table names of the database behind `engine`; refuse another program's."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite":  # read-only: pragmas change files
        path = Path(database) if database and database != ":memory:" else None
        tables = _sqlite_tables(url, path) if path and path.is_file() else []
    else:  # every schema a program may use, not only the default one
        try:
            inspector = inspect(engine)
            tables = [
                name
                for schema in inspector.get_schema_names()
                if schema != "information_schema" and not schema.startswith("pg_")
                for name in inspector.get_table_names(schema=schema)
            ]
            if "schema_info" in tables:
                tables = inspector.get_table_names()  # ours: the default schema
        except DBAPIError as exc:
            raise ValueError(
                f"db {shown_url(url)!r} cannot be opened as a database ({exc.orig}); "
                "check the URL and that the server runs."
            ) from exc
    _check_tables(url, tables)
    return tables


def check_store(url: str, *, create: bool = True) -> None:
    """Check that `url` can hold (or holds) a PhenoScreen store; write nothing.

    Commands call it before reading their inputs, so store problems come first,
    and open the store with `make_engine` only when they write.

    Raises
    ------
    ValueError
        As `make_engine`.
    """
    engine = _engine(url, create=create)
    try:
        tables = _tables(url, engine)
    finally:
        engine.dispose()
    if not create and "schema_info" not in tables:
        raise ValueError(
            f"db {shown_url(url)!r} holds no PhenoScreen store; run a plate first."
        )


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
        Naming the fix, if `url` is not a database URL or its driver is not
        installed; the SQLite path is a folder, under a file, or not writable; the
        database cannot be reached or is not a database file; it holds another
        program's tables (left untouched); the store has no schema and `create` is
        False; or its schema version is not one this code opens (`OPENED_VERSIONS`).
    """
    check_store(url, create=create)
    engine = _engine(url, create=create)
    if engine.url.get_backend_name() == "sqlite" and create:
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    if not inspect(engine).has_table("schema_info"):
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
    else:
        try:
            with Session(engine) as session:
                version = session.scalar(select(SchemaInfo.version))
        except DBAPIError as exc:
            raise ValueError(
                f"db {shown_url(url)!r} has a schema_info table that is not "
                f"PhenoScreen's ({exc.orig}); use a new database file or an empty "
                "database."
            ) from exc
        tables = inspect(engine)
        if (
            version == 6
            and create
            and tables.has_table("cell")
            and not tables.get_foreign_keys("cell")
        ):
            # made between dropping the per-cell keys and raising the version to 7
            # (2026-12-06), some before the triggers that replace the keys' cascades
            # came: given the triggers and marked 7, so older PhenoScreens refuse it
            with engine.begin() as connection:
                create_cell_cascades(connection)
                connection.execute(update(SchemaInfo).values(version=SCHEMA_VERSION))
            version = SCHEMA_VERSION
        if version not in OPENED_VERSIONS:
            fix = (
                "it was made by a newer PhenoScreen: upgrade PhenoScreen"
                if version is not None and version > max(OPENED_VERSIONS)
                else "use a new database file"
            )
            raise ValueError(
                f"db {shown_url(url)!r} has schema version {version} but this "
                f"PhenoScreen opens versions {', '.join(map(str, OPENED_VERSIONS))}; "
                f"{fix}."
            )
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Yield a session inside one transaction: committed on success, else rolled back."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


#: PostgreSQL SQLSTATEs of a lost or refused connection and of a killed backend.
_LOST_SQLSTATES = ("08", "57P01", "57P02", "57P03")
#: PostgreSQL's refusals at connect that running again cannot mend (psycopg gives
#: them no SQLSTATE): a wrong password, user or database, an access rule.
_REFUSED_FOR_GOOD = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "not permitted to log in",
)
#: PostgreSQL SQLSTATEs of a transaction aborted in a conflict with another one
#: (deadlock detected, serialization failure): it succeeds when run again.
_CONFLICT_SQLSTATES = ("40P01", "40001")


def transient_cause(exc: BaseException) -> str | None:
    """Return why a database error is worth retrying, or None if it is not.

    Parameters
    ----------
    exc : BaseException
        An error raised by SQLAlchemy or by the driver (psycopg, sqlite3).

    Returns
    -------
    str or None
        ``"lost"`` for a dropped or refused connection (SQLAlchemy invalidated it,
        PostgreSQL SQLSTATE class 08 or 57P01-57P03, or psycopg's operational error
        without a SQLSTATE: the connection failed, or the server refused it while
        starting up or with too many clients), ``"locked"`` for SQLite's "database
        is locked", ``"conflict"`` for a PostgreSQL transaction aborted by a
        deadlock or a serialization failure (40P01, 40001), None for any other
        error (a full disk, a missing table, a cancelled statement, a wrong
        password, user or database name at connect: running it again would not
        help).
    """
    orig = getattr(exc, "orig", None) or exc
    if getattr(exc, "connection_invalidated", False):
        return "lost"
    sqlstate = getattr(orig, "sqlstate", None) or ""
    if sqlstate.startswith(_LOST_SQLSTATES):
        return "lost"
    if isinstance(orig, psycopg.OperationalError) and not sqlstate:
        # refused or broken before the server said why (a restart), or refused by
        # the server (starting up, too many clients); not for a wrong password or
        # database name, which running again cannot mend
        text = str(orig)
        return None if any(s in text for s in _REFUSED_FOR_GOOD) else "lost"
    if sqlstate in _CONFLICT_SQLSTATES:
        return "conflict"
    if isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig):
        return "locked"
    return None


#: Per `transient_cause`: what went wrong for good, and what happened once.
_PROBLEMS = {
    "lost": "the database connection was lost; check that the database server is up",
    "locked": "the database stayed locked by another program; close it",
    "conflict": "the transaction kept being aborted in conflicts (deadlocks, "
    "serialization failures) with another writer of this store; let it finish",
}
_EVENTS = {
    "lost": "database connection lost",
    "locked": "database locked",
    "conflict": "transaction aborted in a conflict with another writer",
}


def store_problem(cause: str) -> str:
    """Return what went wrong for good, per `transient_cause`, and what to check.

    Parameters
    ----------
    cause : {"lost", "locked", "conflict"}

    Returns
    -------
    str
        For a message: the problem and what to check.

    Raises
    ------
    KeyError
        If `cause` is not one `transient_cause` returns.
    """
    return _PROBLEMS[cause]


def retry_lost_connection(
    work: Callable[[], T],
    *,
    what: str,
    delays: Sequence[float] = RECONNECT_DELAYS_S,
    then: str = "rerun: completed fields are kept and the run resumes",
) -> T:
    """Run one unit of work (a whole transaction), again after a lost connection.

    A dropped database connection (the server restarted, a network blip, a killed
    backend), a SQLite database locked by another writer or a PostgreSQL deadlock
    with another writer rolls the transaction back, so the unit is simply run
    again on a fresh connection, after each of `delays`. Any other error
    (`transient_cause` None) is raised at once.

    Parameters
    ----------
    work : callable
        Runs the transaction (e.g. `db.store.write_field_cells` of one field); it
        must be safe to repeat after a rollback.
    what : str
        Named in the log and the error, e.g. ``"field 12"``.
    delays : sequence of float
        Seconds to wait before each new attempt (exponential back-off).
    then : str
        What the user does after the last attempt failed, in the error.

    Returns
    -------
    The result of `work`.

    Raises
    ------
    StoreConnectionLost
        If the connection is still lost (the database still locked, the
        transaction still aborted by conflicts) after the last attempt.
    """
    for attempt, delay in enumerate([*delays, None]):
        try:
            return work()
        except Exception as exc:
            cause = transient_cause(exc)
            if cause is None:
                raise
            if delay is None:
                problem = store_problem(cause)
                raise StoreConnectionLost(
                    f"{what}: {problem} ({len(delays)} retries over "
                    f"{sum(delays):g} s failed: {getattr(exc, 'orig', exc)}), then "
                    f"{then}."
                ) from exc
            logger.warning(
                "%s: %s (%s); retrying in %g s (attempt %d of %d)",
                what, _EVENTS[cause], getattr(exc, "orig", exc), delay, attempt + 2,
                len(delays) + 1,
            )  # fmt: skip
            time.sleep(delay)
