"""Plate time on a GPU machine: segmentation, measurement, embedding and fine-tuning.

One script to run whenever a CUDA machine is available (it runs on CPU too and says
so). It draws real-size fields (`pipeline.images.demo.render_field`: 1080 px, 5 channels,
about 200 nuclei of 20 px, as a JUMP Cell Painting field) and measures, side by side:

- segmentation: `pipeline.cells.segment.segment_field` with the U-Net on the device
  (``segment.device = "cuda"``: bfloat16) and on the CPU, seconds per field;
- measurement: `pipeline.measure.features.measure_cells` (CPU), seconds per field;
- embedding: the default recipe's `models.embed.CellEmbedder` (each channel as RGB,
  ``blocks[3]``, 64 px, cell pooling) as `models.embed.embed_run` runs it
  (`models.backbones.on_device`, `models.embed.embed_with_backoff`: channels-last;
  on CUDA bfloat16 autocast and pinned memory), crops per second at the default
  batch (`pipeline.config.embed_batch_size`: 32 on CUDA, 8 on a CPU for this
  recipe with 5 channels) and at 256;
- fine-tuning: epochs of `models.train.fine_tune` with the default recipe
  (`fine_tune_seconds_per_cell`), cells per second per epoch, frozen and unfrozen.

It then projects the time of a 384-well x 9-field plate (3,456 fields, about 690,000
cells) on a machine of `--cores` CPU cores and one GPU: segmentation on the GPU (one
queue; without a GPU, spread over the cores), measurement spread over the cores,
embedding every cell at the default batch, and the default fine-tuning
(`models.train.TrainConfig`: 16,000 cells, every epoch run).

    python benchmarks/bench_gpu_plate.py [--fields 6] [--cores 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

from models.backbones import on_device  # noqa: E402
from models.embed import build_embedder, embed_with_backoff  # noqa: E402
from models.train import TrainConfig, fine_tune  # noqa: E402
from pipeline.cells.crops import crop_cells  # noqa: E402
from pipeline.cells.segment import segment_field  # noqa: E402
from pipeline.config import EmbedConfig, embed_batch_size  # noqa: E402
from pipeline.images.demo import CHANNELS_5, cell_params, render_field, vignetting  # noqa: E402
from pipeline.measure.features import measure_cells  # noqa: E402

FIELDS_PER_PLATE = 384 * 9


def real_size_fields(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` JUMP-like fields (5, 1080, 1080) of about 200 DMSO cells."""
    rng = np.random.default_rng(seed)
    illumination = vignetting((1080, 1080), rng)
    return [
        render_field(cell_params("none", 0.0, rng, 200), shape=(1080, 1080),
                     illumination=illumination, nucleus_radius_px=10.0, rng=rng,
                     n_channels=5)[0]
        for _ in range(n)
    ]  # fmt: skip


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def fine_tune_seconds_per_cell(
    data: np.ndarray, masks: np.ndarray, device: torch.device
) -> dict[str, float]:
    """Seconds per cell of an epoch of `models.train.fine_tune`, frozen and unfrozen.

    The product's own loop and default recipe (augmentation, bfloat16 autocast on
    CUDA, the weights' moving average, validation; random labels of 16 classes):
    four epochs of each phase, of which the first is left out (it pays warm-up)
    and the mean of the other three kept. An epoch's seconds (training and
    validation; not the saving of the training state that `phenoscreen train`
    adds after each epoch) are divided by all its cells.
    """
    config = replace(TrainConfig(), epochs=8, warmup_epochs=4, patience=8)
    rng = np.random.default_rng(0)
    labels = np.array([f"class_{k % 16}" for k in range(len(data))])
    is_val = rng.random(len(data)) < config.val_fraction
    log = fine_tune(data, labels, is_val, config, masks=masks, device=str(device)).log
    return {
        phase: float(log.loc[log["phase"] == phase, "seconds"].iloc[1:].mean())
        / len(data)
        for phase in ("frozen", "unfrozen")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=6)
    parser.add_argument("--cores", type=int, default=16)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print("device:", torch.cuda.get_device_name(0) if cuda else
          "no CUDA device: every figure below is from the CPU")  # fmt: skip
    fields = real_size_fields(args.fields)
    names = list(CHANNELS_5)
    figures: dict[str, object] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),  # embedding and fine-tuning on CPU
        "fields": args.fields,
    }
    seconds = {"segment_cpu": 0.0, "segment_device": 0.0, "measure": 0.0}
    crops, masks, n_cells = [], [], 0
    segment_field(fields[0][0], fields[0][1], device="cpu")  # loads the U-Net
    for image in fields:
        (nuclei, cells), t_cpu = timed(segment_field, image[0], image[1], device="cpu")
        seconds["segment_cpu"] += t_cpu
        if cuda:
            segment_field(image[0], image[1], device="cuda")  # warm-up per size
            _, t_gpu = timed(segment_field, image[0], image[1], device="cuda")
            seconds["segment_device"] += t_gpu
        (table, _), t_measure = timed(
            measure_cells, image, nuclei, cells, channel_names=names
        )
        seconds["measure"] += t_measure
        n_cells += int(nuclei.max())
        centroids = table[["centroid_y", "centroid_x"]].to_numpy()
        field_crops, field_masks = crop_cells(
            image.astype(np.float32), centroids, 64, cell_labels=cells,
            object_numbers=table["object_number"].to_numpy(),
        )  # fmt: skip
        crops.append(field_crops)
        masks.append(field_masks)
    per_field = {k: v / args.fields for k, v in seconds.items()}
    if not cuda:
        per_field["segment_device"] = per_field["segment_cpu"]
    cells_per_field = n_cells / args.fields
    data, data_masks = np.concatenate(crops), np.concatenate(masks)
    data = (data / np.percentile(data, 99.9, axis=(0, 2, 3), keepdims=True)).astype(
        np.float32
    )  # a plate-like scaling; the rate does not depend on it
    recipe = EmbedConfig()  # as `models.embed.embed_run` runs it
    embedder, info = build_embedder(recipe, len(names))
    embedder = on_device(embedder, device)
    embed_rates = {}
    default = embed_batch_size(
        device.type, recipe.batch_size,
        pixels_per_crop=embedder.pixels_per_crop(len(names), data.shape[-1]),
    )  # fmt: skip
    for batch in (default, 256):  # the device's default, and a large one for GPUs
        warm = data[: 2 * batch], data_masks[: 2 * batch]
        embed_with_backoff(embedder, *warm, batch_size=batch, device=device)
        (_, used), t_embed = timed(
            embed_with_backoff, embedder, data, data_masks, batch_size=batch,
            device=device,
        )  # fmt: skip
        embed_rates[f"batch_{batch}"] = {
            "crops_per_s": round(len(data) / t_embed),
            "batch_used": used,  # smaller when the GPU ran out of memory
        }
    embed_rate = embed_rates[f"batch_{default}"]["crops_per_s"]
    train_seconds = fine_tune_seconds_per_cell(data, data_masks, device)
    train = TrainConfig()
    plate_cells = cells_per_field * FIELDS_PER_PLATE
    queues = 1 if cuda else args.cores  # one GPU, or the U-Net on every core
    plate = {
        "segment_h": per_field["segment_device"] * FIELDS_PER_PLATE / queues / 3600,
        "measure_on_cores_h": per_field["measure"]
        * FIELDS_PER_PLATE
        / args.cores
        / 3600,
        "embed_h": plate_cells / embed_rate / 3600,
        "fine_tune_h": train.max_cells
        * (
            train.warmup_epochs * train_seconds["frozen"]
            + (train.epochs - train.warmup_epochs) * train_seconds["unfrozen"]
        )
        / 3600,
    }
    plate["total_h"] = (
        max(plate["segment_h"], plate["measure_on_cores_h"])
        + plate["embed_h"] + plate["fine_tune_h"]
    )  # fmt: skip
    figures |= {
        "cells_per_field": round(cells_per_field, 1),
        "seconds_per_field": {k: round(v, 3) for k, v in per_field.items()},
        "embed": embed_rates,
        "fine_tune_cells_per_s_per_epoch": {
            phase: round(1 / v, 1) for phase, v in train_seconds.items()
        },
        "embedder": info["name"],
        f"plate_384x9_on_{args.cores}_cores_and_{'1 GPU' if cuda else 'no GPU'}": {
            k: round(v, 2) for k, v in plate.items()
        },
        "note": "segmentation and measurement overlap (the GPU's queue and the CPU "
        "workers), so the total takes the slower of the two, then embedding and "
        "fine-tuning (every epoch of the default recipe: early stopping can end "
        "sooner); embedding at the default batch; without a GPU the segmentation "
        "also shares the cores (optimistic), and embedding and fine-tuning run at "
        "this machine's torch_threads, not on all the cores",
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    save("gpu_plate" if cuda else "gpu_plate_cpu_only", figures)


if __name__ == "__main__":
    main()
