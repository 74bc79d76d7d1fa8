"""A translocation readout on real images: NF-kB nuclear vs cytoplasmic (BBBC014).

Data: ../shared/data/fields/bbbc014_nfkb_vitra, two wells of an NF-kB translocation
assay (A01 stimulated: nuclear NF-kB; A12 unstimulated: cytoplasmic), one
1024x1360 field each, channels NF-kB and DNA. With only two wells, each field is cut
into a 4 x 4 grid of tiles that stand in for wells (16 per condition; A12's tiles
are the negative controls). Cells are segmented (the default segmenter, cells grown
over the NF-kB stain) and profiled three ways:

- ``classical``: our CellProfiler-style features, median per tile;
- ``deep``: the default embedding recipe (`pipeline.config.EmbedConfig`: crops of
  four nucleus diameters resized to 64 px, scaled on the control cells, each
  channel as RGB, ``blocks[3]`` averaged over the cell's mask, median per tile);
  ``deep_crop_pool``: the same averaged over the whole crop;
- ``combined``: both, each normalized and weighted equally.

Tiles are normalized as `phenoscreen` normalizes wells
(`pipeline.profiling.profiles.normalize_profiles`, the default recipe; for classical and
deep features also with feature-selection correlations measured on all tiles and
without feature selection), scored by their distance from the
controls (`pipeline.profiling.profiles.well_activity`), and the Z' of that score between the
stimulated and the control tiles is reported, with the nucleus/cytoplasm NF-kB
intensity ratio (the assay's classic one-number readout) for reference.

    python benchmarks/bench_bbbc014_translocation.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

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
from pipeline.calls.plateqc import z_prime  # noqa: E402
from pipeline.cells.crops import crop_cells, default_crop_size  # noqa: E402
from pipeline.cells.segment import segment_field  # noqa: E402
from pipeline.config import EmbedConfig, ProfileConfig  # noqa: E402
from pipeline.measure.features import measure_cells  # noqa: E402
from pipeline.profiling.profiles import normalize_profiles, well_activity  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/fields/bbbc014_nfkb_vitra"
WELLS = {"A01": "01-A-01", "A12": "12-A-12"}  # stimulated, control
GRID = 4
#: Profile recipes other than the default, to show what its choices do here.
OTHER_RECIPES = {
    "correlations_on_all_tiles": ProfileConfig(corr_on="all"),
    "no_feature_selection": ProfileConfig(feature_select=False),
}


def load_cells() -> tuple[pd.DataFrame, pd.DataFrame, list, list]:
    """Segment and measure both fields; return cell metadata, features, images, labels."""
    metas, features, images, labels = [], [], [], []
    for well, tag in WELLS.items():
        nfkb = tifffile.imread(DATA / "images" / f"Channel 1-{tag}-00.tif")
        dna = tifffile.imread(DATA / "images" / f"Channel 2-{tag}-00.tif")
        nuclei, cells = segment_field(dna, nfkb)
        image = np.stack([nfkb, dna]).astype(np.float32)
        table, values = measure_cells(
            image, nuclei, cells, channel_names=["NFkB", "DNA"]
        )
        rows = np.minimum(
            (table["centroid_y"] / nfkb.shape[0] * GRID).astype(int), GRID - 1
        )
        cols = np.minimum(
            (table["centroid_x"] / nfkb.shape[1] * GRID).astype(int), GRID - 1
        )
        metas.append(table.assign(well=well, tile=rows * GRID + cols))
        features.append(values)
        images.append(image)
        labels.append(cells)
    return (pd.concat(metas, ignore_index=True), pd.concat(features, ignore_index=True),
            images, labels)  # fmt: skip


def deep_vectors(
    meta: pd.DataFrame, images: list, labels: list, recipe: EmbedConfig
) -> np.ndarray:
    """A recipe's vectors of every cell (controls' ranges for the scaling)."""
    size = default_crop_size(meta["area_px"].to_numpy())
    crops, masks = [], []
    for (_, cells), image, label in zip(meta.groupby("well", sort=False), images, labels,
                                        strict=True):  # fmt: skip
        c, m = crop_cells(
            image, cells[["centroid_y", "centroid_x"]].to_numpy(), size,
            cell_labels=label, object_numbers=cells["object_number"].to_numpy(),
        )  # fmt: skip
        crops.append(c)
        masks.append(m)
    crops, masks = np.concatenate(crops), np.concatenate(masks)
    control = (meta["well"] == "A12").to_numpy()
    ranges = fit_channel_ranges(crops[control], masks[control], recipe.percentiles)
    backbone, _ = create_backbone(in_chans=3)
    embedder = CellEmbedder(
        backbone, strategy=recipe.strategy, layer=recipe.layer,
        input_size=recipe.input_size, pool=recipe.pool,
    )  # fmt: skip
    return embed_array(
        embedder, normalize_crops(crops, ranges), masks, batch_size=64,
        device=torch.device("cpu"),
    )  # fmt: skip


def tile_profiles(meta: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """Median of each tile's cells, with the metadata `normalize_profiles` needs."""
    keys = meta[["well", "tile"]].reset_index(drop=True)
    tiles = pd.concat([keys, values.reset_index(drop=True)], axis=1)
    tiles = tiles.groupby(["well", "tile"]).median().reset_index()
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "Metadata_Plate": "BBBC014",
                    "Metadata_Well": tiles["well"] + "/" + tiles["tile"].astype(str),
                    "Metadata_Role": np.where(
                        tiles["well"] == "A12", "negative_control", "treatment"
                    ),
                }
            ),  # fmt: skip
            tiles.drop(columns=["well", "tile"]),
        ],
        axis=1,
    )


def separation(
    profiles: pd.DataFrame,
    blocks: list[list[str]] | None = None,
    recipe: ProfileConfig | None = None,
) -> dict:
    """Z' of the distance from the control tiles, stimulated vs control tiles."""
    normalized = normalize_profiles(profiles, recipe, blocks=blocks)
    score = well_activity(normalized)
    stimulated = normalized["Metadata_Role"] == "treatment"
    return {
        "z_prime_distance": round(
            float(z_prime(score[stimulated], score[~stimulated])), 3
        ),
        "median_distance_stimulated_control": [
            round(float(score[stimulated].median()), 2),
            round(float(score[~stimulated].median()), 2),
        ],
        "n_features": int(normalized.shape[1] - 3),
    }


def main() -> None:
    start = time.perf_counter()
    meta, classical, images, labels = load_cells()
    print(f"{len(meta)} cells ({meta['well'].value_counts().to_dict()}), "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    start = time.perf_counter()
    deep = pd.DataFrame(deep_vectors(meta, images, labels, EmbedConfig()))
    deep = deep.add_prefix("deep_")
    deep_seconds = time.perf_counter() - start
    crop_pool = deep_vectors(meta, images, labels, EmbedConfig(pool="crop"))
    ratio = (classical["Nuclei_Intensity_MeanIntensity_NFkB"]
             / classical["Cytoplasm_Intensity_MeanIntensity_NFkB"]).rename("ratio")  # fmt: skip
    tiles = {
        "classical": tile_profiles(meta, classical),
        "deep": tile_profiles(meta, deep),
        "nucleus_cytoplasm_ratio": tile_profiles(meta, ratio.to_frame()),
        "deep_crop_pool": tile_profiles(
            meta, pd.DataFrame(crop_pool).add_prefix("deep_")
        ),
    }
    results = {name: separation(table) for name, table in tiles.items()}
    combined = tiles["classical"].merge(tiles["deep"])
    results["combined"] = separation(
        combined, blocks=[list(classical.columns), list(deep.columns)]
    )
    results["deep"]["seconds"] = round(deep_seconds, 1)
    for name, recipe in OTHER_RECIPES.items():  # the default recipe's choices
        for feature_set in ("classical", "deep"):
            results[f"{feature_set}_{name}"] = separation(
                tiles[feature_set], recipe=recipe
            )
    for name, figures in results.items():
        print(f"{name}: {figures}")
    save(
        "bbbc014_translocation",
        {"command": "python benchmarks/bench_bbbc014_translocation.py",
         "grid": f"{GRID}x{GRID} tiles per field", "cells": len(meta),
         "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
