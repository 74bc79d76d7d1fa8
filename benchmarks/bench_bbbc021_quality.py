"""Quality on real cells: classical features vs ImageNet vs fine-tuned embeddings.

Data: ../shared/data/cells/bbbc021_singlecell_crops_dmso_vs_cycloheximide (BBBC021,
MCF-7, 2,400 single-cell crops of 68 x 68 px, DAPI / tubulin / actin; 6 plates;
DMSO and cycloheximide at 5, 15 and 50 uM). Each feature set gives per-cell vectors;
the unit of comparison is the field of view (median of its cells, normalized to the
plate's DMSO fields: z-scores, as the MAD of 4 fields is 0 for sparse embedding
dimensions). Reported per feature set:

- mAP of each dose's fields retrieving each other against the DMSO fields (copairs'
  phenotypic activity, `pipeline.activity`), with permutation p and BH q;
- dose ordering: median distance to DMSO (RMS of the z-scores, `score_wells`) per dose, and
  Spearman's rho between dose and the fields' distance (treated fields only).

Feature sets: ``classical`` (our CellProfiler-style features of the centre cell,
segmented in its crop), ``imagenet_stem`` / ``imagenet_rgb`` (tf_efficientnet_lite0
with offline ImageNet weights, 3-channel stem or each channel as RGB), and
``finetuned`` (the same network fine-tuned on compound-dose labels with whole plates
held out: 3 folds of 2 held-out plates; every plate is embedded by the model that
never saw it). CPU, 2 threads on the reference machine.

    python benchmarks/bench_bbbc021_quality.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import sys
import time
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
    embed_array,
    fit_channel_ranges,
    make_embedder,
    normalize_crops,
)
from models.train import TrainConfig, fine_tune, validation_split  # noqa: E402
from pipeline.activity import average_precision, mean_average_precision  # noqa: E402
from pipeline.features import measure_cells  # noqa: E402
from pipeline.profiles import normalize_to_controls, score_wells  # noqa: E402
from pipeline.segment import estimate_nucleus_diameter, segment_field  # noqa: E402

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
) -> np.ndarray:
    """Centre crops scaled per plate and channel on DMSO cells (as phenoscreen embed)."""
    lo = (crops.shape[-1] - SIZE) // 2
    centre = crops[..., lo : lo + SIZE, lo : lo + SIZE]
    centre_masks = masks[:, lo : lo + SIZE, lo : lo + SIZE]
    out = np.empty(centre.shape, np.float32)
    for _, rows in meta.groupby("plate").groups.items():
        rows = np.asarray(rows)
        dmso = rows[(meta.loc[rows, "role"] == "negative_control").to_numpy()]
        ranges = fit_channel_ranges(centre[dmso], centre_masks[dmso], (1.0, 99.9))
        out[rows] = normalize_crops(centre[rows], ranges)
    return out


def imagenet_embeddings(crops: np.ndarray, strategy: str) -> np.ndarray:
    model, _ = create_backbone(in_chans=3 if strategy == "rgb" else crops.shape[1])
    model = model.to(memory_format=torch.channels_last)
    return embed_array(
        make_embedder(model, strategy), crops, batch_size=64, device=torch.device("cpu")
    )


def finetuned_embeddings(
    crops: np.ndarray, meta: pd.DataFrame, epochs: int
) -> tuple[np.ndarray, list[dict]]:
    """Embed each plate with a model fine-tuned on the other plates."""
    labels = np.where(
        meta["role"] == "negative_control",
        "DMSO",
        meta["compound"] + " @ " + meta["concentration_uM"].map("{:g}".format),
    )
    plates = sorted(meta["plate"].unique())
    folds = [plates[i::3] for i in range(3)]
    out = np.zeros((len(crops), 1280), np.float32)
    logs = []
    for held_out in folds:
        test = meta["plate"].isin(held_out).to_numpy()
        train = ~test
        is_val = validation_split(
            meta.loc[train, "plate"].to_numpy(),
            meta.loc[train, "well"].to_numpy(),
            0.25,
        )
        config = TrainConfig(epochs=epochs, warmup_epochs=1, batch_size=64, patience=3)
        start = time.perf_counter()
        result = fine_tune(crops[train], labels[train], is_val, config, device="cpu")
        best = result.log.loc[result.log["epoch"] == result.best_epoch].iloc[0]
        logs.append(
            {"held_out_plates": held_out, "best_epoch": result.best_epoch,
             "val_accuracy": round(float(best["val_accuracy"]), 3),
             "seconds": round(time.perf_counter() - start, 1)}
        )  # fmt: skip
        print(f"  fine-tuned without {held_out}: {logs[-1]}")
        result.model.reset_classifier(0)
        out[test] = embed_array(
            result.model, crops[test], batch_size=64, device=torch.device("cpu")
        )
    return out, logs


def evaluate(vectors: np.ndarray, meta: pd.DataFrame) -> dict[str, object]:
    """Field-of-view profiles -> mAP per dose vs DMSO and dose ordering."""
    features = pd.DataFrame(vectors).add_prefix("f")
    cells = pd.concat(
        [meta[["plate", "fov", "role", "concentration_uM"]], features], axis=1
    )
    cells = cells.dropna()
    fields = cells.groupby(["plate", "fov", "role", "concentration_uM"]).median()
    fields = fields.reset_index().rename(
        columns={"plate": "Metadata_Plate", "role": "Metadata_Role",
                 "concentration_uM": "Metadata_Concentration", "fov": "Metadata_Field"}
    )  # fmt: skip
    # z to each plate's 4 DMSO fields: their MAD is 0 for the many exactly-zero
    # (ReLU) embedding dimensions, which robust z would have to drop
    normalized = normalize_to_controls(fields, method="z")
    feature_columns = [c for c in normalized.columns if not c.startswith("Metadata_")]
    finite = np.isfinite(normalized[feature_columns].to_numpy()).all(axis=0)
    normalized = normalized.drop(columns=np.array(feature_columns)[~finite])
    n_features = int(finite.sum())
    if n_features == 0:
        raise ValueError("no feature varies within the DMSO fields of every plate.")
    ap = average_precision(normalized, group_by=["Metadata_Concentration"])
    activity = mean_average_precision(
        ap, group_by=["Metadata_Concentration"], null_size=20_000, rng=0
    )
    distance = normalized.assign(distance=score_wells(normalized))
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
        "n_fields": int(len(normalized)),
        "n_features": n_features,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    crops, meta = load()
    print(f"{len(crops)} crops, {meta['plate'].nunique()} plates, doses "
          f"{sorted(meta['concentration_uM'].unique())}")  # fmt: skip
    results, seconds = {}, {}
    start = time.perf_counter()
    classical, masks = classical_features(crops)
    seconds["classical"] = time.perf_counter() - start
    results["classical"] = evaluate(classical.to_numpy(np.float64), meta)
    scaled = scaled_crops(crops, masks, meta)
    for strategy in ("stem", "rgb"):
        start = time.perf_counter()
        vectors = imagenet_embeddings(scaled, strategy)
        seconds[f"imagenet_{strategy}"] = time.perf_counter() - start
        results[f"imagenet_{strategy}"] = evaluate(vectors, meta)
    start = time.perf_counter()
    vectors, folds = finetuned_embeddings(scaled, meta, args.epochs)
    seconds["finetuned"] = time.perf_counter() - start
    results["finetuned"] = evaluate(vectors, meta) | {"folds": folds}
    for name, figures in results.items():
        figures["seconds"] = round(seconds[name], 1)
        print(f"{name}: {figures}")
    save(
        "bbbc021_quality",
        {"command": f"python benchmarks/bench_bbbc021_quality.py --epochs {args.epochs}",
         "threads": torch.get_num_threads(), "crop_px": SIZE, "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
