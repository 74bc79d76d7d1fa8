"""The dashboard on a run with a CNN embedding: the feature-set selector and its views."""

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from db.session import make_engine
from db.store import resolve_run, write_phenotype_map
from pipeline.views.export import phenotype_map_table, read_profiles, sample_cells
from tests.app.test_views import VIEWS, run_view
from tests.conftest import copy_store

APP = Path(__file__).resolve().parents[2] / "app"


@pytest.fixture(scope="module")
def embedded_store(demo_run, tmp_path_factory):
    """A copy of the demo store with a small CNN embedding (and so a combined set).

    Its phenotype map is made from the embedding (``phenoscreen map --feature-set
    deep``). About 15 s: a shallow layer on the crops at their native size.
    """
    from models.embed import embed_run
    from pipeline.config import EmbedConfig

    url = copy_store(demo_run[0], tmp_path_factory.mktemp("embedded"))
    engine = make_engine(url, create=False)
    run_id, experiment_id = resolve_run(engine)
    result = embed_run(
        engine, run_id, EmbedConfig(input_size=None, layer="blocks.2", batch_size=64)
    )
    assert result["combined_feature_set"] is not None
    cells = sample_cells(engine, run_id, experiment_id, n_cells=200, feature_set="deep")
    points = phenotype_map_table(
        read_profiles(engine, run_id, experiment_id, feature_set="deep")[1],
        cells=cells,
    )
    write_phenotype_map(engine, run_id, points)
    return url, result


def test_loader_lists_classical_deep_combined(embedded_store):
    from app import data

    url, result = embedded_store
    options = data.load_feature_sets(url, 1)
    assert options == {
        "classical": "classical",
        "deep": result["feature_set"],
        "combined": result["combined_feature_set"],
    }


def test_selector_switches_the_hits_view(embedded_store, monkeypatch):
    url, result = embedded_store
    app = run_view("hits.py", url, monkeypatch)
    assert not app.exception
    selector = app.sidebar.selectbox(key="feature_set")
    assert selector.options == [
        "classical",
        f"deep ({result['feature_set']})",
        f"combined ({result['combined_feature_set']})",
    ]
    assert selector.value == "classical"  # the default
    classical = app.dataframe[0].value
    selector.set_value("deep").run()
    assert not app.exception
    deep = app.dataframe[0].value
    assert set(deep["Metadata_Compound"]) == set(classical["Metadata_Compound"])
    assert not deep["q_value"].equals(classical["q_value"])  # other profiles
    assert app.session_state["feature_set_name"] == result["feature_set"]
    # the compound-dose table carries the embedding's consensus profile
    downloads = {b.label for b in app.get("download_button")}
    assert "compound_doses.parquet" in downloads
    app.sidebar.selectbox(key="feature_set").set_value("combined").run()
    assert not app.exception
    assert not app.dataframe[0].value["q_value"].equals(deep["q_value"])


@pytest.mark.parametrize("choice", ["deep", "combined"])
def test_every_view_renders_for_a_feature_set(choice, embedded_store, monkeypatch):
    url, result = embedded_store
    monkeypatch.setenv("PHENOSCREEN_DB_URL", url)
    for view in VIEWS:
        app = AppTest.from_file(str(APP / "views" / view), default_timeout=60)
        app.session_state["feature_set_choice"] = choice  # as chosen on another page
        app.run()
        assert not app.exception, (view, app.exception)
        if view != "runs.py":
            assert app.sidebar.selectbox(key="feature_set").value == choice, view
        if view == "plate.py":
            assert len(app.get("plotly_chart")) == 1
            app.toggle(key="well_cells_table").set_value(True).run()
            assert not app.exception
            cells = app.dataframe[1].value
            assert len(cells) > 3 and f"{result['feature_set']}_0000" in cells.columns
            # a combined set shows each cell's classical features beside its own
            assert ("Nuclei_AreaShape_Area" in cells.columns) == (choice == "combined")
        elif view == "phenotype_map.py":
            assert len(app.get("plotly_chart")) == 1
            assert (
                "one map is stored per run"
                in " ".join(c.value for c in app.caption).lower()
            )
        elif view == "compare.py":
            assert app.dataframe[0].value.loc[0, "rank"] == 0
        elif view == "gallery.py":
            assert len(app.get("image")) > 0
        elif view == "runs.py":
            sets = app.dataframe[1].value
            aliases = dict(zip(sets["name"], sets["alias"], strict=True))
            assert aliases[result["feature_set"]] == "deep"
            assert aliases[result["combined_feature_set"]] == "combined"


def test_the_choice_follows_page_switches_and_warms_its_caches(
    embedded_store, monkeypatch
):
    url, result = embedded_store
    monkeypatch.setenv("PHENOSCREEN_DB_URL", url)
    st.cache_data.clear()
    app = AppTest.from_file(str(APP / "streamlit_app.py"), default_timeout=60).run()
    assert app.session_state["warmed"] == (app.session_state["run_id"], "classical")
    app.sidebar.selectbox(key="feature_set").set_value("combined").run()
    assert not app.exception
    combined = result["combined_feature_set"]
    assert app.session_state["warmed"] == (app.session_state["run_id"], combined)
    app.switch_page("views/plate.py").run()
    assert not app.exception and app.header[0].value == "Plates"
    assert app.sidebar.selectbox(key="feature_set").value == "combined"
