"""Crops per forward pass of the embedding CNN on the CPU: speed, and the same vectors.

Two measurements, one run:

- forward: `models.embed.embed_array` (the call `embed_run` makes) on 512 random
  crops of 56 px, for the default recipe (`pipeline.config.EmbedConfig`: each
  channel as RGB, ``blocks[3]``, cell pooling) with 3 and 5 channels at the
  default 64 px input and at 96 px, and with 5 channels for the ``stem`` strategy
  and the ``pooled`` layer; batches of 4, 8, 16 and 32 crops and the recipe's CPU
  default (`pipeline.config.embed_batch_size`: 40 images of 64 px per pass), three
  rounds interleaved (these machines are shared: medians of side-by-side runs),
  and whether every batch gives the same bits as 32;
- end to end: a one-plate, 5-channel demo (`pipeline.images.demo`, 192 fields of
  256 px) is analysed once, then embedded by `models.embed.embed_run` with the
  default recipe at 32 crops per pass (the default before 2026-12-06) and at the
  CPU's default (8), and with the ``stem`` strategy at 8 (its default on
  2026-12-06) and at its CPU default (40), each pair in the order old, new, new,
  old after a discarded warm-up run, each on a fresh copy of the store; cells/s of
  each, and whether each pair's first two stores hold the same vectors (and how
  many cells and by how much they differ: a forward pass of a single image, as
  ``stem`` makes for the last crop of a group of fields that holds one crop more
  than a multiple of the batch, runs another oneDNN kernel and gives other bits).
  The bits depend on the thread count too: these checks ran with 2 threads.

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
from pipeline.config import (  # noqa: E402
    CPU_EMBED_PIXELS,
    EmbedConfig,
    embed_batch_size,
)

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
    defaults = {
        name: embed_batch_size("cpu", pixels_per_crop=model.pixels_per_crop(
            RECIPES[name][0], 56))
        for name, model in models.items()
    }  # fmt: skip
    rates = {r: {b: [] for b in sorted({*BATCHES, defaults[r]})} for r in RECIPES}
    same: dict[str, bool] = {}
    for name, model in models.items():  # warm-up: first calls pay for the set-up
        data = crops[RECIPES[name][0]][:64]
        embed_array(model, data, masks[:64], batch_size=8, device=device)
    for round_ in range(rounds):
        for name, model in models.items():
            data = crops[RECIPES[name][0]]
            outputs = {}
            for batch in rates[name]:
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

    def speedup(by_batch: dict, new: int, old: int) -> float:
        return round(float(np.median(by_batch[new]) / np.median(by_batch[old])), 2)

    return {
        name: {
            "crops_per_s": {
                b: {"median": round(float(np.median(v))), "runs": [round(x) for x in v]}
                for b, v in by_batch.items()
            },
            "default_batch": defaults[name],
            "speedup_default_vs_8": speedup(by_batch, defaults[name], 8),
            "speedup_default_vs_32": speedup(by_batch, defaults[name], 32),
            "same_vectors_at_every_batch": same[name],
        }
        for name, by_batch in rates.items()
    }


def end_to_end(analysed: Path, run_id: int, folder: Path, recipe: EmbedConfig,
               old: int) -> dict:  # fmt: skip
    """`embed_run` cells/s of `recipe` at `old` crops per pass and its CPU default."""
    warm = copy_store(analysed, folder / "warm_up.db")  # the first run pays start-up
    summary = embed_run(make_engine(warm, create=False), run_id, recipe, device="cpu")
    default = summary["batch_size"]
    rates: dict[int, list[float]] = {old: [], default: []}
    stores = {}
    for repeat, order in enumerate(((old, default), (default, old))):  # ABBA
        for batch in order:
            url = copy_store(analysed, folder / f"b{batch}_{repeat}.db")
            summary = embed_run(make_engine(url, create=False), run_id,
                                replace(recipe, batch_size=batch), device="cpu")  # fmt: skip
            rates[batch].append(round(summary["cells_per_s"], 1))
            stores.setdefault(batch, (url, summary["feature_set"], summary["n_cells"]))
    (cells_a, a), (cells_b, b) = (
        cell_vectors(make_engine(url, create=False), run_id, name)
        for url, name, _ in stores.values()
    )
    return {
        "cells": stores[default][2],
        "default_batch": default,
        "cells_per_s": {f"batch_{k}": v for k, v in rates.items()},
        "speedups": [
            round(new / before, 2)
            for before, new in zip(rates[old], rates[default], strict=True)
        ],
        "same_cells": bool(cells_a.equals(cells_b)),
        "same_vectors": bool(np.array_equal(a, b)),
        "cells_with_other_bits": int((a != b).any(axis=1).sum()),
        "max_abs_difference": float(np.abs(a - b).max()),
    }


def main() -> None:
    figures = {
        "command": "python benchmarks/bench_embed_batch.py",
        "threads": torch.get_num_threads(),
        "cpu_embed_pixels": CPU_EMBED_PIXELS,
        "forward": forward_sweep(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        url, _ = run_demo(Path(tmp) / "demo", n_plates=1, n_channels=5)
        analysed = Path(url.removeprefix("sqlite:///"))
        run_id, _ = store.resolve_run(make_engine(url, create=False))
        figures["end_to_end"] = {
            "plate": "1 demo plate, 96 wells x 2 fields of 256 px, 5 channels"
        }
        for name, recipe, old in (
            ("rgb_vs_32", EmbedConfig(), 32),
            ("stem_vs_8", EmbedConfig(strategy="stem"), 8),
        ):
            folder = Path(tmp) / name
            folder.mkdir()
            figures["end_to_end"][name] = end_to_end(
                analysed, run_id, folder, recipe, old
            )
    for name, result in figures["forward"].items():
        medians = {b: r["median"] for b, r in result["crops_per_s"].items()}
        print(f"{name}: {medians} crops/s; default {result['default_batch']} vs 8: "
              f"{result['speedup_default_vs_8']}x, vs 32: "
              f"{result['speedup_default_vs_32']}x; same vectors: "
              f"{result['same_vectors_at_every_batch']}")  # fmt: skip
    print("end to end:", figures["end_to_end"])
    save("embed_batch", figures)


if __name__ == "__main__":
    main()
