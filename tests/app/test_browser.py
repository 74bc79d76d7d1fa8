"""The dashboard in a real headless Chromium: every view opens and shows its content.

Starts `phenoscreen dashboard` on a copy of the demo store (with its phenotype map),
opens each view from the sidebar like a user, checks what is visible and saves a
screenshot of each (to ``$PHENOSCREEN_SCREENSHOTS`` when set, else the test's
temporary folder). Needs Debian's ``chromium`` (``.ci/run`` installs it) and the
``playwright`` Python package; without them the test skips, except under CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from db.session import make_engine
from db.store import resolve_run, write_phenotype_map
from pipeline.cli import dashboard_command
from pipeline.views.export import phenotype_map_table, read_profiles, sample_cells
from tests.conftest import copy_store, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
]


def _needs_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM and sync_playwright:
        return sync_playwright
    reason = "headless Chromium (Debian chromium) and playwright are needed"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} under CI; .ci/run installs them")
    pytest.skip(reason)


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {process.returncode}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/_stcore/health", timeout=2
            ) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard did not answer on port {port}")


@pytest.fixture
def dashboard(demo_run, tmp_path):
    """The dashboard serving a copy of the demo store: its base URL."""
    url = copy_store(demo_run[0], tmp_path)
    engine = make_engine(url, create=False)
    run_id, experiment_id = resolve_run(engine)
    cells = sample_cells(engine, run_id, experiment_id, n_cells=300)
    points = phenotype_map_table(
        read_profiles(engine, run_id, experiment_id)[1], cells=cells
    )
    write_phenotype_map(engine, run_id, points)
    port = free_port()
    process = subprocess.Popen(
        dashboard_command(host="127.0.0.1", port=port),
        env=os.environ | {"PHENOSCREEN_DB_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _drag_box(page, x0: float, y0: float, x1: float, y1: float) -> None:
    """Drag a selection box on a Plotly chart (its box-select tool chosen)."""
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()


@pytest.mark.slow
def test_every_view_in_headless_chromium(dashboard, tmp_path):
    sync_playwright = _needs_browser()
    from playwright.sync_api import expect

    shots = Path(os.environ.get("PHENOSCREEN_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        # tall: Streamlit scrolls inside its own container, not the page
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(dashboard)
        page.get_by_text("compounds are hits").wait_for(timeout=60_000)
        # a true active in the table (st.dataframe draws on a canvas; its cells are
        # mirrored in an accessible grid that is attached but not "visible")
        page.get_by_text("Mitoglow").first.wait_for(state="attached")
        curve = page.locator(".js-plotly-plot .scatterlayer .trace")
        curve.first.wait_for(timeout=60_000)  # the top compound's dose response
        page.get_by_text("hits.parquet").wait_for()
        page.screenshot(path=shots / "hits.png")

        page.get_by_role("link", name="Plates").click()
        page.get_by_text("Plate QC").wait_for(timeout=60_000)
        wells = page.locator(".js-plotly-plot .scatterlayer .point")
        expect(wells).to_have_count(96, timeout=60_000)  # one square per well
        well = page.evaluate(
            "document.querySelector('.js-plotly-plot').data[0].customdata[40]"
        )
        box = wells.nth(40).bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.get_by_text(f"DEMO-P1 {well}", exact=True).wait_for(timeout=60_000)
        page.get_by_text("cells white, nuclei yellow").first.wait_for(timeout=60_000)
        field = page.locator("[data-testid='stImage'] img").first
        field.wait_for(timeout=60_000)  # visible: the field with its outlines
        page.screenshot(path=shots / "plates.png")

        page.get_by_role("link", name="Campaign").click()
        page.get_by_text("Plate QC across the campaign").wait_for(timeout=60_000)
        page.get_by_text("plate_trends.csv").wait_for(timeout=60_000)
        page.screenshot(path=shots / "campaign.png")

        page.get_by_role("link", name="Phenotype map").click()
        page.get_by_role("heading", name="Phenotype map").wait_for(timeout=60_000)
        page.get_by_text("cell", exact=True).first.wait_for()  # the cell-level map
        points = page.locator(".js-plotly-plot .scatterlayer .point")
        points.first.wait_for(timeout=60_000)
        assert points.count() > 20  # compound-doses of the demo plate
        page.locator("[data-title='Box Select']").first.click()  # plot toolbar
        area = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
        _drag_box(page, area["x"] + 2, area["y"] + 2,
                  area["x"] + area["width"] - 2, area["y"] + area["height"] / 2)  # fmt: skip
        page.get_by_text("selected points").wait_for(timeout=60_000)
        page.screenshot(path=shots / "phenotype_map.png")
        page.get_by_role("button", name="Open their cells in the gallery").click()
        page.get_by_text("selected on the map").wait_for(timeout=60_000)
        cells = page.locator("[data-testid='stImage'] img")
        # at least 8 cells; images stream in one by one
        cells.nth(7).wait_for(timeout=60_000)
        page.screenshot(path=shots / "gallery_of_map_selection.png")
        page.get_by_role("button", name="Clear the selection").click()
        page.get_by_text("Show cells of").wait_for(timeout=60_000)  # rerun done

        page.get_by_role("link", name="Compare compounds").click()
        page.get_by_text("Top features of").wait_for(timeout=60_000)
        page.get_by_text("cosine_similarity").first.wait_for(state="attached")
        page.screenshot(path=shots / "compare.png")

        page.get_by_role("link", name="Cell gallery").click()
        page.get_by_text("Show cells of").wait_for(timeout=60_000)
        # the default sample of the first compound; images stream in, so poll the count
        expect(cells).to_have_count(24, timeout=60_000)
        page.screenshot(path=shots / "gallery.png")

        page.get_by_role("link", name="Runs").click()
        page.get_by_text("complete").first.wait_for(state="attached", timeout=60_000)
        page.get_by_text("Provenance").wait_for()
        page.get_by_text("[input]").first.wait_for()  # the run's config
        page.screenshot(path=shots / "runs.png")
        browser.close()
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "campaign.png", "compare.png", "gallery.png", "gallery_of_map_selection.png",
        "hits.png", "phenotype_map.png", "plates.png", "runs.png",
    ]  # fmt: skip
