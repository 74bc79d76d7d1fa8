"""Calibration of hit calling on real DMSO wells split into fake treatments.

On the real plates in ../shared/data/profiles (LINCS SQ00015054 and JUMP-MOA
BR00117060a10x, 24 DMSO wells each), the DMSO wells of each random split are
divided into 12 controls and 4 fake compounds of 3 wells; the fake plate goes
through the same steps as a screen (robust z to the remaining controls, then
`pipeline.hits.call_hits`). Nothing differs from DMSO, so about 5 % of fake
compound-doses should have p < 0.05 (mAP of replicate wells; Mahalanobis distance
as for single-replicate designs), and hits at q < 0.05 should be at most ~5 %.

    python benchmarks/bench_calibration.py [--splits 50]
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

from pipeline.hits import call_hits  # noqa: E402
from pipeline.importers import ImportOptions, read_source, standardize  # noqa: E402
from pipeline.profiles import normalize_to_controls  # noqa: E402

PROFILES = Path(__file__).resolve().parents[2] / "shared/data/profiles"
PLATES = {
    "lincs_SQ00015054": (
        PROFILES / "lincs_cpg0004_plate_SQ00015054"
        / "SQ00015054_normalized_feature_select.csv.gz",
        ImportOptions(negative_control="DMSO"),
    ),
    "jump_moa_BR00117060a10x": (
        PROFILES / "jump_moa_cpg0002_plate_BR00117060a10x"
        / "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz",
        ImportOptions(),
    ),
}  # fmt: skip


def dmso_wells(path: Path, options: ImportOptions) -> pd.DataFrame:
    """The plate's negative-control well profiles, as the importer reads them."""
    imported = standardize(read_source(path, options), options, source=str(path))
    profiles = pd.concat([imported.metadata, imported.features], axis=1)
    return profiles[profiles["Metadata_Role"] == "negative_control"].reset_index(
        drop=True
    )


def fake_split(
    dmso: pd.DataFrame, rng: np.random.Generator, *, n_fake: int = 4, size: int = 3
) -> pd.DataFrame:
    """Relabel `n_fake` x `size` random DMSO wells as fake compounds."""
    chosen = rng.permutation(len(dmso))[: n_fake * size]
    fake = dmso.copy()
    fake.loc[chosen, "Metadata_Role"] = "treatment"
    fake.loc[chosen, "Metadata_Compound"] = [
        f"fake_{i // size}" for i in range(len(chosen))
    ]
    fake.loc[chosen, "Metadata_Concentration"] = 1.0
    fake["Metadata_CellCount"] = fake["Metadata_CellCount"].fillna(100)
    return fake


def calibrate(dmso: pd.DataFrame, n_splits: int) -> dict[str, float]:
    """Fractions of fake compound-doses with p < 0.05 and called at q < 0.05."""
    rng = np.random.default_rng(0)
    doses, hits = [], []
    for split in range(n_splits):
        normalized = normalize_to_controls(fake_split(dmso, rng))
        hit_list, dose_table = call_hits(normalized, null_size=10_000, rng=split)
        doses.append(dose_table[dose_table["Metadata_Role"] == "treatment"])
        hits.append(hit_list)
    doses, hits = pd.concat(doses), pd.concat(hits)
    return {
        "n_fake_compounds": len(hits),
        "map_p_below_0.05": round(float((doses["p_value"] < 0.05).mean()), 3),
        "map_hits_q_below_0.05": round(float(hits["is_hit"].mean()), 3),
        "mahalanobis_p_below_0.05": round(
            float((doses["mahalanobis_p"] < 0.05).mean()), 3
        ),
        "mahalanobis_hits_q_below_0.05": round(
            float((hits["distance_q"] < 0.05).mean()), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=50)
    args = parser.parse_args()
    figures = {"n_splits": args.splits, "design": "12 DMSO controls + 4 fake x 3 wells"}
    for name, (path, options) in PLATES.items():
        start = time.perf_counter()
        result = calibrate(dmso_wells(path, options), args.splits)
        result["seconds"] = round(time.perf_counter() - start, 1)
        figures[name] = result
        print(f"{name}: {result}")
    save("calibration_dmso_null", figures)


if __name__ == "__main__":
    main()
