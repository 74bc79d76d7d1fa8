"""Every dashboard view renders on an empty store and on a store with a run."""

import contextlib
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io
import pytest
import streamlit as st
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from streamlit.testing.v1 import AppTest

from app.data import unreachable_store_message
from app.glossary import EC50_FLAGS, GLOSSARY
from app.widgets import (
    CONTROL_GREY,
    PALETTE,
    compound_colors,
    dose_response_figure,
    well_summary,
)
from db.session import (
    StoreConnectionLost,
    make_engine,
    retry_lost_connection,
    store_problem,
)
from db.store import read_run_provenance, resolve_run, write_phenotype_map
from pipeline.calls.doseresponse import FLAGS
from pipeline.calls.hits import HIT_COLUMNS, MIN_SIMILARITY
from pipeline.config import HitsConfig
from pipeline.views.export import phenotype_map_table, read_profiles, sample_cells
from tests.conftest import SHARED_DATA, copy_store, free_port

APP = Path(__file__).resolve().parents[2] / "app"
VIEWS = [
    "hits.py", "plate.py", "campaign.py", "phenotype_map.py", "compare.py",
    "gallery.py", "runs.py",
]  # fmt: skip
JUMP_MOA = (
    "profiles/jump_moa_cpg0002_plate_BR00117060a10x/"
    "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"
)


@pytest.fixture(scope="module")
def demo_store(demo_run, tmp_path_factory):
    """A copy of the session's demo store: these tests store a phenotype map."""
    return copy_store(demo_run[0], tmp_path_factory.mktemp("views"))


def run_view(view, url, monkeypatch):
    monkeypatch.setenv("PHENOSCREEN_DB_URL", url)
    app = AppTest.from_file(str(APP / "views" / view), default_timeout=60)
    return app.run()


def plotly_figure(app, index=0):
    """The Plotly figure of a view's `index`-th chart."""
    return plotly.io.from_json(app.get("plotly_chart")[index].proto.spec)


def figure_traces(app, index=0):
    """The Plotly traces of a view's `index`-th chart."""
    return plotly_figure(app, index).data


def well_line(app):
    """The Plates view's line about the chosen well (after the glossary)."""
    return next(m.value for m in app.markdown if m.value.startswith("**"))


def real_data(relative):
    """Path under ../shared/data; skips when absent, fails under CI (CI=true)."""
    path = SHARED_DATA / relative
    if not path.exists():
        reason = f"real data {path} is absent (../shared/data is not beside this clone)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} under CI")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def jump_stores(tmp_path_factory):
    """The JUMP-MOA plate imported by `phenoscreen import-profiles`: store URLs.

    ``as_given`` (no concentrations, with cell counts and a phenotype map) and
    ``no_cell_counts`` (the same table without its count columns, no map).
    """
    from pipeline.cli import main
    from pipeline.profiling.importers import CELL_COUNT_COLUMNS

    source = real_data(JUMP_MOA)
    folder = tmp_path_factory.mktemp("jump_moa")
    without = folder / "no_cell_counts.csv.gz"
    table = pd.read_csv(source)
    table.drop(columns=[c for c in CELL_COUNT_COLUMNS if c in table.columns]).to_csv(
        without, index=False
    )
    urls = {}
    for name, path in (("as_given", source), ("no_cell_counts", without)):
        urls[name] = f"sqlite:///{folder}/{name}.db"
        assert main(["import-profiles", str(path), "--db", urls[name]]) == 0
    engine = make_engine(urls["as_given"], create=False)
    run_id, experiment_id = resolve_run(engine)
    points = phenotype_map_table(read_profiles(engine, run_id, experiment_id)[1])
    write_phenotype_map(engine, run_id, points)
    return urls


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
    assert "DEMO-P1 C05" in well_line(app) and "Mitoglow" in well_line(app)
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
    dmso = pd.Series(np.linspace(-2.0, 2.0, 101))
    figure = dose_response_figure(wells, fit, dmso, compound="X", color="#2E91E5")
    assert [t.name for t in figure.data] == ["DMSO", "wells", "4PL fit"]
    band = figure.data[0]
    assert band.fill == "toself" and sorted(set(band.y)) == pytest.approx([-1.8, 1.8])
    assert figure.data[1].marker.color == figure.data[2].line.color == "#2E91E5"
    assert figure.layout.yaxis.title.text == "activity (SDs from DMSO)"
    curve = figure.data[2]
    assert curve.y.min() > 0.99 and curve.y.max() < 5.01  # bottom .. top
    label = figure.layout.annotations[-1]
    assert label.text == "EC50 1 uM" and label.x == 0.0  # log10 on the log axis
    unfitted = dose_response_figure(
        wells, fit.drop("ec50"), pd.Series(dtype=float), compound="X"
    )
    assert [t.name for t in unfitted.data] == ["wells"]  # no DMSO wells: no band
    flagged = dose_response_figure(
        wells, fit.replace({"ok": "ec50_outside_range"}), dmso, compound="X"
    )
    assert [t.name for t in flagged.data] == ["DMSO", "wells"]  # curve only if ok
    with pytest.raises(ValueError, match="activity"):
        dose_response_figure(wells.drop(columns="activity"), fit, wells["activity"],
                             compound="X")  # fmt: skip


def test_dose_response_figure_without_concentrations_shows_a_box():
    wells = pd.DataFrame(
        {"Metadata_Concentration": np.nan, "activity": [3.0, 4.0, 5.0],
         "Metadata_Plate": "P1", "Metadata_Well": ["A01", "A02", "A03"]}
    )  # fmt: skip
    fit = pd.Series({"ec50": np.nan, "ec50_flag": "too_few_doses"})
    figure = dose_response_figure(wells, fit, pd.Series([-1.0, 0.0, 1.0]), compound="X")
    assert [(t.type, t.name) for t in figure.data] == [
        ("scatter", "DMSO"), ("box", "wells")
    ]  # fmt: skip
    assert list(figure.layout.xaxis.ticktext) == ["X"]
    assert "no concentrations" in figure.layout.title.text


def test_compound_colors_are_stable_and_grey_for_negative_controls():
    compounds = ["b", "DMSO", "a", "c", "a"]
    colors = compound_colors(compounds, negative_controls=["DMSO"])
    assert colors == {"a": PALETTE[0], "b": PALETTE[1], "c": PALETTE[2],
                      "DMSO": CONTROL_GREY}  # fmt: skip
    assert compound_colors(compounds[::-1], negative_controls=["DMSO"]) == colors
    many = compound_colors([f"c{i:03d}" for i in range(len(PALETTE) + 1)])
    assert many["c000"] == many[f"c{len(PALETTE):03d}"]  # the palette repeats
    assert CONTROL_GREY not in PALETTE and len(set(PALETTE)) == len(PALETTE)


def test_glossary_defines_every_ec50_flag():
    assert tuple(EC50_FLAGS) == FLAGS
    assert all(f"`{flag}`" in GLOSSARY["ec50_flag"] for flag in FLAGS)


def test_well_summary_says_what_a_well_has():
    well = pd.Series({"Metadata_FieldCount": 1, "Metadata_CellCount": 312.0,
                      "activity": 2.414})  # fmt: skip
    assert well_summary(well) == "312 cells, activity 2.41 SDs from DMSO"
    assert well_summary(well.drop("Metadata_CellCount")).startswith("activity")
    assert well_summary(well.drop("Metadata_FieldCount")) == "every field flagged by QC"


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


class Relay:
    """A local port relayed to a TCP server until `stop`, as a server that goes down.

    Every connection made through it is cut by `stop`, and new ones are refused.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:  # the server does not answer: neither does the relay
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # the other side hung up: pass it on
        except OSError:  # cut by stop
            pass

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def relay(postgres_url):
    """The PostgreSQL server of `postgres_url` behind a `Relay`; stopped after."""
    server = make_url(postgres_url)
    relay = Relay(server.host, server.port)
    yield relay
    with contextlib.suppress(OSError):  # the test may have stopped it
        relay.stop()


def test_app_says_so_when_the_database_server_goes_down(
    postgres_url, relay, monkeypatch
):
    make_engine(postgres_url).dispose()  # an empty store
    server = make_url(postgres_url)
    password = server.password or "secret"  # trust auth takes any
    url = server.set(host="127.0.0.1", port=relay.port, password=password)
    url = url.render_as_string(hide_password=False)
    monkeypatch.setenv("PHENOSCREEN_DB_URL", url)
    st.cache_data.clear()
    app = AppTest.from_file(str(APP / "streamlit_app.py"), default_timeout=60).run()
    assert not app.exception and "No complete run" in app.info[0].value
    relay.stop()  # the server goes down while the dashboard is open
    st.cache_data.clear()  # as after the runs' 30 s cache
    app.run()
    assert not app.exception
    [message] = [m.value for m in app.error]
    shown = f"{server.drivername}://{server.username}:***@127.0.0.1:{relay.port}/"
    assert message.startswith(f"Cannot read the store {shown}")
    assert "the database connection was lost; check that the database server is up" in (
        message
    )
    assert "Reload the page" in message and f":{password}@" not in message


def test_unreachable_store_message_after_the_retries_and_for_other_errors(tmp_path):
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"

    def connect():
        with create_engine(closed).connect():
            pass

    with pytest.raises(StoreConnectionLost) as lost:  # as the gallery's crop reads
        retry_lost_connection(connect, what="reading crops", delays=[])
    message = unreachable_store_message(lost.value, closed)
    assert "the database connection was lost" in message
    assert "Connection refused" in message or "connection failed" in message
    sqlite = f"sqlite:///{tmp_path}/s.db"
    # no such table: not the server's fault
    with (
        pytest.raises(OperationalError) as missing,
        create_engine(sqlite).connect() as c,
    ):
        c.execute(text("SELECT * FROM cell"))
    assert unreachable_store_message(missing.value, sqlite) is None
    assert unreachable_store_message(ValueError("a bug"), sqlite) is None
    with pytest.raises(KeyError):
        store_problem("slow")


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
    from pipeline.profiling.importers import import_profiles
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
    # one concentration per compound: wells on a log-dose axis, no curve
    hits = run_view("hits.py", url, monkeypatch)
    assert hits.dataframe[0].value["ec50_flag"].eq("too_few_doses").all()
    traces = figure_traces(hits)
    assert [(t.type, t.name) for t in traces] == [
        ("scatter", "DMSO"), ("scatter", "wells")
    ]  # fmt: skip
    assert plotly_figure(hits).layout.xaxis.type == "log"


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
    assert "every field flagged by QC" in well_line(app)


def test_plate_view_reports_cell_count_z_prime_of_the_declared_control(
    demo_store, monkeypatch
):
    from app import data

    st.cache_data.clear()
    monkeypatch.setattr(
        data, "load_hit_settings",
        lambda url, run_id: HitsConfig(cell_count_control="Toxicol"),
    )  # fmt: skip
    app = run_view("plate.py", demo_store, monkeypatch)
    assert not app.exception
    qc = app.dataframe[0].value
    assert np.isfinite(qc.loc[0, "z_prime_cell_count"])
    assert "cell count of the Toxicol wells" in app.caption[0].value
    assert app.expander[0].label == "Glossary"
    st.cache_data.clear()
    monkeypatch.setattr(
        data, "load_hit_settings",
        lambda url, run_id: HitsConfig(cell_count_control="Nonexistin"),
    )  # fmt: skip
    app = run_view("plate.py", demo_store, monkeypatch)
    assert not app.exception
    assert "'Nonexistin' is not a compound of the run" in app.error[0].value
    assert len(app.get("plotly_chart")) == 1  # the plate map still shows
    st.cache_data.clear()


@pytest.mark.parametrize("store", ["as_given", "no_cell_counts"])
def test_every_view_on_imported_jump_moa_profiles(jump_stores, store, monkeypatch):
    url = jump_stores[store]
    apps = {view: run_view(view, url, monkeypatch) for view in VIEWS}
    for view, app in apps.items():
        assert not app.exception, (view, app.exception)

    hits = apps["hits.py"]
    table = hits.dataframe[0].value
    assert list(table.columns) == HIT_COLUMNS and len(table) == 90
    n_hits = int(table["is_hit"].sum())
    assert hits.subheader[0].value == f"{n_hits} of 90 compounds are hits"
    assert (
        5 <= n_hits < 90 and (table.loc[table["is_hit"], "n_active_doses"] >= 1).all()
    )
    assert "false discovery rate of 0.05" in hits.caption[0].value
    assert "fewer than 50% of the DMSO wells' cells" in hits.caption[0].value
    assert hits.expander[0].label == "Glossary"
    glossary = hits.expander[0].markdown[0].value
    assert "`too_few_doses`" in glossary
    assert glossary.count("\n- **") == len(GLOSSARY) - 1  # one bullet per term
    traces = figure_traces(hits)  # no concentrations: the wells as a box
    assert [(t.type, t.name) for t in traces] == [
        ("scatter", "DMSO"), ("box", "wells")
    ]  # fmt: skip

    plates = apps["plate.py"]
    qc = plates.dataframe[0].value
    assert "z_prime_cell_count" not in qc.columns  # no cell-count control declared
    assert "No cell-count Z'" in plates.caption[0].value
    assert "no images" in plates.info[0].value
    assert "every field flagged" not in well_line(plates)
    metrics = plates.selectbox(key="plate_metric").options
    if store == "no_cell_counts":
        assert (
            qc.loc[0, "edge_wells"]
            == "negative controls (activity only: no cell counts)"
        )
        assert "Metadata_CellCount" not in metrics and metrics[0] == "activity"
        assert "cells" not in well_line(plates)
    else:
        assert qc.loc[0, "edge_wells"] == "negative controls"
        assert metrics[0] == "Metadata_CellCount"

    compare = apps["compare.py"]
    neighbors = compare.dataframe[0].value
    assert (
        neighbors["is_similar"].tolist()
        == (neighbors["cosine_similarity"] >= MIN_SIMILARITY).tolist()
    )
    shown = {t.name for t in figure_traces(compare)}
    assert len(shown) == int(neighbors["is_similar"].sum())  # similar ones only
    assert f"at or above {MIN_SIMILARITY:g}" in compare.caption[0].value

    mapped = apps["phenotype_map.py"]
    if store == "as_given":
        assert len(mapped.get("plotly_chart")) == 1
    else:
        assert "phenoscreen map" in mapped.info[0].value
    assert "no images" in apps["gallery.py"].info[0].value
    assert apps["runs.py"].dataframe[0].value.loc[0, "status"] == "complete"


def test_compound_colours_agree_across_map_levels_and_views(jump_stores, monkeypatch):
    url = jump_stores["as_given"]
    app = run_view("phenotype_map.py", url, monkeypatch)
    app.selectbox(key="map_colour").set_value("compound").run()
    colors = {}
    for level in ("compound_dose", "well"):
        app.radio(key="map_level").set_value(level).run()
        assert not app.exception
        colors[level] = {t.name: t.marker.color for t in figure_traces(app)}
    assert len(colors["well"]) == 91  # 90 compounds and DMSO
    assert colors["compound_dose"] == colors["well"]
    assert colors["well"]["DMSO"] == CONTROL_GREY
    hits = run_view("hits.py", url, monkeypatch)
    compound = hits.selectbox(key="dose_response_compound").value
    wells = next(t for t in figure_traces(hits) if t.name == "wells")
    assert wells.marker.color == colors["well"][compound]
    compare = run_view("compare.py", url, monkeypatch)
    for trace in figure_traces(compare):  # bars: "compound @ dose"
        assert trace.marker.color == colors["well"][trace.name.split(" @ ")[0]]
