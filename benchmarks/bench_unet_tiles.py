"""U-Net tiling: tiles sized to the field (`models.segmenter.tile_side`) vs full tiles.

The learned segmenter predicts fields larger than 1024 px (at network scale, after
rescaling nuclei to 20 px) tile by tile. Cutting full 1024 px tiles ran a
1080 px field as four 1024 px tiles (3.6x its area); `tile_side` covers it with
four 576 px tiles (1.14x). Both tilings run side by side here, in one process
(the earlier one by patching `tile_side` to return full tiles), on demo fields
drawn at JUMP density (`pipeline.images.demo.render_field`, ~200 nuclei):
1080 px fields with 20 px nuclei and 2160 px fields with 40 px nuclei (unbinned
1080 px optics), the nucleus diameter given (as ``[segment] nucleus_diameter_px``
does) or estimated. One core, one torch thread; the best of ``--repeats`` runs of
`segment_field` (nuclei and cells). Reported: seconds per field, the speed-up,
the nuclei found and the share of pixels whose nucleus/background call agrees.

    python benchmarks/bench_unet_tiles.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save  # noqa: E402

import models.segmenter as segmenter  # noqa: E402
from pipeline.cells.segment import segment_field  # noqa: E402
from pipeline.images.demo import cell_params, render_field, vignetting  # noqa: E402

CASES = (  # (field px, nucleus diameter px, diameter given?)
    (1080, 20, True), (1080, 20, False), (2160, 40, True), (2160, 40, False),
)  # fmt: skip


def full_tiles(length: int, tile_px: int, overlap_px: int, multiple: int) -> int:
    """The earlier tiling: tiles of `tile_px` whatever the field's size."""
    return min(length, tile_px)


def best_time(image: np.ndarray, diameter: float | None, repeats: int):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        nuclei, _ = segment_field(image[0], image[1], nucleus_diameter_px=diameter)
        times.append(time.perf_counter() - start)
    return min(times), nuclei


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    balanced = segmenter.tile_side
    rows = []
    for size, diameter, given in CASES:
        rng = np.random.default_rng(size)
        image, truth, _ = render_field(
            cell_params("none", 0.0, rng, 200), shape=(size, size),
            illumination=vignetting((size, size), rng),
            nucleus_radius_px=diameter / 2, rng=rng, n_channels=2,
        )  # fmt: skip
        image = image.astype(np.float32)
        segment_field(image[0, :256, :256], image[1, :256, :256])  # load the model
        segmenter.tile_side = full_tiles
        full_s, full = best_time(image, diameter if given else None, args.repeats)
        segmenter.tile_side = balanced
        new_s, new = best_time(image, diameter if given else None, args.repeats)
        rows.append({
            "field_px": size, "nucleus_diameter_px": diameter,
            "diameter": "given" if given else "estimated",
            "true_nuclei": int(truth.max()),
            "full_tiles_s": round(full_s, 3), "fitted_tiles_s": round(new_s, 3),
            "speedup": round(full_s / new_s, 2),
            "nuclei_full_tiles": int(full.max()), "nuclei_fitted_tiles": int(new.max()),
            "foreground_agreement": round(float(((full > 0) == (new > 0)).mean()), 6),
        })  # fmt: skip
        print(rows[-1])
    save("unet_tiles", {"command": "python benchmarks/bench_unet_tiles.py "
                        f"--repeats {args.repeats}", "threads": 1, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
