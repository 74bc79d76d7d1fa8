"""Cached, read-only loaders over the store for the dashboard views."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy import Engine

from db.session import (
    StoreConnectionLost,
    make_engine,
    shown_url,
    store_problem,
    transient_cause,
)
from db.store import (
    FEATURE_SET_ALIASES,
    count_flagged_fields,
    read_field_masks,
    read_phenotype_map,
    read_run_provenance,
    read_wells,
    resolve_feature_set,
    resolve_run,
    summarize_runs,
)
from pipeline.calls.campaign import plate_trends, recipe_diagnostics
from pipeline.calls.hits import DOSE_KEYS
from pipeline.cells.stored import StoredFieldReader
from pipeline.config import HitsConfig
from pipeline.profiling.profiles import feature_columns, metadata_columns, well_activity
from pipeline.views.export import (
    COMBINED_KIND,
    combined_blocks,
    hit_settings,
    iter_cell_tables,
    plate_qc_table,
    read_hit_tables,
    read_profiles,
)
from pipeline.views.gallery import display_limits, field_thumbnail, sample_cell_crops

DEFAULT_DB_URL = "sqlite:///phenoscreen.db"


def db_url() -> str:
    """Return the store URL the dashboard was started with."""
    return os.environ.get("PHENOSCREEN_DB_URL", DEFAULT_DB_URL)


def unreachable_store_message(exc: BaseException, url: str) -> str | None:
    """Return what the dashboard says when the store cannot be read, else None.

    Parameters
    ----------
    exc : BaseException
        An error raised while a view loaded data: a `db.session.StoreConnectionLost`
        (the gallery's crop reads are retried first) or a database error.
    url : str
        The store's URL.

    Returns
    -------
    str or None
        The message, naming the store, the problem and the fix, for a lost or
        refused connection, a locked database or repeated conflicts
        (`db.session.transient_cause`); None for any other error, which the view
        raises as it is.
    """
    error = exc.__cause__ if isinstance(exc, StoreConnectionLost) else exc
    cause = transient_cause(error) if error is not None else None
    if cause is None:
        return None
    return (
        f"Cannot read the store {shown_url(url)}: {store_problem(cause)} "
        f"({getattr(error, 'orig', error)}). Reload the page to try again."
    )


@st.cache_resource
def get_engine(url: str) -> Engine:
    """Open the store once per server (never creates one)."""
    return make_engine(url, create=False)


@st.cache_data(ttl=30)
def load_runs(url: str) -> pd.DataFrame:
    """Return every run with its progress (refreshed every 30 s)."""
    return summarize_runs(get_engine(url))


@st.cache_data(ttl=30)
def load_feature_sets(url: str, run_id: int) -> dict[str, str]:
    """Return the feature sets a run can be viewed in, for the selector.

    Returns
    -------
    dict
        Option -> stored feature-set name, in the selector's order: ``classical``,
        then the aliases ``deep`` (latest CNN embedding) and ``combined`` (latest
        classical + embedding set) when the run has them, then every other stored
        set (older embeddings, imported profiles) by name. The first option is the
        run's default (`db.store.resolve_feature_set`). Refreshed every 30 s, so an
        embedding added by ``phenoscreen embed`` shows up.

    Raises
    ------
    ValueError
        If the run does not exist.
    """
    sets = read_run_provenance(get_engine(url), run_id)["feature_sets"]
    kinds = dict(zip(sets["name"], sets["kind"], strict=True))
    options: dict[str, str] = {}
    if "classical" in kinds:
        options["classical"] = "classical"
    for alias, kind in FEATURE_SET_ALIASES.items():
        latest = [n for n, k in kinds.items() if k == kind]
        if latest and alias not in kinds:  # a set stored under the alias is itself
            options[alias] = latest[-1]
    shown = set(options.values())
    options |= {name: name for name in kinds if name not in shown}
    if "classical" not in kinds and len(kinds):  # the run's default first
        default = next(o for o, n in options.items() if n == next(iter(kinds)))
        options = {default: options.pop(default), **options}
    return options


@st.cache_data
def load_profiles(
    url: str, run_id: int, feature_set: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a run's well profiles and the same after its profile recipe.

    `pipeline.views.export.read_profiles` of the feature set (a stored name; None: the
    run's default); the loaders below take theirs from here.
    """
    engine = get_engine(url)
    run_id, experiment_id = resolve_run(engine, run_id)
    return read_profiles(engine, run_id, experiment_id, feature_set=feature_set)


def load_well_profiles(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return the per-well profiles of a complete run (cached by `load_profiles`)."""
    return load_profiles(url, run_id, feature_set)[0]


def load_normalized_profiles(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return the well profiles after the run's recipe (cached by `load_profiles`)."""
    return load_profiles(url, run_id, feature_set)[1]


@st.cache_data
def load_hits(
    url: str, run_id: int, feature_set: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the compound hit list and the compound-dose table of a run."""
    engine = get_engine(url)
    return read_hit_tables(
        engine, *resolve_run(engine, run_id), feature_set=feature_set
    )


@st.cache_data(ttl=30)
def load_hit_settings(url: str, run_id: int) -> HitsConfig:
    """Return a run's hit settings (`[hits]` of its saved config)."""
    engine = get_engine(url)
    return hit_settings(engine, resolve_run(engine, run_id)[0])


@st.cache_data
def load_plate_qc(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return per-plate QC of a run: Z' of activity, edge effects.

    `pipeline.views.export.plate_qc_table`, with cell-count Z' when the run declares a
    ``[hits] cell_count_control``.

    Raises
    ------
    ValueError
        If the declared cell-count control is not a compound of the run.
    """
    return plate_qc_table(
        load_normalized_profiles(url, run_id, feature_set),
        cell_count_control=load_hit_settings(url, run_id).cell_count_control,
    )


@st.cache_data
def load_plate_trends(
    url: str, run_id: int, feature_set: str | None = None, *, with_qc: bool = True
) -> pd.DataFrame:
    """Return one row per plate of a run: what drifts over a campaign, and its QC.

    `pipeline.calls.campaign.plate_trends` of the run's well profiles and the same after
    its recipe (`load_profiles`), followed by the other columns of `load_plate_qc`
    (robust Z', edge effects, ...) when `with_qc`.

    Returns
    -------
    DataFrame
        In plate order: ``Metadata_Plate``, ``Metadata_Batch`` (when the plate map
        has one), ``layout`` (equal numbers: replicate plates), ``n_wells``,
        ``dmso_wells``, ``dmso_cell_count``,
        ``replicate_correlation_across_plates`` and, when `with_qc`,
        ``z_prime_activity`` and the rest of the plate QC.

    Raises
    ------
    ValueError
        As `load_plate_qc` (a declared cell-count control the run does not hold):
        pass ``with_qc=False`` to get the trends without QC.
    """
    raw, normalized = load_profiles(url, run_id, feature_set)
    if not with_qc:
        return plate_trends(raw, normalized)
    qc = load_plate_qc(url, run_id, feature_set)
    trends = plate_trends(raw, normalized, qc)
    others = [c for c in qc.columns if c not in trends.columns]
    return trends.merge(qc[["Metadata_Plate", *others]], on="Metadata_Plate",
                        how="left")  # fmt: skip


@st.cache_data
def load_correction_diagnostics(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return plate-effect diagnostics of a run's profiles before and after its recipe.

    `pipeline.calls.campaign.recipe_diagnostics` (before: robust z to the DMSO wells of
    all plates pooled, on the features the recipe kept; after: the run's recipe),
    with MoA NSC / NSCB when the plate map has a ``moa`` column.

    Raises
    ------
    ValueError
        As `pipeline.calls.campaign.recipe_diagnostics` (e.g. fewer than two DMSO
        wells).
    """
    raw, normalized = load_profiles(url, run_id, feature_set)
    return recipe_diagnostics(raw, normalized, reference_column="moa")


@st.cache_data
def load_plate_batches(url: str, run_id: int) -> pd.Series:
    """Return each plate's batch from a run's plate map (``Metadata_Batch``).

    Returns
    -------
    Series
        Plate -> batch, sorted by plate; empty when the plate map has no
        ``Metadata_Batch`` column.
    """
    engine = get_engine(url)
    wells = read_wells(engine, resolve_run(engine, run_id)[1])
    if "Metadata_Batch" not in wells.columns:
        return pd.Series(dtype=object, name="Metadata_Batch")
    return (
        wells.drop_duplicates("Metadata_Plate")
        .set_index("Metadata_Plate")["Metadata_Batch"]
        .sort_index()
    )


@st.cache_data(ttl=30)
def load_phenotype_map(url: str, run_id: int) -> pd.DataFrame:
    """Return the stored phenotype map of a run (empty until `phenoscreen map`).

    One map per run, made from the feature set `phenoscreen map --feature-set`
    was given, whatever the dashboard's feature set.
    """
    return read_phenotype_map(get_engine(url), run_id)


@st.cache_data
def load_well_activity(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return every well's metadata and activity.

    ``activity`` is `pipeline.profiling.profiles.well_activity`: distance from DMSO in robust
    SDs of the plate's DMSO wells' own distances (DMSO wells: 0 +- 1).
    """
    normalized = load_normalized_profiles(url, run_id, feature_set)
    return normalized[metadata_columns(normalized)].assign(
        activity=well_activity(normalized)
    )


@st.cache_data
def load_compounds(url: str, run_id: int) -> pd.DataFrame:
    """Return each compound of a run's plate map with its role, sorted by name.

    Returns
    -------
    DataFrame
        ``Metadata_Compound``, ``Metadata_Role``: one row per pair, from every
        well of the run's experiment (profiled or not), so every view colours
        compounds alike (`app.widgets.run_compound_colors`).
    """
    engine = get_engine(url)
    wells = read_wells(engine, resolve_run(engine, run_id)[1])
    return (
        wells[["Metadata_Compound", "Metadata_Role"]]
        .drop_duplicates()
        .sort_values(["Metadata_Compound", "Metadata_Role"], ignore_index=True)
    )


@st.cache_data(ttl=30)
def load_run_provenance(url: str, run_id: int) -> dict:
    """Return a run's config TOML, software versions and feature sets."""
    return read_run_provenance(get_engine(url), run_id)


@st.cache_data
def load_consensus(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Return one normalized profile per compound-dose (controls left out)."""
    _, doses = load_hits(url, run_id, feature_set)
    profiled = set(feature_columns(load_normalized_profiles(url, run_id, feature_set)))
    consensus = doses[[*DOSE_KEYS, *(c for c in doses.columns if c in profiled)]]
    return consensus[consensus["Metadata_Role"] != "negative_control"]


@st.cache_resource(max_entries=4, ttl=60)
def _field_reader(url: str, run_id: int) -> StoredFieldReader | None:
    """Open the run's image reader; None for a run without images (imported)."""
    if read_run_provenance(get_engine(url), run_id)["segmenter"] == "imported":
        return None
    return StoredFieldReader.open(get_engine(url), run_id)


def load_channels(url: str, run_id: int) -> list[str]:
    """Return the channel names of a run, in stored order (none without images)."""
    reader = _field_reader(url, run_id)
    return reader.channel_names if reader is not None else []


@st.cache_data
def load_plate_map_metrics(
    url: str, run_id: int, feature_set: str | None = None
) -> pd.DataFrame:
    """Per-well metrics for the plate map: well profiles, activity, q and QC flags.

    Returns
    -------
    DataFrame
        The well profiles plus ``activity`` (`load_well_activity`),
        ``q_value`` (of the well's compound-dose) and ``Metadata_FlaggedFields``
        (fields left out by image QC); wells whose every field was flagged come
        with their metadata and NaN measurements.
    """
    engine = get_engine(url)
    wells = load_well_profiles(url, run_id, feature_set)
    activity = load_well_activity(url, run_id, feature_set)
    _, doses = load_hits(url, run_id, feature_set)
    flagged = count_flagged_fields(engine, run_id)
    keys = ["Metadata_Plate", "Metadata_Well"]
    # wells whose every field was flagged have no profile: shown with metadata only
    only_flagged = flagged.merge(wells[keys], how="left", indicator=True)
    only_flagged = only_flagged[only_flagged["_merge"] == "left_only"][keys]
    if len(only_flagged):
        metadata = read_wells(engine, resolve_run(engine, run_id)[1])
        metadata = metadata[[c for c in metadata.columns if c in wells.columns]]
        wells = pd.concat([wells, only_flagged.merge(metadata, on=keys)],
                          ignore_index=True)  # fmt: skip
    return (
        wells.merge(activity[[*keys, "activity"]], on=keys, how="left")
        .merge(doses[[*DOSE_KEYS, "q_value"]], on=DOSE_KEYS, how="left")
        .merge(flagged, on=keys, how="left")
    )


def warm_up(url: str, run_id: int, feature_set: str | None = None) -> None:
    """Fill the caches the views read on arrival for one run and feature set.

    Called once per session after the first page has been sent to the browser, so
    the other views open from cache; a page switch meanwhile waits only for the
    loader being computed (each is cached once per server, not per session).
    """
    load_plate_map_metrics(url, run_id, feature_set)  # profiles, activity, hits
    load_plate_qc(url, run_id, feature_set)
    load_consensus(url, run_id, feature_set)
    load_phenotype_map(url, run_id)
    load_compounds(url, run_id)  # the compounds' colours
    load_channels(url, run_id)  # opens the run's image reader


@st.cache_data(max_entries=64)
def load_field_thumbnails(
    url: str, run_id: int, plate: str, well: str, channels: tuple[int, ...]
) -> list[tuple[str, np.ndarray | str]]:
    """Return each field of a well as an RGB thumbnail with its stored outlines.

    Returns
    -------
    list of (caption, ndarray (Y, X, 3) uint8 or str)
        Caption: the site and its QC flags (flagged fields are shown, but left out
        of profiles); the message instead of the image when a field's files
        cannot be read.
    """
    reader = _field_reader(url, run_id)
    fields = reader.fields[
        (reader.fields["Metadata_Plate"] == plate)
        & (reader.fields["Metadata_Well"] == well)
    ]
    masks = read_field_masks(get_engine(url), run_id, fields["field_id"])

    def thumbnail(field: Any) -> tuple[str, np.ndarray | str]:
        caption = f"site {field.Metadata_Site}" + (
            f" (QC: {field.qc_flags}, left out of profiles)" if field.qc_flags else ""
        )
        try:
            image = reader.read(field)
        except (OSError, ValueError) as exc:
            return caption, str(exc)
        nuclei, cells = masks.get(field.field_id, (None, None))
        return caption, field_thumbnail(
            image, nuclei, cells, limits=display_limits(image), channels=channels
        )

    # decoding and numpy release the GIL: the fields of a well load side by side
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(thumbnail, fields.itertuples(index=False)))


CELL_KEYS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_ObjectNumber",
]


@st.cache_data(max_entries=16)
def load_well_cells(
    url: str, run_id: int, plate: str, well: str, feature_set: str | None = None
) -> pd.DataFrame:
    """Return the single cells of one well with their features.

    A combined feature set gives each cell the features of its every block.
    """
    engine = get_engine(url)
    run_id, experiment_id = resolve_run(engine, run_id)
    name, kind = resolve_feature_set(engine, run_id, feature_set)
    blocks = combined_blocks(engine, run_id, name) if kind == COMBINED_KIND else [name]
    cells = pd.DataFrame()
    for block in blocks:
        tables = list(
            iter_cell_tables(
                engine, run_id, experiment_id, feature_set=block, wells=[(plate, well)]
            )
        )
        if not tables:
            continue
        table = pd.concat(tables, ignore_index=True)
        cells = (
            table
            if cells.empty
            else cells.merge(
                table[[*CELL_KEYS, *feature_columns(table)]], on=CELL_KEYS, how="left"
            )
        )
    return cells


@st.cache_data(max_entries=32)
def load_gallery(
    url: str,
    run_id: int,
    wells: tuple[tuple[str, str], ...],
    cells: tuple[tuple[str, str, int, int], ...],
    n_cells: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Return crops, masks and identities of cells sampled from 4 fields of wells.

    Or of exact cells (plate, well, site, object number) when `cells` is given.
    """
    return sample_cell_crops(
        get_engine(url),
        run_id,
        wells=pd.DataFrame(list(wells), columns=["Metadata_Plate", "Metadata_Well"]),
        cells=list(cells),
        n_cells=n_cells,
        n_fields=4,  # a field read costs ~0.25 s at 1080 px: 4 keep a view < 2 s
        rng=seed,
    )
