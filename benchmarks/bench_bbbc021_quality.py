"""Quality on real cells: classical features vs ImageNet vs fine-tuned embeddings.

Data: ../shared/data/cells/bbbc021_singlecell_crops_dmso_vs_cycloheximide (BBBC021,
MCF-7, 2,400 single-cell crops of 68 x 68 px, DAPI / tubulin / actin; 6 plates;
DMSO and cycloheximide at 5, 15 and 50 uM). Each feature set gives per-cell vectors;
the unit of comparison is the field of view (median of its cells' features, mean
of their embeddings, as `phenoscreen` aggregates wells; centred on its
plate's DMSO fields and scaled by the DMSO fields' pooled spread, `center_and_scale`),
and fields are compared within three folds of two plates (the plates each fine-tuned
network never saw; the same folds for every feature set). Reported per feature set:

- mAP of each dose's fields retrieving each other against the DMSO fields (copairs'
  phenotypic activity, `pipeline.profiling.activity`), with permutation p and BH q;
- dose ordering: median distance to DMSO (RMS of the scaled features, `well_distance`) per dose, and
  Spearman's rho between dose and the fields' distance (treated fields only).

Feature sets: ``classical`` (our CellProfiler-style features of the centre cell,
segmented in its crop); ``imagenet_pooled_stem`` (the earlier default:
tf_efficientnet_lite0 with offline ImageNet weights, one pass through a 3-channel
stem, final pooled layer, fields averaged); ``imagenet_recipe`` (the default
recipe, `pipeline.config.EmbedConfig`: each channel as RGB, ``blocks[3]``
averaged over the centre cell's mask, crops at 64 px, plate scaling, median over
cells; ``imagenet_recipe_crop_pool``: the same averaged over the whole crop);
``finetuned``
(the default fine-tuning, `models.train.TrainConfig`, on compound-dose labels with
whole plates held out: 3 folds of 2 held-out plates, every plate embedded by the
model that never saw it, with the recipe's layer, the layer it was trained at by
default; ``finetuned_pooled``: the same networks' final pooled layer, untrained
ImageNet stages when training stopped at the recipe's layer); ``combined`` /
``combined_finetuned`` (classical + the recipe's or the fine-tuned embedding,
each block centred and scaled on its own and weighted equally, as
`pipeline.profiling.profiles.normalize_profiles` does with blocks). CPU, 2 threads on the
reference machine.

The fine-tuning is repeated with ``--seeds`` (default 0 1 2): a single training's
Spearman moves by about 0.07 between seeds, so ``finetuned_by_seed`` reports each
seed's figures and their mean. Other seeds than the default save to
``bbbc021_quality_seeds_<seeds>.json``, so the default run's file stays.

    python benchmarks/bench_bbbc021_quality.py [--epochs 8] [--seeds 0 1 2]
        [--train KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from models.backbones import create_backbone  # noqa: E402
from models.embed import (  # noqa: E402
    CellEmbedder,
    embed_array,
    fit_channel_ranges,
    normalize_crops,
)
from models.train import TrainConfig, fine_tune, validation_split  # noqa: E402
from pipeline.cells.segment import segment_field  # noqa: E402
from pipeline.config import EmbedConfig  # noqa: E402
from pipeline.images.planes import estimate_nucleus_diameter  # noqa: E402
from pipeline.measure.features import measure_cells  # noqa: E402
from pipeline.profiling.activity import average_precision, mean_average_precision  # noqa: E402
from pipeline.profiling.profiles import weight_blocks, well_distance  # noqa: E402

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared/data/cells/bbbc021_singlecell_crops_dmso_vs_cycloheximide"
)
CHANNELS = ["DNA", "Tubulin", "Actin"]
SIZE = 64  # centre crop fed to the CNN


def load() -> tuple[np.ndarray, pd.DataFrame]:
    """Crops (N, 3, 68, 68) float32 and their metadata."""
    crops = np.load(DATA / "crops.npz")["crops"]  # (N, 68, 68, 3) uint16
    meta = pd.read_csv(DATA / "metadata.csv").sort_values("crop_index")
    return np.moveaxis(crops, -1, 1).astype(np.float32), meta.reset_index(drop=True)


def classical_features(crops: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Features of the cell nearest each crop's centre, and its cell mask."""
    diameter = float(np.median([estimate_nucleus_diameter(c[0]) for c in crops[:200]]))
    rows, masks = [], np.zeros((len(crops), *crops.shape[2:]), bool)
    centre = (np.array(crops.shape[2:]) - 1) / 2
    for i, crop in enumerate(crops):
        nuclei, cells = segment_field(crop[0], crop[2], nucleus_diameter_px=diameter)
        if nuclei.max() == 0:
            rows.append(None)
            continue
        table, features = measure_cells(crop, nuclei, cells, channel_names=CHANNELS)
        distance = np.hypot(
            table["centroid_y"] - centre[0], table["centroid_x"] - centre[1]
        )
        best = int(np.argmin(distance.to_numpy()))
        rows.append(features.iloc[best])
        masks[i] = cells == int(table["object_number"].iloc[best])
    columns = next(r.index for r in rows if r is not None)
    table = pd.DataFrame(
        [r if r is not None else pd.Series(np.nan, index=columns) for r in rows]
    )
    print(f"  classical: nucleus diameter {diameter:.1f} px, "
          f"{sum(r is None for r in rows)} crops without a nucleus")  # fmt: skip
    return table.reset_index(drop=True), masks


def scaled_crops(
    crops: np.ndarray, masks: np.ndarray, meta: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """Centre crops scaled per plate and channel on DMSO cells (as phenoscreen embed),
    and their cell masks."""
    lo = (crops.shape[-1] - SIZE) // 2
    centre = crops[..., lo : lo + SIZE, lo : lo + SIZE]
    centre_masks = masks[:, lo : lo + SIZE, lo : lo + SIZE]
    out = np.empty(centre.shape, np.float32)
    for _, rows in meta.groupby("plate").groups.items():
        rows = np.asarray(rows)
        dmso = rows[(meta.loc[rows, "role"] == "negative_control").to_numpy()]
        ranges = fit_channel_ranges(centre[dmso], centre_masks[dmso], (1.0, 99.9))
        out[rows] = normalize_crops(centre[rows], ranges)
    return out, centre_masks


RECIPE = EmbedConfig()


def imagenet_embeddings(
    crops: np.ndarray, masks: np.ndarray, *, strategy: str, layer: str, pool: str
) -> np.ndarray:
    backbone, _ = create_backbone(in_chans=3 if strategy == "rgb" else crops.shape[1])
    embedder = CellEmbedder(
        backbone, strategy=strategy, layer=layer, input_size=RECIPE.input_size,
        pool=pool,
    )  # fmt: skip
    return embed_array(
        embedder, crops, masks, batch_size=64, device=torch.device("cpu")
    )


def finetuned_embeddings(
    crops: np.ndarray,
    masks: np.ndarray,
    meta: pd.DataFrame,
    config: TrainConfig,
    layers: tuple[str, ...],
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Embed each plate with a model fine-tuned on the other plates, at `layers`."""
    labels = np.where(
        meta["role"] == "negative_control",
        "DMSO",
        meta["compound"] + " @ " + meta["concentration_uM"].map("{:g}".format),
    )
    out: dict[str, np.ndarray] = {}
    logs = []
    for held_out in folds_of(meta):
        test = meta["plate"].isin(held_out).to_numpy()
        train = ~test
        is_val = validation_split(
            meta.loc[train, "plate"].to_numpy(),
            meta.loc[train, "well"].to_numpy(),
            0.25,
        )
        start = time.perf_counter()
        result = fine_tune(
            crops[train],
            labels[train],
            is_val,
            config,
            masks=masks[train],
            device="cpu",
        )
        best = result.log.loc[result.log["epoch"] == result.best_epoch].iloc[0]
        logs.append(
            {"held_out_plates": held_out, "best_epoch": result.best_epoch,
             "epochs_run": len(result.log),
             "val_accuracy": round(float(best["val_accuracy"]), 3),
             "seconds": round(time.perf_counter() - start, 1)}
        )  # fmt: skip
        print(f"  fine-tuned without {held_out}: {logs[-1]}")
        for layer in layers:
            embedder = CellEmbedder(
                result.model.embedder.backbone, strategy=config.strategy,
                layer=layer, input_size=config.input_size, pool=config.pool,
            )  # fmt: skip
            vectors = embed_array(embedder, crops[test], masks[test], batch_size=64,
                                  device=torch.device("cpu"))  # fmt: skip
            if layer not in out:
                out[layer] = np.zeros((len(crops), vectors.shape[1]), np.float32)
            out[layer][test] = vectors
    return out, logs


def center_and_scale(fields: pd.DataFrame) -> pd.DataFrame:
    """Subtract each plate's DMSO mean, divide by the DMSO fields' pooled std.

    With 4 DMSO fields per plate, a per-plate spread is 0 for the many dimensions
    of an embedding that are exactly 0 (ReLU) in all of them, which per-plate
    robust z (or z) would have to drop; centring per plate still removes plate
    effects and the pooled spread (24 fields) scales every dimension.
    """
    features = [c for c in fields.columns if not c.startswith("Metadata_")]
    values = fields[features].to_numpy(np.float64, copy=True)
    is_dmso = (fields["Metadata_Role"] == "negative_control").to_numpy()
    for plate in fields["Metadata_Plate"].unique():
        on_plate = (fields["Metadata_Plate"] == plate).to_numpy()
        values[on_plate] -= values[on_plate & is_dmso].mean(axis=0)
    spread = values[is_dmso].std(axis=0, ddof=1)
    keep = spread > 1e-9
    if not keep.any():
        raise ValueError("no feature varies within the DMSO fields.")
    scaled = pd.DataFrame(values[:, keep] / spread[keep], index=fields.index)
    meta = fields[[c for c in fields.columns if c.startswith("Metadata_")]]
    return pd.concat([meta, scaled.add_prefix("f")], axis=1)


def folds_of(meta: pd.DataFrame) -> list[list[str]]:
    """Three folds of two plates each (sorted plate names, every third)."""
    plates = sorted(meta["plate"].unique())
    return [plates[i::3] for i in range(3)]


def field_profiles(
    vectors: np.ndarray, meta: pd.DataFrame, method: str
) -> pd.DataFrame:
    """Median or mean of each field of view's cells, with its metadata."""
    features = pd.DataFrame(vectors).add_prefix("f")
    cells = pd.concat(
        [meta[["plate", "fov", "role", "concentration_uM"]], features], axis=1
    ).dropna()
    grouped = cells.groupby(["plate", "fov", "role", "concentration_uM"])
    fields = grouped.median() if method == "median" else grouped.mean()
    return fields.reset_index().rename(
        columns={"plate": "Metadata_Plate", "role": "Metadata_Role",
                 "concentration_uM": "Metadata_Concentration", "fov": "Metadata_Field"}
    )  # fmt: skip


def combine(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate centred and scaled blocks, each weighted to an equal share."""
    parts = weight_blocks([t.drop(columns=_meta(t)) for t in tables])
    parts = [p.add_prefix(f"b{i}_") for i, p in enumerate(parts)]
    return pd.concat([tables[0][_meta(tables[0])], *parts], axis=1)


def _meta(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("Metadata_")]


def evaluate(
    blocks: list[tuple[np.ndarray, str]], meta: pd.DataFrame
) -> dict[str, object]:
    """mAP per dose vs DMSO and dose ordering, within each fold's held-out plates.

    `blocks` are (per-cell vectors, aggregation) pairs: one for a feature set, two
    for a combined one. Fields are compared only with fields of the same fold (the
    fine-tuned vectors of different folds come from different networks); AP rows
    of all folds are pooled into one mAP, p and q per dose.
    """
    per_block = [field_profiles(v, meta, method) for v, method in blocks]
    keys = ["Metadata_Plate", "Metadata_Field"]
    common = per_block[0][keys]
    for other in per_block[1:]:
        common = common.merge(other[keys])
    per_block = [common.merge(b, on=keys) for b in per_block]
    tables, aps = [], []
    for plates in folds_of(meta):
        table = combine([
            center_and_scale(b[b["Metadata_Plate"].isin(plates)]) for b in per_block
        ])  # fmt: skip
        tables.append(table.assign(distance=well_distance(table))[
            ["Metadata_Role", "Metadata_Concentration", "distance"]
        ])  # fmt: skip
        aps.append(average_precision(table, group_by=["Metadata_Concentration"]))
    activity = mean_average_precision(
        pd.concat(aps), group_by=["Metadata_Concentration"], null_size=20_000, rng=0
    )
    distance = pd.concat(tables)
    treated = distance[distance["Metadata_Role"] != "negative_control"]
    per_dose = treated.groupby("Metadata_Concentration")["distance"].median()
    rho = spearmanr(treated["Metadata_Concentration"], treated["distance"]).statistic
    return {
        "map_by_dose_uM": {f"{k:g}": round(float(v), 3) for k, v in
                           zip(activity["Metadata_Concentration"],
                               activity["mean_average_precision"], strict=True)},
        "q_by_dose_uM": {f"{k:g}": float(f"{v:.2g}") for k, v in
                         zip(activity["Metadata_Concentration"], activity["q_value"],
                             strict=True)},
        "mean_map": round(float(activity["mean_average_precision"].mean()), 3),
        "distance_by_dose_uM": {f"{k:g}": round(float(v), 2) for k, v in per_dose.items()},
        "dose_ordered": bool(per_dose.is_monotonic_increasing),
        "spearman_dose_vs_distance": round(float(rho), 3),
        "n_fields": int(len(distance)),
    }  # fmt: skip


def train_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value): a Python literal, else the text itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        sys.exit(f"--train {text!r}: write KEY=VALUE, e.g. layer=pooled")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument(
        "--train", nargs="*", default=[], metavar="KEY=VALUE",
        help="other TrainConfig settings of the fine-tuning (Python literals)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2],
        help="fine-tuning seeds (they replace --train seed=...); each trains the "
        "three folds anew; the first one's networks give the finetuned rows",
    )  # fmt: skip
    args = parser.parse_args()
    args.seeds = list(dict.fromkeys(args.seeds))  # each seed once
    overrides = dict(train_setting(a) for a in args.train)
    train_config = TrainConfig(**({"epochs": args.epochs} | overrides))
    torch.manual_seed(0)
    crops, meta = load()
    print(f"{len(crops)} crops, {meta['plate'].nunique()} plates, doses "
          f"{sorted(meta['concentration_uM'].unique())}")  # fmt: skip
    vectors, seconds = {}, {}
    start = time.perf_counter()
    classical, masks = classical_features(crops)
    vectors["classical"] = (classical.to_numpy(np.float64), "median")
    seconds["classical"] = time.perf_counter() - start
    scaled, centre_masks = scaled_crops(crops, masks, meta)
    for name, strategy, layer, pool, method in (
        ("imagenet_pooled_stem", "stem", "pooled", "crop", "mean"),  # earlier default
        ("imagenet_recipe", RECIPE.strategy, RECIPE.layer, RECIPE.pool,
         RECIPE.aggregate),
        ("imagenet_recipe_crop_pool", RECIPE.strategy, RECIPE.layer, "crop",
         RECIPE.aggregate),
    ):  # fmt: skip
        start = time.perf_counter()
        vectors[name] = (imagenet_embeddings(scaled, centre_masks, strategy=strategy,
                                             layer=layer, pool=pool),
                         method)  # fmt: skip
        seconds[name] = time.perf_counter() - start
    by_seed = {}
    for seed in args.seeds:
        start = time.perf_counter()
        by_seed[seed] = finetuned_embeddings(
            scaled, centre_masks, meta, replace(train_config, seed=seed),
            (RECIPE.layer, "pooled"),
        )  # fmt: skip
        seconds.setdefault("finetuned", time.perf_counter() - start)
    finetuned, folds = by_seed[args.seeds[0]]
    vectors["finetuned"] = (finetuned[RECIPE.layer], RECIPE.aggregate)
    vectors["finetuned_pooled"] = (finetuned["pooled"], RECIPE.aggregate)
    sets = {name: [v] for name, v in vectors.items()}
    sets["combined"] = [vectors["classical"], vectors["imagenet_recipe"]]
    sets["combined_finetuned"] = [vectors["classical"], vectors["finetuned"]]
    results = {name: evaluate(blocks, meta) for name, blocks in sets.items()}
    results["finetuned"]["folds"] = folds
    seeds = {}
    for seed, (embedded, seed_folds) in by_seed.items():
        alone = evaluate([(embedded[RECIPE.layer], RECIPE.aggregate)], meta)
        both = evaluate([vectors["classical"], (embedded[RECIPE.layer], RECIPE.aggregate)],
                        meta)  # fmt: skip
        seeds[str(seed)] = {
            "spearman_dose_vs_distance": alone["spearman_dose_vs_distance"],
            "mean_map": alone["mean_map"], "dose_ordered": alone["dose_ordered"],
            "combined_spearman": both["spearman_dose_vs_distance"],
            "val_accuracy_by_fold": [f["val_accuracy"] for f in seed_folds],
        }  # fmt: skip
    rhos = [v["spearman_dose_vs_distance"] for v in seeds.values()]
    results["finetuned_by_seed"] = seeds | {
        "mean_spearman": round(float(np.mean(rhos)), 3),
        "sd_spearman": round(float(np.std(rhos, ddof=1)), 3) if len(rhos) > 1 else None,
    }
    for name, figures in results.items():
        if name != "finetuned_by_seed":
            figures["seconds"] = round(seconds.get(name, 0.0), 1)
        print(f"{name}: {figures}")
    default_seeds = args.seeds == [0, 1, 2]
    save(
        "bbbc021_quality" + ("" if default_seeds else "_seeds_" + "_".join(map(str, args.seeds))),
        {"command": shlex.join(["python", "benchmarks/bench_bbbc021_quality.py",
                                "--epochs", str(args.epochs),
                                "--seeds", *map(str, args.seeds),
                                *(["--train", *args.train] if args.train else [])]),
         "threads": torch.get_num_threads(), "crop_px": SIZE,
         "fine_tuning": asdict(replace(train_config, seed=args.seeds[0])),
         "recipe": {k: v for k, v in vars(RECIPE).items() if k != "enabled"},
         "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
