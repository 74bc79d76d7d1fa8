"""Run an experiment: validate, register, process fields on Dask, commit per field.

This is the only module (with `pipeline.export`) that reads files and writes to the
store. Order of work: everything cheap is checked first (file names, plate map,
channels) and nothing is written until it all passes; then the experiment is
registered in one transaction, and each field's cells are committed in their own
transaction as its Dask task returns. A rerun of the same command finds the run by
its analysis key and processes only the fields without a complete result, so a run
killed at any moment resumes without duplicated or missing cells.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, LocalCluster, as_completed
from sqlalchemy import Engine
from tqdm.auto import tqdm

from db import store
from db.session import make_engine
from pipeline.config import RunConfig, analysis_key, dump_config
from pipeline.errors import InputError, PipelineError, collect_input_errors
from pipeline.features import FEATURE_SET_NAME, feature_names, measure_cells
from pipeline.io import compile_pattern, discover_fields, read_field
from pipeline.platemap import (
    check_platemap_against_fields,
    infer_plate_format,
    read_platemap,
)
from pipeline.qc import measure_field_qc
from pipeline.segment import SEGMENTER_NAME, segment_field

logger = logging.getLogger(__name__)

_VERSIONED = (
    "phenoscreen",
    "numpy",
    "pandas",
    "scikit-image",
    "scipy",
    "sqlalchemy",
    "dask",
    "distributed",
    "tifffile",
    "imagecodecs",
)


@dataclass(frozen=True)
class RunSummary:
    """What a run did: ids, counts and timings."""

    run_id: int
    experiment_id: int
    status: str
    n_fields: int
    n_processed: int
    n_skipped: int
    n_failed: int
    n_cells: int
    timings: dict[str, float]


@dataclass(frozen=True)
class PreparedRun:
    """Everything validated before the first write."""

    experiment_name: str
    image_root: Path
    fields: pd.DataFrame
    wells: pd.DataFrame
    plate_formats: dict[str, int]
    channel_names: list[str]
    channel_indexes: list[int | None]


def package_versions() -> dict[str, str]:
    """Return the versions of Python and the packages that shape results."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def prepare_run(
    images_dir: str | Path,
    platemap_path: str | Path,
    *,
    config: RunConfig,
    experiment_name: str | None = None,
) -> PreparedRun:
    """Check file names, plate map and channels; read no pixels and write nothing.

    Raises
    ------
    FileNotFoundError
        If the image folder or plate map does not exist.
    InputError
        Listing every problem of file names, plate map and channel map.
    """
    cfg = config.input
    regex = compile_pattern(layout=cfg.layout, pattern=cfg.pattern)
    if not cfg.channels:
        raise InputError(
            "no channel map; pass --channels NAME=TOKEN,... (e.g. DNA=w1,Actin=w2) or set "
            "[input.channels] in the config."
        )
    per_channel = "channel" in regex.groupindex
    if per_channel:
        indexes: list[int | None] = [None] * len(cfg.channels)
    else:
        bad = [f"{n}={t}" for n, t in cfg.channels.items() if not str(t).isdigit()]
        if bad:
            raise InputError(
                f"channels {', '.join(bad)}: with one multi-channel file per field the "
                "token is the 0-based channel index, e.g. DNA=0,Actin=1."
            )
        indexes = [int(t) for t in cfg.channels.values()]
    errors: list[InputError] = []
    try:
        platemap = read_platemap(platemap_path)
    except InputError as exc:
        errors.append(exc)
    try:
        fields = discover_fields(images_dir, regex=regex, channels=cfg.channels)
    except InputError as exc:
        errors.append(exc)
    if errors:  # plate-map and file problems are reported together
        raise collect_input_errors(errors)
    wells = check_platemap_against_fields(
        platemap, fields, allow_unimaged_wells=cfg.allow_unimaged_wells
    )
    formats = {
        str(plate): infer_plate_format(group["Metadata_Well"])
        for plate, group in wells.groupby("Metadata_Plate")
    }
    root = Path(images_dir).resolve()
    logger.info(
        "validated %s: %d plates, %d wells, %d fields, channels %s",
        root,
        len(formats),
        len(wells),
        len(fields),
        ", ".join(cfg.channels),
    )
    return PreparedRun(
        experiment_name=experiment_name or root.name,
        image_root=root,
        fields=fields,
        wells=wells,
        plate_formats=formats,
        channel_names=list(cfg.channels),
        channel_indexes=indexes,
    )


def process_field(
    paths: list[str],
    *,
    channel_indexes: list[int | None],
    channel_names: list[str],
    nuclei_channel: str,
    segment: Mapping[str, Any],
    measure: Mapping[str, Any],
) -> dict[str, Any]:
    """Read, segment and measure one field (runs on a Dask worker).

    Returns
    -------
    dict
        ``cells`` (DataFrame), ``features`` (ndarray (N, F) float32), ``qc`` and
        ``seconds`` per step; or ``error`` (str naming the file) when the field's
        files cannot be read or are inconsistent.
    """
    start = time.perf_counter()
    try:
        image = read_field(paths, channel_indexes=channel_indexes)
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
    read_s = time.perf_counter()
    nuclei, cells = segment_field(image[channel_names.index(nuclei_channel)], **segment)
    segment_s = time.perf_counter()
    table, features = measure_cells(
        image, nuclei, cells, channel_names=channel_names, **measure
    )
    qc = measure_field_qc(image, channel_names=channel_names, n_cells=len(table))
    end = time.perf_counter()
    return {
        "cells": table,
        "features": features.to_numpy(np.float32),
        "qc": qc,
        "seconds": {
            "read": read_s - start,
            "segment": segment_s - read_s,
            "measure": end - segment_s,
        },
    }


@contextmanager
def dask_client(
    scheduler: str | None, *, n_workers: int, processes: bool
) -> Iterator[Client]:
    """Connect to `scheduler`, or start a LocalCluster of single-threaded workers.

    Raises
    ------
    InputError
        If `scheduler` does not answer within 10 s.
    """
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise InputError(
                f"cannot reach the Dask scheduler {scheduler!r} ({exc}); start one with "
                "`dask scheduler` and workers with `dask worker ADDRESS`, or omit "
                "--scheduler to use a local cluster."
            ) from exc
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _process_fields(
    client: Client,
    engine: Engine,
    pending: pd.DataFrame,
    *,
    run_id: int,
    feature_set_id: int,
    image_root: Path,
    task_options: dict[str, Any],
) -> tuple[int, list[tuple[int, str]], dict[str, float]]:
    """Run `process_field` on Dask for each pending field; commit each as it returns.

    At most four tasks per worker are in flight, so the client holds few results.

    Returns
    -------
    n_cells : int
    failures : list of (field_id, error)
    step_seconds : dict
        Summed seconds of read, segment, measure (on workers) and write (here).
    """
    file_columns = [f"FileName_{name}" for name in task_options["channel_names"]]
    n_cells, failures = 0, []
    step_seconds = {"read": 0.0, "segment": 0.0, "measure": 0.0, "write": 0.0}
    field_of_key: dict[str, int] = {}
    queue = iter(pending.itertuples(index=False))

    def submit(row: Any) -> Any:
        paths = [str(image_root / getattr(row, c)) for c in file_columns]
        key = f"field-{run_id}-{row.field_id}"
        field_of_key[key] = row.field_id
        return client.submit(process_field, paths, **task_options, key=key, pure=False)

    window = 4 * max(len(client.scheduler_info()["workers"]), 1)
    futures = as_completed(
        [submit(row) for _, row in zip(range(window), queue, strict=False)]
    )
    with tqdm(total=len(pending), unit="field", disable=None) as bar:
        for future in futures:
            next_row = next(queue, None)
            if next_row is not None:
                futures.add(submit(next_row))
            field_id = field_of_key.pop(future.key)
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - one field must not stop the plate
                result = {"error": f"{type(exc).__name__}: {exc}"}
            future.release()
            t_write = time.perf_counter()
            if "error" in result:
                failures.append((field_id, result["error"]))
                logger.warning("field %d failed: %s", field_id, result["error"])
                store.write_field_failure(
                    engine, run_id=run_id, field_id=field_id, error=result["error"]
                )
            else:
                store.write_field_cells(
                    engine,
                    run_id=run_id,
                    field_id=field_id,
                    feature_set_id=feature_set_id,
                    cells=result["cells"],
                    features=result["features"],
                    qc=result["qc"],
                    seconds=result["seconds"],
                )
                n_cells += len(result["cells"])
                for step, seconds in result["seconds"].items():
                    step_seconds[step] += seconds
            step_seconds["write"] += time.perf_counter() - t_write
            bar.update()
    return n_cells, failures, step_seconds


def run_experiment(
    images_dir: str | Path,
    platemap_path: str | Path,
    *,
    config: RunConfig,
    db_url: str,
    experiment_name: str | None = None,
) -> RunSummary:
    """Analyse every field of an experiment into the store; resume if run before.

    Parameters
    ----------
    images_dir : str or Path
        Folder of TIFFs (searched recursively).
    platemap_path : str or Path
        Plate-map CSV (see `pipeline.platemap.read_platemap`).
    config : RunConfig
        Saved as TOML in the run row.
    db_url : str
        SQLAlchemy URL of the store.
    experiment_name : str, optional
        Defaults to the image folder's name.

    Returns
    -------
    RunSummary

    Raises
    ------
    InputError
        Before any write, if inputs are wrong or the Dask scheduler does not answer.
    PipelineError
        After recording the run as failed, if more than
        ``config.execution.max_failed_fields_frac`` of the fields failed.
    """
    t_start = time.perf_counter()
    prepared = prepare_run(
        images_dir, platemap_path, config=config, experiment_name=experiment_name
    )
    exe = config.execution
    with dask_client(
        exe.scheduler, n_workers=exe.resolved_n_workers(), processes=exe.processes
    ) as client:
        engine = make_engine(db_url)
        experiment_id, fields = store.register_experiment(
            engine,
            name=prepared.experiment_name,
            image_root=str(prepared.image_root),
            channels=config.input.channels,
            wells=prepared.wells,
            fields=prepared.fields,
            plate_formats=prepared.plate_formats,
        )
        run_id, resumed = store.open_run(
            engine,
            experiment_id=experiment_id,
            analysis_key=analysis_key(config),
            config_toml=dump_config(config),
            segmenter=SEGMENTER_NAME,
            versions=package_versions(),
        )
        feature_set_id = store.ensure_feature_set(
            engine,
            run_id=run_id,
            name=FEATURE_SET_NAME,
            kind="classical",
            feature_names=feature_names(
                prepared.channel_names, **asdict(config.measure)
            ),
            config={
                "segment": asdict(config.segment),
                "measure": asdict(config.measure),
            },
        )
        done = store.completed_field_ids(engine, run_id)
        pending = fields[~fields["field_id"].isin(done)]
        logger.info(
            "run %d of experiment %r (%s): %d of %d fields done, %d to process on Dask %s",
            run_id, prepared.experiment_name, "resumed" if resumed else "new",
            len(done), len(fields), len(pending),
            client.dashboard_link or client.scheduler.address,
        )  # fmt: skip
        t_process = time.perf_counter()
        n_cells, failures, step_seconds = _process_fields(
            client,
            engine,
            pending,
            run_id=run_id,
            feature_set_id=feature_set_id,
            image_root=prepared.image_root,
            task_options={
                "channel_indexes": prepared.channel_indexes,
                "channel_names": prepared.channel_names,
                "nuclei_channel": config.input.nuclei_channel,
                "segment": asdict(config.segment),
                "measure": asdict(config.measure),
            },
        )
    elapsed = time.perf_counter() - t_process
    n_processed = len(pending)
    timings = {
        "total_s": time.perf_counter() - t_start,
        "process_s": elapsed,
        "fields_per_s": n_processed / elapsed if n_processed and elapsed > 0 else 0.0,
        "cells_per_s": n_cells / elapsed if n_cells and elapsed > 0 else 0.0,
        **{f"{step}_s": seconds for step, seconds in step_seconds.items()},
    }
    failed_frac = len(failures) / max(len(fields), 1)
    if failed_frac > exe.max_failed_fields_frac:
        shown = "; ".join(f"field {fid}: {err}" for fid, err in failures[:5])
        message = (
            f"{len(failures)} of {len(fields)} fields failed ({failed_frac:.1%} > "
            f"max_failed_fields_frac {exe.max_failed_fields_frac:.1%}): {shown}"
        )
        store.finish_run(
            engine, run_id, status="failed", message=message, timings=timings
        )
        raise PipelineError(message)
    message = f"{len(failures)} fields failed and were skipped" if failures else None
    store.finish_run(
        engine, run_id, status="complete", message=message, timings=timings
    )
    failed_ids = {fid for fid, _ in failures}
    for plate, group in fields.groupby("Metadata_Plate"):
        logger.info(
            "plate %s: %d fields, %d processed now, %d failed",
            plate, len(group), group["field_id"].isin(pending["field_id"]).sum(),
            group["field_id"].isin(failed_ids).sum(),
        )  # fmt: skip
    logger.info(
        "run %d complete: %d fields processed (%.2f fields/s), %d cells, %d already done",
        run_id, n_processed, timings["fields_per_s"], n_cells, len(done),
    )  # fmt: skip
    return RunSummary(
        run_id=run_id,
        experiment_id=experiment_id,
        status="complete",
        n_fields=len(fields),
        n_processed=n_processed,
        n_skipped=len(done),
        n_failed=len(failures),
        n_cells=n_cells,
        timings=timings,
    )
