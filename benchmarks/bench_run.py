"""Fields/s and cells/s of a whole `run` (read, segment, measure, write) on the demo plates.

Runs the same demo experiment side by side: SQLite with 1 and 2 local Dask worker
processes, and PostgreSQL with 2 (unless --no-postgres). Each run starts from an empty
store, so the figures include Dask start-up and experiment registration.

    python benchmarks/bench_run.py [--plates 3] [--fields-per-well 2] [--field-size 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402
from bench_sql_insert import fresh_pg_database  # noqa: E402

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.images.demo import CHANNELS, write_demo_plate  # noqa: E402
from pipeline.run import run_experiment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plates", type=int, default=3)
    parser.add_argument("--fields-per-well", type=int, default=2)
    parser.add_argument("--field-size", type=int, default=256)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        demo = write_demo_plate(
            Path(tmp) / "demo",
            n_plates=args.plates,
            fields_per_well=args.fields_per_well,
            field_size_px=args.field_size,
        )
        print(f"demo plates generated in {time.perf_counter() - start:.1f} s")
        setups = [("sqlite", 1), ("sqlite", 2)] + (
            [] if args.no_postgres else [("postgresql", 2)]
        )
        for backend, n_workers in setups:
            if backend == "sqlite":
                url, drop = f"sqlite:///{tmp}/run_{n_workers}.db", (lambda: None)
            else:
                url, drop = fresh_pg_database()
            config = config_from_dict(
                {
                    "input": {"layout": "imagexpress", "channels": CHANNELS},
                    "execution": {"n_workers": n_workers, "processes": True},
                }
            )
            try:
                start = time.perf_counter()
                summary = run_experiment(
                    demo["images"], demo["platemap"], config=config, db_url=url
                )
                wall = time.perf_counter() - start
            finally:
                drop()
            t = summary.timings
            rows.append(
                {
                    "backend": backend,
                    "workers": n_workers,
                    "fields": summary.n_fields,
                    "cells": summary.n_cells,
                    "wall_s": round(wall, 1),
                    "fields_per_s": round(summary.n_fields / wall, 2),
                    "cells_per_s": round(summary.n_cells / wall),
                    "fields_per_s_processing": round(t["fields_per_s"], 2),
                    "per_field_ms": {
                        k.removesuffix("_s"): round(1000 * t[k] / summary.n_fields, 1)
                        for k in ("read_s", "segment_s", "measure_s", "write_s")
                    },
                }
            )
            print(rows[-1])
    one, two = rows[0]["fields_per_s"], rows[1]["fields_per_s"]
    print(f"2 workers vs 1 worker (SQLite, whole run): {two / one:.2f}x")
    save(
        "run",
        {
            "field_size_px": args.field_size,
            "rows": rows,
            "speedup_2_vs_1_workers": round(two / one, 2),
        },
    )


if __name__ == "__main__":
    main()
