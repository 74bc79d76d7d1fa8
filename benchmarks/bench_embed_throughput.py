"""Cells/s of the whole embed step vs the raw forward pass, side by side.

A demo plate (3 channels) is analysed into SQLite, then, for each network input
size, in one run, with the default recipe otherwise (`pipeline.config.EmbedConfig`:
each channel as RGB, ``blocks[3]`` averaged over each cell's mask, plate scaling):

- raw: the recipe's `models.embed.CellEmbedder` alone (resize, three passes, stop
  at the layer, pool over random masks) on 2,048 distinct random 3-channel crops
  already in memory, same
  batch (``torch.inference_mode``, channels_last), the ceiling; timed right before
  and right after the end-to-end pass, and their mean is the reference (the
  machines are shared: a single raw figure can be off by 2x);
- end to end: `models.embed.embed_run` (reading fields, illumination correction,
  cropping at the stored centroids, reading the stored cell masks, per-plate
  scaling, DataLoader, forward, grouped transactions into the store), timed
  over its embedding loop.

Run: ``python benchmarks/bench_embed_throughput.py [--sizes 64 96 128] [--device cpu]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import save  # noqa: E402
from db.session import make_engine  # noqa: E402
from models.backbones import create_backbone  # noqa: E402
from models.embed import CellEmbedder, embed_run  # noqa: E402
from pipeline.config import EmbedConfig, config_from_dict  # noqa: E402
from pipeline.images.demo import CHANNELS, write_demo_plate  # noqa: E402
from pipeline.run import run_experiment  # noqa: E402


def raw_forward(
    model: torch.nn.Module, *, size: int, batch: int, n: int, device
) -> float:  # size: the crops' side before the recipe resizes them
    """Return crops/s of the forward pass alone over `n` distinct random crops.

    The crops are made beforehand and already in memory (on the device), so only
    the forward passes are timed; distinct crops per batch, as real ones are
    (re-feeding one cache-hot batch overstates the speed by up to 1.5x at 96 px).
    """
    data = torch.randn(n, 3, size, size, device=device)
    masks = torch.rand(n, size, size, device=device) < 0.3  # cell pooling weighs
    with torch.inference_mode():
        model(
            data[:batch].contiguous(memory_format=torch.channels_last), masks[:batch]
        )  # warm-up
        start = time.perf_counter()
        for lo in range(0, n - batch + 1, batch):
            model(
                data[lo : lo + batch].contiguous(memory_format=torch.channels_last),
                masks[lo : lo + batch],
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (n // batch) * batch / (time.perf_counter() - start)


def summary_crop_size(engine, run_id: int) -> int:
    """The recipe's default crop side on this run (four median nucleus diameters)."""
    from pipeline.cells.stored import iter_field_crops

    return next(iter_field_crops(engine, run_id)).crops.shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_plate(Path(tmp) / "demo", n_plates=1, fields_per_well=2)
        url = f"sqlite:///{tmp}/bench.db"
        config = config_from_dict(
            {"input": {"layout": "imagexpress", "channels": CHANNELS}}
        )
        summary = run_experiment(
            demo["images"], demo["platemap"], config=config, db_url=url
        )
        engine = make_engine(url, create=False)
        backbone, _ = create_backbone(in_chans=3)
        recipe = EmbedConfig(batch_size=args.batch_size)
        crop = int(summary_crop_size(engine, summary.run_id))
        rows = {}
        for size in args.sizes:
            model = CellEmbedder(
                backbone, strategy=recipe.strategy, layer=recipe.layer, input_size=size,
                pool=recipe.pool,
            ).eval()  # fmt: skip
            model = model.to(device).to(memory_format=torch.channels_last)
            raws = [
                raw_forward(
                    model, size=crop, batch=args.batch_size, n=2048, device=device
                )
            ]
            start = time.perf_counter()
            result = embed_run(
                engine,
                summary.run_id,
                EmbedConfig(input_size=size, batch_size=args.batch_size),
                device=args.device,
            )
            total = time.perf_counter() - start
            raws.append(
                raw_forward(
                    model, size=crop, batch=args.batch_size, n=2048, device=device
                )
            )
            raw = sum(raws) / 2
            # embed_run's own figure times its loop over fields (read .. write);
            # `total` also includes model creation and the control-range fit
            rows[size] = {
                "crop_px": crop,
                "raw_forward_crops_per_s": round(raw, 1),
                "raw_before_after": [round(r, 1) for r in raws],
                "end_to_end_crops_per_s": round(result["cells_per_s"], 1),
                "ratio": round(result["cells_per_s"] / raw, 3),
                "cells": result["n_cells"],
                "fields": result["n_fields"],
                "with_setup_s": round(total, 2),
            }
            # a second size needs a fresh feature set: drop this one's vectors
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "DELETE FROM cell_vector WHERE feature_set_id IN "
                    "(SELECT id FROM feature_set WHERE kind = 'embedding')"
                )
                connection.exec_driver_sql(
                    "DELETE FROM feature_set WHERE kind = 'embedding'"
                )
            print(
                f"{size} px: raw forward {raw:.0f} crops/s, end to end "
                f"{result['cells_per_s']:.0f} crops/s ({rows[size]['ratio']:.0%}), "
                f"{result['n_cells']} cells"
            )
    save(
        "embed_throughput",
        {
            "command": "python benchmarks/bench_embed_throughput.py",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "model": f"tf_efficientnet_lite0, {recipe.strategy} x 3 channels, "
            f"{recipe.layer}, pool {recipe.pool}, batch {args.batch_size}",
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
