"""Per-field time with and without `pipeline.memory.keep_freed_memory`, side by side.

glibc maps blocks over its threshold (at most 32 MiB) fresh from the kernel and
trims its heap's free top, so a process segmenting field after field page-faults
and zero-fills its large arrays again for each field; `keep_freed_memory` (applied
in a run's Dask workers) keeps them. Each round runs, in fresh processes on one
core (``taskset -c 0``, one thread), `segment_field` + `measure_cells` (default
features) of the two 1080 px fields of ``bench_vs_cellprofiler.py`` (JUMP and
pediatric, DNA + cell stain) with the setting and without it, for each segmenter,
alternating. Reported per
segmenter: median seconds per field over ``--repeats`` passes after a warm-up
pass, per round, and the speed-up of the medians; the U-Net's pass over a 768 px
tile alone (median of 3 after a warm-up); each process's peak and final resident
size (after the timed passes; the U-Net's from after its tile passes).

    python benchmarks/bench_field_memory.py [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import save  # noqa: E402

ONE_FIELD_SET = """
import json, re, sys, time
import numpy as np, tifffile
from benchmarks.bench_vs_cellprofiler import FIELDS, measure_config
from pipeline.cells.segment import segment_field
from pipeline.measure.features import measure_cells
from pipeline.memory import keep_freed_memory
method, keep, repeats = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
if keep:
    keep_freed_memory()
options = measure_config({})
images = [np.stack([tifffile.imread(a), tifffile.imread(b)]) for a, b in FIELDS.values()]
def one(image):
    start = time.perf_counter()
    nuclei, cells = segment_field(image[0], image[1], method=method)
    segmented = time.perf_counter()
    measure_cells(image, nuclei, cells, channel_names=["DNA", "CELL"], options=options)
    return segmented - start, time.perf_counter() - segmented
for image in images:
    one(image)
steps = np.median([np.mean([one(i) for i in images], axis=0) for _ in range(repeats)], 0)
figures = {"segment_s": float(steps[0]), "measure_s": float(steps[1])}
if method == "unet":  # the network alone, one 768 px tile
    import torch
    from models.segmenter import cached_segmenter
    model = cached_segmenter(None)[0]
    tile = torch.rand(1, 1, 768, 768).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        passes = []
        for _ in range(4):
            start = time.perf_counter()
            model(tile)
            passes.append(time.perf_counter() - start)
    figures["unet_768px_pass_s"] = float(np.median(passes[1:]))
status = open("/proc/self/status").read()
figures["peak_rss_mib"] = int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) // 1024
figures["final_rss_mib"] = int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) // 1024
print(json.dumps(figures))
"""


def run_once(method: str, keep: bool, repeats: int) -> dict[str, float]:
    """Seconds per field (segment, measure, total) in a fresh one-core process."""
    command = [sys.executable, "-c", ONE_FIELD_SET, method, "on" if keep else "off",
               str(repeats)]  # fmt: skip
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    steps = json.loads(done.stdout.splitlines()[-1])
    return {**steps, "total_s": steps["segment_s"] + steps["measure_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segmenters", default="unet,classical")
    args = parser.parse_args()
    results = {}
    for method in args.segmenters.split(","):
        rounds = []
        for _ in range(args.rounds):
            rounds.append({
                "without": run_once(method, False, args.repeats),
                "with": run_once(method, True, args.repeats),
            })  # fmt: skip
        medians = {
            side: {
                key: float(np.median([r[side][key] for r in rounds]))
                for key in rounds[0][side]
            }
            for side in ("without", "with")
        }
        totals = {side: medians[side]["total_s"] for side in medians}
        results[method] = {
            "rounds": rounds,
            "medians": medians,
            "speedup": round(totals["without"] / totals["with"], 3),
        }
        print(
            f"{method}: {totals['without']:.3f} s/field without, {totals['with']:.3f} "
            f"s/field with keep_freed_memory ({results[method]['speedup']:.2f}x); "
            "rounds: " + ", ".join(
                f"{r['without']['total_s']:.3f}/{r['with']['total_s']:.3f}"
                for r in rounds
            )
            + "; peak / final resident MiB "
            + ", ".join(
                f"{side} {medians[side]['peak_rss_mib']:.0f} / "
                f"{medians[side]['final_rss_mib']:.0f}"
                for side in medians
            )
            + (
                f"; U-Net 768 px pass {medians['without']['unet_768px_pass_s']:.3f} s "
                f"without, {medians['with']['unet_768px_pass_s']:.3f} s with"
                if method == "unet" else ""
            )
        )  # fmt: skip
    save("field_memory", {
        "command": "python benchmarks/bench_field_memory.py "
                   f"--rounds {args.rounds} --repeats {args.repeats} "
                   f"--segmenters {args.segmenters}",
        "fields": "bench_vs_cellprofiler.FIELDS (JUMP, pediatric; 1080 px, 2 channels)",
        "results": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
