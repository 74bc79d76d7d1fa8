"""Per-field time with and without `pipeline.memory.keep_freed_memory`, side by side.

glibc maps blocks over its threshold (at most 32 MiB) fresh from the kernel and
trims its heap's free top, so a process segmenting field after field page-faults
and zero-fills its large arrays again for each field; `keep_freed_memory` (applied
by `segment_field`) keeps them. Each round runs, in fresh processes on one core
(``taskset -c 0``, one thread), `segment_field` + `measure_cells` (default
features) of the two 1080 px fields of ``bench_vs_cellprofiler.py`` (JUMP and
pediatric, DNA + cell stain) with the setting and without it (`segment_field`'s
reference patched to a no-op), for each segmenter, alternating. Reported per
segmenter: median seconds per field over ``--repeats`` passes after a warm-up
pass, per round, and the speed-up of the medians.

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
import json, sys, time
import numpy as np, tifffile
import pipeline.cells.segment as segment
from benchmarks.bench_vs_cellprofiler import FIELDS, measure_config
from pipeline.measure.features import measure_cells
method, keep, repeats = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
if not keep:
    segment.keep_freed_memory = lambda: False
options = measure_config({})
images = [np.stack([tifffile.imread(a), tifffile.imread(b)]) for a, b in FIELDS.values()]
def one(image):
    start = time.perf_counter()
    nuclei, cells = segment.segment_field(image[0], image[1], method=method)
    segmented = time.perf_counter()
    measure_cells(image, nuclei, cells, channel_names=["DNA", "CELL"], options=options)
    return segmented - start, time.perf_counter() - segmented
for image in images:
    one(image)
steps = np.median([np.mean([one(i) for i in images], axis=0) for _ in range(repeats)], 0)
print(json.dumps({"segment_s": float(steps[0]), "measure_s": float(steps[1])}))
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
        totals = {
            side: float(np.median([r[side]["total_s"] for r in rounds]))
            for side in ("without", "with")
        }
        results[method] = {
            "rounds": rounds,
            "median_total_s": totals,
            "speedup": round(totals["without"] / totals["with"], 3),
        }
        print(
            f"{method}: {totals['without']:.3f} s/field without, {totals['with']:.3f} "
            f"s/field with keep_freed_memory ({results[method]['speedup']:.2f}x); "
            "rounds: " + ", ".join(
                f"{r['without']['total_s']:.3f}/{r['with']['total_s']:.3f}"
                for r in rounds
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
