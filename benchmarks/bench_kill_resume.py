"""kill -9 during a run, then rerun: the store ends identical to an uninterrupted run.

A demo plate (96 wells, one field each) is run once without interruption (the
reference). Then, `--trials` times, `phenoscreen run` is started into a fresh store
and killed with SIGKILL after a random delay (uniform over the reference run's
duration), and rerun to completion. Each resumed store is compared with the
reference: the number of completed fields and cells, every cell's features
(per-well medians, max absolute difference), and the hit list (same hits, same
q-values). Printed and saved per trial.

    python benchmarks/bench_kill_resume.py [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from db.session import make_engine  # noqa: E402
from db.store import resolve_run, summarize_runs  # noqa: E402
from pipeline.demo import write_demo_plate  # noqa: E402
from pipeline.export import read_hit_tables, read_well_profiles  # noqa: E402


def run_command(demo: dict[str, Path], url: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "run", str(demo["images"]),
        "--platemap", str(demo["platemap"]), "--config", str(demo["config"]),
        "--workers", "2", "--db", url,
    ]  # fmt: skip


def snapshot(url: str) -> dict[str, object]:
    """What a finished run stored: fields, cells, well profiles and hits."""
    engine = make_engine(url, create=False)
    run_id, experiment_id = resolve_run(engine)
    runs = summarize_runs(engine)
    wells = read_well_profiles(engine, run_id, experiment_id)
    hits, _ = read_hit_tables(engine, run_id, experiment_id)
    return {
        "runs": len(runs),
        "fields_done": int(runs["n_complete"].iloc[0]),
        "cells": int(runs["n_cells"].iloc[0]),
        "wells": wells.sort_values(["Metadata_Plate", "Metadata_Well"]),
        "hits": hits.set_index("Metadata_Compound").sort_index(),
    }


def compare(reference: dict, resumed: dict) -> dict[str, object]:
    features = [c for c in reference["wells"].columns if not c.startswith("Metadata_")]
    a = reference["wells"][features].to_numpy(float)
    b = resumed["wells"][features].to_numpy(float)
    same_hits = reference["hits"]["is_hit"].equals(resumed["hits"]["is_hit"])
    q_diff = float(
        np.nanmax(np.abs(reference["hits"]["q_value"] - resumed["hits"]["q_value"]))
    )
    return {
        "runs_in_store": resumed["runs"],
        "same_fields_and_cells": (resumed["fields_done"], resumed["cells"])
        == (reference["fields_done"], reference["cells"]),
        "max_abs_well_feature_diff": float(np.nanmax(np.abs(a - b))),
        "same_hits": bool(same_hits),
        "max_abs_q_diff": q_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    figures: dict[str, object] = {"trials": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo = write_demo_plate(folder / "demo", n_plates=1, fields_per_well=1)
        reference_url = f"sqlite:///{folder}/reference.db"
        start = time.perf_counter()
        subprocess.run(run_command(demo, reference_url), env=env, check=True,
                       capture_output=True)  # fmt: skip
        duration = time.perf_counter() - start
        figures["reference_seconds"] = round(duration, 1)
        reference = snapshot(reference_url)
        for trial in range(args.trials):
            url = f"sqlite:///{folder}/trial{trial}.db"
            delay = float(rng.uniform(0.1, 1.0) * duration)
            process = subprocess.Popen(
                run_command(demo, url), env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            time.sleep(delay)
            killed = process.poll() is None
            if killed:  # the whole group: the CLI and its Dask workers
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            subprocess.run(run_command(demo, url), env=env, check=True,
                           capture_output=True)  # fmt: skip
            result = {"kill_after_s": round(delay, 1), "killed": killed}
            result |= compare(reference, snapshot(url))
            figures["trials"].append(result)
            print(f"trial {trial}: {result}", flush=True)
    trials = figures["trials"]
    figures["all_identical"] = all(
        t["same_fields_and_cells"] and t["same_hits"] and t["runs_in_store"] == 1
        and t["max_abs_well_feature_diff"] < 1e-6
        for t in trials
    )  # fmt: skip
    print(f"all identical: {figures['all_identical']}")
    save("kill_resume", figures)


if __name__ == "__main__":
    main()
