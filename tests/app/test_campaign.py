"""The Campaign view on a run of several plates in batches and on a one-plate run."""

import base64

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app.widgets import plate_trend_figure
from db.session import make_engine
from db.store import resolve_run, write_phenotype_map
from pipeline.config import HitsConfig
from pipeline.views.export import phenotype_map_table, read_profiles
from tests.app.test_views import APP, figure_traces, plotly_figure, run_view
from tests.conftest import copy_store

PLATES = ["SQ0", "SQ1", "SQ2", "SQ3", "SQ4"]
BATCHES = {"SQ0": "B1", "SQ1": "B1", "SQ2": "B1", "SQ3": "B2", "SQ4": "B2"}


def values(array):
    """A trace's numbers: Plotly's JSON carries numeric arrays as base64 (bdata)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array, dtype=float)


def _store_with_map(url):
    """Store the phenotype map of a store's run (wells and compound-doses)."""
    engine = make_engine(url, create=False)
    run_id, experiment_id = resolve_run(engine)
    normalized = read_profiles(engine, run_id, experiment_id)[1]
    write_phenotype_map(engine, run_id, phenotype_map_table(normalized))


@pytest.fixture(scope="module")
def campaign_store(tmp_path_factory):
    """Five imported plates in two batches, with MoAs and a phenotype map: its URL."""
    from pipeline.profiling.importers import import_profiles
    from tests.pipeline.test_importers import pycytominer_wells

    folder = tmp_path_factory.mktemp("campaign")
    table = pycytominer_wells(n_plates=len(PLATES))
    table["Metadata_Batch"] = table["Metadata_Plate"].map(BATCHES)
    table.to_csv(folder / "campaign.csv", index=False)
    url = f"sqlite:///{folder}/campaign.db"
    import_profiles(make_engine(url), folder / "campaign.csv")
    _store_with_map(url)
    return url


@pytest.fixture(scope="module")
def one_plate_store(demo_run, tmp_path_factory):
    """A copy of the demo run (one plate, no batches) with its phenotype map."""
    url = copy_store(demo_run[0], tmp_path_factory.mktemp("one_plate"))
    _store_with_map(url)
    return url


def test_campaign_view_shows_every_plates_qc_maps_and_diagnostics(
    campaign_store, monkeypatch
):
    st.cache_data.clear()
    app = run_view("campaign.py", campaign_store, monkeypatch)
    assert not app.exception
    trends = app.dataframe[0].value
    assert trends["Metadata_Plate"].tolist() == PLATES  # one row per plate, in order
    assert trends["Metadata_Batch"].tolist() == [BATCHES[p] for p in PLATES]
    assert (trends["n_wells"] == 32).all() and (trends["dmso_wells"] == 16).all()
    assert {"z_prime_activity", "robust_z_prime_activity",
            "edge_to_inner_cell_count"} <= set(trends.columns)  # fmt: skip
    assert np.isfinite(trends["replicate_correlation_across_plates"]).all()
    assert not app.info  # several plates: no one-plate message

    metric = app.selectbox(key="campaign_metric")
    assert metric.options[:2] == [
        "dmso_cell_count", "replicate_correlation_across_plates"
    ]  # fmt: skip
    # no positive controls: Z' is blank on every plate, so not offered
    assert trends["z_prime_activity"].isna().all()
    assert "z_prime_activity" not in metric.options
    assert {"n_wells", "edge_to_inner_cell_count"} <= set(metric.options)
    assert "Metadata_Plate" not in metric.options
    traces = figure_traces(app, 0)  # the trend: a line, then one trace per batch
    assert [t.name for t in traces[1:]] == ["B1", "B2"]
    assert list(traces[0].x) == PLATES
    assert values(traces[0].y).tolist() == trends["dmso_cell_count"].tolist()
    metric.set_value("replicate_correlation_across_plates").run()
    assert not app.exception
    assert values(figure_traces(app, 0)[0].y).tolist() == pytest.approx(
        trends["replicate_correlation_across_plates"].tolist()
    )

    charts = app.get("plotly_chart")
    assert len(charts) == 1 + 4  # the trend and the first 4 plates' maps
    assert app.multiselect(key="campaign_plates").value == PLATES[:4]
    ranges = set()
    for index, plate in enumerate(PLATES[:4], start=1):
        figure = plotly_figure(app, index)
        assert figure.layout.title.text == f"{plate} ({BATCHES[plate]})"
        assert len(figure.data[0].customdata) == 32  # one square per well
        ranges.add((figure.data[0].marker.cmin, figure.data[0].marker.cmax))
    assert len(ranges) == 1  # one colour scale shared by the maps
    assert ranges.pop() == (500, 531)  # the wells' cell counts: 500 + i on each
    app.multiselect(key="campaign_plates").set_value(["SQ1", "SQ4"]).run()
    app.selectbox(key="campaign_map_metric").set_value("activity").run()
    assert not app.exception
    assert len(app.get("plotly_chart")) == 1 + 2
    assert plotly_figure(app, 2).layout.title.text == "SQ4 (B2)"

    diagnostics = app.dataframe[1].value
    assert diagnostics["stage"].tolist() == [
        "one scale, no plate alignment", "the run's profile recipe"
    ]  # fmt: skip
    assert {"dmso_within_minus_across", "replicate_map", "nsc", "nscb"} <= set(
        diagnostics.columns
    )  # the plate map has MoAs
    assert "near 0: no plate effect" in app.caption[-1].value
    labels = {b.label for b in app.get("download_button")}
    assert {"plate_trends.csv", "correction_diagnostics.parquet"} <= labels


def test_campaign_view_of_one_plate_shows_its_qc_and_says_why_no_more(
    one_plate_store, monkeypatch
):
    st.cache_data.clear()
    app = run_view("campaign.py", one_plate_store, monkeypatch)
    assert not app.exception
    trends = app.dataframe[0].value
    assert trends["Metadata_Plate"].tolist() == ["DEMO-P1"]
    assert trends.loc[0, "n_positive"] == 8 and trends.loc[0, "dmso_cell_count"] > 0
    assert "Metadata_Batch" not in trends.columns
    assert "one plate (DEMO-P1)" in app.info[0].value
    assert "two or more" in app.info[0].value
    assert not app.get("plotly_chart") and len(app.dataframe) == 1


def test_campaign_view_keeps_its_table_when_plate_qc_fails(campaign_store,
                                                           monkeypatch):  # fmt: skip
    from app import data

    st.cache_data.clear()
    monkeypatch.setattr(
        data, "load_hit_settings",
        lambda url, run_id: HitsConfig(cell_count_control="Nonexistin"),
    )  # fmt: skip
    app = run_view("campaign.py", campaign_store, monkeypatch)
    assert not app.exception
    assert "'Nonexistin' is not a compound of the run" in app.error[0].value
    trends = app.dataframe[0].value
    assert trends["Metadata_Plate"].tolist() == PLATES
    assert "z_prime_activity" not in trends.columns  # the trends without QC
    assert len(app.get("plotly_chart")) == 1 + 4
    st.cache_data.clear()


def test_app_entry_opens_the_campaign_page(campaign_store, monkeypatch):
    monkeypatch.setenv("PHENOSCREEN_DB_URL", campaign_store)
    app = AppTest.from_file(str(APP / "streamlit_app.py"), default_timeout=60).run()
    app.switch_page("views/campaign.py").run()
    assert not app.exception
    assert app.header[0].value == "Campaign"
    assert app.dataframe[0].value["Metadata_Plate"].tolist() == PLATES


def test_phenotype_map_colours_wells_by_plate_and_batch(campaign_store, monkeypatch):
    st.cache_data.clear()
    app = run_view("phenotype_map.py", campaign_store, monkeypatch)
    assert not app.exception
    colour = app.selectbox(key="map_colour")
    assert colour.value == "cluster"  # the default colouring is kept
    assert colour.options[-2:] == ["plate", "batch"]
    app.radio(key="map_level").set_value("well").run()
    app.selectbox(key="map_colour").set_value("plate").run()
    assert not app.exception
    assert sorted(t.name for t in figure_traces(app)) == PLATES
    app.selectbox(key="map_colour").set_value("batch").run()
    assert not app.exception
    traces = figure_traces(app)
    assert sorted(t.name for t in traces) == ["B1", "B2"]
    assert sum(len(t.customdata) for t in traces if t.name == "B1") == 3 * 32
    # compound-doses pool plates: said so, drawn in one colour
    app.radio(key="map_level").set_value("compound_dose").run()
    assert not app.exception
    assert "pools its wells over plates" in app.info[0].value
    assert len(figure_traces(app)) == 1


def test_phenotype_map_offers_plate_but_no_batch_without_batches(
    one_plate_store, monkeypatch
):
    st.cache_data.clear()
    app = run_view("phenotype_map.py", one_plate_store, monkeypatch)
    assert not app.exception
    options = app.selectbox(key="map_colour").options
    assert "plate" in options and "batch" not in options
    app.radio(key="map_level").set_value("well").run()
    app.selectbox(key="map_colour").set_value("plate").run()
    assert not app.exception
    assert [t.name for t in figure_traces(app)] == ["DEMO-P1"]


def test_plate_trend_figure_without_batches_and_rejects_missing_columns():
    import pandas as pd

    trends = pd.DataFrame({"Metadata_Plate": ["10", "2"], "z": [0.5, 0.1]})
    figure = plate_trend_figure(trends, "z")
    assert [t.name for t in figure.data[1:]] == ["z"] and not figure.layout.showlegend
    assert figure.layout.xaxis.type == "category"  # plate names, never numbers
    assert list(figure.layout.xaxis.categoryarray) == ["10", "2"]  # the table's order
    with pytest.raises(ValueError, match="missing"):
        plate_trend_figure(trends, "missing")
