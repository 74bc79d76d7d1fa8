"""Nuclei segmentation accuracy on real DSB2018 fluorescence images (AP at IoU t).

Images of ../shared/data/segmentation/dsb2018_dev are split at random (seed 0) into a
tuning half, on which the defaults of the ``classical`` segmenter were chosen and
the shipped ``unet`` weights were trained (``train_default_segmenter.py``), and a
report half, which neither tuning nor training saw. Both halves are scored (the
tune half is training data for ``unet``), with no per-image settings, and with a
plain Otsu + distance-transform watershed for reference. AP(t) = TP / (TP + FP +
FN), pooled over images; per image-size group too. Each worker process uses one
torch thread.

``--bfloat16`` also scores the U-Net in bfloat16 (``segment.precision``; fast on CPUs
with AMX tiles).

Run: ``python benchmarks/bench_segmentation_dsb.py [--workers 2] [--weights FILE]
[--flips] [--bfloat16]``
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.io import imread
from skimage.segmentation import watershed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import save  # noqa: E402
from models.segmenter import segment_nuclei_unet  # noqa: E402
from pipeline.cells.segeval import average_precision, match_counts  # noqa: E402
from pipeline.cells.segment import segment_nuclei  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/segmentation/dsb2018_dev"
SHOWN = (0.5, 0.75, 0.9)


def otsu_watershed(image: np.ndarray) -> np.ndarray:
    """The plain reference: Otsu on a lightly smoothed image, distance watershed."""
    smoothed = ndi.gaussian_filter(image.astype(np.float32), 1)
    if smoothed.max() <= smoothed.min():
        return np.zeros(image.shape, np.int32)
    mask = ndi.binary_fill_holes(smoothed > threshold_otsu(smoothed))
    distance = ndi.distance_transform_edt(mask)
    components, _ = ndi.label(mask)
    peaks = peak_local_max(distance, min_distance=5, labels=components)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


METHODS = {
    "classical": segment_nuclei,
    "otsu + watershed": otsu_watershed,
    "unet": segment_nuclei_unet,
}


def _init_worker(weights: str | None, flips: bool, bfloat16: bool) -> None:
    """One torch thread per worker; the unet method with the chosen weights."""
    torch.set_num_threads(1)
    METHODS["unet"] = functools.partial(segment_nuclei_unet, weights=weights)
    if flips:
        METHODS["unet + flips"] = functools.partial(
            segment_nuclei_unet, weights=weights, flips=True
        )
    if bfloat16:
        METHODS["unet bfloat16"] = functools.partial(
            segment_nuclei_unet, weights=weights, precision="bfloat16"
        )


def score_image(row: dict) -> pd.DataFrame:
    image = imread(DATA / row["image_file"])
    truth = tifffile.imread(DATA / row["label_file"])
    out = []
    for method, function in METHODS.items():
        start = time.perf_counter()
        labels = function(image)
        seconds = time.perf_counter() - start
        counts = match_counts(truth, labels)
        out.append(
            counts.assign(
                method=method,
                image_id=row["image_id"],
                size=row["size"],
                split=row["split"],
                seconds=seconds,
                pixels=image.size,
            )
        )
    return pd.concat(out)


def summarize(counts: pd.DataFrame) -> dict[str, float]:
    ap = average_precision(counts)
    figures = {f"AP@{t}": round(float(ap.loc[t]), 4) for t in SHOWN}
    figures["mAP@0.5:0.95"] = round(float(ap.mean()), 4)
    figures["images"] = int(counts["image_id"].nunique())
    figures["true_nuclei"] = int(counts.drop_duplicates("image_id")["n_true"].sum())
    return figures


def dsb_split() -> pd.DataFrame:
    """The dev set's metadata with ``split`` = "tune" or "report" (numpy seed 0)."""
    meta = pd.read_csv(DATA / "metadata.csv")
    rng = np.random.default_rng(0)
    meta["split"] = np.where(rng.random(len(meta)) < 0.5, "tune", "report")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--weights", help="unet weights (default: the shipped ones)")
    parser.add_argument("--flips", action="store_true", help="also unet + test flips")
    parser.add_argument("--bfloat16", action="store_true", help="also unet in bfloat16")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data.")
    meta = dsb_split()
    start = time.perf_counter()
    init = (args.weights, args.flips, args.bfloat16)
    with ProcessPoolExecutor(
        args.workers, initializer=_init_worker, initargs=init
    ) as pool:
        counts = pd.concat(pool.map(score_image, meta.to_dict("records"), chunksize=4))
    elapsed = time.perf_counter() - start
    results: dict[str, dict] = {}
    for (method, split), group in counts.groupby(["method", "split"], sort=False):
        results.setdefault(method, {})[split] = summarize(group)
        by_size = {
            size: summarize(g)
            for size, g in group.groupby("size")
            if g["image_id"].nunique() >= 1
        }
        results[method][f"{split}_by_size"] = by_size
        per_image = group.drop_duplicates("image_id")
        results[method][f"{split}_ms_per_megapixel"] = round(
            1000 * per_image["seconds"].sum() / (per_image["pixels"].sum() / 1e6), 1
        )
    for method, figures in results.items():
        print(f"\n{method}")
        for split in ("tune", "report"):
            print(f"  {split:6s} {figures[split]}")
        print("  report split by image size (AP@0.5, images):")
        for size, fig in figures["report_by_size"].items():
            print(f"    {size:10s} {fig['AP@0.5']:.3f}  ({fig['images']})")
    by_size = pd.DataFrame(
        {
            method: {size: f["AP@0.5"] for size, f in figures["report_by_size"].items()}
            for method, figures in results.items()
        }
    )
    print("\nreport half, AP@0.5 per image size, side by side:")
    print(by_size.to_string())
    save(
        "segmentation_dsb2018",
        {
            "command": "python benchmarks/bench_segmentation_dsb.py"
            + (f" --weights {args.weights}" if args.weights else "")
            + (" --flips" if args.flips else "")
            + (" --bfloat16" if args.bfloat16 else ""),
            "split": "random half (numpy seed 0) tune / report of dsb2018_dev",
            "wall_s": round(elapsed, 1),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
