"""Crops per forward pass of the embedding CNN on the CPU: speed, and the same vectors.

Two measurements, one run:

- forward: `models.embed.embed_array` (the call `embed_run` makes) on 512 random
  crops of 56 px, for the default recipe (`pipeline.config.EmbedConfig`: each
  channel as RGB, ``blocks[3]``, cell pooling) with 3 and 5 channels at the
  default 64 px input and at 96 px, and with 5 channels for the ``stem`` strategy
  and the ``pooled`` layer; batches of 4, 8, 16 and 32 crops, three rounds
  interleaved (these machines are shared: medians of side-by-side runs), and
  whether every batch gives the same bits as 32;
- end to end: a one-plate, 5-channel demo (`pipeline.images.demo`, 192 fields of
  256 px) is analysed once, then embedded by `models.embed.embed_run` at 32 crops
  per pass (the default before 2026-12-06) and at the CPU's default
  (`pipeline.config.embed_batch_size`), in the order 32, default, default, 32 after
  a discarded warm-up run, each on a fresh copy of the store; cells/s of each, and
  whether the first two stores hold the same vectors.

Run: ``python benchmarks/bench_embed_batch.py``
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402
from bench_embed_precision import cell_vectors, copy_store  # noqa: E402

from db import store  # noqa: E402
from db.session import make_engine  # noqa: E402
from models.backbones import on_device  # noqa: E402
from models.embed import build_embedder, embed_array, embed_run  # noqa: E402
from pipeline.config import EmbedConfig, embed_batch_size  # noqa: E402

BATCHES = (4, 8, 16, 32)
RECIPES = {  # name: (channels, EmbedConfig changes)
    "rgb_blocks.3_64px_3ch": (3, {}),
    "rgb_blocks.3_64px_5ch": (5, {}),
    "rgb_blocks.3_96px_3ch": (3, {"input_size": 96}),
    "rgb_blocks.3_96px_5ch": (5, {"input_size": 96}),
    "stem_blocks.3_64px_5ch": (5, {"strategy": "stem"}),
    "rgb_pooled_64px_5ch": (5, {"layer": "pooled"}),
}


def forward_sweep(rounds: int = 3, n: int = 512) -> dict:
    """Crops/s of `embed_array` per recipe and batch (medians), and same-bits checks."""
    device = torch.device("cpu")
    rng = np.random.default_rng(0)
    masks = rng.random((n, 56, 56)) < 0.3
    crops = {c: rng.random((n, c, 56, 56), dtype=np.float32) for c in (3, 5)}
    models = {
        name: on_device(build_embedder(replace(EmbedConfig(), **changes), c)[0], device)
        for name, (c, changes) in RECIPES.items()
    }
    rates: dict[str, dict[int, list[float]]] = {
        r: {b: [] for b in BATCHES} for r in RECIPES
    }
    same: dict[str, bool] = {}
    for name, model in models.items():  # warm-up: first calls pay for the set-up
        data = crops[RECIPES[name][0]][:64]
        embed_array(model, data, masks[:64], batch_size=8, device=device)
    for round_ in range(rounds):
        for name, model in models.items():
            data = crops[RECIPES[name][0]]
            outputs = {}
            for batch in BATCHES:
                start = time.perf_counter()
                outputs[batch] = embed_array(
                    model, data, masks, batch_size=batch, device=device
                )
                rates[name][batch].append(n / (time.perf_counter() - start))
            if round_ == 0:
                same[name] = all(
                    np.array_equal(o, outputs[32]) for o in outputs.values()
                )
        print(f"round {round_ + 1} of {rounds} done", flush=True)
    return {
        name: {
            "crops_per_s": {
                b: {"median": round(float(np.median(v))), "runs": [round(x) for x in v]}
                for b, v in by_batch.items()
            },
            "speedup_8_vs_32": round(
                float(np.median(by_batch[8]) / np.median(by_batch[32])), 2
            ),
            "same_vectors_at_every_batch": same[name],
        }
        for name, by_batch in rates.items()
    }


def end_to_end(folder: Path) -> dict:
    """`embed_run` cells/s at 32 per pass and at the CPU's default, alternating."""
    url, _ = run_demo(folder / "demo", n_plates=1, n_channels=5)
    analysed = Path(url.removeprefix("sqlite:///"))
    run_id, _ = store.resolve_run(make_engine(url, create=False))
    default = embed_batch_size("cpu")
    warm = copy_store(analysed, folder / "warm_up.db")  # the first run pays start-up
    embed_run(make_engine(warm, create=False), run_id, EmbedConfig(), device="cpu")
    rates: dict[int, list[float]] = {32: [], default: []}
    stores = {}
    for repeat, order in enumerate(((32, default), (default, 32))):  # ABBA
        for batch in order:
            url = copy_store(analysed, folder / f"b{batch}_{repeat}.db")
            summary = embed_run(make_engine(url, create=False), run_id,
                                replace(EmbedConfig(), batch_size=batch), device="cpu")  # fmt: skip
            rates[batch].append(round(summary["cells_per_s"], 1))
            stores.setdefault(batch, (url, summary["feature_set"], summary["n_cells"]))
    (cells_a, a), (cells_b, b) = (
        cell_vectors(make_engine(url, create=False), run_id, name)
        for url, name, _ in stores.values()
    )
    return {
        "plate": "1 demo plate, 96 wells x 2 fields of 256 px, 5 channels",
        "cells": stores[default][2],
        "cells_per_s": {f"batch_{k}": v for k, v in rates.items()},
        "speedups": [
            round(new / old, 2)
            for old, new in zip(rates[32], rates[default], strict=True)
        ],
        "same_cells": bool(cells_a.equals(cells_b)),
        "same_vectors": bool(np.array_equal(a, b)),
    }


def main() -> None:
    figures = {
        "command": "python benchmarks/bench_embed_batch.py",
        "threads": torch.get_num_threads(),
        "cpu_default_batch": embed_batch_size("cpu"),
        "forward": forward_sweep(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        figures["end_to_end"] = end_to_end(Path(tmp))
    for name, result in figures["forward"].items():
        medians = {b: r["median"] for b, r in result["crops_per_s"].items()}
        print(f"{name}: {medians} crops/s; 8 vs 32: {result['speedup_8_vs_32']}x; "
              f"same vectors: {result['same_vectors_at_every_batch']}")  # fmt: skip
    print("end to end:", figures["end_to_end"])
    save("embed_batch", figures)


if __name__ == "__main__":
    main()
