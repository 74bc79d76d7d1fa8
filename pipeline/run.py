"""Run an experiment: validate, register, process fields on Dask, commit fields.

The orchestration on top of the stages: it reads the images (`pipeline.images`),
segments and measures (`pipeline.cells`, `pipeline.measure`) and, with
`pipeline.views.export`, writes results to the store. Order of work: everything
cheap is checked first (file names, plate map, channels) and nothing is written
until it all passes; then the experiment is
registered in one transaction, and the fields' cells are committed as their Dask
tasks return, each field whole (alone, or with the fields that finished with it:
`db.store.FieldBatches`). A rerun of the same command finds the run by
its analysis key and processes only the fields without a complete result, so a run
killed at any moment resumes without duplicated or missing cells.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster, as_completed
from distributed.client import ClosedClientError
from sqlalchemy import Engine
from tqdm.auto import tqdm

from db import store
from db.session import check_store, make_engine, retry_lost_connection
from pipeline.cells.segment import (
    DEFAULT_SEGMENTER,
    check_segmenter,
    segment_field,
    segmenter_weights_sha256,
)
from pipeline.config import (
    IlluminationConfig,
    MeasureConfig,
    RunConfig,
    SegmentConfig,
    analysis_key,
    dump_config,
    network_precision,
)
from pipeline.cpu import warn_if_emulated_bfloat16
from pipeline.errors import InputError, PipelineError, collect_input_errors
from pipeline.images.illumination import downsample, illumination_function
from pipeline.images.io import (
    compile_pattern,
    discover_fields,
    load_field,
    read_field,
    write_labels,
)
from pipeline.images.platemap import (
    check_platemap_against_fields,
    infer_plate_format,
    read_platemap,
    with_well_positions,
)
from pipeline.images.qc import flag_fields, measure_field_qc
from pipeline.measure.features import FEATURE_SET_NAME, feature_names, measure_cells
from pipeline.memory import keep_freed_memory
from pipeline.views.export import aggregate_run

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
    "torch",
    "torchvision",
    "timm",
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
    embedding: dict[str, Any] | None = None


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


def package_versions(segment: SegmentConfig) -> dict[str, str]:
    """Return the versions of Python and the packages that shape results.

    With the ``unet`` segmenter, also ``unet_precision``: its device and arithmetic
    (`pipeline.config.network_precision`), such as ``cpu float32``.
    """
    versions = {"python": platform.python_version()}
    if segment.method == "unet":
        precision = network_precision(segment.device, segment.precision)
        versions["unet_precision"] = f"{segment.device} {precision}"
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["opencv"] = cv2.__version__  # the one imported, whichever wheel holds it
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
        Listing every problem of file names, plate map and channel map; or if
        ``[hits] cell_count_control`` names no compound of the plate map.
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
        platemap,
        fields,
        allow_unimaged_wells=cfg.allow_unimaged_wells,
        plate_format=cfg.plate_format,
    )
    control = config.hits.cell_count_control
    if control and not (wells["Metadata_Compound"] == control).any():
        raise InputError(
            f"[hits] cell_count_control = {control!r} is not a compound of the plate "
            "map's imaged wells; name one (e.g. a cytotoxic control) or leave it empty."
        )
    formats = {
        str(plate): cfg.plate_format or infer_plate_format(group["Metadata_Well"])
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


def segment_image(
    image: np.ndarray,
    *,
    channel_names: list[str],
    nuclei_channel: str,
    cytoplasm_channel: str | None,
    segment: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Segment nuclei and cells of a (C, Y, X) field by channel name."""
    cytoplasm = (
        image[channel_names.index(cytoplasm_channel)] if cytoplasm_channel else None
    )
    return segment_field(
        image[channel_names.index(nuclei_channel)], cytoplasm, **segment
    )


def process_field(
    paths: list[str],
    *,
    channel_indexes: list[int | None],
    channel_names: list[str],
    nuclei_channel: str,
    cytoplasm_channel: str | None,
    illumination: np.ndarray | None,
    segment: Mapping[str, Any],
    measure: MeasureConfig,
) -> dict[str, Any]:
    """Read, correct, segment and measure one field (runs on a Dask worker).

    Returns
    -------
    dict
        ``cells`` (DataFrame), ``features`` (ndarray (N, F) float32), ``masks``
        (the labels packed by `db.store.encode_masks`), ``qc`` (of the raw field)
        and ``seconds`` per step; or ``error`` (str naming the file)
        when the field's files cannot be read or are inconsistent.

    Notes
    -----
    The worker process keeps memory it frees for the next field
    (`pipeline.memory.keep_freed_memory`, set once per process).
    """
    keep_freed_memory()
    start = time.perf_counter()
    try:
        raw, image = load_field(
            paths, channel_indexes=channel_indexes, illumination=illumination
        )
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
    read_s = time.perf_counter()
    try:
        nuclei, cells = segment_image(
            image,
            channel_names=channel_names,
            nuclei_channel=nuclei_channel,
            cytoplasm_channel=cytoplasm_channel,
            segment=segment,
        )
    except ValueError as exc:  # e.g. NaN pixels in a float TIFF
        return {"error": f"{paths[0]}: {exc}"}
    segment_s = time.perf_counter()
    table, features = measure_cells(
        image, nuclei, cells, channel_names=channel_names, options=measure
    )
    qc = measure_field_qc(raw, channel_names=channel_names, n_cells=len(table))
    end = time.perf_counter()
    return {
        "cells": table,
        "features": features.to_numpy(np.float32),
        "masks": store.encode_masks(nuclei, cells),
        "qc": qc,
        "seconds": {
            "read": read_s - start,
            "segment": segment_s - read_s,
            "measure": end - segment_s,
        },
    }


def downsample_field(
    paths: list[str], *, channel_indexes: list[int | None], size_px: int
) -> np.ndarray | None:
    """Read a field and block-average it for the illumination function.

    Returns None when the field cannot be read (it fails later, with its message).
    The worker process keeps memory it frees for the next field
    (`pipeline.memory.keep_freed_memory`).
    """
    keep_freed_memory()
    try:
        image = read_field(paths, channel_indexes=channel_indexes)
        return downsample(image, size_px)
    except (OSError, ValueError):
        return None


def _illumination_functions(
    client: Client,
    engine: Engine,
    fields: pd.DataFrame,
    *,
    run_id: int,
    image_root: Path,
    channel_names: list[str],
    channel_indexes: list[int | None],
    config: IlluminationConfig,
) -> dict[int, np.ndarray]:
    """Compute (on Dask) and store each plate's functions, or read stored ones.

    One transaction per plate, so a rerun recomputes only plates not yet stored.
    """
    functions = store.read_illumination(engine, run_id, channel_names)
    file_columns = [f"FileName_{name}" for name in channel_names]
    for plate_id, plate_fields in fields.groupby("plate_id", sort=True):
        if plate_id in functions:
            continue
        n = len(plate_fields)
        take = np.unique(np.linspace(0, n - 1, min(n, config.max_fields_per_plate)))
        sample = plate_fields.iloc[take.astype(int)]
        futures = [
            client.submit(
                downsample_field,
                [str(image_root / getattr(row, c)) for c in file_columns],
                channel_indexes=channel_indexes,
                size_px=config.size_px,
                pure=False,
            )
            for row in sample.itertuples(index=False)
        ]
        small = [x for x in client.gather(futures) if x is not None]
        shapes = {x.shape for x in small}
        if not small or len(shapes) != 1:
            logger.warning(
                "plate %s: no illumination function (%s); fields are not corrected",
                plate_fields["Metadata_Plate"].iloc[0],
                "no readable field" if not small else f"field shapes differ: {shapes}",
            )
            continue
        function = illumination_function(
            np.stack(small), smoothing_frac=config.smoothing_frac
        )
        store.write_illumination(
            engine,
            run_id=run_id,
            plate_id=int(plate_id),
            channel_names=channel_names,
            functions=function,
            n_fields=len(small),
        )
        functions[plate_id] = function
        logger.info(
            "plate %s: illumination function from %d fields",
            plate_fields["Metadata_Plate"].iloc[0],
            len(small),
        )
    return functions


#: Seconds between progress lines when the output is not a terminal.
PROGRESS_EVERY_S = 60.0


def progress_line(done: int, total: int, elapsed_s: float) -> str:
    """Return ``"120/960 fields (12.5 %), 2.0 fields/s, about 7 min left"``.

    Raises
    ------
    ValueError
        If `total` < 1, `done` is outside [0, total] or `elapsed_s` < 0.

    Examples
    --------
    >>> progress_line(120, 960, 60.0)
    '120/960 fields (12.5 %), 2.0 fields/s, about 7 min left'
    """
    if total < 1 or not 0 <= done <= total or elapsed_s < 0:
        raise ValueError(
            f"need total >= 1, 0 <= done <= total and elapsed_s >= 0; got {done}, "
            f"{total}, {elapsed_s}."
        )
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f"about {round((total - done) / rate / 60)} min left" if rate else "starting"
    return (
        f"{done}/{total} fields ({100 * done / total:.1f} %), {rate:.1f} fields/s, "
        f"{left}"
    )


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
        client_log = logging.getLogger("distributed.client")
        level = client_log.level
        try:
            with client:
                try:
                    yield client
                except PipelineError:  # e.g. the scheduler went away: closing the
                    # client cancels its reconnection, logged by distributed as a
                    # traceback; the run's own message says what happened
                    client_log.setLevel(logging.CRITICAL)
                    raise
        finally:
            client_log.setLevel(level)
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
        try:
            yield client
        finally:  # workers slow to stop are killed: routine, not a warning
            logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


def _scheduler_lost(client: Client, done: int, total: int) -> str:
    """Return the message of a run whose Dask scheduler went away."""
    address = getattr(client.scheduler, "address", None) or "the Dask scheduler"
    return (
        f"lost the connection to {address} after {done} of {total} fields were "
        "stored; they are kept. Restart the scheduler and its workers, then rerun "
        "the same command: the run resumes with the fields still to do."
    )


def _process_fields(
    client: Client,
    engine: Engine,
    pending: pd.DataFrame,
    *,
    run_id: int,
    feature_set_id: int,
    image_root: Path,
    task_options: dict[str, Any],
    illumination: Mapping[int, Any],
) -> tuple[int, list[tuple[int, str]], dict[str, float]]:
    """Run `process_field` on Dask for each pending field; commit fields as they return.

    At most four tasks per worker are in flight, so the client holds few results.
    Finished fields are committed in groups (`db.store.FieldBatches`: alone
    unless others are ready with them), failed ones at once; on any error the
    waiting group is committed before the error goes on. `illumination` maps plate
    id to its (scattered) function, or is empty.

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
    first_file: dict[int, str] = {}
    queue = iter(pending.itertuples(index=False))
    batches = store.FieldBatches()

    def commit(batch: list[dict[str, Any]]) -> None:
        if batch:
            retry_lost_connection(
                partial(store.write_fields_cells, engine, run_id=run_id,
                        feature_set_id=feature_set_id, fields=batch),
                what=f"{len(batch)} field(s) ({batch[0]['field_id']}, ...)",
            )  # fmt: skip

    def submit(row: Any) -> Any:
        paths = [str(image_root / getattr(row, c)) for c in file_columns]
        key = f"field-{run_id}-{row.field_id}"
        field_of_key[key] = row.field_id
        first_file[row.field_id] = paths[0]
        return client.submit(
            process_field,
            paths,
            **task_options,
            illumination=illumination.get(row.plate_id),
            key=key,
            pure=False,
        )

    window = 4 * max(len(client.scheduler_info()["workers"]), 1)
    futures = as_completed(
        [submit(row) for _, row in zip(range(window), queue, strict=False)]
    )
    started = last_line = time.monotonic()
    try:
        with tqdm(total=len(pending), unit="field", disable=None) as bar:
            for done, future in enumerate(futures):
                if bar.disable and time.monotonic() - last_line >= PROGRESS_EVERY_S:
                    last_line = time.monotonic()  # no terminal: a line a minute
                    logger.info(progress_line(done, len(pending), last_line - started))
                field_id = field_of_key.pop(future.key)
                file = first_file.pop(field_id)
                try:
                    result = future.result()
                except CancelledError as exc:  # the scheduler is gone, not this field
                    raise PipelineError(
                        _scheduler_lost(client, done, len(pending))
                    ) from exc
                except Exception as exc:  # noqa: BLE001 - one field must not stop the plate
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                future.release()
                next_row = next(queue, None)
                if next_row is not None:
                    try:
                        futures.add(submit(next_row))
                    except ClosedClientError as exc:
                        raise PipelineError(
                            _scheduler_lost(client, done, len(pending))
                        ) from exc
                t_write = time.perf_counter()
                if "error" in result:
                    failures.append((field_id, result["error"]))
                    logger.warning("field %d failed: %s", field_id, result["error"])
                    retry_lost_connection(
                        partial(store.write_field_failure, engine, run_id=run_id,
                                field_id=field_id, error=result["error"]),
                        what=f"field {field_id}",
                    )  # fmt: skip
                else:
                    commit(batches.add({"field_id": field_id} | result,
                                       len(result["cells"]),
                                       more_ready=futures.has_ready()))  # fmt: skip
                    n_cells += len(result["cells"])
                    if not len(result["cells"]):
                        logger.warning(
                            "field %d (%s): no cells found (a blank or unfocused "
                            "image?); it counts as done with 0 cells",
                            field_id, file,
                        )  # fmt: skip
                    for step, seconds in result["seconds"].items():
                        step_seconds[step] += seconds
                step_seconds["write"] += time.perf_counter() - t_write
                bar.update()
    except BaseException:
        _commit_before_raising(engine, run_id, feature_set_id, batches.take())
        raise
    t_write = time.perf_counter()
    commit(batches.take())
    step_seconds["write"] += time.perf_counter() - t_write
    return n_cells, failures, step_seconds


def _commit_before_raising(
    engine: Engine, run_id: int, feature_set_id: int, fields: list[dict[str, Any]]
) -> None:
    """Write the fields that waited for their group when the run stops on an error.

    One attempt; its failure is logged, not raised (the error that stopped the run
    is the one to report).
    """
    if not fields:
        return
    try:
        store.write_fields_cells(
            engine, run_id=run_id, feature_set_id=feature_set_id, fields=fields
        )
    except Exception as exc:  # noqa: BLE001
        logger.warning(
            "%d finished fields could not be written (%s); a rerun processes them "
            "again", len(fields), exc,
        )  # fmt: skip


def _flag_fields(
    engine: Engine, run_id: int, config: RunConfig, prepared: PreparedRun
) -> int:
    """Flag the run's completed fields against their plates; return how many."""
    qc = store.read_field_qc(engine, run_id)
    if qc.empty:
        return 0
    flags = flag_fields(
        qc,
        channel_names=prepared.channel_names,
        nuclei_channel=config.input.nuclei_channel,
        config=config.qc,
    )
    store.write_field_flags(engine, run_id, flags.set_axis(qc["field_id"]))
    flagged = qc.assign(flags=flags.to_numpy())[flags.astype(bool).to_numpy()]
    for row in flagged.head(10).itertuples(index=False):
        logger.warning(
            "QC: plate %s well %s site %s flagged %s",
            row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site, row.flags,
        )  # fmt: skip
    return len(flagged)


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
        Plate-map CSV (see `pipeline.images.platemap.read_platemap`).
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
    check_store(db_url)  # store problems first; it is created after validation
    check_segmenter(
        config.segment.method, config.segment.weights, config.segment.precision
    )
    if not config.execution.scheduler:  # an external cluster's workers segment
        warn_if_emulated_bfloat16(
            "segment.precision", config.segment.device, config.segment.precision
        )
    if config.segment.device == "cuda" and not config.execution.scheduler:
        import torch  # noqa: PLC0415 - loaded by the unet check above anyway

        if not torch.cuda.is_available():  # local workers share this machine's GPUs
            raise InputError(
                'segment.device = "cuda" but this machine has no CUDA device; set '
                'device = "cpu", or run on a machine (or --scheduler) with GPUs.'
            )
    weights_sha = segmenter_weights_sha256(
        config.segment.method, config.segment.weights
    )
    prepared = prepare_run(
        images_dir, platemap_path, config=config, experiment_name=experiment_name
    )
    if config.embed.enabled:  # a wrong model or layer stops the run before writing
        from models.embed import (  # noqa: PLC0415 - torch only when asked
            build_embedder,
            embed_device,
        )

        build_embedder(config.embed, len(prepared.channel_names))
        warn_if_emulated_bfloat16(  # it embeds in this process, after the fields
            "embed.precision", embed_device(), config.embed.precision
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
            wells=with_well_positions(prepared.wells),
            fields=prepared.fields,
            plate_formats=prepared.plate_formats,
        )
        run_id, resumed = store.open_run(
            engine,
            experiment_id=experiment_id,
            analysis_key=analysis_key(config, weights_sha),
            config_toml=dump_config(config),
            segmenter=f"unet {weights_sha[:16]}"
            if weights_sha
            else config.segment.method,
            versions=package_versions(config.segment),
        )
        feature_set_id = store.ensure_feature_set(
            engine,
            run_id=run_id,
            name=FEATURE_SET_NAME,
            kind="classical",
            feature_names=feature_names(prepared.channel_names, config.measure),
            config={
                "illumination": asdict(config.illumination),
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
        t_illum = time.perf_counter()
        illumination = {}
        if config.illumination.enabled and len(pending):
            functions = _illumination_functions(
                client,
                engine,
                fields,
                run_id=run_id,
                image_root=prepared.image_root,
                channel_names=prepared.channel_names,
                channel_indexes=prepared.channel_indexes,
                config=config.illumination,
            )
            illumination = {
                plate_id: client.scatter(function, broadcast=True)
                for plate_id, function in functions.items()
            }
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
                "cytoplasm_channel": config.input.cytoplasm_channel,
                "segment": asdict(config.segment),
                "measure": config.measure,
            },
            illumination=illumination,
        )
    elapsed = time.perf_counter() - t_process
    n_processed = len(pending)
    n_flagged = _flag_fields(engine, run_id, config, prepared)
    timings = {
        "total_s": time.perf_counter() - t_start,
        "illumination_s": t_process - t_illum,
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
    notes = []
    if failures:
        notes.append(f"{len(failures)} fields failed and were skipped")
    if n_flagged:
        notes.append(f"{n_flagged} fields flagged by QC (left out of profiles)")
    message = "; ".join(notes) or None
    store.finish_run(
        engine, run_id, status="complete", message=message, timings=timings
    )
    # the dashboard and later commands read these instead of every cell
    aggregate_run(engine, run_id, FEATURE_SET_NAME, method="median")
    embedding = None
    if config.embed.enabled:
        from models.embed import embed_run  # noqa: PLC0415 - torch only when asked

        embedding = embed_run(engine, run_id, config.embed)
        timings["embed_s"] = embedding["seconds"]
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
        embedding=embedding,
    )


def segment_files(
    images: list[Path],
    out_dir: Path,
    *,
    cytoplasm: list[Path] | None = None,
    nuclei_index: int | None = None,
    cytoplasm_index: int | None = None,
    segment: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Segment image files and write their label TIFFs (``phenoscreen segment``).

    Parameters
    ----------
    images : list of Path
        Nuclear-stain TIFFs (or multi-channel TIFFs with `nuclei_index`).
    out_dir : Path
        Receives ``<stem>_nuclei.tif`` per image and ``<stem>_cells.tif`` when a
        cytoplasm plane is given.
    cytoplasm : list of Path, optional
        One cytoplasm TIFF per image, in the same order.
    nuclei_index, cytoplasm_index : int, optional
        Plane indexes inside multi-channel files; `cytoplasm_index` without
        `cytoplasm` takes the cytoplasm from the image file itself.
    segment : mapping, optional
        Keyword options of `pipeline.cells.segment.segment_field`.

    Returns
    -------
    DataFrame
        One row per image: ``image``, ``n_nuclei``, ``nuclei_labels``,
        ``cells_labels`` (path or empty).

    Raises
    ------
    InputError
        If the lists differ in length, a file is missing or unreadable, or a stem
        repeats (outputs would overwrite each other); nothing is written then.
    """
    options = dict(segment or {})
    check_segmenter(
        options.get("method", DEFAULT_SEGMENTER),
        options.get("weights"),
        options.get("precision"),
    )
    warn_if_emulated_bfloat16(
        "precision (--segmenter-precision)",
        options.get("device", "cpu"),
        options.get("precision"),
    )
    if cytoplasm is not None and len(cytoplasm) != len(images):
        raise InputError(
            f"{len(images)} images but {len(cytoplasm)} cytoplasm files; give one "
            "--cytoplasm file per image, in the same order."
        )
    problems = [
        f"{p}: no such file" for p in [*images, *(cytoplasm or [])] if not p.is_file()
    ]  # noqa: E501
    stems = pd.Series([p.stem for p in images])
    problems += [
        f"{stem}: several images have this name; their masks would overwrite each other"
        for stem in stems[stems.duplicated()].unique()
    ]
    if problems:
        raise InputError(problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # each image's large arrays reused by the next
    rows = []
    for k, path in enumerate(tqdm(images, unit="image", disable=None)):
        if cytoplasm is not None:
            paths, indexes = [path, cytoplasm[k]], [nuclei_index, cytoplasm_index]
        elif cytoplasm_index is not None:
            paths, indexes = [path, path], [nuclei_index or 0, cytoplasm_index]
        else:
            paths, indexes = [path], [nuclei_index]
        try:
            image = read_field(paths, channel_indexes=indexes)
            nuclei, cells = segment_field(
                image[0], image[1] if len(image) > 1 else None, **options
            )
        except (OSError, ValueError) as exc:
            raise InputError(str(exc), source=str(path)) from exc
        nuclei_path = write_labels(out_dir / f"{path.stem}_nuclei.tif", nuclei)
        cells_path = ""
        if len(image) > 1:
            cells_path = str(write_labels(out_dir / f"{path.stem}_cells.tif", cells))
        rows.append(
            {
                "image": str(path),
                "n_nuclei": int(nuclei.max(initial=0)),
                "nuclei_labels": str(nuclei_path),
                "cells_labels": cells_path,
            }
        )
    return pd.DataFrame(rows)
