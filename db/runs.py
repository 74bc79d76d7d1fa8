"""Run bookkeeping in the store: experiments, runs, feature sets, checkpoints.

Registering an experiment (plates, wells, fields: one transaction), opening and
finishing runs, resolving a run or a feature set by name, the provenance of a run
and the fine-tuned checkpoints with their training logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import (
    Engine,
    func,
    insert,
    select,
    update,
)

from db.schema import (
    WELL_COLUMNS,
    Experiment,
    FeatureSet,
    Field,
    FieldResult,
    ModelCheckpoint,
    Plate,
    Run,
    TrainingEpoch,
    Well,
    none_if_nan,
    utcnow,
)
from db.session import session_scope


def _well_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {column: none_if_nan(record.get(key)) for key, column in WELL_COLUMNS.items()}
    row["extra"] = {
        key: none_if_nan(value)
        for key, value in record.items()
        if key.startswith("Metadata_")
        and key not in WELL_COLUMNS
        and key not in ("Metadata_Plate", "Metadata_Well")
    }
    return row


def register_experiment(
    engine: Engine,
    *,
    name: str,
    image_root: str,
    channels: Mapping[str, str],
    wells: pd.DataFrame,
    fields: pd.DataFrame,
    plate_formats: Mapping[str, int],
) -> tuple[int, pd.DataFrame]:
    """Create or update an experiment's plates, wells and fields in one transaction.

    Well metadata is replaced by the plate map's (a corrected plate map takes effect
    on rerun); new wells and fields are added; nothing is deleted.

    Parameters
    ----------
    engine : Engine
    name : str
        Experiment name, unique in the store.
    image_root : str
        Absolute folder the field file names are relative to.
    channels : mapping of str to str
        Channel name -> token, saved for the record.
    wells : DataFrame
        From `pipeline.images.platemap.check_platemap_against_fields`, with the
        zero-based ``row_index`` and ``column_index`` of each well
        (`pipeline.images.platemap.with_well_positions`).
    fields : DataFrame
        From `pipeline.images.io.discover_fields`.
    plate_formats : mapping of str to int
        Plate name -> 96, 384 or 1536.

    Returns
    -------
    experiment_id : int
    fields : DataFrame
        `fields` with ``field_id`` and ``plate_id`` columns, same row order.
    """
    missing = {"row_index", "column_index"} - set(wells.columns)
    if missing:
        raise ValueError(
            f"wells lack the column(s) {sorted(missing)}; add the well positions with "
            "pipeline.images.platemap.with_well_positions."
        )
    file_columns = [c for c in fields.columns if c.startswith("FileName_")]
    with session_scope(engine) as session:
        experiment = session.scalar(select(Experiment).where(Experiment.name == name))
        if experiment is None:
            experiment = Experiment(
                name=name, image_root=image_root, channels=dict(channels)
            )
            session.add(experiment)
            session.flush()
        else:
            experiment.image_root = image_root
            experiment.channels = dict(channels)
        field_ids: dict[tuple[str, str, int], int] = {}
        plate_ids: dict[str, int] = {}
        for plate_name, plate_wells in wells.groupby("Metadata_Plate", sort=True):
            plate_id = session.scalar(
                select(Plate.id).where(
                    Plate.experiment_id == experiment.id, Plate.name == plate_name
                )
            )
            if plate_id is None:
                plate_id = session.scalar(
                    insert(Plate).returning(Plate.id),
                    [
                        {
                            "experiment_id": experiment.id,
                            "name": plate_name,
                            "plate_format": plate_formats[str(plate_name)],
                        }
                    ],
                )
            existing = dict(
                session.execute(
                    select(Well.name, Well.id).where(Well.plate_id == plate_id)
                ).all()
            )
            new_rows, changed_rows = [], []
            for record in plate_wells.to_dict("records"):
                row = _well_row(record) | {
                    "row_index": int(record["row_index"]),
                    "column_index": int(record["column_index"]),
                }
                if record["Metadata_Well"] in existing:
                    changed_rows.append(row | {"id": existing[record["Metadata_Well"]]})
                else:
                    new_rows.append(
                        row | {"plate_id": plate_id, "name": record["Metadata_Well"]}
                    )
            if new_rows:
                session.execute(insert(Well), new_rows)
            if changed_rows:
                session.execute(update(Well), changed_rows)
            well_ids = dict(
                session.execute(
                    select(Well.name, Well.id).where(Well.plate_id == plate_id)
                ).all()
            )
            plate_fields = fields[fields["Metadata_Plate"] == plate_name]
            known = {
                (well_id, site): field_id
                for well_id, site, field_id in session.execute(
                    select(Field.well_id, Field.site, Field.id)
                    .join(Well, Field.well_id == Well.id)
                    .where(Well.plate_id == plate_id)
                ).all()
            }
            new_fields, changed_fields = [], []
            for record in plate_fields.to_dict("records"):
                files = {c.removeprefix("FileName_"): record[c] for c in file_columns}
                key = (well_ids[record["Metadata_Well"]], int(record["Metadata_Site"]))
                if key in known:
                    changed_fields.append({"id": known[key], "files": files})
                else:
                    new_fields.append(
                        {"well_id": key[0], "site": key[1], "files": files}
                    )
            if new_fields:
                session.execute(insert(Field), new_fields)
            if changed_fields:
                session.execute(update(Field), changed_fields)
            by_name = {v: k for k, v in well_ids.items()}
            for well_id, site, field_id in session.execute(
                select(Field.well_id, Field.site, Field.id)
                .join(Well, Field.well_id == Well.id)
                .where(Well.plate_id == plate_id)
            ).all():
                field_ids[(str(plate_name), by_name[well_id], site)] = field_id
            plate_ids[str(plate_name)] = plate_id
    keys = zip(
        fields["Metadata_Plate"].astype(str),
        fields["Metadata_Well"],
        fields["Metadata_Site"].astype(int),
        strict=True,
    )
    return experiment.id, fields.assign(
        field_id=[field_ids[key] for key in keys],
        plate_id=fields["Metadata_Plate"].astype(str).map(plate_ids),
    )


def open_run(
    engine: Engine,
    *,
    experiment_id: int,
    analysis_key: str,
    config_toml: str,
    segmenter: str,
    versions: Mapping[str, str],
) -> tuple[int, bool]:
    """Return the run of this experiment and analysis key, creating it if new.

    Returns
    -------
    run_id : int
    resumed : bool
        True when the run existed (a rerun resumes it).
    """
    with session_scope(engine) as session:
        run = session.scalar(
            select(Run).where(
                Run.experiment_id == experiment_id, Run.analysis_key == analysis_key
            )
        )
        resumed = run is not None
        if run is None:
            run = Run(
                experiment_id=experiment_id,
                analysis_key=analysis_key,
                config_toml=config_toml,
                segmenter=segmenter,
                versions=dict(versions),
                timings={},
                status="running",
            )
            session.add(run)
            session.flush()
        else:
            run.status, run.message, run.config_toml = "running", None, config_toml
            run.versions = dict(versions)
        return run.id, resumed


def ensure_feature_set(
    engine: Engine,
    *,
    run_id: int,
    name: str,
    kind: str,
    feature_names: list[str],
    config: Mapping[str, Any],
    model_name: str | None = None,
    weights: str | None = None,
) -> int:
    """Return the id of a run's feature set, creating it if new.

    Raises
    ------
    ValueError
        If the set exists with other feature names (the run's code changed).
    """
    with session_scope(engine) as session:
        existing = session.scalar(
            select(FeatureSet).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        )
        if existing is not None:
            if list(existing.feature_names) != list(feature_names):
                raise ValueError(
                    f"feature set {name!r} of run {run_id} was stored with other feature "
                    "names; results of different code versions cannot be mixed. Use a new "
                    "database or experiment name."
                )
            return existing.id
        return session.scalar(
            insert(FeatureSet).returning(FeatureSet.id),
            [
                {
                    "run_id": run_id,
                    "name": name,
                    "kind": kind,
                    "feature_names": list(feature_names),
                    "config": dict(config),
                    "model_name": model_name,
                    "weights": weights,
                }
            ],
        )


def completed_field_ids(engine: Engine, run_id: int) -> set[int]:
    """Return the ids of the fields this run has finished successfully."""
    with session_scope(engine) as session:
        return set(
            session.scalars(
                select(FieldResult.field_id).where(
                    FieldResult.run_id == run_id, FieldResult.status == "complete"
                )
            )
        )


def finish_run(
    engine: Engine,
    run_id: int,
    *,
    status: str,
    message: str | None,
    timings: Mapping[str, Any],
) -> None:
    """Set a run's final status, message and timings."""
    with session_scope(engine) as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(
                status=status,
                message=message,
                timings=dict(timings),
                finished_at=utcnow(),
            )
        )


def read_feature_set(engine: Engine, run_id: int, name: str) -> tuple[int, list[str]]:
    """Return the id and feature names of a run's feature set.

    Raises
    ------
    ValueError
        If the run has no feature set of that name; the message lists those it has.
    """
    with session_scope(engine) as session:
        found = session.execute(
            select(FeatureSet.id, FeatureSet.feature_names).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        ).first()
        if found is None:
            names = session.scalars(
                select(FeatureSet.name).where(FeatureSet.run_id == run_id)
            ).all()
            raise ValueError(
                f"run {run_id} has no feature set {name!r}; it has {', '.join(names) or 'none'}."
            )
        return found[0], list(found[1])


#: Feature-set kind of imported per-well profiles (stored in ``well_profile``).
WELL_PROFILE_KIND = "imported_wells"


#: Feature-set names that stand for the run's latest set of a kind.
FEATURE_SET_ALIASES = {"deep": "embedding", "combined": "combined"}


def resolve_feature_set(
    engine: Engine, run_id: int, name: str | None = None
) -> tuple[str, str]:
    """Return the name and kind of a run's feature set (None: its default one).

    The default is ``classical`` when the run has it, else its first feature set
    (an imported run has only its own). ``deep`` is the run's latest CNN
    embedding, ``combined`` its latest combined (classical + embedding) set.

    Raises
    ------
    ValueError
        If the run has no feature set of that name, or none at all (the message
        lists the available ones).
    """
    with session_scope(engine) as session:
        sets = session.execute(
            select(FeatureSet.name, FeatureSet.kind)
            .where(FeatureSet.run_id == run_id)
            .order_by(FeatureSet.id)
        ).all()
    kinds = dict(sets)
    available = [
        *kinds,
        *(a for a, k in FEATURE_SET_ALIASES.items() if k in kinds.values()),
    ]
    if name is None:
        if not sets:
            raise ValueError(f"run {run_id} has no feature set yet.")
        name = "classical" if "classical" in kinds else sets[0][0]
    elif name in FEATURE_SET_ALIASES and name not in kinds:
        latest = [n for n, k in sets if k == FEATURE_SET_ALIASES[name]]
        if not latest:
            raise ValueError(
                f"run {run_id} has no {name} feature set; it has "
                f"{', '.join(available) or 'none'}. Embed the run first "
                "(phenoscreen embed, or phenoscreen run --embed)."
            )
        name = latest[-1]
    if name not in kinds:
        raise ValueError(
            f"run {run_id} has no feature set {name!r}; it has "
            f"{', '.join(available) or 'none'}."
        )
    return name, kinds[name]


def read_feature_set_config(
    engine: Engine, run_id: int, name: str
) -> tuple[str, dict[str, Any]]:
    """Return the kind and the config (recipe) a run's feature set was made with.

    Raises
    ------
    ValueError
        If the run has no feature set of that name.
    """
    with session_scope(engine) as session:
        found = session.execute(
            select(FeatureSet.kind, FeatureSet.config).where(
                FeatureSet.run_id == run_id, FeatureSet.name == name
            )
        ).first()
    if found is None:
        raise ValueError(f"run {run_id} has no feature set {name!r}.")
    return found[0], dict(found[1])


def summarize_runs(engine: Engine) -> pd.DataFrame:
    """Return one row per run: experiment, status, fields done/failed/total, cells.

    Returns
    -------
    DataFrame
        ``run_id``, ``experiment``, ``status``, ``n_fields``, ``n_complete``,
        ``n_failed``, ``n_cells``, ``created_at``, ``finished_at``, ``message``,
        ``fields_per_s``.
    """
    with session_scope(engine) as session:
        runs = session.execute(
            select(Run, Experiment.name).join(Experiment).order_by(Run.id)
        ).all()
        totals = dict(
            session.execute(
                select(Plate.experiment_id, func.count(Field.id))
                .join(Well, Well.plate_id == Plate.id)
                .join(Field, Field.well_id == Well.id)
                .group_by(Plate.experiment_id)
            ).all()
        )
        counts = {
            (run_id, status): (n, cells)
            for run_id, status, n, cells in session.execute(
                select(
                    FieldResult.run_id,
                    FieldResult.status,
                    func.count(),
                    func.coalesce(func.sum(FieldResult.n_cells), 0),
                ).group_by(FieldResult.run_id, FieldResult.status)
            ).all()
        }
    records = []
    for run, experiment_name in runs:
        complete, n_cells = counts.get((run.id, "complete"), (0, 0))
        records.append(
            {
                "run_id": run.id,
                "experiment": experiment_name,
                "status": run.status,
                "n_fields": totals.get(run.experiment_id, 0),
                "n_complete": complete,
                "n_failed": counts.get((run.id, "failed"), (0, 0))[0],
                "n_cells": int(n_cells),
                "fields_per_s": run.timings.get("fields_per_s"),
                "created_at": run.created_at,
                "finished_at": run.finished_at,
                "message": run.message,
            }
        )
    return pd.DataFrame.from_records(records)


def resolve_run(engine: Engine, run_id: int | None = None) -> tuple[int, int]:
    """Return (run_id, experiment_id): the given run, or the latest complete one.

    Raises
    ------
    ValueError
        If the run does not exist, or no run is complete; the message lists runs.
    """
    with session_scope(engine) as session:
        runs = session.execute(
            select(Run.id, Run.experiment_id, Run.status).order_by(Run.id)
        ).all()
    listing = ", ".join(f"{r} ({s})" for r, _, s in runs) or "none"
    if run_id is not None:
        for rid, experiment_id, _ in runs:
            if rid == run_id:
                return rid, experiment_id
        raise ValueError(f"run {run_id} does not exist; runs: {listing}.")
    complete = [(rid, eid) for rid, eid, status in runs if status == "complete"]
    if not complete:
        raise ValueError(
            f"no complete run in the store (runs: {listing}); run a plate first."
        )
    return complete[-1]


#: Columns of a training log (`register_checkpoint`, `read_training_log`).
TRAINING_LOG_COLUMNS = (
    "epoch", "phase", "train_loss", "val_loss", "val_accuracy", "learning_rate",
    "seconds",
)  # fmt: skip


def register_checkpoint(
    engine: Engine,
    *,
    run_id: int,
    model_name: str,
    path: str,
    sha256: str,
    config: Mapping[str, Any],
    classes: Sequence[str],
    metrics: Mapping[str, Any],
    log: pd.DataFrame,
) -> int:
    """Record a fine-tuned checkpoint and its per-epoch log in one transaction.

    Parameters
    ----------
    engine : Engine
    run_id : int
        The run whose cells trained it.
    model_name, path, sha256 : str
    config, metrics : mapping
        JSON-serializable.
    classes : sequence of str
        The labels, in the order of the network's outputs.
    log : DataFrame
        One row per epoch with `TRAINING_LOG_COLUMNS`.

    Returns
    -------
    int
        The checkpoint id.

    Raises
    ------
    ValueError
        If `log` lacks a column.
    """
    missing = [c for c in TRAINING_LOG_COLUMNS if c not in log.columns]
    if missing:
        raise ValueError(f"log lacks columns {missing}.")
    with session_scope(engine) as session:
        checkpoint_id = session.scalar(
            insert(ModelCheckpoint).returning(ModelCheckpoint.id),
            [
                {"run_id": run_id, "model_name": model_name, "path": path,
                 "sha256": sha256, "config": dict(config), "classes": list(classes),
                 "metrics": dict(metrics)}
            ],
        )  # fmt: skip
        if len(log):
            rows = log[list(TRAINING_LOG_COLUMNS)].astype(object).to_dict("records")
            session.execute(
                insert(TrainingEpoch),
                [r | {"checkpoint_id": checkpoint_id} for r in rows],
            )
    return checkpoint_id


def read_training_log(engine: Engine, checkpoint_id: int) -> pd.DataFrame:
    """Return a checkpoint's per-epoch training log (`TRAINING_LOG_COLUMNS`)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(*(getattr(TrainingEpoch, c) for c in TRAINING_LOG_COLUMNS))
            .where(TrainingEpoch.checkpoint_id == checkpoint_id)
            .order_by(TrainingEpoch.epoch)
        ).all()
    return pd.DataFrame(rows, columns=list(TRAINING_LOG_COLUMNS))


def read_run_provenance(engine: Engine, run_id: int) -> dict[str, Any]:
    """Return what made a run's results: config, versions and feature sets.

    Returns
    -------
    dict
        ``config_toml``, ``analysis_key``, ``versions``, ``segmenter``, ``status``,
        ``timings`` and ``feature_sets`` (DataFrame: ``name``, ``kind``,
        ``n_features``, ``model_name``, ``weights``).

    Raises
    ------
    ValueError
        If the run does not exist.
    """
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"run {run_id} does not exist.")
        sets = session.execute(
            select(FeatureSet.name, FeatureSet.kind, FeatureSet.feature_names,
                   FeatureSet.model_name, FeatureSet.weights)
            .where(FeatureSet.run_id == run_id).order_by(FeatureSet.id)
        ).all()  # fmt: skip
        return {
            "config_toml": run.config_toml,
            "analysis_key": run.analysis_key,
            "versions": dict(run.versions),
            "segmenter": run.segmenter,
            "status": run.status,
            "timings": dict(run.timings),
            "feature_sets": pd.DataFrame(
                [(n, k, len(f), m, w) for n, k, f, m, w in sets],
                columns=["name", "kind", "n_features", "model_name", "weights"],
            ),
        }
