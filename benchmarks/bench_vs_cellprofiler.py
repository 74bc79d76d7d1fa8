"""Segmentation + features side by side with CellProfiler 5 on real 1080x1080 fields.

Both tools get the same two-channel fields (nuclear stain DNA, cell-body stain CELL)
from ../shared/data/fields/cellpainting_fovs_cytodataframe (the JUMP CPJUMP1 field
with AGP, the pediatric-atlas field with AGP), each written ``--copies`` times, and
run on one core (``taskset -c 0``, one thread), one after the other in this run.
Ours runs twice per segmenter: with the default features (more modules than the
CellProfiler pipeline: granularity, texture at scales 3 and 5, the cytoplasm
compartment, radial distribution, neighbours) and with ``cellprofiler_modules``
(nuclei and cells only, texture at scale 3 only, no granularity: CellProfiler's
modules, plus the radial and neighbour features ours always measures).
CellProfiler runs the peer pipeline ../shared/peers/cellprofiler/nuc_cell_csv.cppipe
(nuclei by Otsu + shape declumping, cells by propagation, size/shape with Zernike,
intensity, texture at scale 3, CSV export); its per-field time is the difference
of a run over all image sets and a run over the first one (start-up removed).
PhenoScreen runs `segment_field` + `measure_cells` on the same files (in a process
that keeps freed memory, `pipeline.memory.keep_freed_memory`, as a run's workers
do), for each
segmenter (``--segmenters classical,unet``: the learned U-Net also on one core, one
torch thread; ``unet-bfloat16`` is the U-Net with ``segment.precision = "bfloat16"``,
fast on CPUs with AMX tiles, whose flags the machine facts record) and each of the two
feature sets below.

Also reported: nuclei counts per field against CellProfiler's (this run, and the
CellProfiler masks shipped with the data: 5 NF1 fields, the pediatric and JUMP
fields).

This machine's speed drifts by 10-20 % within minutes, so the run repeats in
``--rounds`` (default 3): each round times CellProfiler, then every PhenoScreen
configuration; a ratio is taken within each round and the medians are reported.
``--baseline DIR`` also times another PhenoScreen checkout (made with ``git worktree
add DIR <commit>``; the default features, each segmenter) in the same rounds, so a
code change is measured side by side with the code before it; its own
``bench_vs_cellprofiler.measure_config`` / ``segment_options`` and
``pipeline.memory.keep_freed_memory`` run there (c00f1d2 has them).

Needs CellProfiler 5: ``bash ../shared/peers/cellprofiler/install_cellprofiler5.sh
/tmp/cp5``. Run: ``python benchmarks/bench_vs_cellprofiler.py --cellprofiler
/tmp/cp5/bin/cellprofiler``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from skimage.io import imread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import commit, save  # noqa: E402
from pipeline.cells.segment import check_segmenter, segment_field  # noqa: E402
from pipeline.config import MeasureConfig  # noqa: E402
from pipeline.errors import InputError  # noqa: E402

SHARED = ROOT.parent / "shared"
FOVS = SHARED / "data/fields/cellpainting_fovs_cytodataframe"
PIPELINE = SHARED / "peers/cellprofiler/nuc_cell_csv.cppipe"
FIELDS = {
    "jump": (
        FOVS / "JUMP_plate_BR00117006/images/orig/r01c01f01p01-ch5sk1fk1fl1.tiff",
        FOVS / "JUMP_plate_BR00117006/images/orig/r01c01f01p01-ch2sk1fk1fl1.tiff",
    ),
    "pediatric": (
        FOVS
        / "pediatric_cancer_atlas_profiling/images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff",  # noqa: E501
        FOVS
        / "pediatric_cancer_atlas_profiling/images/orig/r03c03f03p01-ch3sk1fk1fl1.tiff",  # noqa: E501
    ),
}
_NOT_FEATURES = (
    "ImageNumber",
    "ObjectNumber",
    "Location_",
    "Number_",
    "Parent_",
    "Children_",
)  # noqa: E501
MEASURES = {  # MeasureConfig arguments per feature set
    "default": {},
    # the CellProfiler pipeline's modules: nuclei and cells, texture at scale 3
    # only, no granularity; ours still adds radial distribution and neighbours
    "cellprofiler_modules": {
        "texture_scales": [3],
        "granularity_scales": 0,
        "cytoplasm": False,
    },
}
_ONE_CORE = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}  # noqa: E501

OURS = """
import json, sys, time
import numpy as np, tifffile
from benchmarks.bench_vs_cellprofiler import measure_config, segment_options
from pipeline.measure.features import measure_cells
from pipeline.cells.segment import segment_field
from pipeline.memory import keep_freed_memory
keep_freed_memory()  # as in a run's Dask workers
options = measure_config(json.loads(sys.argv[3]))
rows = []
for dna, cell in json.loads(sys.argv[1]):
    start = time.perf_counter()
    image = np.stack([tifffile.imread(dna), tifffile.imread(cell)])
    read = time.perf_counter()
    nuclei, cells = segment_field(image[0], image[1], **segment_options(sys.argv[2]))
    seg = time.perf_counter()
    table, features = measure_cells(image, nuclei, cells, channel_names=["DNA", "CELL"],
                                    options=options)
    end = time.perf_counter()
    rows.append({"read_s": read - start, "segment_s": seg - read,
                 "measure_s": end - seg, "total_s": end - start,
                 "n_nuclei": len(table), "n_features": features.shape[1]})
print(json.dumps(rows))
"""


def one_core(command: list[str]) -> list[str]:
    """Pin a command to core 0 when taskset exists."""
    return ["taskset", "-c", "0", *command] if shutil.which("taskset") else command


def segment_options(segmenter: str) -> dict[str, str]:
    """`segment_field` options of a ``--segmenters`` entry (``unet-bfloat16``: in bfloat16)."""
    method, _, precision = segmenter.partition("-")
    return {"method": method} | ({"precision": precision} if precision else {})


def outline_count(outlines: np.ndarray) -> int:
    """Objects enclosed by an outline image (the largest region is background)."""
    lines = outlines.reshape(outlines.shape[0], outlines.shape[1], -1).max(-1) > 0
    regions, n = ndi.label(~lines)
    sizes = np.bincount(regions.ravel())[1:]
    return int((sizes >= 10).sum()) - 1 if n else 0


def shipped_masks(segmenters: list[str]) -> list[dict]:
    """Nuclei counts of CellProfiler masks/outlines shipped with the data vs ours."""
    rows = []
    nf1 = FOVS / "NF1_cellpainting_data_shrunken"

    def ours(plane: np.ndarray) -> dict[str, int]:
        return {
            f"phenoscreen_{name}": int(
                segment_field(plane, **segment_options(name))[0].max()
            )
            for name in segmenters
        }

    for mask in sorted((nf1 / "Plate_2_masks").glob("*_MaskNuclei.tiff")):
        name = mask.name.replace("_MaskNuclei.tiff", ".tif")
        rows.append(
            {
                "field": f"NF1 {name}",
                "cellprofiler": int(ndi.label(tifffile.imread(mask) > 0)[1]),
                **ours(tifffile.imread(nf1 / "Plate_2_images" / name)),
            }
        )
    pediatric = FOVS / "pediatric_cancer_atlas_profiling/images/outlines"
    jump = FOVS / "JUMP_plate_BR00117006/images/outlines"
    for field, outline in (
        ("pediatric", pediatric / "NucleiOutlines_BR00143976_C03_3.tiff"),
        ("jump", jump / "r01c01f01p01-ch5sk1fk1fl1_nuclei_outlines.png"),
    ):
        rows.append(
            {
                "field": field,
                "cellprofiler": outline_count(imread(outline)),
                **ours(tifffile.imread(FIELDS[field][0])),
            }
        )
    return rows


def measure_config(options: dict) -> MeasureConfig:
    """A `MeasureConfig` from JSON arguments (lists become tuples)."""
    return MeasureConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    )


def run_ours(
    pairs: list[list[str]],
    method: str,
    options: dict,
    env: dict[str, str],
    checkout: Path = ROOT,
) -> dict:
    """Segment and measure the fields in a fresh one-core process; its figures.

    `checkout` is the PhenoScreen whose code runs (this one by default): the
    process starts in it, as ``python -c`` puts its working folder first on the path.
    Times are not rounded (ratios are taken from them).
    """
    start = time.perf_counter()
    done = subprocess.run(
        one_core([sys.executable, "-c", OURS, json.dumps(pairs), method,
                  json.dumps(options)]),
        env=env | {"PYTHONPATH": str(checkout)},
        cwd=checkout,
        capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"PhenoScreen ({checkout}) failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    rows = pd.DataFrame(json.loads(done.stdout.strip().splitlines()[-1]))
    warm = rows.iloc[1:] if len(rows) > 1 else rows  # the first pays imports
    return {
        "wall_all_s": wall,
        "per_field_s": float(warm["total_s"].mean()),
        "per_field_steps_s": {
            c: float(warm[c].mean()) for c in ("read_s", "segment_s", "measure_s")
        },
        "nuclei_per_field": rows["n_nuclei"].tolist(),
        "features_per_cell": int(rows["n_features"].iloc[0]),
    }


def over_rounds(runs: list[dict], cp_per_field: list[float]) -> dict:
    """One configuration's figures over the rounds: medians, and each round's.

    ``speedup_per_field`` is the median of the rounds' ratios (CellProfiler's
    per-field time in that round over ours).
    """
    times = [run["per_field_s"] for run in runs]
    ratios = [cp / ours for cp, ours in zip(cp_per_field, times, strict=True)]
    steps = {
        step: round(float(np.median([run["per_field_steps_s"][step] for run in runs])), 3)
        for step in runs[0]["per_field_steps_s"]
    }  # fmt: skip
    return {
        "wall_all_s": [round(run["wall_all_s"], 2) for run in runs],
        "per_field_s": round(float(np.median(times)), 3),
        "per_field_s_rounds": [round(t, 3) for t in times],
        "per_field_steps_s": steps,
        "nuclei_per_field": runs[0]["nuclei_per_field"],
        "features_per_cell": runs[0]["features_per_cell"],
        "speedup_per_field": round(float(np.median(ratios)), 2),
        "speedup_per_field_rounds": [round(r, 2) for r in ratios],
    }


def cellprofiler_features(out: Path) -> int:
    count = 0
    for table in ("Nuclei", "Cells"):
        columns = pd.read_csv(out / f"{table}.csv", nrows=1).columns
        count += sum(not c.startswith(_NOT_FEATURES) for c in columns)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cellprofiler", default="/tmp/cp5/bin/cellprofiler")
    parser.add_argument("--copies", type=int, default=3, help="copies of each field")
    parser.add_argument("--segmenters", default="classical,unet")
    parser.add_argument("--rounds", type=int, default=3, help="repeats, interleaved")
    parser.add_argument(
        "--baseline", type=Path, help="another PhenoScreen checkout to time alongside"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit(f"--rounds {args.rounds}: give at least 1.")
    if args.baseline and not (args.baseline / "pipeline/measure/features.py").is_file():
        sys.exit(
            f"--baseline {args.baseline} is not a PhenoScreen checkout; make one "
            "with: git worktree add DIR <commit>"
        )
    segmenters = args.segmenters.split(",")
    for name in segmenters:  # a misspelt entry stops here, not after CellProfiler ran
        try:
            check_segmenter(**segment_options(name))
        except InputError as exc:
            sys.exit(f"--segmenters {name}: {exc}")
    if not FOVS.is_dir():
        sys.exit(f"{FOVS} is absent: this benchmark needs ../shared/data.")
    if not Path(args.cellprofiler).exists():
        sys.exit(
            f"{args.cellprofiler} not found; install CellProfiler 5 with "
            "bash ../shared/peers/cellprofiler/install_cellprofiler5.sh /tmp/cp5"
        )
    env = os.environ | _ONE_CORE
    work = Path(tempfile.mkdtemp(prefix="bench_cp_"))
    images = work / "in"
    images.mkdir()
    pairs = []
    k = 0
    for _ in range(args.copies):
        for dna, cell in FIELDS.values():
            k += 1
            for stain, source in (("DNA", dna), ("CELL", cell)):
                tifffile.imwrite(
                    images / f"field{k}_{stain}.tif", tifffile.imread(source)
                )
            pairs.append(
                [str(images / f"field{k}_DNA.tif"), str(images / f"field{k}_CELL.tif")]
            )  # noqa: E501
    n_sets = len(pairs)

    def cellprofiler(out: Path, first_only: bool) -> float:
        command = [args.cellprofiler, "-c", "-r", "-p", str(PIPELINE), "-i", str(images),
                   "-o", str(out), "-e", "imageio_reader"]  # fmt: skip
        if first_only:
            command += ["-f", "1", "-l", "1"]
        start = time.perf_counter()
        done = subprocess.run(
            one_core(command), env=env, capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"CellProfiler failed:\n{done.stderr[-3000:]}")
        return time.perf_counter() - start

    configurations = [
        (
            method if measure == "default" else f"{method}_{measure}",
            method,
            options,
            ROOT,
        )
        for method in segmenters
        for measure, options in MEASURES.items()
    ]
    if args.baseline:
        configurations += [(f"baseline_{method}", method, {}, args.baseline)
                           for method in segmenters]  # fmt: skip
    cp_rounds: list[dict] = []
    runs: dict[str, list[dict]] = {name: [] for name, *_ in configurations}
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}/{args.rounds}: CellProfiler 5 on {n_sets} fields "
              "(1080x1080, DNA + CELL), one core ...")  # fmt: skip
        cp_all = cellprofiler(work / "cp_all", first_only=False)
        cp_one = cellprofiler(work / "cp_one", first_only=True)
        cp_rounds.append({"all": cp_all, "one": cp_one,
                          "per_field": (cp_all - cp_one) / (n_sets - 1)})  # fmt: skip
        for name, method, options, checkout in configurations:
            print(f"round {round_}/{args.rounds}: PhenoScreen {name}, one core ...")
            runs[name].append(run_ours(pairs, method, options, env, checkout))
    cp_per_field = [r["per_field"] for r in cp_rounds]
    nuclei_csv = pd.read_csv(work / "cp_all" / "Nuclei.csv")
    cp_counts = nuclei_csv.groupby("ImageNumber").size().tolist()
    ours = {}
    for name, method, options, _ in configurations:
        ours[name] = over_rounds(runs[name], cp_per_field) | {
            "measure_options": options
        }
        if args.baseline and not name.startswith("baseline_") and not options:
            before = [run["per_field_s"] for run in runs[f"baseline_{method}"]]
            now = [run["per_field_s"] for run in runs[name]]
            ratios = [b / n for b, n in zip(before, now, strict=True)]
            ours[name]["speedup_vs_baseline_rounds"] = [round(r, 3) for r in ratios]
            ours[name]["speedup_vs_baseline"] = round(float(np.median(ratios)), 3)
    figures = {
        "command": "python benchmarks/bench_vs_cellprofiler.py --segmenters "
        f"{args.segmenters} --copies {args.copies} --rounds {args.rounds}"
        + (f" --baseline {args.baseline}" if args.baseline else ""),
        "fields": n_sets,
        "field_size": "1080x1080 uint16, 2 channels",
        "rounds": args.rounds,
        "baseline": (
            {"checkout": str(args.baseline), "commit": commit(args.baseline)}
            if args.baseline
            else None
        ),
        "cellprofiler": {
            "wall_all_s": [round(r["all"], 2) for r in cp_rounds],
            "wall_first_only_s": [round(r["one"], 2) for r in cp_rounds],
            "per_field_s": round(float(np.median(cp_per_field)), 3),
            "per_field_s_rounds": [round(t, 3) for t in cp_per_field],
            "features_per_cell": cellprofiler_features(work / "cp_all"),
            "nuclei_per_field": cp_counts,
        },
        "phenoscreen": ours,
        "shipped_cellprofiler_masks": shipped_masks(segmenters),
    }
    shutil.rmtree(work)
    cp = figures["cellprofiler"]
    print(
        f"CellProfiler: {cp['per_field_s']:.2f} s/field (median; rounds "
        f"{cp['per_field_s_rounds']}), {cp['features_per_cell']} features/cell, "
        f"nuclei per field {cp_counts}"
    )
    for name, mine in ours.items():
        print(
            f"PhenoScreen {name}: {mine['per_field_s']:.2f} s/field "
            f"({mine['speedup_per_field']:.2f}x faster; rounds "
            f"{mine['speedup_per_field_rounds']}), {mine['features_per_cell']} "
            f"features/cell, steps {mine['per_field_steps_s']}, "
            f"nuclei per field {mine['nuclei_per_field']}"
            + (
                f", {mine['speedup_vs_baseline']:.3f}x the baseline's speed (rounds "
                f"{mine['speedup_vs_baseline_rounds']})"
                if "speedup_vs_baseline" in mine
                else ""
            )
        )
    for row in figures["shipped_cellprofiler_masks"]:
        print(f"  nuclei, shipped CellProfiler masks vs ours: {row}")
    save("vs_cellprofiler", figures)


if __name__ == "__main__":
    main()
