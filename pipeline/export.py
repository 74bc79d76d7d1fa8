"""Profile tables from the store, and their export to CSV or Parquet.

Cells are streamed plate by plate (never all in memory); well profiles are the
per-plate median of cells; compound tables are built from well profiles.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine

from db import store
from pipeline.features import FEATURE_SET_NAME
from pipeline.hits import DOSE_KEYS, call_hits
from pipeline.moa import consensus_profiles, predict_moa
from pipeline.plateqc import edge_effect, plate_z_prime
from pipeline.profiles import (
    aggregate_cells,
    metadata_columns,
    normalize_to_controls,
    score_wells,
)
from pipeline.reduce import cluster_coordinates, umap_coordinates

TABLES = ("cells", "wells", "compounds", "hits")
FORMATS = ("csv", "parquet")


def _with_well_metadata(table: pd.DataFrame, wells: pd.DataFrame) -> pd.DataFrame:
    """Join plate-map metadata on ``well_id`` and put ``Metadata_*`` columns first."""
    extra = wells.drop(columns=["Metadata_Plate", "Metadata_Well"])
    merged = table.merge(extra, on="well_id", how="left", validate="many_to_one")
    merged = merged.drop(columns="well_id")
    meta = [c for c in merged.columns if c.startswith("Metadata_")]
    rest = [c for c in merged.columns if not c.startswith("Metadata_")]
    merged = merged[meta + rest]
    text = [
        c
        for c in meta
        if merged[c].dtype == object or pd.api.types.is_string_dtype(merged[c])
    ]
    return merged.astype({c: "string" for c in text})


def iter_cell_tables(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    feature_set: str = FEATURE_SET_NAME,
    include_flagged: bool = False,
) -> Iterator[pd.DataFrame]:
    """Yield one single-cell table per plate: ``Metadata_*`` columns and features.

    Cells of QC-flagged fields are left out unless `include_flagged`.
    """
    wells = store.read_wells(engine, experiment_id)
    for _, cells, features in store.iter_plate_cells(
        engine, run_id, feature_set, include_flagged=include_flagged
    ):
        yield _with_well_metadata(pd.concat([cells, features], axis=1), wells)


def read_well_profiles(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    feature_set: str = FEATURE_SET_NAME,
    include_flagged: bool = False,
) -> pd.DataFrame:
    """Return per-well median profiles of a run, aggregated plate by plate.

    Fields flagged by QC are left out (and not counted) unless `include_flagged`.

    Returns
    -------
    DataFrame
        One row per well with at least one completed field: ``Metadata_Plate``,
        ``Metadata_Well``, ``Metadata_FieldCount``, ``Metadata_CellCount`` (0 where
        no cell was found, e.g. after cell loss; features are then NaN), the
        plate-map metadata and the features.

    Raises
    ------
    ValueError
        If the run has no completed field.
    """
    wells = store.read_wells(engine, experiment_id)
    field_counts = store.read_completed_field_counts(
        engine, run_id, include_flagged=include_flagged
    )
    if field_counts.empty:
        raise ValueError(
            f"run {run_id} has no completed field that passed QC yet; run the plate "
            "first, or pass --include-flagged."
        )
    per_plate = [
        aggregate_cells(cells, features, by=["well_id"])
        for _, cells, features in store.iter_plate_cells(
            engine, run_id, feature_set, include_flagged=include_flagged
        )
    ]
    ids = wells[["well_id", "Metadata_Plate", "Metadata_Well"]].merge(
        field_counts, on="well_id"
    )
    if per_plate:
        profiles = ids.merge(
            pd.concat(per_plate, ignore_index=True), on="well_id", how="left"
        )
    else:
        profiles = ids.assign(Metadata_CellCount=0)
    profiles["Metadata_CellCount"] = (
        profiles["Metadata_CellCount"].fillna(0).astype(int)
    )
    return _with_well_metadata(profiles, wells)


def hit_tables(well_profiles: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the compound hit list and the compound-dose table of well profiles.

    Profiles are robust-z normalized to each plate's negative controls, then
    `pipeline.hits.call_hits` runs; the compound-dose table also carries each
    compound-dose's consensus profile (median of its normalized wells).
    """
    normalized = normalize_to_controls(well_profiles)
    hits, doses = call_hits(normalized)
    features = [c for c in normalized.columns if not c.startswith("Metadata_")]
    consensus = (
        normalized.groupby(DOSE_KEYS, dropna=False)[features].median().reset_index()
    )
    return hits, doses.merge(consensus, on=DOSE_KEYS, how="left")


def plate_qc_table(well_profiles: pd.DataFrame) -> pd.DataFrame:
    """Return per-plate QC: Z' of the activity score and of the cell count, and edges.

    Activity is the distance of each well from DMSO (`pipeline.profiles.score_wells`
    after robust-z normalization), so Z' says how well positive controls separate
    from DMSO in the profile, the usual > 0.5 bar. ``edge_to_inner_cell_count``
    compares DMSO wells on the plate's outer ring with inner ones (1 = no edge
    effect).

    Returns
    -------
    DataFrame
        One row per plate: ``Metadata_Plate``, ``z_prime_activity``,
        ``robust_z_prime_activity``, ``z_prime_cell_count``, ``n_positive``,
        ``n_negative``, ``edge_to_inner_cell_count``; Z' columns are NaN on plates
        without two positive and two negative control wells.
    """
    normalized = normalize_to_controls(well_profiles)
    wells = normalized[metadata_columns(normalized)].assign(
        activity=score_wells(normalized)
    )
    plates = pd.DataFrame({"Metadata_Plate": sorted(wells["Metadata_Plate"].unique())})
    try:
        activity = plate_z_prime(wells, "activity")
        counts = plate_z_prime(wells, "Metadata_CellCount")
    except ValueError:  # no plate has both control kinds: Z' is undefined
        activity = counts = pd.DataFrame(columns=["Metadata_Plate", "z_prime",
                                                  "robust_z_prime", "n_positive",
                                                  "n_negative"])  # fmt: skip
    table = plates.merge(
        activity[["Metadata_Plate", "z_prime", "robust_z_prime", "n_positive", "n_negative"]]
        .rename(columns={"z_prime": "z_prime_activity",
                         "robust_z_prime": "robust_z_prime_activity"}),
        on="Metadata_Plate", how="left",
    ).merge(
        counts[["Metadata_Plate", "z_prime"]].rename(columns={"z_prime": "z_prime_cell_count"}),
        on="Metadata_Plate", how="left",
    )  # fmt: skip
    edges = edge_effect(wells, "Metadata_CellCount")[
        ["Metadata_Plate", "edge_to_inner_ratio"]
    ]
    return table.merge(
        edges.rename(columns={"edge_to_inner_ratio": "edge_to_inner_cell_count"}),
        on="Metadata_Plate",
        how="left",
    )


def moa_table(
    well_profiles: pd.DataFrame, *, reference_column: str
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict an annotation (e.g. MoA) of every compound-dose by 1-NN, NSC and NSCB.

    Parameters
    ----------
    well_profiles : DataFrame
        From `read_well_profiles`.
    reference_column : str
        ``moa`` finds the plate map's ``Metadata_MoA`` (or an imported
        ``Metadata_moa``); any other name ``X`` finds ``Metadata_X`` or ``X``,
        case-insensitively. Batches are ``Metadata_Batch`` when present, else plates.

    Returns
    -------
    predictions : DataFrame
    accuracy : dict
        See `pipeline.moa.predict_moa`.

    Raises
    ------
    ValueError
        If the column is not found (the message lists the metadata columns).
    """
    lower = {c.lower(): c for c in well_profiles.columns if c.startswith("Metadata_")}
    name = reference_column.lower().removeprefix("metadata_")
    column = lower.get(f"metadata_{name}")
    if column is None:
        raise ValueError(
            f"reference column {reference_column!r} is not among the metadata columns "
            f"({', '.join(sorted(lower.values()))}); add it to the plate map."
        )
    batch = lower.get("metadata_batch", "Metadata_Plate")
    normalized = normalize_to_controls(well_profiles)
    consensus = consensus_profiles(normalized, batch_column=batch, carry=[column])
    return predict_moa(consensus, reference_column=column, batch_column=batch)


def _role_suffix(role: str) -> str:
    return "" if role == "treatment" else f" ({role})"


def phenotype_map_table(well_profiles: pd.DataFrame, *, rng: int = 0) -> pd.DataFrame:
    """Return UMAP coordinates and HDBSCAN clusters of wells and of compound-doses.

    Wells are robust-z normalized to their plate's negative controls; a
    compound-dose's point is the median of its wells over all plates. Wells without
    cells are left out.

    Returns
    -------
    DataFrame
        `db.store.MAP_COLUMNS`: ``level`` (``well`` or ``compound_dose``), ``label``,
        ``plate`` and ``well`` (wells only), ``compound``, ``concentration``,
        ``role``, ``moa``, ``activity`` (distance from DMSO), ``umap_x``,
        ``umap_y``, ``cluster`` (-1 = unassigned).
    """
    normalized = normalize_to_controls(well_profiles)
    features = [c for c in normalized.columns if not c.startswith("Metadata_")]
    normalized = normalized[
        np.isfinite(normalized[features].to_numpy(float)).all(axis=1)
    ]
    normalized = normalized.assign(Metadata_Activity=score_wells(normalized))
    moa = normalized.get("Metadata_MoA")
    doses = normalized.assign(Metadata_MoA=moa).groupby(DOSE_KEYS, dropna=False)
    consensus = pd.concat(
        [
            doses[["Metadata_MoA"]].first(),
            doses[["Metadata_Activity", *features]].median(),
        ],
        axis=1,
    ).reset_index()
    levels = []
    for level, table in (("well", normalized), ("compound_dose", consensus)):
        coordinates = umap_coordinates(table[features], rng=rng)
        is_well = level == "well"
        levels.append(
            pd.DataFrame(
                {
                    "level": level,
                    "label": (
                        table["Metadata_Plate"] + "/" + table["Metadata_Well"]
                        if is_well
                        else table["Metadata_Compound"]
                        + " @ "
                        + table["Metadata_Concentration"].map("{:g}".format)
                        + table["Metadata_Role"].map(_role_suffix)
                    ),
                    "plate": table["Metadata_Plate"] if is_well else None,
                    "well": table["Metadata_Well"] if is_well else None,
                    "compound": table["Metadata_Compound"],
                    "concentration": table["Metadata_Concentration"],
                    "role": table["Metadata_Role"],
                    "moa": table.get("Metadata_MoA"),
                    "activity": table["Metadata_Activity"],
                    "umap_x": coordinates["umap_x"],
                    "umap_y": coordinates["umap_y"],
                    "cluster": cluster_coordinates(coordinates),
                }
            )
        )
    return pd.concat(levels, ignore_index=True)


def _write_tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp")


def write_tables(tables: Iterator[pd.DataFrame], out: str | Path, *, fmt: str) -> int:
    """Write a stream of same-column tables to one CSV or Parquet file atomically.

    The file appears only when complete (written to ``<out>.tmp``, then renamed).

    Returns
    -------
    int
        Rows written.

    Raises
    ------
    ValueError
        If `fmt` is unknown or the stream is empty.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}.")
    out = Path(out)
    tmp = _write_tmp(out)
    n_rows, writer = 0, None
    try:
        for table in tables:
            if fmt == "csv":
                table.to_csv(
                    tmp, mode="a" if n_rows else "w", header=not n_rows, index=False
                )
            else:
                arrow = pa.Table.from_pandas(table, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, arrow.schema)
                writer.write_table(arrow.cast(writer.schema))
            n_rows += len(table)
        if writer is not None:
            writer.close()
            writer = None
        if not n_rows:
            raise ValueError("nothing to write: the table is empty.")
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return n_rows


def export_table(
    engine: Engine,
    *,
    table: str,
    out: str | Path,
    fmt: str,
    run_id: int | None = None,
    include_flagged: bool = False,
    feature_set: str = FEATURE_SET_NAME,
) -> int:
    """Export a table of a run (default: the latest complete run).

    ``cells``: one row per cell; ``wells``: per-well median profiles; ``compounds``:
    per compound-dose activity, q-value and consensus profile; ``hits``: the
    per-compound hit list; of the `feature_set` (classical features or an embedding).

    Returns
    -------
    int
        Rows written.

    Raises
    ------
    ValueError
        If `table` or `fmt` is unknown, or the run does not exist.
    """
    if table not in TABLES:
        raise ValueError(f"table {table!r} is unknown; use one of {', '.join(TABLES)}.")
    run_id, experiment_id = store.resolve_run(engine, run_id)
    if table == "cells":
        stream = iter_cell_tables(
            engine,
            run_id,
            experiment_id,
            include_flagged=include_flagged,
            feature_set=feature_set,
        )
    else:
        wells = read_well_profiles(
            engine,
            run_id,
            experiment_id,
            include_flagged=include_flagged,
            feature_set=feature_set,
        )
        if table == "wells":
            stream = iter([wells])
        else:
            hits, doses = hit_tables(wells)
            stream = iter([doses if table == "compounds" else hits])
    return write_tables(stream, out, fmt=fmt)
