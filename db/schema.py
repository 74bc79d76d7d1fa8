"""SQLAlchemy 2.0 models of the PhenoScreen store.

experiment -> plate -> well (plate-map metadata) -> field (image files);
run (config, status, timings) -> field_result (per-field status, QC and flags),
illumination_function (per plate and channel) and
cell (objects found in a field) -> cell_vector (one float32 vector per cell and
feature_set: classical features or a CNN embedding; these two per-cell tables have
no foreign keys, for write speed: their writers check the parents per
transaction); well_profile holds imported
per-well profiles (CellProfiler/pycytominer tables) that come without cells;
field_mask keeps each field's nucleus and cell labels (for outlines and galleries);
well_aggregate caches per-well profiles aggregated from cells and table_cache the
tables computed from them (hit list, compound-doses), both dropped by any write to
the run's cells, vectors, flags or imported profiles;
model_checkpoint -> training_epoch record fine-tuned networks and their training log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The schema version of new stores: 7 since 2026-12-06, when the per-cell tables
#: lost their foreign keys (`Cell`), so that PhenoScreen versions before it, which
#: would write them unchecked, refuse these stores.
SCHEMA_VERSION = 7
#: Versions this code opens: 6, stores made before, keep their keys and work as they
#: did (`make_old_cell_tables`).
OPENED_VERSIONS = (6, 7)

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Return the current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention for constraints."""

    metadata = MetaData(naming_convention=_NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SchemaInfo(Base):
    """One row: the schema version this store was created with."""

    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int]


class Experiment(Base):
    """A set of plates imaged with one layout and channel map."""

    __tablename__ = "experiment"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    image_root: Mapped[str] = mapped_column(Text)
    channels: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )


class Plate(Base):
    """One physical plate (barcode)."""

    __tablename__ = "plate"
    __table_args__ = (UniqueConstraint("experiment_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiment.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    plate_format: Mapped[int]


class Well(Base):
    """A well with its plate-map metadata."""

    __tablename__ = "well"
    __table_args__ = (UniqueConstraint("plate_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    plate_id: Mapped[int] = mapped_column(
        ForeignKey("plate.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(4))
    row_index: Mapped[int]
    column_index: Mapped[int]
    compound: Mapped[str] = mapped_column(String(300), index=True)
    concentration: Mapped[float | None] = mapped_column(Float)
    concentration_unit: Mapped[str | None] = mapped_column(String(20))
    role: Mapped[str] = mapped_column(String(20))
    moa: Mapped[str | None] = mapped_column(Text)
    smiles: Mapped[str | None] = mapped_column(Text)
    extra: Mapped[dict[str, Any]]


class Field(Base):
    """One site of a well: its image files, relative to the experiment's image root."""

    __tablename__ = "field"
    __table_args__ = (UniqueConstraint("well_id", "site"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    well_id: Mapped[int] = mapped_column(
        ForeignKey("well.id", ondelete="CASCADE"), index=True
    )
    site: Mapped[int]
    files: Mapped[dict[str, Any]]


class Run(Base):
    """One analysis of an experiment with one config; reruns resume it."""

    __tablename__ = "run"
    __table_args__ = (UniqueConstraint("experiment_id", "analysis_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiment.id", ondelete="CASCADE"), index=True
    )
    analysis_key: Mapped[str] = mapped_column(String(64))
    config_toml: Mapped[str] = mapped_column(Text)
    segmenter: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(Text)
    versions: Mapped[dict[str, Any]]
    timings: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FieldResult(Base):
    """Outcome of one field in one run, written in the transaction of its cells."""

    __tablename__ = "field_result"
    __table_args__ = (UniqueConstraint("run_id", "field_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    field_id: Mapped[int] = mapped_column(
        ForeignKey("field.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    n_cells: Mapped[int] = mapped_column(Integer, default=0)
    qc: Mapped[dict[str, Any]]
    qc_flags: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[dict[str, Any]]
    finished_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )


class IlluminationFunction(Base):
    """A run's illumination function of one plate and channel (float32 bytes)."""

    __tablename__ = "illumination_function"
    __table_args__ = (UniqueConstraint("run_id", "plate_id", "channel"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    plate_id: Mapped[int] = mapped_column(ForeignKey("plate.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(100))
    height: Mapped[int]
    width: Mapped[int]
    n_fields: Mapped[int]
    values: Mapped[bytes] = mapped_column(LargeBinary)


class FeatureSet(Base):
    """A named per-cell vector space of a run: classical features or an embedding."""

    __tablename__ = "feature_set"
    __table_args__ = (UniqueConstraint("run_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    feature_names: Mapped[list[Any]]
    config: Mapped[dict[str, Any]]
    model_name: Mapped[str | None] = mapped_column(String(200))
    weights: Mapped[str | None] = mapped_column(Text)


class Cell(Base):
    """One object (nucleus and its cell) of a field in a run.

    ``run_id`` and ``field_id`` carry no foreign key, nor do `CellVector`'s ids: a
    foreign key is checked row by row, and these two tables get a row per cell.
    Without the four checks PostgreSQL bulk-inserts cells with 60 features
    3.5-3.8x as fast (`benchmarks/bench_sql_insert.py`). Their only writers,
    `db.writers.write_fields_cells` and `db.writers.write_fields_vectors`, check
    the run, fields and feature set once per transaction instead (and on
    PostgreSQL lock them against deletion until it commits, as the keys did), and
    deleting a run, field, cell or feature set still deletes its cells and
    vectors (`CELL_CASCADES`). Stores made before 2026-12-06 keep their foreign
    keys, and no triggers (`make_old_cell_tables`), which changes nothing but the
    speed.
    """

    __tablename__ = "cell"
    __table_args__ = (UniqueConstraint("run_id", "field_id", "object_number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int]
    field_id: Mapped[int] = mapped_column(index=True)
    object_number: Mapped[int]
    centroid_y: Mapped[float]
    centroid_x: Mapped[float]
    bbox_min_y: Mapped[int]
    bbox_min_x: Mapped[int]
    bbox_max_y: Mapped[int]
    bbox_max_x: Mapped[int]
    area_px: Mapped[int]


class CellVector(Base):
    """float32 little-endian bytes of one cell's vector in one feature set.

    No foreign keys, for speed (see `Cell`).
    """

    __tablename__ = "cell_vector"
    cell_id: Mapped[int] = mapped_column(primary_key=True)
    feature_set_id: Mapped[int] = mapped_column(primary_key=True)
    values: Mapped[bytes] = mapped_column(LargeBinary)


#: What deleting a row of a parent table deletes in the per-cell tables, as the
#: foreign keys' cascades did: (parent, child, child column). Triggers on the
#: parents, which fire on their (rare) deletes, never on the per-cell inserts.
CELL_CASCADES = (
    ("run", "cell", "run_id"),
    ("field", "cell", "field_id"),
    ("cell", "cell_vector", "cell_id"),
    ("feature_set", "cell_vector", "feature_set_id"),
)


def _trigger_name(parent: str, child: str) -> str:
    """Name of the `CELL_CASCADES` trigger (and PostgreSQL function) of a pair."""
    return f"cascade_{parent}_to_{child}"


def _cascade_ddl(parent: str, child: str, column: str) -> list[tuple[str, str]]:
    """(statement, dialect) pairs that create one `CELL_CASCADES` trigger.

    Row-level on SQLite; on PostgreSQL (11 or later) one set-based delete per
    statement, from its transition table. Replaces a trigger of the same name.
    """
    name = _trigger_name(parent, child)
    return [
        (f"DROP TRIGGER IF EXISTS {name}", "sqlite"),
        (
            f"CREATE TRIGGER {name} AFTER DELETE ON {parent} FOR EACH ROW "
            f"BEGIN DELETE FROM {child} WHERE {column} = OLD.id; END",
            "sqlite",
        ),
        (
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN DELETE FROM {child} WHERE {column} IN "
            "(SELECT id FROM gone); RETURN NULL; END $$",
            "postgresql",
        ),
        (f"DROP TRIGGER IF EXISTS {name} ON {parent}", "postgresql"),
        (
            f"CREATE TRIGGER {name} AFTER DELETE ON {parent} REFERENCING OLD "
            f"TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION {name}()",
            "postgresql",
        ),
    ]


def create_cell_cascades(connection: Connection) -> None:
    """Create (or replace) the `CELL_CASCADES` triggers in `connection`'s store.

    Runs with every store's tables (`Base.metadata`'s ``after_create``) and when a
    store made without them is opened (`db.session.make_engine`).
    """
    for cascade in CELL_CASCADES:
        for statement, dialect in _cascade_ddl(*cascade):
            if connection.dialect.name == dialect:
                connection.execute(DDL(statement))


event.listen(
    Base.metadata,
    "after_create",
    lambda _metadata, connection, **kw: create_cell_cascades(connection),
)


def make_old_cell_tables(connection: Connection) -> None:
    """Give an empty store the per-cell tables of stores made before 2026-12-06.

    `Cell` and `CellVector` with their four foreign keys (``ON DELETE CASCADE``)
    and without the `CELL_CASCADES` triggers, and schema version 6, so that tests
    and benchmarks can check such stores.

    Raises
    ------
    ValueError
        If the store's ``cell`` or ``cell_vector`` table already holds rows.
    """
    for table in (Cell, CellVector):
        if connection.scalar(select(func.count()).select_from(table)):
            raise ValueError(
                f"the store's {table.__tablename__} table holds rows; give an empty "
                "store the old tables."
            )
    postgresql = connection.dialect.name == "postgresql"
    for parent, child, _ in CELL_CASCADES:
        name = _trigger_name(parent, child)
        if postgresql:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {parent}"))
            connection.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
        else:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
    for table in (CellVector.__table__, Cell.__table__):
        table.drop(connection)
    old = MetaData(naming_convention=_NAMING)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(old)
    for parent, child, column in CELL_CASCADES:  # the keys the triggers replace
        old.tables[child].append_constraint(
            ForeignKeyConstraint([column], [f"{parent}.id"], ondelete="CASCADE")
        )
    old.create_all(connection, tables=[old.tables["cell"], old.tables["cell_vector"]])
    connection.execute(update(SchemaInfo).values(version=6))


class WellProfile(Base):
    """An imported per-well profile (float32 bytes) of a feature set of a run."""

    __tablename__ = "well_profile"
    __table_args__ = (UniqueConstraint("feature_set_id", "well_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    feature_set_id: Mapped[int] = mapped_column(
        ForeignKey("feature_set.id", ondelete="CASCADE")
    )
    well_id: Mapped[int] = mapped_column(ForeignKey("well.id", ondelete="CASCADE"))
    cell_count: Mapped[int | None]
    values: Mapped[bytes] = mapped_column(LargeBinary)


class FieldMask(Base):
    """A field's nucleus and cell label images: zlib of a (2, Y, X) array."""

    __tablename__ = "field_mask"
    __table_args__ = (UniqueConstraint("run_id", "field_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    field_id: Mapped[int] = mapped_column(
        ForeignKey("field.id", ondelete="CASCADE"), index=True
    )
    height: Mapped[int]
    width: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(10))
    labels: Mapped[bytes] = mapped_column(LargeBinary)


class WellAggregate(Base):
    """A cached per-well profile aggregated from a run's cells (float32 bytes)."""

    __tablename__ = "well_aggregate"
    __table_args__ = (UniqueConstraint("feature_set_id", "include_flagged", "well_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    feature_set_id: Mapped[int] = mapped_column(
        ForeignKey("feature_set.id", ondelete="CASCADE")
    )
    include_flagged: Mapped[bool]
    well_id: Mapped[int] = mapped_column(ForeignKey("well.id", ondelete="CASCADE"))
    cell_count: Mapped[int]
    values: Mapped[bytes] = mapped_column(LargeBinary)


class TableCache(Base):
    """A table computed from a run's well profiles (e.g. its hit list), as Parquet."""

    __tablename__ = "table_cache"
    __table_args__ = (UniqueConstraint("feature_set_id", "include_flagged", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    feature_set_id: Mapped[int] = mapped_column(
        ForeignKey("feature_set.id", ondelete="CASCADE")
    )
    include_flagged: Mapped[bool]
    name: Mapped[str] = mapped_column(String(50))
    parquet: Mapped[bytes] = mapped_column(LargeBinary)


class ModelCheckpoint(Base):
    """A fine-tuned network: its file, hash, config and classes (`phenoscreen train`)."""

    __tablename__ = "model_checkpoint"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    model_name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]]
    classes: Mapped[list[Any]]
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow
    )


class TrainingEpoch(Base):
    """One epoch of the training that produced a checkpoint (the training log)."""

    __tablename__ = "training_epoch"
    __table_args__ = (UniqueConstraint("checkpoint_id", "epoch"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("model_checkpoint.id", ondelete="CASCADE"), index=True
    )
    epoch: Mapped[int]
    phase: Mapped[str] = mapped_column(String(20))
    train_loss: Mapped[float]
    val_loss: Mapped[float]
    val_accuracy: Mapped[float]
    learning_rate: Mapped[float]
    seconds: Mapped[float]


class PhenotypeMapPoint(Base):
    """One point of a run's stored phenotype map (a well or a compound-dose)."""

    __tablename__ = "phenotype_map_point"
    __table_args__ = (UniqueConstraint("run_id", "level", "label"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), index=True
    )
    level: Mapped[str] = mapped_column(String(20))
    label: Mapped[str] = mapped_column(String(400))
    plate: Mapped[str | None] = mapped_column(String(200))
    well: Mapped[str | None] = mapped_column(String(4))
    compound: Mapped[str] = mapped_column(String(300))
    concentration: Mapped[float | None] = mapped_column(Float)
    role: Mapped[str] = mapped_column(String(20))
    moa: Mapped[str | None] = mapped_column(Text)
    activity: Mapped[float | None] = mapped_column(Float)
    umap_x: Mapped[float]
    umap_y: Mapped[float]
    cluster: Mapped[int]
    feature_set: Mapped[str | None] = mapped_column(String(100))


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


MAP_COLUMNS = (
    "level", "label", "plate", "well", "compound", "concentration", "role", "moa",
    "activity", "umap_x", "umap_y", "cluster",
)  # fmt: skip


#: Plate-map metadata columns -> their `Well` columns (the rest go to ``extra``).
WELL_COLUMNS = {
    "Metadata_Compound": "compound",
    "Metadata_Concentration": "concentration",
    "Metadata_ConcentrationUnit": "concentration_unit",
    "Metadata_Role": "role",
    "Metadata_MoA": "moa",
    "Metadata_SMILES": "smiles",
}


def none_if_nan(value: Any) -> Any:
    """Return `value` as a column value: NaN and None become SQL NULL."""
    return (
        None
        if value is None or (isinstance(value, float) and value != value)
        else value
    )
