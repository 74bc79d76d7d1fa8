"""Profile tables from the store, and their export to CSV or Parquet.

Cells are streamed plate by plate (never all in memory); well profiles are the
per-plate median of cells; compound tables are built from well profiles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine

from db import store
from pipeline.calls.hits import DOSE_KEYS, call_hits
from pipeline.calls.plateqc import edge_effect, plate_z_prime
from pipeline.config import HitsConfig, ProfileConfig, RunConfig, config_from_dict
from pipeline.profiling.profiles import (
    aggregate_cells,
    dose_labels,
    metadata_columns,
    normalize_profiles,
    normalize_to_controls,
    well_activity,
)
from pipeline.profiling.reduce import cluster_coordinates, umap_coordinates

logger = logging.getLogger(__name__)

TABLES = ("cells", "wells", "compounds", "hits")
#: Kind of a feature set made of other feature sets' well profiles.
COMBINED_KIND = "combined"
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
    feature_set: str | None = None,
    include_flagged: bool = False,
    wells: Sequence[tuple[str, str]] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield single-cell tables, plate by plate in chunks of whole wells.

    ``Metadata_*`` columns and the features of `feature_set` (None: the run's
    default, `db.store.resolve_feature_set`). Cells of QC-flagged fields are left
    out unless `include_flagged`; only the cells of `wells` ((plate, well) pairs)
    when given.

    Raises
    ------
    ValueError
        If the feature set holds imported per-well profiles (there are no cells).
    """
    name, kind = store.resolve_feature_set(engine, run_id, feature_set)
    if kind == store.WELL_PROFILE_KIND:
        raise ValueError(
            f"feature set {name!r} of run {run_id} holds imported per-well profiles; "
            "it has no cells to export (export --table wells)."
        )
    if kind == COMBINED_KIND:
        raise ValueError(
            f"feature set {name!r} combines well profiles of "
            f"{' and '.join(combined_blocks(engine, run_id, name))}; export their "
            "cells one feature set at a time (--feature-set classical / deep)."
        )
    metadata = store.read_wells(engine, experiment_id)
    well_ids = None
    if wells is not None:
        keys = pd.DataFrame(list(wells), columns=["Metadata_Plate", "Metadata_Well"])
        well_ids = metadata.merge(keys)["well_id"].tolist()
    for _, cells, features in store.iter_plate_cells(
        engine, run_id, name, include_flagged=include_flagged, well_ids=well_ids
    ):
        yield _with_well_metadata(pd.concat([cells, features], axis=1), metadata)


def read_well_profiles(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    feature_set: str | None = None,
    include_flagged: bool = False,
) -> pd.DataFrame:
    """Return per-well profiles of a run, aggregated plate by plate.

    The median or mean of the well's cells, as the feature set records
    (`aggregation_method`: classical features and the embedding recipe take the
    median; embeddings stored before the recipe recorded it, the mean), read from
    the store's cache of
    aggregates when present, else computed by `aggregate_run` (cells stream in
    chunks of whole wells, so memory is bounded by the chunk, not by the plate).
    Fields flagged by QC are left out (and not counted) unless `include_flagged`.
    Imported per-well profiles are returned as imported.

    Parameters
    ----------
    engine : Engine
    run_id, experiment_id : int
    feature_set : str or None
        Classical features, an embedding or an import; None: the run's default
        (`db.store.resolve_feature_set`).
    include_flagged : bool

    Returns
    -------
    DataFrame
        One row per well with at least one completed field: ``Metadata_Plate``,
        ``Metadata_Well``, ``Metadata_FieldCount``, ``Metadata_CellCount`` (0 where
        no cell was found, e.g. after cell loss; features are then NaN; NaN where
        an import gave no count), the plate-map metadata and the features.

    Raises
    ------
    ValueError
        If the run has no completed field or no such feature set.
    """
    name, kind = store.resolve_feature_set(engine, run_id, feature_set)
    wells = store.read_wells(engine, experiment_id)
    field_counts = store.read_completed_field_counts(
        engine, run_id, include_flagged=include_flagged
    )
    if field_counts.empty:
        raise ValueError(
            f"run {run_id} has no completed field that passed QC yet; run the plate "
            "first, or pass --include-flagged."
        )
    ids = wells[["well_id", "Metadata_Plate", "Metadata_Well"]].merge(
        field_counts, on="well_id"
    )
    if kind == store.WELL_PROFILE_KIND:
        profiles = ids.merge(
            store.read_well_profile_vectors(engine, run_id, name), on="well_id"
        )
        return _with_well_metadata(profiles, wells)
    if kind == COMBINED_KIND:
        aggregates = None
        for block in combined_blocks(engine, run_id, name):
            part = _well_aggregates(engine, run_id, block, include_flagged)
            aggregates = (
                part
                if aggregates is None
                else aggregates.merge(
                    part.drop(columns="Metadata_CellCount"), on="well_id", how="outer"
                )
            )
    else:
        aggregates = _well_aggregates(engine, run_id, name, include_flagged)
    if len(aggregates):
        profiles = ids.merge(aggregates, on="well_id", how="left")
    else:
        profiles = ids.assign(Metadata_CellCount=0)
    profiles["Metadata_CellCount"] = (
        profiles["Metadata_CellCount"].fillna(0).astype(int)
    )
    return _with_well_metadata(profiles, wells)


def _well_aggregates(
    engine: Engine, run_id: int, feature_set: str, include_flagged: bool
) -> pd.DataFrame:
    """Per-well aggregates of a stored feature set, from the cache or computed."""
    aggregates = store.read_well_aggregates(
        engine, run_id, feature_set, include_flagged=include_flagged
    )
    if aggregates is None:
        aggregates = aggregate_run(
            engine, run_id, feature_set, method=aggregation_method(engine, run_id,
                                                                   feature_set),
            include_flagged=include_flagged,
        )  # fmt: skip
    return aggregates


def aggregation_method(engine: Engine, run_id: int, feature_set: str) -> str:
    """Return how a feature set's cells are aggregated into wells.

    The embedding recipe records its ``aggregate`` (`pipeline.config.EmbedConfig`);
    embeddings stored before it was recorded are averaged, classical features take
    the median.
    """
    kind, config = store.read_feature_set_config(engine, run_id, feature_set)
    return config.get("aggregate", "mean" if kind == "embedding" else "median")


def combined_blocks(engine: Engine, run_id: int, feature_set: str) -> list[str]:
    """Return the feature sets a combined feature set is made of, in order."""
    return list(store.read_feature_set_config(engine, run_id, feature_set)[1]["blocks"])


def aggregate_run(
    engine: Engine,
    run_id: int,
    feature_set: str,
    *,
    method: str,
    include_flagged: bool = False,
) -> pd.DataFrame:
    """Aggregate a run's cells into per-well profiles and cache them in the store.

    `method` is ``median`` or ``mean`` (`aggregation_method`). Cells stream in
    chunks of whole wells. The result is cached in the store when the run is
    complete (`db.store.write_well_aggregates`), so the dashboard and later
    commands read it instead of every cell.

    Returns
    -------
    DataFrame
        ``well_id``, ``Metadata_CellCount`` and the features, one row per well
        with cells (none for a run without cells).
    """
    per_chunk = [
        aggregate_cells(cells, features, by=["well_id"], method=method)
        for _, cells, features in store.iter_plate_cells(
            engine, run_id, feature_set, include_flagged=include_flagged
        )
    ]
    if not per_chunk:
        return pd.DataFrame(columns=["well_id", "Metadata_CellCount"])
    aggregates = pd.concat(per_chunk, ignore_index=True)
    store.write_well_aggregates(
        engine, run_id, feature_set, include_flagged=include_flagged,
        profiles=aggregates,
    )  # fmt: skip
    return aggregates


def sample_cells(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    n_cells: int,
    feature_set: str | None = None,
    include_flagged: bool = False,
    rng: int = 0,
) -> pd.DataFrame:
    """Return a uniform random sample of about `n_cells` cells of a run, streamed.

    Each streamed chunk keeps every cell with probability n_cells / total, so the
    whole run is never in memory; the result is capped at `n_cells`.

    Returns
    -------
    DataFrame
        Single-cell table as `iter_cell_tables` yields it; empty when the feature
        set holds imported per-well profiles, is combined, or the run has no cells.

    Raises
    ------
    ValueError
        If `n_cells` < 1.
    """
    if n_cells < 1:
        raise ValueError(f"n_cells = {n_cells} must be >= 1.")
    name, kind = store.resolve_feature_set(engine, run_id, feature_set)
    if kind in (store.WELL_PROFILE_KIND, COMBINED_KIND):
        return pd.DataFrame()
    _, _, fields = store.read_run_fields(engine, run_id)
    total = int(fields["n_cells"].sum()) if len(fields) else 0
    if total == 0:
        return pd.DataFrame()
    generator = np.random.default_rng(rng)
    rate = min(1.0, 1.1 * n_cells / total)  # a margin, then capped
    parts = [
        table[generator.random(len(table)) < rate]
        for table in iter_cell_tables(
            engine, run_id, experiment_id, feature_set=name,
            include_flagged=include_flagged,
        )
    ]  # fmt: skip
    sample = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(sample) > n_cells:
        sample = sample.iloc[np.sort(generator.permutation(len(sample))[:n_cells])]
    return sample.reset_index(drop=True)


def _stored_section(engine: Engine, run_id: int, section: str) -> RunConfig:
    """Return the run config with only `section` read from the one saved with a run."""
    toml = store.read_run_provenance(engine, run_id)["config_toml"]
    values = tomllib.loads(toml or "").get(section, {})
    return config_from_dict({section: values}, stored=True)


def profile_recipe(engine: Engine, run_id: int) -> ProfileConfig:
    """Return the profile recipe saved with a run (`[profile]` of its config)."""
    return _stored_section(engine, run_id, "profile").profile


def hit_settings(
    engine: Engine, run_id: int, **overrides: float | str | None
) -> HitsConfig:
    """Return a run's hit settings (`[hits]` of its config), with `overrides`.

    None overrides are ignored (e.g. ``fdr=None``: the run's FDR level).

    Raises
    ------
    pipeline.errors.InputError
        If an override is out of range.
    """
    settings = _stored_section(engine, run_id, "hits").hits
    kept = {k: v for k, v in overrides.items() if v is not None}
    return replace(settings, **kept) if kept else settings


def read_profiles(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    feature_set: str | None = None,
    include_flagged: bool = False,
    recipe: ProfileConfig | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a run's well profiles and the same after its profile recipe.

    The one path from stored cells to comparable profiles: `read_well_profiles`,
    then `pipeline.profiling.profiles.normalize_profiles` with the run's `profile_recipe`
    (or `recipe`, to compare recipes; a combined feature set is normalized block by
    block).

    Returns
    -------
    raw : DataFrame
        `read_well_profiles`.
    normalized : DataFrame
        `pipeline.profiling.profiles.normalize_profiles` of it.

    Raises
    ------
    ValueError
        As `read_well_profiles` and `pipeline.profiling.profiles.normalize_profiles`.
    """
    name, kind = store.resolve_feature_set(engine, run_id, feature_set)
    raw = read_well_profiles(
        engine, run_id, experiment_id, feature_set=name, include_flagged=include_flagged
    )
    blocks = None
    if kind == COMBINED_KIND:
        blocks = [
            store.read_feature_set(engine, run_id, block)[1]
            for block in combined_blocks(engine, run_id, name)
        ]
    recipe = recipe or profile_recipe(engine, run_id)
    return raw, normalize_profiles(raw, recipe, blocks=blocks)


def hit_tables(
    normalized: pd.DataFrame, settings: HitsConfig | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the compound hit list and the compound-dose table of well profiles.

    `normalized` are well profiles after the run's recipe (`read_profiles`);
    `pipeline.calls.hits.call_hits` runs on them with `settings` (default: `HitsConfig`
    defaults); the compound-dose table also carries each compound-dose's
    consensus profile (median of its normalized wells).
    """
    settings = settings or HitsConfig()
    hits, doses = call_hits(
        normalized, fdr=settings.fdr, toxic_ratio=settings.toxicity_threshold
    )
    features = [c for c in normalized.columns if not c.startswith("Metadata_")]
    consensus = (
        normalized.groupby(DOSE_KEYS, dropna=False)[features].median().reset_index()
    )
    return hits, doses.merge(consensus, on=DOSE_KEYS, how="left")


def hit_table_names(recipe: ProfileConfig, settings: HitsConfig) -> tuple[str, str]:
    """Names of the cached hit list and compound-dose table of a recipe and settings."""
    key = repr((recipe, settings.fdr, settings.toxicity_threshold))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"hits@{digest}", f"compound_doses@{digest}"


def read_hit_tables(
    engine: Engine,
    run_id: int,
    experiment_id: int,
    *,
    feature_set: str | None = None,
    include_flagged: bool = False,
    settings: HitsConfig | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a run's hit list and compound-dose table, cached in the store.

    Computed once by `hit_tables` from `read_profiles` with `settings` (None: the
    run's own, `hit_settings`) and kept in the store (`db.store.write_cached_tables`,
    under a hash of the recipe and settings) until the run's cells, vectors or
    flags change; `phenoscreen run` computes them when it completes, so the
    dashboard and `phenoscreen hits` read them instead of calling hits again.
    The hit list records the ``fdr`` and ``toxicity_threshold`` it used.

    Raises
    ------
    ValueError
        As `read_profiles` and `pipeline.calls.hits.call_hits` (e.g. too few negative
        controls).
    """
    name, _ = store.resolve_feature_set(engine, run_id, feature_set)
    settings = settings or hit_settings(engine, run_id)
    names = hit_table_names(profile_recipe(engine, run_id), settings)
    cached = store.read_cached_tables(
        engine, run_id, name, include_flagged=include_flagged, names=names
    )
    if cached is not None:
        return cached[names[0]], cached[names[1]]
    hits, doses = hit_tables(
        read_profiles(
            engine, run_id, experiment_id, feature_set=name,
            include_flagged=include_flagged,
        )[1],
        settings,
    )  # fmt: skip
    store.write_cached_tables(
        engine, run_id, name, include_flagged=include_flagged,
        tables=dict(zip(names, (hits, doses), strict=True)),
    )  # fmt: skip
    return hits, doses


def plate_qc_table(
    normalized: pd.DataFrame,
    *,
    well_profiles: pd.DataFrame | None = None,
    features: Sequence[str] = (),
    cell_count_control: str = "",
) -> pd.DataFrame:
    """Return per-plate QC: Z' of the activity, edge effects, optional cell-count Z'.

    `normalized` are well profiles after the run's recipe (`read_profiles`);
    `well_profiles` the raw ones, needed for `features` only. Activity is
    `pipeline.profiling.profiles.well_activity`, so ``z_prime_activity`` says how well the
    positive controls separate from DMSO in the profile (> 0.5: an excellent
    assay; 0 to 0.5: usable for phenotypic screens). Edge effects compare the
    plate's outer ring with its inner wells (`pipeline.calls.plateqc.edge_effect`: DMSO
    wells when both rings have them, else all wells): the cell-count ratio (1 =
    none) and the activity difference (0 = none).

    Parameters
    ----------
    normalized : DataFrame
    well_profiles : DataFrame, optional
    features : sequence of str
        Also Z' of these raw features (positive vs negative controls).
    cell_count_control : str
        A compound declared to change cell count (e.g. a cytotoxic control):
        ``z_prime_cell_count`` of its wells against the negative controls. Empty:
        no cell-count Z' (it means nothing for controls that keep cells alive).

    Returns
    -------
    DataFrame
        One row per plate: ``Metadata_Plate``, ``z_prime_activity``,
        ``robust_z_prime_activity``, ``n_positive``, ``n_negative``,
        ``edge_to_inner_cell_count``, ``edge_minus_inner_activity``,
        ``edge_wells``; ``z_prime_cell_count`` with `cell_count_control`; for each
        of `features`, ``z_prime_<feature>`` and ``robust_z_prime_<feature>``.
        Z' columns are NaN on plates without two wells of each control group.

    Raises
    ------
    ValueError
        If a feature is not a column of the profiles (similar names are listed),
        or `cell_count_control` is not a compound of the run.
    """
    columns = [] if well_profiles is None else well_profiles.columns
    for feature in features:
        if feature not in columns:
            similar = [c for c in columns if feature.lower() in c.lower()]
            raise ValueError(
                f"feature {feature!r} is not in the profiles; similar: "
                f"{', '.join(similar[:10]) or 'none'}."
            )
    compounds = normalized["Metadata_Compound"]
    if cell_count_control and not (compounds == cell_count_control).any():
        raise ValueError(
            f"cell_count_control {cell_count_control!r} is not a compound of the "
            f"run; its compounds include {', '.join(sorted(compounds.unique())[:10])}."
        )
    wells = normalized[metadata_columns(normalized)].assign(
        activity=well_activity(normalized)
    )
    z_columns = ["Metadata_Plate", "z_prime", "robust_z_prime", "n_positive",
                 "n_negative"]  # fmt: skip

    def z_primes(table: pd.DataFrame, value: str) -> pd.DataFrame:
        try:
            return plate_z_prime(table, value)
        except ValueError:  # no plate has both control kinds: Z' is undefined
            return pd.DataFrame(columns=z_columns)

    table = pd.DataFrame({"Metadata_Plate": sorted(wells["Metadata_Plate"].unique())})
    activity = z_primes(wells, "activity")[z_columns].rename(
        columns={"z_prime": "z_prime_activity",
                 "robust_z_prime": "robust_z_prime_activity"}
    )  # fmt: skip
    table = table.merge(activity, on="Metadata_Plate", how="left")
    if cell_count_control:
        declared = wells.assign(
            Metadata_Role=np.where(
                compounds == cell_count_control, "positive_control",
                np.where(wells["Metadata_Role"] == "negative_control",
                         "negative_control", "other"),
            )
        )  # fmt: skip
        counts = z_primes(declared, "Metadata_CellCount")[["Metadata_Plate", "z_prime"]]
        table = table.merge(
            counts.rename(columns={"z_prime": "z_prime_cell_count"}),
            on="Metadata_Plate", how="left",
        )  # fmt: skip
    for feature in features:
        scores = z_primes(well_profiles, feature)[
            ["Metadata_Plate", "z_prime", "robust_z_prime"]
        ]
        table = table.merge(
            scores.rename(
                columns={"z_prime": f"z_prime_{feature}",
                         "robust_z_prime": f"robust_z_prime_{feature}"}
            ),
            on="Metadata_Plate", how="left",
        )  # fmt: skip
    counts = edge_effect(wells, "Metadata_CellCount")
    shift = edge_effect(wells, "activity", statistic="difference")
    edges = counts[["Metadata_Plate", "edge_effect", "edge_wells"]].rename(
        columns={"edge_effect": "edge_to_inner_cell_count"}
    )
    edges["edge_minus_inner_activity"] = shift["edge_effect"].to_numpy()
    no_counts = edges["edge_wells"] == "no values"
    edges.loc[no_counts, "edge_wells"] = shift.loc[no_counts, "edge_wells"].map(
        lambda used: f"{used} (activity only: no cell counts)"
    )
    return table.merge(edges, on="Metadata_Plate", how="left")


def _role_suffix(role: str) -> str:
    return "" if role == "treatment" else f" ({role})"


def _map_labels(level: str, table: pd.DataFrame) -> pd.Series:
    if level == "compound_dose":
        return dose_labels(table) + table["Metadata_Role"].map(_role_suffix)
    label = table["Metadata_Plate"] + "/" + table["Metadata_Well"]
    if level == "cell":
        label += (
            "/s" + table["Metadata_Site"].astype(str)
            + "#" + table["Metadata_ObjectNumber"].astype(str)
        )  # fmt: skip
    return label


def phenotype_map_table(
    normalized: pd.DataFrame,
    *,
    cells: pd.DataFrame | None = None,
    rng: int = 0,
) -> pd.DataFrame:
    """Return UMAP coordinates and HDBSCAN clusters of wells, compound-doses, cells.

    `normalized` are well profiles after the run's recipe (`read_profiles`); a
    compound-dose's point is the median of its wells over all plates. Wells without
    cells are left out. A sample of single cells (`sample_cells`), when given, is
    normalized to its plate's negative-control cells (robust z per plate: a
    plate's sampled control cells are many, so its own spread is stable) and
    mapped on its own.

    Returns
    -------
    DataFrame
        `db.store.MAP_COLUMNS`: ``level`` (``well``, ``compound_dose`` or
        ``cell``), ``label``, ``plate`` and ``well`` (wells and cells),
        ``compound``, ``concentration``, ``role``, ``moa``, ``activity`` (distance
        from DMSO), ``umap_x``, ``umap_y``, ``cluster`` (-1 = unassigned).
    """
    features = [c for c in normalized.columns if not c.startswith("Metadata_")]
    normalized = normalized[
        np.isfinite(normalized[features].to_numpy(float)).all(axis=1)
    ]
    normalized = normalized.assign(Metadata_Activity=well_activity(normalized))
    moa = normalized.get("Metadata_MoA")
    doses = normalized.assign(Metadata_MoA=moa).groupby(DOSE_KEYS, dropna=False)
    consensus = pd.concat(
        [
            doses[["Metadata_MoA"]].first(),
            doses[["Metadata_Activity", *features]].median(),
        ],
        axis=1,
    ).reset_index()
    tables = [("well", normalized, features), ("compound_dose", consensus, features)]
    if cells is not None and len(cells) >= 4:
        try:
            cell_table = normalize_to_controls(cells)
        except ValueError as exc:  # e.g. no control cell sampled on a plate
            logger.warning("single cells left off the map: %s", exc)
            cell_table = cells.iloc[:0]
        cell_features = [c for c in features if c in cell_table.columns]
        cell_table = cell_table[
            np.isfinite(cell_table[cell_features].to_numpy(float)).all(axis=1)
        ]
        cell_table = cell_table[[*metadata_columns(cell_table), *cell_features]]
        cell_table = cell_table.assign(Metadata_Activity=well_activity(cell_table))
        if len(cell_table) >= 4:
            tables.append(("cell", cell_table, cell_features))
    levels = []
    for level, table, columns in tables:
        coordinates = umap_coordinates(table[columns], rng=rng)
        has_well = level != "compound_dose"
        levels.append(
            pd.DataFrame(
                {
                    "level": level,
                    "label": _map_labels(level, table),
                    "plate": table["Metadata_Plate"] if has_well else None,
                    "well": table["Metadata_Well"] if has_well else None,
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


#: Leading characters that make a spreadsheet read a CSV cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def check_output_path(out: str | Path) -> Path:
    """Return `out` if a table may be written there; refuse it with the fix otherwise.

    The export rule: a relative path must stay inside the working directory (an
    absolute path says where on purpose), its folder must exist (no folders are
    created), and it must not be a folder.

    Raises
    ------
    ValueError
        Naming the path and the fix.
    """
    out = Path(out)
    if not out.is_absolute():
        here = Path.cwd().resolve()
        if not out.resolve().is_relative_to(here):
            raise ValueError(
                f"--out {str(out)!r} leads outside the working directory {str(here)!r}; "
                "give an absolute path if you mean to write there."
            )
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; name a file in it.")
    if not out.parent.is_dir():
        raise ValueError(
            f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist; "
            "create it first (exports never create folders)."
        )
    return out


def _defuse(text: pd.Series) -> pd.Series:
    """Prefix the cells of a text Series that start like a formula with a quote."""
    risky = text.str.startswith(FORMULA_PREFIXES).fillna(False).astype(bool)
    return text.where(~risky, "'" + text)


def escape_formulas(table: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells and headers that a spreadsheet would run as formulas.

    OWASP's CSV-injection rule: a text cell or column name starting with one of
    `FORMULA_PREFIXES` (e.g. a compound named ``=HYPERLINK(...)``) gets a leading
    ``'``, so it opens as text. Numbers are left alone.

    Returns
    -------
    DataFrame
        A copy when anything changed, else `table` itself.
    """
    escaped = {}
    for column in table.columns:
        values = table[column]
        if not (
            values.dtype == object
            or pd.api.types.is_string_dtype(values)
            or isinstance(values.dtype, pd.CategoricalDtype)
        ):
            continue
        text = values.astype("string")
        defused = _defuse(text)
        if not defused.equals(text):
            escaped[column] = defused.astype(object).where(values.notna(), None)
    names = _defuse(pd.Series(table.columns.astype(str), dtype="string"))
    renamed = dict(zip(table.columns, names, strict=True))
    if not escaped and all(str(k) == v for k, v in renamed.items()):
        return table
    return table.assign(**escaped).rename(columns=renamed)


def write_tables(tables: Iterator[pd.DataFrame], out: str | Path, *, fmt: str) -> int:
    """Write a stream of same-column tables to one CSV or Parquet file atomically.

    `check_output_path` first; the file appears only when complete (written to a
    new temporary file beside it, then renamed); CSV text cells and headers go
    through `escape_formulas`.

    Returns
    -------
    int
        Rows written.

    Raises
    ------
    ValueError
        If `fmt` is unknown, `out` is refused, or the stream is empty.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}.")
    out = check_output_path(out)
    handle, name = tempfile.mkstemp(
        dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"
    )
    os.close(handle)  # a new file of our own: no existing path or link is reused
    tmp = Path(name)
    n_rows, writer = 0, None
    try:
        for table in tables:
            if fmt == "csv":
                escape_formulas(table).to_csv(
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
    feature_set: str | None = None,
    fdr: float | None = None,
    toxicity_threshold: float | None = None,
) -> int:
    """Export a table of a run (default: the latest complete run).

    ``cells``: one row per cell; ``wells``: per-well profiles (median or mean of
    the cells, as the feature set records); ``compounds``: per compound-dose
    activity, test, q-value and consensus profile; ``hits``: the per-compound hit
    list (with the run's `hit_settings`, `fdr` and `toxicity_threshold` overriding
    them when given); of the `feature_set` (classical, deep, combined or any
    stored name). Every row carries its provenance: ``Metadata_RunID``,
    ``Metadata_AnalysisKey`` (the hash of what determined the cells) and
    ``Metadata_FeatureSet``.

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
    elif table == "wells":
        stream = iter(
            [read_well_profiles(engine, run_id, experiment_id,
                                include_flagged=include_flagged,
                                feature_set=feature_set)]
        )  # fmt: skip
    else:
        settings = hit_settings(
            engine, run_id, fdr=fdr, toxicity_threshold=toxicity_threshold
        )
        hits, doses = read_hit_tables(
            engine, run_id, experiment_id, feature_set=feature_set,
            include_flagged=include_flagged, settings=settings,
        )  # fmt: skip
        stream = iter([doses if table == "compounds" else hits])
    stamp = {
        "Metadata_RunID": run_id,
        "Metadata_AnalysisKey": store.read_run_provenance(engine, run_id)[
            "analysis_key"
        ],
        "Metadata_FeatureSet": store.resolve_feature_set(engine, run_id, feature_set)[
            0
        ],
    }
    stamped = (
        pd.concat([pd.DataFrame(stamp, index=part.index), part], axis=1)
        for part in stream
    )  # provenance first, in one block (wide cell tables stay unfragmented)
    return write_tables(stamped, out, fmt=fmt)
