"""Peak memory of well aggregation streamed from a store of millions of cells.

Builds a synthetic SQLite store (default 5,000,000 cells: 4 plates x 384 wells x
4 fields, 50 float32 features per cell) through the store's per-field writes, then
aggregates it to well profiles with `pipeline.views.export.read_well_profiles` in a fresh
process and reports that process's peak RSS next to the size of the cell features
(what holding them all would take). The store is kept between runs (``--store``).

    python benchmarks/bench_aggregate_memory.py [--cells 5000000] [--store /tmp/agg.db]
"""

from __future__ import annotations

import argparse
import resource
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

N_PLATES, N_ROWS, N_COLUMNS, N_SITES, N_FEATURES = 4, 16, 24, 4, 50


def build_store(url: str, n_cells: int, seed: int = 0) -> int:
    """Write `n_cells` synthetic cells into a new store; return the run id."""
    engine = make_engine(url)
    rng = np.random.default_rng(seed)
    wells = pd.DataFrame(
        [
            {
                "Metadata_Plate": f"P{p}",
                "Metadata_Well": f"{chr(65 + r)}{c + 1:02d}",
                "Metadata_Compound": "DMSO" if c < 2 else f"cpd{r}_{c}",
                "Metadata_Concentration": 1.0,
                "Metadata_Role": "negative_control" if c < 2 else "treatment",
            }
            for p in range(N_PLATES)
            for r in range(N_ROWS)
            for c in range(N_COLUMNS)
        ]
    )
    fields = wells[["Metadata_Plate", "Metadata_Well"]].merge(
        pd.DataFrame({"Metadata_Site": range(1, N_SITES + 1)}), how="cross"
    )
    fields["FileName_DNA"] = "none.tif"
    experiment_id, fields = store.register_experiment(
        engine,
        name="bench",
        image_root="/none",
        channels={"DNA": "none"},
        wells=with_well_positions(wells),
        fields=fields,
        plate_formats={f"P{p}": 384 for p in range(N_PLATES)},
    )
    run_id, _ = store.open_run(
        engine,
        experiment_id=experiment_id,
        analysis_key="bench",
        config_toml="",
        segmenter="synthetic",
        versions={},
    )
    feature_set_id = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name="classical",
        kind="classical",
        feature_names=[f"f{i}" for i in range(N_FEATURES)],
        config={},
    )
    per_field = -(-n_cells // len(fields))
    start = time.perf_counter()
    for i, field_id in enumerate(fields["field_id"]):
        n = max(0, min(per_field, n_cells - i * per_field))
        cells = pd.DataFrame(
            {
                "object_number": np.arange(1, n + 1),
                "centroid_y": rng.uniform(0, 1080, n),
                "centroid_x": rng.uniform(0, 1080, n),
                "bbox_min_y": 0,
                "bbox_min_x": 0,
                "bbox_max_y": 10,
                "bbox_max_x": 10,
                "area_px": 100,
            }
        )
        store.write_field_cells(
            engine,
            run_id=run_id,
            field_id=int(field_id),
            feature_set_id=feature_set_id,
            cells=cells,
            features=rng.standard_normal((n, N_FEATURES), dtype=np.float32),
            qc={},
            seconds={},
        )
        if i % 500 == 0:
            rate = (i + 1) * per_field / (time.perf_counter() - start)
            print(f"  wrote {i + 1}/{len(fields)} fields ({rate:,.0f} cells/s)")
    store.finish_run(engine, run_id, status="complete", timings={}, message=None)
    return run_id


def aggregate(url: str) -> None:
    """Aggregate the store's latest run to well profiles; print figures as TSV."""
    from pipeline.views.export import read_well_profiles

    engine = make_engine(url, create=False)
    start = time.perf_counter()
    profiles = read_well_profiles(engine, *store.resolve_run(engine))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(profiles)}\t{int(profiles['Metadata_CellCount'].sum())}\t"
          f"{seconds:.1f}\t{peak_mib:.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5_000_000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/phenoscreen_agg.db"))
    parser.add_argument("--aggregate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = f"sqlite:///{args.store}"
    if args.aggregate_only:
        aggregate(url)
        return
    if not args.store.exists():
        print(f"building a store of {args.cells:,} cells in {args.store} ...")
        start = time.perf_counter()
        build_store(url, args.cells)
        print(f"  built in {time.perf_counter() - start:.0f} s")
    output = subprocess.run(
        [sys.executable, __file__, "--store", str(args.store), "--aggregate-only"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    n_wells, n_cells, seconds, peak_mib = output[-4:]
    figures = {
        "n_cells": int(n_cells),
        "n_wells": int(n_wells),
        "n_features": N_FEATURES,
        "chunk_cells": store.CHUNK_CELLS,
        "aggregate_seconds": float(seconds),
        "cells_per_s": round(int(n_cells) / float(seconds)),
        "peak_rss_mib": int(peak_mib),
        "all_cell_features_mib": round(int(n_cells) * N_FEATURES * 4 / 2**20),
        "store_mib": round(args.store.stat().st_size / 2**20),
    }
    print(
        f"aggregated {figures['n_cells']:,} cells into {figures['n_wells']} wells in "
        f"{figures['aggregate_seconds']} s ({figures['cells_per_s']:,} cells/s); peak "
        f"RSS {figures['peak_rss_mib']} MiB (all cell features would be "
        f"{figures['all_cell_features_mib']} MiB; store {figures['store_mib']} MiB)"
    )
    save("aggregate_memory", figures)


if __name__ == "__main__":
    main()
