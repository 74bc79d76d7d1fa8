"""The embedding CNN in bfloat16 on the CPU against float32: speed and what changes.

A 3-plate demo experiment (`pipeline.images.demo`, seed 0, with its truth) is
analysed once, then embedded on the CPU with the default recipe
(`pipeline.config.EmbedConfig`) in float32 (the CPU's default) and with
``precision = "bfloat16"``, alternating twice, each time into a fresh copy of the
analysed store. Reported:

- the embed step's cells/s of each run (`models.embed.embed_run`, end to end), and
  the forward pass alone on the same random crops, alternating float32 / bfloat16
  twice (these machines are shared: ratios come in pairs run side by side), at
  `embed_run`'s CPU batch for 3-channel crops (`pipeline.config.embed_batch_size`:
  8 before 2026-12-06, 13 since, so older results timed smaller passes);
- how far the vectors of the first pair move: per cell, ``|v_bf16 - v_fp32| / |v_fp32|`` (median,
  95th percentile, maximum); per well, the Pearson correlation of the normalized
  profiles of the two feature sets (median, minimum);
- the hits each feature set calls, and those of its ``combined`` set, against the
  demo's truth (as `bench_demo_feature_sets.py`).

bfloat16 is fast on CPUs with AMX tiles; the machine facts record the CPU's flags.

Run: ``python benchmarks/bench_embed_precision.py``
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402
from bench_demo_feature_sets import recovery  # noqa: E402

from db import store  # noqa: E402
from db.session import make_engine  # noqa: E402
from models.backbones import create_backbone  # noqa: E402
from models.embed import CellEmbedder, embed_run  # noqa: E402
from pipeline.config import EmbedConfig, embed_batch_size  # noqa: E402
from pipeline.views.export import read_profiles  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def forward_rate(model: torch.nn.Module, bfloat16: bool, *, n: int = 1024) -> float:
    """Crops/s of the forward pass alone on `n` distinct random 3-channel crops."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(n, 3, 56, 56, generator=generator)
    masks = torch.rand(n, 56, 56, generator=generator) < 0.3
    batch = embed_batch_size(
        "cpu", EmbedConfig().batch_size, pixels_per_crop=model.pixels_per_crop(3, 56)
    )  # as embed_run
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, bfloat16):
        model(data[:batch].contiguous(memory_format=torch.channels_last), masks[:batch])
        start = time.perf_counter()
        for lo in range(0, n, batch):
            crops = data[lo : lo + batch].contiguous(memory_format=torch.channels_last)
            model(crops, masks[lo : lo + batch])
    return n / (time.perf_counter() - start)


def cell_vectors(engine, run_id: int, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Every cell's identity and vector in a feature set, in the store's order."""
    parts = list(store.iter_plate_cells(engine, run_id, name))
    cells = pd.concat([c for _, c, _ in parts], ignore_index=True)
    return cells, np.concatenate([v.to_numpy(float) for _, _, v in parts])


def copy_store(source: Path, target: Path) -> str:
    """A copy of a SQLite store (SQLite's backup API); its URL."""
    with (
        closing(sqlite3.connect(source)) as origin,
        closing(sqlite3.connect(target)) as copy,
    ):
        origin.backup(copy)
    return f"sqlite:///{target}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url, demo = run_demo(Path(tmp) / "screen", n_plates=3, seed=0)
        truth = json.loads(demo["truth"].read_text())
        analysed = Path(url.removeprefix("sqlite:///"))
        run_id, experiment_id = store.resolve_run(make_engine(url, create=False))
        stores, embedded, rates_end = {}, {}, {p: [] for p in PRECISIONS}
        for repeat in range(2):  # alternating, each on a fresh copy of the store
            for precision in PRECISIONS:
                copy = copy_store(analysed, Path(tmp) / f"{precision}{repeat}.db")
                summary = embed_run(make_engine(copy, create=False), run_id,
                                    EmbedConfig(precision=precision), device="cpu")  # fmt: skip
                rates_end[precision].append(round(summary["cells_per_s"], 1))
                if repeat == 0:
                    stores[precision], embedded[precision] = copy, summary
        results = {
            p: {
                "feature_set": embedded[p]["feature_set"],
                "cells": embedded[p]["n_cells"],
                "deep": recovery(stores[p], embedded[p]["feature_set"], truth),
                "combined": recovery(
                    stores[p], embedded[p]["combined_feature_set"], truth
                ),
            }
            for p in PRECISIONS
        }
        (cells_a, exact), (cells_b, fast) = (
            cell_vectors(make_engine(stores[p], create=False), run_id,
                         embedded[p]["feature_set"])
            for p in PRECISIONS
        )  # fmt: skip
        if not cells_a.drop(columns="well_id").equals(cells_b.drop(columns="well_id")):
            sys.exit("the two feature sets hold other cells; nothing to compare.")
        change = np.linalg.norm(fast - exact, axis=1) / np.linalg.norm(exact, axis=1)
        profiles = [
            read_profiles(make_engine(stores[p], create=False), run_id, experiment_id,
                          feature_set=embedded[p]["feature_set"])[1]
            .set_index(["Metadata_Plate", "Metadata_Well"])
            for p in PRECISIONS
        ]  # fmt: skip
        features = [  # feature k of each set, by its number (normalizing may drop some)
            {c.rsplit("_", 1)[1]: c for c in table.columns
             if c.startswith(embedded[p]["feature_set"] + "_")}
            for table, p in zip(profiles, PRECISIONS, strict=True)
        ]  # fmt: skip
        common = sorted(set(features[0]) & set(features[1]))
        a, b = (
            table.loc[profiles[0].index, [names[k] for k in common]].to_numpy(float)
            for table, names in zip(profiles, features, strict=True)
        )
        keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
        well_r = np.array(
            [np.corrcoef(x[keep], y[keep])[0, 1] for x, y in zip(a, b, strict=True)]
        )
        backbone, _ = create_backbone(in_chans=3)
        recipe = EmbedConfig()
        model = CellEmbedder(
            backbone, strategy=recipe.strategy, layer=recipe.layer,
            input_size=recipe.input_size, pool=recipe.pool,
        ).eval().to(memory_format=torch.channels_last)  # fmt: skip
        rates = {p: [] for p in PRECISIONS}
        for _ in range(2):
            for precision in PRECISIONS:
                rates[precision].append(
                    round(forward_rate(model, precision == "bfloat16"), 1)
                )
    figures = {
        "command": "python benchmarks/bench_embed_precision.py",
        "threads": torch.get_num_threads(),
        "recipe": "the default EmbedConfig (rgb, blocks.3, cell pooling, 64 px)",
        "results": results,
        "end_to_end_cells_per_s": rates_end,
        "end_to_end_speedups": [
            round(b / a, 2)
            for a, b in zip(rates_end["float32"], rates_end["bfloat16"], strict=True)
        ],
        "forward_crops_per_s": rates,
        "forward_speedups": [
            round(b / a, 2)
            for a, b in zip(rates["float32"], rates["bfloat16"], strict=True)
        ],
        "cell_vector_relative_change": {
            "median": round(float(np.median(change)), 4),
            "p95": round(float(np.percentile(change, 95)), 4),
            "max": round(float(change.max()), 4),
        },
        "well_profile_correlation": {
            "median": round(float(np.median(well_r)), 4),
            "min": round(float(well_r.min()), 4),
            "wells": len(well_r),
            "features": int(keep.sum()),
        },
        "same_hits": results["float32"]["deep"]["hits"]
        == results["bfloat16"]["deep"]["hits"]
        and results["float32"]["combined"]["hits"]
        == results["bfloat16"]["combined"]["hits"],
    }
    for key in ("end_to_end_cells_per_s", "end_to_end_speedups",
                "forward_crops_per_s", "forward_speedups",
                "cell_vector_relative_change", "well_profile_correlation",
                "same_hits"):  # fmt: skip
        print(f"{key}: {figures[key]}")
    save("embed_precision", figures)


if __name__ == "__main__":
    main()
