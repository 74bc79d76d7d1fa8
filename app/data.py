"""Cached, read-only loaders over the store for the dashboard views."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy import Engine

from db.session import make_engine
from db.store import (
    count_flagged_fields,
    read_field_masks,
    read_phenotype_map,
    read_run_provenance,
    read_wells,
    resolve_run,
    summarize_runs,
)
from pipeline.export import (
    iter_cell_tables,
    plate_qc_table,
    read_hit_tables,
    read_well_profiles,
)
from pipeline.gallery import display_limits, field_thumbnail
from pipeline.hits import DOSE_KEYS
from pipeline.profiles import (
    feature_columns,
    metadata_columns,
    normalize_to_controls,
    score_wells,
)
from pipeline.run import StoredFieldReader, sample_cell_crops

DEFAULT_DB_URL = "sqlite:///phenoscreen.db"


def db_url() -> str:
    """Return the store URL the dashboard was started with."""
    return os.environ.get("PHENOSCREEN_DB_URL", DEFAULT_DB_URL)


@st.cache_resource
def get_engine(url: str) -> Engine:
    """Open the store once per server (never creates one)."""
    return make_engine(url, create=False)


@st.cache_data(ttl=30)
def load_runs(url: str) -> pd.DataFrame:
    """Return every run with its progress (refreshed every 30 s)."""
    return summarize_runs(get_engine(url))


@st.cache_data
def load_well_profiles(url: str, run_id: int) -> pd.DataFrame:
    """Return the per-well profiles of a complete run."""
    engine = get_engine(url)
    run_id, experiment_id = resolve_run(engine, run_id)
    return read_well_profiles(engine, run_id, experiment_id)


@st.cache_data
def load_hits(url: str, run_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the compound hit list and the compound-dose table of a run."""
    engine = get_engine(url)
    return read_hit_tables(engine, *resolve_run(engine, run_id))


@st.cache_data
def load_plate_qc(url: str, run_id: int) -> pd.DataFrame:
    """Return per-plate Z' and edge effect of a run."""
    return plate_qc_table(load_well_profiles(url, run_id))


@st.cache_data(ttl=30)
def load_phenotype_map(url: str, run_id: int) -> pd.DataFrame:
    """Return the stored phenotype map of a run (empty until `phenoscreen map`)."""
    return read_phenotype_map(get_engine(url), run_id)


@st.cache_data
def load_well_activity(url: str, run_id: int) -> pd.DataFrame:
    """Return every well's metadata and activity (distance from its plate's DMSO)."""
    normalized = normalize_to_controls(load_well_profiles(url, run_id))
    return normalized[metadata_columns(normalized)].assign(
        activity=score_wells(normalized)
    )


@st.cache_data(ttl=30)
def load_run_provenance(url: str, run_id: int) -> dict:
    """Return a run's config TOML, software versions and feature sets."""
    return read_run_provenance(get_engine(url), run_id)


@st.cache_data
def load_consensus(url: str, run_id: int) -> pd.DataFrame:
    """Return one DMSO-normalized profile per compound-dose (controls left out)."""
    _, doses = load_hits(url, run_id)
    profiled = set(feature_columns(load_well_profiles(url, run_id)))
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
def load_plate_map_metrics(url: str, run_id: int) -> pd.DataFrame:
    """Per-well metrics for the plate map: well profiles, activity, q and QC flags.

    Returns
    -------
    DataFrame
        The well profiles plus ``activity`` (distance from the plate's DMSO),
        ``q_value`` (of the well's compound-dose) and ``Metadata_FlaggedFields``
        (fields left out by image QC); wells whose every field was flagged come
        with their metadata and NaN measurements.
    """
    engine = get_engine(url)
    wells = load_well_profiles(url, run_id)
    activity = load_well_activity(url, run_id)
    _, doses = load_hits(url, run_id)
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


def warm_up(url: str, run_id: int) -> None:
    """Fill the caches the views read on arrival for one run.

    Called once per session after the first page has been sent to the browser, so
    the other views open from cache; a page switch meanwhile waits only for the
    loader being computed (each is cached once per server, not per session).
    """
    load_plate_map_metrics(url, run_id)  # well profiles, activity, hit tables
    load_plate_qc(url, run_id)
    load_consensus(url, run_id)
    load_phenotype_map(url, run_id)
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


@st.cache_data(max_entries=16)
def load_well_cells(url: str, run_id: int, plate: str, well: str) -> pd.DataFrame:
    """Return the single cells of one well with their features."""
    engine = get_engine(url)
    run_id, experiment_id = resolve_run(engine, run_id)
    tables = list(
        iter_cell_tables(engine, run_id, experiment_id, wells=[(plate, well)])
    )
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


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
