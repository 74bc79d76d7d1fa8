"""Each step of the profile recipe ([profile]) on real plates and the demo, side by side.

Recipes (`pipeline.config.ProfileConfig`), each applied by
`pipeline.profiling.profiles.normalize_profiles` exactly as every command applies a run's:

- ``robust_z``: robust z per plate to the DMSO wells only, each plate scaled by
  its own DMSO spread (the wave-1 default);
- ``robust_z_all``: robust z per plate to all wells (per-plate spread);
- ``feature_select_0.9``: robust z to DMSO (per-plate spread), then
  pycytominer-style feature selection (missing, near-constant, |correlation| >
  0.9 over all wells, pycytominer's threshold);
- ``feature_select_all_wells``: the same at |correlation| > 0.95 (the default
  until 2026-12-04);
- ``feature_select``: correlations measured on the DMSO wells - the default;
- ``feature_select_scale_per_plate``: each plate scaled by its own DMSO wells'
  spread instead of the spread pooled over the plates of a batch (the default;
  one plate per dev set, so the two agree there: see the split plates below);
- ``feature_select_whiten_all`` / ``_plate``: then whitening (TVN) on the DMSO wells
  of all plates / of each plate.

Figures per recipe:

- JUMP-MOA plate BR00117060a10x (../shared/data; 88 compounds x 4 replicates, 47
  MoAs): Percent Replicating (published 42.2), Percent Matching (compounds of one
  MoA, on compound consensus profiles; published 16.3), MoA mAP (each compound's
  consensus retrieving the other compounds of its MoA; published 0.07-0.14 on such
  plates), replicate activity (mean mAP of a compound's wells vs DMSO, % with
  q < 0.05), 1-NN MoA accuracy NSC;
- LINCS plate SQ00015054 (58 compounds x 6 doses): activity (doses as replicates vs
  DMSO; % compounds with q < 0.05; copairs: 33 of 58), 1-NN MoA accuracy NSC;
- ``feature_select_whiten_cross_fitted`` (real plates only): whitening as the
  recipe's, but each DMSO well whitened by a fit on the other DMSO wells (5 folds),
  to see whether whitening's extra actives come from fitting DMSO to itself;
- the demo (3 plates, 9 compounds with known truth): true actives called (of 7) and
  false hits, for classical features, the ImageNet embedding recipe and combined;
- JUMP-MOA and LINCS each dealt into 2, 3 and 6 plates (DMSO wells and each
  compound's wells round-robin, so 12, 8 and 4 DMSO wells per plate; no plate
  effect added): the default recipe with the spread pooled over the plates vs
  per plate, to see what the uncertainty of a few wells' MAD costs;
- time and peak memory of the default recipe on 1,536 wells x 5,000 features
  (4 plates of 384 wells, 32 DMSO wells each; synthetic values).

One plate per dev set, so no NSCB here (it needs batches).

    python benchmarks/bench_profile_recipe.py [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402

from pipeline.calls.moa import moa_table  # noqa: E402
from pipeline.config import ProfileConfig  # noqa: E402
from pipeline.profiling.activity import (  # noqa: E402
    average_precision,
    mean_average_precision,
    percent_replicating,
    replicate_average_precision,
)
from pipeline.profiling.importers import ImportOptions, read_source, standardize  # noqa: E402
from pipeline.profiling.profiles import normalize_profiles, sphere_to_controls  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/profiles"
JUMP = (
    DATA / "jump_moa_cpg0002_plate_BR00117060a10x"
    / "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"
)  # fmt: skip
LINCS = (
    DATA
    / "lincs_cpg0004_plate_SQ00015054"
    / "SQ00015054_normalized_feature_select.csv.gz"
)
RECIPES = {
    "robust_z": ProfileConfig(feature_select=False, scale_by="plate"),
    "robust_z_all": ProfileConfig(
        feature_select=False, normalize_to="all", scale_by="plate"
    ),
    "feature_select_0.9": ProfileConfig(
        corr_threshold=0.9, corr_on="all", scale_by="plate"
    ),
    "feature_select_all_wells": ProfileConfig(corr_on="all", scale_by="plate"),
    "feature_select": ProfileConfig(),
    "feature_select_scale_per_plate": ProfileConfig(scale_by="plate"),
    "feature_select_whiten_all": ProfileConfig(whiten="controls", whiten_scope="all"),
    "feature_select_whiten_plate": ProfileConfig(
        whiten="controls", whiten_scope="plate"
    ),
}


def load(path: Path, options: ImportOptions, **constant: object) -> pd.DataFrame:
    """A plate as `phenoscreen import-profiles` reads it."""
    imported = standardize(read_source(path, options), options, source=str(path))
    meta = imported.metadata.assign(**constant)
    meta = meta.rename(
        columns={c: "Metadata_MoA" for c in meta if c.lower() == "metadata_moa"}
    )
    keep = ["Metadata_Plate", "Metadata_Well", "Metadata_Compound",
            "Metadata_Concentration", "Metadata_Role", "Metadata_MoA"]  # fmt: skip
    return pd.concat([meta[keep], imported.features.astype(np.float64)], axis=1)


def activity(normalized: pd.DataFrame) -> dict[str, float]:
    ap = average_precision(normalized, group_by=["Metadata_Compound"])
    summary = mean_average_precision(ap, group_by=["Metadata_Compound"], rng=0)
    return {
        "activity_mean_map": round(float(summary["mean_average_precision"].mean()), 3),
        "activity_percent_q_below_0.05": round(
            100 * float(summary["is_active"].mean()), 1
        ),
    }


def moa_retrieval(normalized: pd.DataFrame) -> dict[str, float]:
    """Percent Matching and MoA mAP on compound consensus profiles (JUMP's way)."""
    treated = normalized[normalized["Metadata_Role"] == "treatment"]
    features = [c for c in normalized.columns if not c.startswith("Metadata_")]
    consensus = treated.groupby(["Metadata_Compound", "Metadata_MoA"])[
        features
    ].median()
    consensus = consensus.reset_index().assign(Metadata_Role="treatment")
    matching, _ = percent_replicating(consensus, group_by=["Metadata_MoA"], rng=0)
    retrieval = replicate_average_precision(consensus, group_by=["Metadata_MoA"])
    return {
        "percent_matching": round(matching, 1),
        "moa_map": round(float(retrieval["replicate_map"].mean()), 3),
    }


def percent_replicating_of(normalized: pd.DataFrame) -> float:
    percent, _ = percent_replicating(normalized, group_by=["Metadata_Compound"], rng=0)
    return round(percent, 1)


def nsc(normalized: pd.DataFrame) -> float:
    return round(moa_table(normalized, reference_column="moa")[1]["nsc"], 3)


def cross_fitted(normalized: pd.DataFrame, folds: int = 5) -> pd.DataFrame:
    """The recipe's whitening (`sphere_to_controls`, all plates), but each DMSO well
    whitened by a fit on the other folds of DMSO wells: a check of in-sample
    tightness."""
    out = sphere_to_controls(normalized, scope="all")
    controls = np.flatnonzero(normalized["Metadata_Role"] == "negative_control")
    for fold in np.array_split(np.random.default_rng(0).permutation(controls), folds):
        held_out = normalized.index[fold]  # fitted on the others, not on themselves
        others = normalized.drop(index=held_out)
        rows = pd.concat(
            [
                others[others["Metadata_Role"] == "negative_control"],
                normalized.loc[held_out].assign(Metadata_Role="treatment"),
            ]
        )
        out.loc[held_out] = sphere_to_controls(rows, scope="all").loc[held_out].assign(
            Metadata_Role="negative_control"
        )  # fmt: skip
    return out


def real_plates() -> dict[str, dict[str, dict[str, float]]]:
    jump = load(JUMP, ImportOptions(), Metadata_Concentration=3.0)
    lincs = load(LINCS, ImportOptions(negative_control="DMSO"))
    figures: dict[str, dict[str, dict[str, float]]] = {}
    stages = {name: (recipe, False) for name, recipe in RECIPES.items()}
    stages["feature_select_whiten_cross_fitted"] = (ProfileConfig(), True)
    for name, (recipe, cross_fit) in stages.items():
        row: dict[str, dict[str, float]] = {}
        for plate, table in (("jump_moa", jump), ("lincs", lincs)):
            normalized = normalize_profiles(table, recipe)
            if cross_fit:
                normalized = cross_fitted(normalized)
            row[plate] = {
                "n_features": normalized.shape[1] - 6,
                "moa_nsc": nsc(normalized),
            }
            row[plate] |= activity(normalized)
            if plate == "jump_moa":
                row[plate] |= {
                    "percent_replicating": percent_replicating_of(normalized)
                }
                row[plate] |= moa_retrieval(normalized)
        figures[name] = row
        print(name, row, flush=True)
    return figures


def dealt(table: pd.DataFrame, n_plates: int) -> pd.DataFrame:
    """The plate dealt into `n_plates` plates: DMSO wells and each compound's wells
    round-robin (a compound's first well on a different plate for each compound)."""
    plate = np.empty(len(table), dtype=object)
    for offset, rows in enumerate(table.groupby("Metadata_Compound").indices.values()):
        plate[rows] = [f"P{(offset + i) % n_plates}" for i in range(len(rows))]
    return table.assign(Metadata_Plate=plate)


def split_plates() -> dict[str, dict[str, dict[str, float]]]:
    jump = load(JUMP, ImportOptions(), Metadata_Concentration=3.0)
    lincs = load(LINCS, ImportOptions(negative_control="DMSO"))
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for n_plates in (2, 3, 6):
        for name, recipe in (
            ("pooled", RECIPES["feature_select"]),
            ("per_plate", RECIPES["feature_select_scale_per_plate"]),
        ):
            row: dict[str, dict[str, float]] = {}
            for plate, table in (("jump_moa", jump), ("lincs", lincs)):
                normalized = normalize_profiles(dealt(table, n_plates), recipe)
                row[plate] = {"moa_nsc": nsc(normalized)} | activity(normalized)
                if plate == "jump_moa":
                    row[plate] |= {
                        "percent_replicating": percent_replicating_of(normalized)
                    }
                    row[plate] |= moa_retrieval(normalized)
            figures[f"{n_plates}_plates_{name}"] = row
            print(n_plates, "plates,", name, row, flush=True)
    return figures


def demo() -> dict[str, dict[str, str]]:
    from db.session import make_engine  # noqa: PLC0415
    from db.store import resolve_run  # noqa: PLC0415
    from models.embed import embed_run  # noqa: PLC0415
    from pipeline.config import EmbedConfig  # noqa: PLC0415
    from pipeline.views.export import hit_tables, read_profiles  # noqa: PLC0415

    figures: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url, paths = run_demo(Path(tmp) / "demo", n_plates=3, seed=0)
        compounds = pd.DataFrame(json.loads(paths["truth"].read_text())["compounds"])
        actives = set(compounds.loc[compounds["is_active"], "compound"])
        engine = make_engine(url, create=False)
        summary = embed_run(engine, None, EmbedConfig())
        sets = {"classical": "classical", "imagenet_recipe": summary["feature_set"],
                "combined": summary["combined_feature_set"]}  # fmt: skip
        for name, recipe in RECIPES.items():
            row = {}
            for label, feature_set in sets.items():
                normalized = read_profiles(
                    engine, *resolve_run(engine), feature_set=feature_set, recipe=recipe
                )[1]
                hits, _ = hit_tables(normalized)
                called = set(hits.loc[hits["is_hit"], "Metadata_Compound"])
                row[label] = (
                    f"{len(called & actives)}/{len(actives)} actives, "
                    f"{len(called - actives)} false"
                )
            figures[name] = row
            print(name, row, flush=True)
    return figures


def scale(n_wells: int = 1536, n_features: int = 5000) -> dict[str, float]:
    rng = np.random.default_rng(0)
    plates = np.repeat([f"P{i}" for i in range(n_wells // 384)], 384)
    role = np.where(np.arange(n_wells) % 384 < 32, "negative_control", "treatment")
    compound = np.where(role == "treatment", "x", "DMSO")
    meta = pd.DataFrame(
        {"Metadata_Plate": plates, "Metadata_Role": role, "Metadata_Compound": compound}
    )
    latent = rng.normal(size=(n_wells, 200)) @ rng.normal(size=(200, n_features))
    values = latent + rng.normal(size=(n_wells, n_features))
    profiles = pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)
    figures = {}
    for name in ("feature_select", "feature_select_whiten_all"):
        tracemalloc.start()
        start = time.perf_counter()
        normalized = normalize_profiles(profiles, RECIPES[name])
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        figures[name] = {
            "seconds": round(seconds, 1),
            "peak_python_mib": round(peak / 2**20),
            "features_kept": normalized.shape[1] - 3,
        }
        print(f"{n_wells} wells x {n_features} features, {name}: {figures[name]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the whitening's shrinkage notes
    figures = {"recipes": {k: repr(v) for k, v in RECIPES.items()},
               "real_plates": real_plates(), "split_plates": split_plates(),
               "scale_1536x5000": scale()}  # fmt: skip
    if not args.skip_demo:
        figures["demo"] = demo()
    save("profile_recipe", figures)


if __name__ == "__main__":
    main()
