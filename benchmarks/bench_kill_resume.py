"""kill -9 during a run, then rerun: the store ends identical to an uninterrupted run.

A demo plate (96 wells, one field each) is run once without interruption (the
reference). Then, `--trials` times, `phenoscreen run` is started into a fresh store
and killed with SIGKILL at a random point of its progress (once a random number of
fields, 0 to all but one, is stored; 0 kills it during start-up), and rerun to
completion. Each resumed store is compared with the
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
from pipeline.images.demo import write_demo_plate  # noqa: E402
from pipeline.views.export import read_hit_tables, read_well_profiles  # noqa: E402


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


def fields_done(url: str) -> int:
    """Fields stored so far by the run writing to `url` (0 before the store exists)."""
    try:
        runs = summarize_runs(make_engine(url, create=False))
    except Exception:  # noqa: BLE001 - no store or no run yet
        return 0
    return int(runs["n_complete"].sum()) if len(runs) else 0


def kill_at(command: list[str], url: str, target: int, env: dict, rng) -> dict:
    """Start `command`; SIGKILL its process group once `target` fields are stored."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    start = time.perf_counter()
    if target == 0:
        time.sleep(float(rng.uniform(0.5, 5.0)))
    while target and process.poll() is None and fields_done(url) < target:
        time.sleep(0.1)
    killed = process.poll() is None
    if killed:  # the whole group: the CLI and its Dask workers
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {
        "kill_after_s": round(time.perf_counter() - start, 1),
        "fields_before_kill": fields_done(url),
        "killed": killed,
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
            target = int(rng.integers(0, reference["fields_done"]))
            result = {"kill_at_fields": target}
            result |= kill_at(run_command(demo, url), url, target, env, rng)
            subprocess.run(run_command(demo, url), env=env, check=True,
                           capture_output=True)  # fmt: skip
            result |= compare(reference, snapshot(url))
            figures["trials"].append(result)
            print(f"trial {trial}: {result}", flush=True)
    trials = figures["trials"]
    figures["all_identical"] = all(
        t["same_fields_and_cells"] and t["same_hits"] and t["runs_in_store"] == 1
        and t["max_abs_well_feature_diff"] < 1e-6
        for t in trials
    )  # fmt: skip
    figures["killed_mid_run"] = sum(t["killed"] for t in trials)
    print(f"killed mid-run: {figures['killed_mid_run']} of {len(trials)}; "
          f"all identical: {figures['all_identical']}")  # fmt: skip
    save("kill_resume", figures)


if __name__ == "__main__":
    main()
