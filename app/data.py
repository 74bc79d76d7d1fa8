"""Cached, read-only loaders over the store for the dashboard views."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st
from sqlalchemy import Engine

from db.session import make_engine
from db.store import (
    read_phenotype_map,
    read_run_provenance,
    resolve_run,
    summarize_runs,
)
from pipeline.export import hit_tables, plate_qc_table, read_well_profiles
from pipeline.profiles import metadata_columns, normalize_to_controls, score_wells

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
    return hit_tables(load_well_profiles(url, run_id))


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
