"""A real-size plate on an external Dask scheduler and PostgreSQL, 1 and N workers.

The issue-21 measurement: a Cell Painting-like plate at real scale (`demo-data`:
5 channels, 1080 px fields of about 200 nuclei of 20 px, the density of a JUMP
field) is analysed

- once locally into SQLite (`phenoscreen run`'s default LocalCluster), the
  reference;
- then on a separate ``dask scheduler`` with 1, then 2 ``dask worker`` processes
  (one thread each, with nannies, as the README's cluster recipe starts them),
  each time into a fresh PostgreSQL database.

Reported per setup: wall time, fields/s, cells/s, the scaling efficiency against
one worker, each worker process's peak RSS (``getrusage`` inside the workers),
and whether the cells and well profiles equal the local SQLite run's. The figures
project the time of a 384-well x 9-field plate on N cores (``fields / (fields/s per
worker x N)``, writes included); the run's own per-step times are printed too.

    python benchmarks/bench_cluster_plate.py [--plate-format 96] [--fields-per-well 1]
        [--workers 1 2] [--precision float32|bfloat16]

Another plate than 96 x 1 saves to ``cluster_plate_<format>x<fields>.json``;
``--precision`` (the U-Net's ``segment.precision``, every run of the benchmark) adds
``_<precision>`` to the name.

Needs a PostgreSQL server (``$PHENOSCREEN_TEST_PG_URL``, default the test one).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402
from bench_sql_insert import fresh_pg_database  # noqa: E402

from db.session import make_engine  # noqa: E402
from db.store import resolve_run  # noqa: E402
from pipeline.config import PRECISIONS, config_from_dict  # noqa: E402
from pipeline.images.demo import CHANNELS_5, write_demo_plate  # noqa: E402
from pipeline.run import run_experiment  # noqa: E402
from pipeline.views.export import read_well_profiles  # noqa: E402

FULL_PLATE_FIELDS = 384 * 9
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dask_process(*args: str) -> subprocess.Popen:
    """A `dask` command that can import this checkout (workers unpickle its tasks)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "dask", *args],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peak_rss_mib() -> float:
    """Peak resident memory of the calling process (run inside each worker)."""
    import resource  # noqa: PLC0415 - runs on the worker

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def well_profiles(url: str) -> pd.DataFrame:
    engine = make_engine(url, create=False)
    table = read_well_profiles(engine, *resolve_run(engine), feature_set="classical")
    engine.dispose()
    return table.sort_values(["Metadata_Plate", "Metadata_Well"]).reset_index(drop=True)


def run(
    images: Path, platemap: Path, url: str, precision: str | None, **execution: object
):
    config = config_from_dict(
        {"input": {"layout": "imagexpress", "channels": CHANNELS_5},
         "segment": {"precision": precision} if precision else {},
         "execution": execution}
    )  # fmt: skip
    start = time.perf_counter()
    summary = run_experiment(images, platemap, config=config, db_url=url)
    return summary, time.perf_counter() - start


def on_cluster(
    images: Path, platemap: Path, n_workers: int, precision: str | None
) -> tuple[dict, pd.DataFrame, object]:
    """Run on a fresh scheduler + `n_workers` worker processes into a fresh PG db."""
    from distributed import Client  # noqa: PLC0415

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = []
    try:
        processes.append(dask_process("scheduler", "--host", "127.0.0.1", "--port",
                                      str(port), "--dashboard-address", ":0"))  # fmt: skip
        for i in range(n_workers):
            processes.append(dask_process("worker", address, "--nthreads", "1", "--name",
                                          f"w{i}", "--dashboard-address", ":0"))  # fmt: skip
        url, drop = fresh_pg_database()
        try:
            with Client(address, timeout=60) as client:
                client.wait_for_workers(n_workers, timeout=120)
                summary, wall = run(images, platemap, url, precision, scheduler=address)
                rss = sorted(round(v) for v in client.run(peak_rss_mib).values())
            profiles = well_profiles(url)
        finally:
            drop()
    finally:
        stop(processes)
    return {"wall_s": wall, "peak_rss_mib_per_worker": rss}, profiles, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate-format", type=int, default=96)
    parser.add_argument("--fields-per-well", type=int, default=1)
    parser.add_argument("--field-size", type=int, default=1080)
    parser.add_argument("--cells-per-field", type=int, default=200)
    parser.add_argument("--nucleus-diameter", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", choices=PRECISIONS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        demo = write_demo_plate(
            Path(tmp) / "plate", n_plates=1, fields_per_well=args.fields_per_well,
            field_size_px=args.field_size, cells_per_field=args.cells_per_field,
            nucleus_diameter_px=args.nucleus_diameter, plate_format=args.plate_format,
            n_channels=5,
        )  # fmt: skip
        print(f"plate generated in {time.perf_counter() - start:.0f} s")
        local_url = f"sqlite:///{tmp}/local.db"
        summary, wall = run(demo["images"], demo["platemap"], local_url,
                            args.precision, n_workers=2, processes=True)  # fmt: skip
        reference = well_profiles(local_url)
        local = {"setup": "local LocalCluster, 2 workers, SQLite", "workers": 2,
                 "wall_s": wall}  # fmt: skip
        for n_workers in args.workers:
            figures, profiles, cluster_summary = on_cluster(
                demo["images"], demo["platemap"], n_workers, args.precision
            )
            features = [c for c in reference.columns if not c.startswith("Metadata_")]
            ours = profiles[features].to_numpy(float)
            theirs = reference[features].to_numpy(float)
            comparable = profiles[["Metadata_Plate", "Metadata_Well"]].equals(
                reference[["Metadata_Plate", "Metadata_Well"]]
            ) and np.array_equal(np.isnan(ours), np.isnan(theirs))
            difference = (
                float(np.nanmax(np.abs(ours - theirs))) if comparable else float("inf")
            )
            rows.append(
                {"setup": f"dask scheduler + {n_workers} worker process(es), "
                          "PostgreSQL", "workers": n_workers, **figures,
                 "cells": cluster_summary.n_cells,
                 "same_cell_count_as_local_sqlite": cluster_summary.n_cells
                 == summary.n_cells,
                 "max_abs_well_profile_difference": difference}
            )  # fmt: skip
            print(rows[-1], flush=True)
        rows.append(local | {"cells": summary.n_cells})
        n_fields = summary.n_fields
        timings = {k: round(v, 3) for k, v in summary.timings.items()}
    for row in rows:
        row["fields"] = n_fields
        row["fields_per_s"] = round(n_fields / row["wall_s"], 3)
        row["cells_per_s"] = round(row["cells"] / row["wall_s"], 1)
        row["wall_s"] = round(row["wall_s"], 1)
    one = next((r for r in rows if r["workers"] == 1 and "dask" in r["setup"]), None)
    for row in rows:
        if one is not None:
            row["scaling_efficiency"] = round(
                row["fields_per_s"] / (row["workers"] * one["fields_per_s"]), 2
            )
        per_worker = row["fields_per_s"] / row["workers"]
        row["projected_384x9_plate_h_on_16_cores"] = round(
            FULL_PLATE_FIELDS / (per_worker * 16) / 3600, 2
        )
        print(row)
    default_plate = (args.plate_format, args.fields_per_well) == (96, 1)
    save(
        "cluster_plate" + ("" if default_plate else
                           f"_{args.plate_format}x{args.fields_per_well}")
        + (f"_{args.precision}" if args.precision else ""),
        {"command": shlex.join(["python", *sys.argv]),
         "plate": f"{args.plate_format} wells x {args.fields_per_well} field(s) x 5 "
                  f"channels x {args.field_size} px, ~{args.cells_per_field} nuclei "
                  f"of {args.nucleus_diameter:g} px per field",
         "unet_precision": args.precision or "the device's default (CPU: float32)",
         "local_run_timings_s": timings, "rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
