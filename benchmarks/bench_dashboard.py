"""Dashboard speed on a store of about a million cells: view functions and page loads.

Builds (once, kept with ``--store``) a SQLite store shaped like a real screen: 4
plates x 384 wells x N sites, each site the real JUMP Cell Painting field in
../shared/data (DNA, ER, RNA; segmented once by the default classical segmenter,
its ~600 classical features per cell, masks stored per field as a run stores
them), cells perturbed per compound-dose (42 compounds x 8 doses, a third active;
DMSO in columns 1 and 24, a positive control in column 23). The run is completed
like `phenoscreen run` does (well aggregates and hit tables cached in the store) and
`phenoscreen map` is run.

Then, side by side in one process:
- every cached loader the views call, cold (caches cleared) and warm;
- every view rendered by Streamlit's AppTest, cold and warm;
- every view opened in headless Chromium from the sidebar, timed from the click
  to its content being visible (first visit and revisit), clicks 3 s apart (a
  user reading the view; the dashboard warms the run's caches meanwhile after the
  first page) and only once the previous view's script run is over.
Target (issue 6): each view <= 2 s on 1M cells.

    python benchmarks/bench_dashboard.py [--cells 1000000] [--store /tmp/dash.db]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from db import store  # noqa: E402
from db.session import make_engine  # noqa: E402
from pipeline.images.platemap import with_well_positions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JUMP = (
    ROOT.parent / "shared" / "data" / "fields" / "cellpainting_fovs_cytodataframe"
    / "JUMP_plate_BR00117006" / "images" / "orig"
)  # fmt: skip
CHANNELS = {"DNA": "ch5", "ER": "ch2", "RNA": "ch3"}
N_PLATES, N_COMPOUNDS, N_DOSES = 4, 42, 8
VIEWS = ["hits.py", "plate.py", "phenotype_map.py", "compare.py", "gallery.py",
         "runs.py"]  # fmt: skip


def plate_map() -> pd.DataFrame:
    """4 x 384 wells: DMSO in columns 1 and 24, positive control in 23, 42 x 8 doses."""
    rows = []
    for p in range(N_PLATES):
        k = 0
        for c in range(1, 25):
            for r in range(16):
                well = f"{chr(65 + r)}{c:02d}"
                if c in (1, 24):
                    meta = ("DMSO", np.nan, "negative_control")
                elif c == 23:
                    meta = ("PosCtrl", 1.0, "positive_control")
                else:
                    meta = (f"cpd{k // N_DOSES:02d}", 0.01 * 3 ** (k % N_DOSES),
                            "treatment")  # fmt: skip
                    k += 1
                rows.append({"Metadata_Plate": f"P{p + 1}", "Metadata_Well": well,
                             "Metadata_Compound": meta[0],
                             "Metadata_Concentration": meta[1],
                             "Metadata_Role": meta[2]})  # fmt: skip
    return pd.DataFrame(rows)


def segment_template() -> tuple[pd.DataFrame, pd.DataFrame, dict, dict, str]:
    """Segment and measure the JUMP field once: cells, features, masks, files, config."""
    from pipeline.cells.segment import segment_field
    from pipeline.config import config_from_dict, dump_config
    from pipeline.images.io import read_field
    from pipeline.measure.features import feature_names, measure_cells

    files = {name: next(JUMP.glob(f"*-{token}sk*.tiff")).name
             for name, token in CHANNELS.items()}  # fmt: skip
    image = read_field([JUMP / f for f in files.values()]).astype(np.float32)
    nuclei, cells = segment_field(image[0], image[1])
    table, features = measure_cells(image, nuclei, cells, channel_names=list(CHANNELS))
    config = config_from_dict(
        {"input": {"layout": "phenix", "channels": CHANNELS,
                   "cytoplasm_channel": "ER"}}
    )  # fmt: skip
    assert list(features.columns) == feature_names(list(CHANNELS), config.measure)
    return (table, features, store.encode_masks(nuclei, cells), files,
            dump_config(config))  # fmt: skip


def build_store(url: str, n_cells: int, seed: int = 0) -> dict:
    """Write the synthetic screen; return build figures."""
    from pipeline.views.export import (
        aggregate_run,
        phenotype_map_table,
        read_hit_tables,
        read_well_profiles,
        sample_cells,
    )

    start = time.perf_counter()
    table, template, masks, files, config_toml = segment_template()
    base = np.nan_to_num(template.to_numpy(np.float32))
    per_field = len(table)
    wells = plate_map()
    n_sites = max(1, -(-n_cells // (len(wells) * per_field)))
    fields = wells[["Metadata_Plate", "Metadata_Well"]].merge(
        pd.DataFrame({"Metadata_Site": range(1, n_sites + 1)}), how="cross"
    )
    for name, file in files.items():
        fields[f"FileName_{name}"] = file
    engine = make_engine(url)
    experiment_id, fields = store.register_experiment(
        engine, name="bench_dashboard", image_root=str(JUMP), channels=CHANNELS,
        wells=with_well_positions(wells), fields=fields, plate_formats={p: 384 for p in
                                                   wells["Metadata_Plate"].unique()},
    )  # fmt: skip
    run_id, _ = store.open_run(
        engine, experiment_id=experiment_id, analysis_key="bench",
        config_toml=config_toml, segmenter="classical", versions={},
    )  # fmt: skip
    feature_set_id = store.ensure_feature_set(
        engine, run_id=run_id, name="classical", kind="classical",
        feature_names=list(template.columns), config={},
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    spread = base.std(axis=0) + 1e-6
    effects = {
        f"cpd{k:02d}": rng.standard_normal(base.shape[1]) * (rng.random(base.shape[1])
                                                            < 0.05) * 2.0
        for k in range(0, N_COMPOUNDS, 3)
    }  # fmt: skip
    effects["PosCtrl"] = rng.standard_normal(base.shape[1]) * 2.0
    meta = fields.merge(wells, on=["Metadata_Plate", "Metadata_Well"])
    t_write = time.perf_counter()
    for i, row in enumerate(meta.itertuples(index=False)):
        features = base + rng.normal(0, 0.3, base.shape).astype(np.float32) * spread
        effect = effects.get(row.Metadata_Compound)
        if effect is not None:
            dose = row.Metadata_Concentration
            fraction = dose / (dose + 1.0) if np.isfinite(dose) else 1.0
            features += (effect * fraction * spread).astype(np.float32)
        store.write_field_cells(
            engine, run_id=run_id, field_id=int(row.field_id),
            feature_set_id=feature_set_id, cells=table, features=features,
            qc={"n_cells": per_field}, seconds={}, masks=masks,
        )  # fmt: skip
        if i % 500 == 0:
            rate = (i + 1) * per_field / (time.perf_counter() - t_write)
            print(f"  wrote {i + 1}/{len(meta)} fields ({rate:,.0f} cells/s)")
    write_s = time.perf_counter() - t_write
    store.write_field_flags(engine, run_id, pd.Series(dtype=str))
    store.finish_run(engine, run_id, status="complete", message=None, timings={})
    t_agg = time.perf_counter()
    aggregate_run(engine, run_id, "classical", kind="classical")
    aggregate_s = time.perf_counter() - t_agg
    t_hits = time.perf_counter()
    read_hit_tables(engine, run_id, experiment_id)  # as `phenoscreen run` does
    hits_s = time.perf_counter() - t_hits
    t_map = time.perf_counter()
    profiles = read_well_profiles(engine, run_id, experiment_id)
    sample = sample_cells(engine, run_id, experiment_id, n_cells=2000)
    store.write_phenotype_map(
        engine, run_id, phenotype_map_table(profiles, cells=sample)
    )
    return {
        "n_cells": per_field * len(meta), "n_fields": len(meta),
        "n_wells": len(wells), "n_features": base.shape[1], "cells_per_field":
        per_field, "write_s": round(write_s, 1), "aggregate_s": round(aggregate_s, 1),
        "hits_s": round(hits_s, 1),
        "map_s": round(time.perf_counter() - t_map, 1),
        "build_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def time_loaders(url: str) -> dict[str, dict[str, float]]:
    """Seconds of each dashboard loader, cold (caches cleared) then warm."""
    import streamlit as st

    from app import data

    wells = data.load_well_activity(url, 1)
    one = wells.iloc[100]
    compound = wells.loc[wells["Metadata_Role"] == "treatment", "Metadata_Compound"]
    of = wells[wells["Metadata_Compound"] == compound.iloc[0]]
    chosen = tuple(zip(of["Metadata_Plate"], of["Metadata_Well"], strict=True))
    calls = {
        "load_runs": lambda: data.load_runs(url),
        "load_well_profiles": lambda: data.load_well_profiles(url, 1),
        "load_hits": lambda: data.load_hits(url, 1),
        "load_plate_qc": lambda: data.load_plate_qc(url, 1),
        "load_well_activity": lambda: data.load_well_activity(url, 1),
        "load_phenotype_map": lambda: data.load_phenotype_map(url, 1),
        "load_consensus": lambda: data.load_consensus(url, 1),
        "load_well_cells": lambda: data.load_well_cells(
            url, 1, one["Metadata_Plate"], one["Metadata_Well"]
        ),
        "load_field_thumbnails": lambda: data.load_field_thumbnails(
            url, 1, one["Metadata_Plate"], one["Metadata_Well"], (0, 1, 2)
        ),
        "load_gallery": lambda: data.load_gallery(url, 1, chosen, (), 24, 0),
    }
    st.cache_data.clear()
    st.cache_resource.clear()
    figures: dict[str, dict[str, float]] = {}
    for name, call in calls.items():  # in view order: later loaders reuse earlier
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            call()
            runs.append(round(time.perf_counter() - start, 3))
        figures[name] = {"cold_s": runs[0], "warm_s": runs[1]}
        print(f"  {name}: cold {runs[0]:.2f} s, warm {runs[1]:.2f} s")
    return figures


def time_apptest(url: str) -> dict[str, dict[str, float]]:
    """Seconds to render each view with AppTest, caches cleared, then again."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["PHENOSCREEN_DB_URL"] = url
    st.cache_data.clear()
    st.cache_resource.clear()
    figures = {}
    for view in VIEWS:
        runs = []
        for _ in range(2):
            app = AppTest.from_file(str(ROOT / "app" / "views" / view),
                                    default_timeout=300)  # fmt: skip
            start = time.perf_counter()
            app.run()
            runs.append(round(time.perf_counter() - start, 3))
            assert not app.exception, app.exception
        figures[view] = {"first_s": runs[0], "again_s": runs[1]}
        print(f"  {view}: first {runs[0]:.2f} s, again {runs[1]:.2f} s")
    return figures


def settle(page: object, reading_s: float = 3.0) -> None:
    """Wait as a user reading a view would, and until its script run is over.

    A click during a run (the view, then the dashboard's cache warm-up after the
    first page) waits for it, which would charge one view's time to the next.
    """
    from playwright.sync_api import expect

    time.sleep(reading_s)
    running = page.locator('[data-testid="stStatusWidgetRunningIcon"]')
    expect(running).to_have_count(0, timeout=300_000)


def time_browser(url: str) -> dict[str, dict[str, float]]:
    """Seconds from a sidebar click to each view's content in headless Chromium."""
    from playwright.sync_api import sync_playwright

    from pipeline.cli import dashboard_command

    if shutil.which("chromium") is None:
        sys.exit("no chromium on PATH: install Debian's chromium (apt-get install "
                 "chromium), as .ci/run does.")  # fmt: skip
    port = 8611
    server = subprocess.Popen(
        dashboard_command(host="127.0.0.1", port=port),
        env=os.environ | {"PHENOSCREEN_DB_URL": url},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    ready = {  # what shows that a view has rendered its content
        "Hits": "Compound-doses", "Plates": "cells white, nuclei yellow",
        "Phenotype map": "No point selected", "Compare compounds": "Top features of",
        "Cell gallery": "gallery_cells.csv", "Runs": "Provenance",
    }  # fmt: skip
    figures: dict[str, dict[str, float]] = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking"],
            )  # fmt: skip
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            for _ in range(120):
                try:
                    page.goto(f"http://127.0.0.1:{port}")
                    break
                except Exception:  # noqa: BLE001 - server still starting
                    time.sleep(0.5)
            start = time.perf_counter()
            page.get_by_text(ready["Hits"]).first.wait_for(timeout=300_000)
            figures["Hits"] = {"first_s": round(time.perf_counter() - start, 2)}
            for visit in ("first_s", "again_s"):
                for name, marker in ready.items():
                    if name == "Hits" and visit == "first_s":
                        continue
                    settle(page)
                    start = time.perf_counter()
                    page.get_by_role("link", name=name).click()
                    page.get_by_role("heading", name=name).first.wait_for()
                    page.get_by_text(marker).first.wait_for(timeout=300_000)
                    figures.setdefault(name, {})[visit] = round(
                        time.perf_counter() - start, 2
                    )
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name, runs in figures.items():
        print(f"  {name}: {runs}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/phenoscreen_dash.db"))
    args = parser.parse_args()
    if not JUMP.is_dir():
        sys.exit(f"{JUMP} is absent: put ../shared/data beside this clone.")
    url = f"sqlite:///{args.store}"
    figures: dict = {}
    if not args.store.exists():
        print(f"building a store of ~{args.cells:,} cells in {args.store} ...")
        figures["build"] = build_store(url, args.cells)
        print(f"  {figures['build']}")
    engine = make_engine(url, create=False)
    runs = store.summarize_runs(engine)
    figures["n_cells"] = int(runs["n_cells"].sum())
    figures["store_mib"] = round(args.store.stat().st_size / 2**20)
    print("view loaders (cached per server; cold = first user after a start):")
    figures["loaders"] = time_loaders(url)
    print("views rendered by AppTest:")
    figures["views_apptest"] = time_apptest(url)
    print("views in headless Chromium (click to content):")
    figures["views_browser"] = time_browser(url)
    worst = max(v["again_s"] for v in figures["views_browser"].values()
                if "again_s" in v)  # fmt: skip
    first = max(v["first_s"] for v in figures["views_browser"].values())
    print(f"{figures['n_cells']:,} cells: slowest view {first:.2f} s on first visit, "
          f"{worst:.2f} s on revisit (target 2 s)")  # fmt: skip
    save("dashboard", figures)


if __name__ == "__main__":
    main()
