"""Replicate reproducibility on a real JUMP-MOA plate vs its published figures.

Plate BR00117060a10x (../shared/data/profiles/jump_moa_cpg0002_plate_BR00117060a10x):
88 compounds x 4 replicate wells and 24 DMSO wells, 357 features. Reports Percent
Replicating (published 42.2 on sphered profiles) on the profiles as given and after
our ZCA sphering on DMSO, and the replicate activity (mAP of each compound's wells
against DMSO, q < 0.05; copairs 0.5.5 gave mean mAP 0.441 and 25 % active, see the
folder's SOURCE.txt), and 1-NN MoA accuracy with the same compound left out (NSC;
one plate, so no NSCB), and what `phenoscreen hits` prints after
`phenoscreen import-profiles` (percent replicating and hits).

    python benchmarks/bench_jump_moa_replicates.py
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from pipeline.calls.moa import consensus_profiles, predict_moa  # noqa: E402
from pipeline.cli import main as main_cli  # noqa: E402
from pipeline.profiling.activity import (  # noqa: E402
    average_precision,
    mean_average_precision,
    percent_replicating,
)
from pipeline.profiling.importers import ImportOptions, read_source, standardize  # noqa: E402
from pipeline.profiling.profiles import sphere_to_controls  # noqa: E402

PLATE = (
    Path(__file__).resolve().parents[2]
    / "shared/data/profiles/jump_moa_cpg0002_plate_BR00117060a10x"
    / "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"
)


def main() -> None:
    imported = standardize(
        read_source(PLATE, ImportOptions()), ImportOptions(), source=str(PLATE)
    )  # as `phenoscreen import-profiles` reads it: roles from Metadata_control_type
    profiles = pd.concat(
        [
            imported.metadata[
                ["Metadata_Plate", "Metadata_Compound", "Metadata_Role", "Metadata_MoA"]
            ].assign(Metadata_Concentration=3.0),  # JUMP-MOA: every compound at 3 uM
            imported.features.astype(np.float64),
        ],
        axis=1,
    )
    start = time.perf_counter()
    sphered = sphere_to_controls(profiles)
    pr_raw, _ = percent_replicating(profiles, group_by=["Metadata_Compound"], rng=0)
    pr_sphered, table = percent_replicating(
        sphered, group_by=["Metadata_Compound"], rng=0
    )
    ap = average_precision(profiles, group_by=["Metadata_Compound"])
    activity = mean_average_precision(ap, group_by=["Metadata_Compound"], rng=0)
    moa_accuracy = {}
    for name, table_in in (("as_given", profiles), ("sphered", sphered)):
        consensus = consensus_profiles(
            table_in, batch_column="Metadata_Plate", carry=["Metadata_MoA"]
        )
        _, accuracy = predict_moa(
            consensus, reference_column="Metadata_MoA", batch_column="Metadata_Plate"
        )
        moa_accuracy[name] = round(accuracy["nsc"], 3)
        moa_accuracy["chance"] = round(accuracy["chance_nsc"], 3)
    figures = {
        "n_compounds": len(table),
        "percent_replicating_published": 42.2,
        "percent_replicating_as_given": round(pr_raw, 1),
        "percent_replicating_sphered": round(pr_sphered, 1),
        "activity_mean_map": round(float(activity["mean_average_precision"].mean()), 3),
        "activity_mean_map_copairs_reference": 0.441,
        "activity_percent_q_below_0.05": round(
            100 * float(activity["is_active"].mean()), 1
        ),
        "activity_percent_copairs_reference": 25,
        "moa_1nn_nsc_accuracy_as_given": moa_accuracy["as_given"],
        "moa_1nn_nsc_accuracy_sphered": moa_accuracy["sphered"],
        "moa_1nn_chance_level": moa_accuracy["chance"],
        "seconds": round(time.perf_counter() - start, 2),
    } | through_the_cli()
    for key, value in figures.items():
        print(f"{key:38s} {value}")
    save("jump_moa_replicates", figures)


def through_the_cli() -> dict[str, object]:
    """`phenoscreen import-profiles` then `phenoscreen hits`, as a user runs them:
    the percent replicating and hits it prints (robust z to DMSO, no sphering)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/jump.db"
        with contextlib.redirect_stdout(io.StringIO()):
            if main_cli(["import-profiles", str(PLATE), "--db", url]) != 0:
                raise RuntimeError("import-profiles failed")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            if main_cli(["hits", "--db", url]) != 0:
                raise RuntimeError("hits failed")
    text = printed.getvalue()
    percent = re.search(r"percent replicating: ([0-9.]+) %", text)
    hits = re.search(r"(\d+) of (\d+) compounds are hits", text)
    return {
        "cli_percent_replicating": float(percent.group(1)) if percent else None,
        "cli_hits": f"{hits.group(1)}/{hits.group(2)}" if hits else None,
    }


if __name__ == "__main__":
    main()
