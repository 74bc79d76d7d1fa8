"""Phenotypic activity (mAP, p, q) vs copairs on a real LINCS Cell Painting plate.

Plate SQ00015054 (../shared/data/profiles/lincs_cpg0004_plate_SQ00015054): 58
compounds x 6 doses and 24 DMSO wells, 454 CellProfiler features. As in copairs'
phenotypic-activity example, the doses of a compound are its replicates and DMSO the
negatives (cosine similarity). Runs our `pipeline.profiling.activity` and copairs side by side
on the same input, and reports per-compound |mAP difference|, agreement of hit calls
at q < 0.05 (and how copairs' own calls move with its null's seed: both nulls are
Monte Carlo, so a compound with q near 0.05 can flip), and the runtime ratio. Then
the full hit list as `phenoscreen hits` makes it after `phenoscreen import-profiles`
(DMSO-normalized profiles; the adaptive test; 4PL fits of the 58 compounds).
copairs is a benchmark-only dependency (`pip install copairs`).

    python benchmarks/bench_activity_vs_copairs.py [--null-size 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from pipeline.profiling.activity import average_precision, mean_average_precision  # noqa: E402
from pipeline.profiling.importers import ImportOptions, read_source, standardize  # noqa: E402
from pipeline.profiling.profiles import normalize_profiles  # noqa: E402
from pipeline.views.export import hit_tables  # noqa: E402

LINCS = (
    Path(__file__).resolve().parents[2]
    / "shared/data/profiles/lincs_cpg0004_plate_SQ00015054"
    / "SQ00015054_normalized_feature_select.csv.gz"
)


def load() -> pd.DataFrame:
    """The plate as `phenoscreen import-profiles --negative-control DMSO` reads it."""
    options = ImportOptions(negative_control="DMSO")
    imported = standardize(read_source(LINCS, options), options, source=str(LINCS))
    meta = imported.metadata[
        ["Metadata_Compound", "Metadata_Concentration", "Metadata_Role"]
    ]
    return pd.concat([meta, imported.features.astype(np.float64)], axis=1)


def run_ours(profiles: pd.DataFrame, null_size: int) -> pd.DataFrame:
    ap = average_precision(profiles, group_by=["Metadata_Compound"])
    return mean_average_precision(
        ap, group_by=["Metadata_Compound"], null_size=null_size, rng=0
    )


def run_copairs(
    profiles: pd.DataFrame, null_size: int, seeds: range
) -> list[pd.DataFrame]:
    """copairs' mAP table for each null seed (its AP step runs once)."""
    from copairs import map as copairs_map
    from copairs.matching import assign_reference_index

    frame = assign_reference_index(
        profiles,
        "Metadata_Role == 'negative_control'",
        reference_col="Metadata_Reference",
        default_value=-1,
    )
    same = ["Metadata_Compound", "Metadata_Reference"]
    meta = frame.filter(regex="^Metadata")
    feats = frame.filter(regex="^(?!Metadata)").to_numpy()
    ap = copairs_map.average_precision(meta, feats, same, [], [], same)
    ap = ap.query("Metadata_Role != 'negative_control'")
    return [
        copairs_map.mean_average_precision(
            ap, same, null_size=null_size, threshold=0.05, seed=seed, progress_bar=False
        )
        for seed in seeds
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--null-size", type=int, default=100_000)
    args = parser.parse_args()
    profiles = load()
    start = time.perf_counter()
    ours = run_ours(profiles, args.null_size)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = run_copairs(profiles, args.null_size, range(1))[0]
    copairs_s = time.perf_counter() - start
    by_seed = [
        int(r["below_corrected_p"].sum())
        for r in run_copairs(profiles, args.null_size, range(4))
    ]
    both = ours.merge(theirs, on="Metadata_Compound", suffixes=("", "_copairs"))
    diff = (
        both["mean_average_precision"] - both["mean_average_precision_copairs"]
    ).abs()
    same_calls = (both["is_active"] == both["below_corrected_p"]).mean()
    figures = {
        "null_size": args.null_size,
        "n_compounds": len(both),
        "mean_map_ours": round(float(ours["mean_average_precision"].mean()), 4),
        "mean_map_copairs": round(float(theirs["mean_average_precision"].mean()), 4),
        "max_abs_map_diff": float(diff.max()),
        "retrieved_ours": int(ours["is_active"].sum()),
        "retrieved_copairs": int(theirs["below_corrected_p"].sum()),
        "retrieved_copairs_seeds_0_to_3": by_seed,
        "same_hit_calls_frac": float(same_calls),
        "max_abs_log10_p_diff": float(
            np.abs(np.log10(both["p_value"]) - np.log10(both["p_value_copairs"])).max()
        ),
        "seconds_ours": round(ours_s, 3),
        "seconds_copairs": round(copairs_s, 3),
        "speedup_vs_copairs": round(copairs_s / ours_s, 2),
    }
    figures |= full_hit_list()
    for key, value in figures.items():
        print(f"{key:24s} {value}")
    save("activity_vs_copairs", figures)


def full_hit_list() -> dict[str, object]:
    """What `phenoscreen hits` reports after `import-profiles`: the profiles are
    robust-z normalized to DMSO first (copairs above ran on them as given), then
    `pipeline.calls.hits.call_hits` (one well per dose: the distance test) and 4PL fits of
    well activity."""
    options = ImportOptions(negative_control="DMSO")
    imported = standardize(read_source(LINCS, options), options, source=str(LINCS))
    wells = pd.concat([imported.metadata, imported.features], axis=1)
    start = time.perf_counter()
    hits, doses = hit_tables(
        normalize_profiles(wells.assign(Metadata_CellCount=np.nan))
    )
    seconds = time.perf_counter() - start
    flags = hits["ec50_flag"].value_counts().to_dict()
    treated = doses[doses["Metadata_Role"] == "treatment"]
    return {
        "pipeline_hits_q_below_0.05": int(hits["is_hit"].sum()),
        "pipeline_n_compounds": len(hits),
        "pipeline_tests": {
            str(k): int(v) for k, v in treated["test"].value_counts().items()
        },
        "pipeline_active_doses": int(treated["is_active"].sum()),
        "dose_response_flags": {str(k): int(v) for k, v in flags.items()},
        "pipeline_seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    main()
