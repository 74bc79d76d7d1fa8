"""Every dashboard view renders on an empty store and on a store with a run."""

from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app.widgets import dose_response_figure
from db.session import make_engine
from db.store import read_run_provenance, resolve_run, write_phenotype_map
from pipeline.export import phenotype_map_table, read_profiles, sample_cells
from tests.conftest import copy_store

APP = Path(__file__).resolve().parents[2] / "app"
VIEWS = [
    "hits.py", "plate.py", "phenotype_map.py", "compare.py", "gallery.py", "runs.py"
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_store(demo_run, tmp_path_factory):
    """A copy of the session's demo store: these tests store a phenotype map."""
    return copy_store(demo_run[0], tmp_path_factory.mktemp("views"))


def run_view(view, url, monkeypatch):
    monkeypatch.setenv("PHENOSCREEN_DB_URL", url)
    app = AppTest.from_file(str(APP / "views" / view), default_timeout=60)
    return app.run()


@pytest.mark.parametrize("view", VIEWS)
def test_view_on_empty_store(view, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/empty.db"
    make_engine(url)
    app = run_view(view, url, monkeypatch)
    assert not app.exception
    assert "No" in " ".join(m.value for m in app.info)


def test_view_on_missing_store_shows_error(tmp_path, monkeypatch):
    app = run_view("hits.py", f"sqlite:///{tmp_path}/none.db", monkeypatch)
    assert not app.exception
    assert "Cannot open the store" in app.error[0].value


def test_hits_view_lists_compounds_and_doses(demo_store, monkeypatch):
    app = run_view("hits.py", demo_store, monkeypatch)
    assert not app.exception
    hits, doses = app.dataframe[0].value, app.dataframe[1].value
    assert hits["rank"].tolist()[:3] == [1, 2, 3]
    assert "DMSO" not in set(hits["Metadata_Compound"])
    assert set(hits["Metadata_Compound"]) <= set(doses["Metadata_Compound"])
    assert "compounds are hits" in app.subheader[0].value
    assert len(app.get("plotly_chart")) == 1  # the dose response of the top compound
    app.selectbox(key="dose_response_compound").set_value("Mitoglow").run()
    assert not app.exception and len(app.get("plotly_chart")) == 1
    app.radio(key="hits_filter").set_value("hits only").run()
    assert app.dataframe[0].value["is_hit"].all()
    labels = {b.label for b in app.get("download_button")}
    assert {
        "hits.csv",
        "hits.parquet",
        "compound_doses.parquet",
        "dose_response_Mitoglow.png",
        "dose_response_Mitoglow.html",
    } <= labels


def test_plate_view_maps_a_plate_and_shows_a_wells_fields_and_cells(
    demo_store, monkeypatch
):
    app = run_view("plate.py", demo_store, monkeypatch)
    assert not app.exception
    assert len(app.get("plotly_chart")) == 1  # the chosen plate's map
    qc = app.dataframe[0].value
    assert qc.loc[0, "Metadata_Plate"] == "DEMO-P1" and qc.loc[0, "n_positive"] == 8
    app.selectbox(key="plate_well").set_value("C05").run()
    assert not app.exception
    assert (
        "DEMO-P1 C05" in app.markdown[0].value and "Mitoglow" in app.markdown[0].value
    )
    assert len(app.get("image")) == 1  # its one field, with outlines
    assert len(app.dataframe) == 1  # the cell table only on request
    app.toggle(key="well_cells_table").set_value(True).run()
    cells = app.dataframe[1].value
    assert set(cells["Metadata_Well"]) == {"C05"} and len(cells) > 3
    assert "Nuclei_AreaShape_Area" in cells.columns
    labels = [b.label for b in app.get("download_button")]
    assert {"well_profiles.csv", "well_profiles.parquet",
            "cells_DEMO-P1_C05.parquet"} <= set(labels)  # fmt: skip
    app.multiselect(key="well_ch").set_value(["DNA"]).run()  # one channel shown
    assert not app.exception and len(app.get("image")) == 1


def test_well_click_opens_its_cells_in_the_gallery(demo_store, monkeypatch):
    monkeypatch.setenv("PHENOSCREEN_DB_URL", demo_store)
    app = AppTest.from_file(str(APP / "streamlit_app.py"), default_timeout=60).run()
    app.switch_page("views/plate.py").run()
    app.selectbox(key="plate_well").set_value("C05").run()
    app.button(key="well_to_gallery").click().run()
    assert not app.exception
    assert app.header[0].value == "Cell gallery"
    assert app.subheader[0].value == "Selection: DEMO-P1 C05"
    images = app.get("image")
    assert 3 < len(images) <= 24
    assert all("DEMO-P1/C05" in i.proto.imgs[0].caption for i in images)
    # AppTest reruns the page it was last told to, not the one switched to
    app.switch_page("views/gallery.py").run()
    assert app.subheader[0].value == "Selection: DEMO-P1 C05"
    app.button(key="gallery_clear").click().run()
    assert not app.exception and app.radio(key="gallery_source").value == "compound"


def test_gallery_shows_cells_of_a_compound_a_well_and_a_cluster(demo_store,
                                                               monkeypatch):  # fmt: skip
    app = run_view("gallery.py", demo_store, monkeypatch)
    assert not app.exception
    app.selectbox(key="gallery_compound").set_value("Nucleomax").run()
    app.slider(key="gallery_n").set_value(16).run()
    images = app.get("image")
    assert len(images) == 16
    first = [i.proto.imgs[0].caption for i in images]
    app.button(key="gallery_resample").click().run()
    assert [i.proto.imgs[0].caption for i in app.get("image")] != first
    app.radio(key="gallery_source").set_value("well").run()
    app.selectbox(key="gallery_well").set_value("H12").run()
    assert not app.exception and len(app.get("image")) >= 1
    app.radio(key="gallery_source").set_value("cluster").run()
    assert not app.exception  # before `phenoscreen map`: a message, no crash
    assert "phenoscreen map" in app.info[0].value


def test_compare_view_lists_neighbours_and_top_features(demo_store, monkeypatch):
    app = run_view("compare.py", demo_store, monkeypatch)
    assert not app.exception
    app.selectbox(key="compare_compound").set_value("Mitoglow").run()
    app.slider(key="compare_k").set_value(4).run()
    neighbors = app.dataframe[0].value
    assert neighbors.loc[0, "Metadata_Compound"] == "Mitoglow"
    assert neighbors["rank"].tolist() == [0, 1, 2, 3, 4]
    assert "Mitoglow" not in set(neighbors["Metadata_Compound"].iloc[1:])
    assert len(app.get("plotly_chart")) == 1
    app.selectbox(key="compare_dose").set_value(10.0).run()
    assert (
        not app.exception
        and app.dataframe[0].value.loc[0, "Metadata_Concentration"] == 10.0
    )


def test_phenotype_map_view_before_and_after_the_map_is_stored(demo_store, monkeypatch):
    app = run_view("phenotype_map.py", demo_store, monkeypatch)
    assert not app.exception
    assert "phenoscreen map" in app.info[0].value
    engine = make_engine(demo_store)
    run_id, experiment_id = resolve_run(engine)
    cells = sample_cells(engine, run_id, experiment_id, n_cells=300)
    assert 250 <= len(cells) <= 300 and cells["Metadata_Well"].nunique() > 20
    points = phenotype_map_table(
        read_profiles(engine, run_id, experiment_id)[1], cells=cells
    )
    assert set(points["level"]) == {"well", "compound_dose", "cell"}
    assert points.loc[points["level"] == "cell", "label"].is_unique
    write_phenotype_map(engine, run_id, points)
    st.cache_data.clear()  # the dashboard re-reads within its 30 s cache lifetime
    app = run_view("phenotype_map.py", demo_store, monkeypatch)
    assert not app.exception
    assert len(app.get("plotly_chart")) == 1
    shown = app.dataframe[0].value
    assert set(shown["level"]) == {"compound_dose"} and "Nucleomax" in set(
        shown["compound"]
    )
    assert app.radio[0].options == ["compound_dose", "well", "cell"]
    with pytest.raises(ValueError, match="n_cells"):
        sample_cells(engine, run_id, experiment_id, n_cells=0)


def test_runs_view_shows_the_run(demo_store, monkeypatch):
    app = run_view("runs.py", demo_store, monkeypatch)
    assert not app.exception
    assert app.dataframe[0].value.loc[0, "status"] == "complete"
    feature_sets = app.dataframe[1].value
    assert "classical" in set(feature_sets["name"])
    assert "[input]" in app.code[0].value  # the run's config, to reproduce it


def test_dose_response_figure_draws_wells_fit_and_dmso():
    wells = pd.DataFrame(
        {"Metadata_Concentration": [0.1, 1.0, 10.0], "activity": [1.0, 2.0, 5.0],
         "Metadata_Plate": "P1", "Metadata_Well": ["A01", "A02", "A03"]}
    )  # fmt: skip
    fit = pd.Series({"bottom": 1.0, "top": 5.0, "ec50": 1.0, "hill": 1.0,
                     "ec50_flag": "ok"})  # fmt: skip
    figure = dose_response_figure(wells, fit, pd.Series([0.9, 1.1, 1.0]), compound="X")
    assert [t.name for t in figure.data] == ["wells", "4PL fit"]
    curve = figure.data[1]
    assert curve.y.min() > 0.99 and curve.y.max() < 5.01  # bottom .. top
    label = figure.layout.annotations[-1]
    assert label.text == "EC50 1 uM" and label.x == 0.0  # log10 on the log axis
    unfitted = dose_response_figure(
        wells, fit.drop("ec50"), pd.Series(dtype=float), compound="X"
    )
    assert [t.name for t in unfitted.data] == ["wells"]
    with pytest.raises(ValueError, match="activity"):
        dose_response_figure(wells.drop(columns="activity"), fit, wells["activity"],
                             compound="X")  # fmt: skip


def test_read_run_provenance_rejects_unknown_runs(demo_store):
    with pytest.raises(ValueError, match="run 999 does not exist"):
        read_run_provenance(make_engine(demo_store, create=False), 999)


def test_app_entry_navigates_to_hits_then_warms_the_runs_caches(
    demo_store, monkeypatch
):
    monkeypatch.setenv("PHENOSCREEN_DB_URL", demo_store)
    st.cache_data.clear()
    app = AppTest.from_file(str(APP / "streamlit_app.py"), default_timeout=60).run()
    assert not app.exception
    assert app.header[0].value == "Hits"
    assert app.session_state["warmed"] == (app.session_state["run_id"], "classical")
    assert "feature_set" not in app.session_state  # one feature set: no selector


def test_warm_up_fills_the_caches_the_views_read_first(demo_store, monkeypatch):
    from app import data

    st.cache_data.clear()
    run_id = int(resolve_run(make_engine(demo_store, create=False), None)[0])
    data.warm_up(demo_store, run_id)

    def no_store_reads(*args, **kwargs):
        raise AssertionError("the store was read again")

    for name in ("read_profiles", "read_hit_tables", "read_phenotype_map"):
        monkeypatch.setattr(data, name, no_store_reads)
    assert len(data.load_plate_map_metrics(demo_store, run_id)) == 96
    assert not data.load_plate_qc(demo_store, run_id).empty
    assert not data.load_consensus(demo_store, run_id).empty
    data.load_phenotype_map(demo_store, run_id)
    assert data.load_channels(demo_store, run_id)


def test_warm_up_rejects_an_unknown_run(demo_store):
    from app import data

    with pytest.raises(ValueError, match="999"):
        data.warm_up(demo_store, 999)


def test_app_never_imports_torch_or_models():
    import subprocess
    import sys

    code = (
        "import sys, app.data, app.widgets; "
        "bad = [m for m in ('torch', 'timm', 'models') if m in sys.modules]; "
        "sys.exit(f'app imported {bad}' if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_views_on_imported_profiles_without_images(tmp_path, monkeypatch):
    from pipeline.importers import import_profiles
    from tests.pipeline.test_importers import pycytominer_wells

    path = tmp_path / "plates_normalized.csv"
    pycytominer_wells().to_csv(path, index=False)
    url = f"sqlite:///{tmp_path}/imported.db"
    import_profiles(make_engine(url), path)
    st.cache_data.clear()
    for view in VIEWS:
        app = run_view(view, url, monkeypatch)
        assert not app.exception, view
    plate = run_view("plate.py", url, monkeypatch)
    assert "no images" in plate.info[0].value
    assert len(plate.get("plotly_chart")) == 1  # the plate map still shows
    gallery = run_view("gallery.py", url, monkeypatch)
    assert "no images" in gallery.info[0].value
    compare = run_view("compare.py", url, monkeypatch)
    assert compare.dataframe[0].value.loc[0, "rank"] == 0


def test_figure_png_export_renders_with_the_local_chromium():
    import shutil

    if not (shutil.which("chromium") or shutil.which("google-chrome")):
        pytest.skip("PNG export needs Chrome/Chromium (Debian chromium)")
    wells = pd.DataFrame(
        {"Metadata_Concentration": [0.1, 1.0], "activity": [1.0, 2.0],
         "Metadata_Plate": "P1", "Metadata_Well": ["A01", "A02"]}
    )  # fmt: skip
    figure = dose_response_figure(wells, pd.Series(dtype=float), wells["activity"],
                                  compound="X")  # fmt: skip
    png = figure.to_image(format="png", scale=1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_plate_view_marks_qc_flagged_fields(demo_run, tmp_path, monkeypatch):
    from db.store import read_field_qc, write_field_flags

    url = copy_store(demo_run[0], tmp_path)
    engine = make_engine(url, create=False)
    qc = read_field_qc(engine, 1)
    c05 = qc.loc[qc["Metadata_Well"] == "C05", "field_id"]
    write_field_flags(engine, 1, pd.Series("blurred", index=c05.to_numpy()))
    st.cache_data.clear()
    app = run_view("plate.py", url, monkeypatch)
    app.selectbox(key="plate_well").set_value("C05").run()
    assert not app.exception
    caption = app.get("image")[0].proto.imgs[0].caption
    assert caption.startswith("site 1 (QC: blurred, left out of profiles)")
    assert "every field flagged by QC" in app.markdown[0].value
