"""Calibration of hit calling on real DMSO wells split into fake treatments.

On the real plates in ../shared/data/profiles (LINCS SQ00015054 and JUMP-MOA
BR00117060a10x, 24 DMSO wells each) and on the demo (3 plates, 48 DMSO wells, run
through the pipeline here), each random split relabels 12 DMSO wells as fake
compounds (the rest stay controls) in one of four designs:

- ``single``: 12 compounds x 1 well (a single-concentration primary screen);
- ``dose_series``: 3 compounds x 4 doses x 1 well;
- ``duplicates``: 6 compounds x 2 wells;
- ``triplicates``: 4 compounds x 3 wells.

The fake plate goes through the same steps as a screen (the default profile
recipe, `pipeline.profiling.profiles.normalize_profiles`, on the remaining controls, then
`pipeline.calls.hits.call_hits` with its adaptive test). Nothing differs
from DMSO, so every hit is false: under this complete null the FDR is the fraction
of splits with any hit, which should stay at or below the FDR level (0.05). Also
reported: the fraction of fake compound-doses with p < 0.05 for the chosen test and
for each test on its own (about 0.05 when calibrated).

    python benchmarks/bench_calibration.py [--splits 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402

from db.session import make_engine  # noqa: E402
from db.store import resolve_run  # noqa: E402
from pipeline.calls.hits import call_hits  # noqa: E402
from pipeline.profiling.importers import ImportOptions, read_source, standardize  # noqa: E402
from pipeline.profiling.profiles import normalize_profiles  # noqa: E402
from pipeline.views.export import read_well_profiles  # noqa: E402

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


#: (compounds, doses per compound, wells per dose) of each fake design.
DESIGNS = {
    "single": (12, 1, 1),
    "dose_series": (3, 4, 1),
    "duplicates": (6, 1, 2),
    "triplicates": (4, 1, 3),
}


def fake_split(
    dmso: pd.DataFrame, rng: np.random.Generator, design: tuple[int, int, int]
) -> pd.DataFrame:
    """Relabel random DMSO wells as fake compounds of `design` (see `DESIGNS`)."""
    n_compounds, n_doses, n_wells = design
    chosen = rng.permutation(len(dmso))[: n_compounds * n_doses * n_wells]
    fake = dmso.copy()
    slot = np.arange(len(chosen))
    fake.loc[chosen, "Metadata_Role"] = "treatment"
    fake.loc[chosen, "Metadata_Compound"] = [
        f"fake_{i // (n_doses * n_wells)}" for i in slot
    ]
    fake.loc[chosen, "Metadata_Concentration"] = 10.0 ** -((slot // n_wells) % n_doses)
    fake["Metadata_CellCount"] = fake["Metadata_CellCount"].fillna(100)
    return fake


def calibrate(
    dmso: pd.DataFrame, design: tuple[int, int, int], n_splits: int
) -> dict[str, float]:
    """False-hit figures of `n_splits` random fake splits of one design."""
    rng = np.random.default_rng(0)
    doses, hits = [], []
    for split in range(n_splits):
        normalized = normalize_profiles(fake_split(dmso, rng, design))
        hit_list, dose_table = call_hits(normalized, null_size=10_000, rng=split)
        doses.append(dose_table[dose_table["Metadata_Role"] == "treatment"])
        hits.append(hit_list.assign(split=split))
    doses, hits = pd.concat(doses), pd.concat(hits)
    return {
        "tests_used": sorted(set(doses["test"])),
        "n_fake_compounds": len(hits),
        "splits_with_a_false_hit": round(
            float(hits.groupby("split")["is_hit"].any().mean()), 3
        ),
        "compounds_called": round(float(hits["is_hit"].mean()), 3),
        "p_below_0.05": round(float((doses["p_value"] < 0.05).mean()), 3),
        "map_p_below_0.05": round(float((doses["map_p"] < 0.05).mean()), 3)
        if doses["map_p"].notna().any()
        else None,
        "distance_p_below_0.05": round(
            float((doses["mahalanobis_p"] < 0.05).mean()), 3
        ),
    }


def demo_dmso_wells(folder: Path) -> pd.DataFrame:
    """The 48 DMSO wells of 3 demo plates (one field per well), as a run stores them."""
    url, _ = run_demo(folder, n_plates=3, fields_per_well=1)
    engine = make_engine(url, create=False)
    wells = read_well_profiles(engine, *resolve_run(engine))
    return wells[wells["Metadata_Role"] == "negative_control"].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=100)
    args = parser.parse_args()
    figures = {"n_splits": args.splits, "fdr": 0.05}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {
            name: dmso_wells(path, options) for name, (path, options) in PLATES.items()
        } | {"demo_3_plates": demo_dmso_wells(Path(tmp))}
    for name, dmso in sources.items():
        figures[name] = {"n_dmso_wells": len(dmso)}
        for design_name, design in DESIGNS.items():
            start = time.perf_counter()
            result = calibrate(dmso, design, args.splits)
            result["seconds"] = round(time.perf_counter() - start, 1)
            figures[name][design_name] = result
            print(f"{name} {design_name}: {result}", flush=True)
    save("calibration_dmso_null", figures)


if __name__ == "__main__":
    main()
