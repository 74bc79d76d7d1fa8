"""The ``phenoscreen`` command line.

Exit codes: 0 success, 2 bad input (nothing written), 1 a run that failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from db.session import StoreConnectionLost
from pipeline.calls.hits import HIT_COLUMNS, MIN_SIMILARITY
from pipeline.config import (
    AGGREGATIONS,
    EMBED_POOLS,
    EMBED_SCALINGS,
    EMBED_STRATEGIES,
    PRECISIONS,
    EmbedConfig,
    InputConfig,
    RunConfig,
    SegmentConfig,
    load_config,
    with_overrides,
)
from pipeline.cpu import warn_if_emulated_bfloat16
from pipeline.errors import InputError, PipelineError
from pipeline.images.io import LAYOUTS, parse_channels
from pipeline.views.export import TABLES

logger = logging.getLogger("phenoscreen")

DEFAULT_DB_URL = "sqlite:///phenoscreen.db"
DEMO_DIR = "demo_output"
HITS_HEADER = (
    "hit: a compound with at least one active dose (q < {fdr:g}); test: mAP of "
    ">= 3 replicate wells vs DMSO when its permutation test can reach q < {fdr:g}, "
    "else the distance of its wells to DMSO;\nactivity: distance from DMSO in SDs of "
    "the DMSO wells' own (0 = like DMSO); EC50 (uM) only from a 4PL fit flagged ok;"
    "\ntoxic: cell count < {toxicity:.0%} of DMSO; replicate_correlation: median "
    "Pearson r of replicate wells; most_similar: nearest compound (cosine >= "
    f"{MIN_SIMILARITY:g}). README: Glossary"
)


def _db_url(args: argparse.Namespace) -> str:
    return args.db or os.environ.get("PHENOSCREEN_DB_URL") or DEFAULT_DB_URL


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        help=f"SQLAlchemy URL of the store (default: $PHENOSCREEN_DB_URL or {DEFAULT_DB_URL})",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog="phenoscreen",
        description="Image-based screening: plate images to cells, profiles and hits.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log per-field detail"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo_data = sub.add_parser("demo-data", help="generate the synthetic demo plate(s)")
    demo_data.add_argument("out_dir", type=Path)
    demo_data.add_argument("--plates", type=int, default=3, help="replicate plates (3)")
    demo_data.add_argument("--fields-per-well", type=int, default=2)
    demo_data.add_argument("--field-size", type=int, default=256, help="pixels (256)")
    demo_data.add_argument(
        "--cells-per-field", type=int, default=30, help="mean DMSO cells (30)"
    )
    demo_data.add_argument(
        "--nucleus-diameter", type=float, default=14.0, help="pixels (14)"
    )
    demo_data.add_argument(
        "--plate-format", type=int, choices=[96, 384, 1536], default=96
    )
    demo_data.add_argument(
        "--n-channels", type=int, choices=[3, 5], default=3,
        help="DNA, Actin, Mito; 5 adds ER and RNA",
    )  # fmt: skip
    demo_data.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="segment and measure every field into the store")
    run.add_argument("images_dir", type=Path)
    run.add_argument("--platemap", type=Path, required=True, help="plate-map CSV")
    layout = run.add_mutually_exclusive_group()
    layout.add_argument("--layout", choices=list(LAYOUTS), help="file-name preset")
    layout.add_argument("--pattern", help="file-name regex with named groups")
    run.add_argument("--channels", help="NAME=TOKEN,... e.g. DNA=w1,Actin=w2")
    run.add_argument("--nuclei-channel", help="channel with the nuclear stain (DNA)")
    run.add_argument(
        "--cytoplasm-channel",
        help="channel cells are grown over (default: a ring around each nucleus)",
    )
    run.add_argument("--config", type=Path, help="run config TOML")
    run.add_argument(
        "--experiment", help="experiment name (default: image folder name)"
    )
    run.add_argument("--scheduler", help="address of a running Dask scheduler")
    run.add_argument(
        "--workers", type=int, help="local worker processes (one per core)"
    )
    run.add_argument(
        "--allow-unimaged-wells",
        action="store_true",
        default=None,
        help="accept plate-map wells without images",
    )
    run.add_argument(
        "--plate-format",
        type=int,
        choices=[96, 384, 1536],
        help="wells per plate (default: inferred from the imaged wells)",
    )
    run.add_argument(
        "--embed",
        action="store_true",
        default=None,
        help="also embed every cell with the CNN recipe of [embed] (deep and combined "
        "feature sets)",
    )
    _add_hit_options(run, "([hits] of --config, else ")
    _add_db(run)

    segment = sub.add_parser(
        "segment", help="segment TIFFs and write their instance-label TIFFs"
    )
    segment.add_argument("images", type=Path, nargs="+", help="nuclear-stain TIFFs")
    segment.add_argument("--out-dir", type=Path, required=True)
    segment.add_argument(
        "--nucleus-diameter", type=float, help="typical diameter in px (default: auto)"
    )
    segment.add_argument(
        "--cytoplasm",
        type=Path,
        nargs="+",
        help="one cytoplasm TIFF per image, same order: also writes <stem>_cells.tif",
    )
    segment.add_argument(
        "--nuclei-index", type=int, help="plane of the nuclei in multi-channel TIFFs"
    )
    segment.add_argument(
        "--cytoplasm-index", type=int, help="plane of the cytoplasm stain"
    )
    segment.add_argument(
        "--segmenter",
        "--method",
        dest="method",
        default=SegmentConfig.method,
        help="unet (default: learned, shipped weights), classical, cellpose, stardist",
    )
    segment.add_argument(
        "--segmenter-weights",
        help="weights file of the unet segmenter (from train-segmenter; default: shipped)",
    )
    segment.add_argument(
        "--segmenter-precision",
        choices=PRECISIONS,
        help="arithmetic of the unet segmenter on the CPU (default: float32); "
        "bfloat16 segments 1.4-1.7x faster on CPUs with AMX tiles; CPUs without "
        "bfloat16 instructions emulate it (6x slower on an AVX2-only AMD EPYC)",
    )

    train_seg = sub.add_parser(
        "train-segmenter",
        help="train the unet nuclei segmenter on annotated images (instance masks)",
    )
    train_seg.add_argument("--images", type=Path, required=True, help="image folder")
    train_seg.add_argument(
        "--masks",
        type=Path,
        required=True,
        help="label images named like the images (optionally _masks/_labels)",
    )
    train_seg.add_argument("--epochs", type=int, help="default 40")
    train_seg.add_argument(
        "--steps-per-epoch", type=int, help="batches per epoch (default 100)"
    )
    train_seg.add_argument("--batch-size", type=int, help="default 8")
    train_seg.add_argument(
        "--crop-px", type=int, help="training crop side at network scale (default 128)"
    )
    train_seg.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    train_seg.add_argument(
        "--val-fraction",
        type=float,
        help="share of images held out to pick the best epoch (default 0.2)",
    )
    train_seg.add_argument("--seed", type=int, help="default 0")
    train_seg.add_argument(
        "--init",
        help="start from these weights ('shipped': the shipped ones) to adapt them",
    )
    train_seg.add_argument(
        "--out", type=Path, default=Path("segmenter.pt"), help="weights file"
    )
    train_seg.add_argument(
        "--device", choices=["cpu", "cuda"], help="default: cuda if present"
    )

    embed = sub.add_parser(
        "embed", help="embed every cell of a run with an ImageNet-pretrained CNN"
    )
    _add_db(embed)
    embed.add_argument("--run", type=int, help="run id (default: latest complete)")
    embed.add_argument(
        "--config", type=Path, help="run config TOML: its [embed] section is the recipe"
    )
    embed.add_argument("--model", help="timm model name (tf_efficientnet_lite0)")
    embed.add_argument(
        "--weights",
        help="auto (offline package weights, else the timm hub), package, hub, or a "
        "checkpoint path",
    )
    embed.add_argument(
        "--strategy",
        choices=list(EMBED_STRATEGIES),
        help="rgb (default): each channel as RGB, vectors concatenated; stem: one pass "
        "with a C-channel stem",
    )
    embed.add_argument(
        "--layer",
        help=f"pooled, or blocks.K: an intermediate stage (default {EmbedConfig.layer})",
    )
    embed.add_argument(
        "--pool",
        choices=list(EMBED_POOLS),
        help="average the layer over each crop's cell (default) or the whole crop",
    )
    embed.add_argument(
        "--crop-size", type=int, help="px around each nucleus (default: 4 diameters)"
    )
    embed.add_argument(
        "--input-size",
        type=int,
        help="px the crops are resized to (default 64; 0: none)",
    )
    embed.add_argument(
        "--scaling", choices=list(EMBED_SCALINGS), help="plate (default) or crop"
    )
    embed.add_argument(
        "--aggregate", choices=list(AGGREGATIONS), help="cells -> wells (median)"
    )
    embed.add_argument(
        "--batch-size",
        type=int,
        help="crops per forward pass (default or 0: 32 on CUDA; on CPU 40 images of "
        "64 px, e.g. 8 crops of 5 channels)",
    )
    embed.add_argument(
        "--device", choices=["cpu", "cuda"], help="default: cuda if present"
    )
    embed.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the network's arithmetic (default: float32 on CPU, bfloat16 on CUDA); "
        "bfloat16 embeds faster on CPUs with AMX tiles; CPUs without bfloat16 "
        "instructions emulate it (slower)",
    )
    embed.add_argument(
        "--checkpoint",
        type=Path,
        help="a fine-tuned checkpoint from phenoscreen train (instead of --model)",
    )

    train = sub.add_parser(
        "train", help="fine-tune a CNN on a run's cells, labelled by treatment"
    )
    _add_db(train)
    train.add_argument("--run", type=int, help="run id (default: latest complete)")
    train.add_argument(
        "--model", default="tf_efficientnet_lite0", help="timm model name"
    )
    train.add_argument("--weights", default="auto", help="auto, package or hub")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument(
        "--warmup-epochs", type=int, default=1, help="epochs with the backbone frozen"
    )
    train.add_argument(
        "--label", choices=["compound_dose", "compound"], default="compound_dose"
    )
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--max-cells", type=int, default=16_000)
    train.add_argument("--crop-size", type=int, help="px (default: 4 diameters)")
    train.add_argument(
        "--input-size",
        type=int,
        default=64,
        help="px crops are resized to (64; 0: none)",
    )
    train.add_argument(
        "--layer",
        default=EmbedConfig.layer,
        help="features the classifier reads: pooled or blocks.K (default: the "
        f"embedding recipe's layer, {EmbedConfig.layer})",
    )
    train.add_argument(
        "--pool",
        choices=list(EMBED_POOLS),
        default=EmbedConfig.pool,
        help="average the layer over each crop's cell (default) or the whole crop",
    )
    train.add_argument(
        "--ema-epochs",
        type=float,
        default=1.0,
        help="horizon of the weights' moving average that is kept, in epochs "
        "(default 1; 0: the network as trained)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--out", type=Path, default=Path("finetuned.pt"), help="checkpoint file"
    )
    train.add_argument(
        "--device", choices=["cpu", "cuda"], help="default: cuda if present"
    )

    imports = sub.add_parser(
        "import-profiles",
        help="import CellProfiler/pycytominer tables or DeepProfiler .npz as a run",
    )
    imports.add_argument(
        "path",
        type=Path,
        help="CSV/TSV/Parquet/SQLite table, CellProfiler SQLite or CSV folder, or "
        "DeepProfiler features folder",
    )
    _add_db(imports)
    imports.add_argument(
        "--format", choices=["auto", "table", "cellprofiler", "deepprofiler"],
        default="auto",
    )  # fmt: skip
    imports.add_argument(
        "--level", choices=["auto", "wells", "cells"], default="auto",
        help="auto: cells when a well has several rows",
    )  # fmt: skip
    imports.add_argument("--table", help="table of a SQLite file holding profiles")
    imports.add_argument(
        "--config",
        type=Path,
        help="run config TOML whose [profile] recipe and [hits] settings the imported "
        "run keeps (other sections are not used)",
    )
    imports.add_argument(
        "--platemap", type=Path, help="plate-map CSV joined on plate and well"
    )
    imports.add_argument(
        "--negative-control",
        metavar="COMPOUND",
        help="compound whose wells are the negative controls (e.g. DMSO)",
    )
    imports.add_argument("--compound-column", help="default: Metadata_Compound, ...")
    imports.add_argument(
        "--concentration-column", help="default: Metadata_Concentration, ..."
    )
    imports.add_argument(
        "--role-column", help="default: Metadata_Role or Metadata_control_type"
    )
    imports.add_argument("--experiment", help="default: the file or folder name")
    imports.add_argument("--feature-set", default="imported")

    export = sub.add_parser("export", help="write a cells/wells/compounds table")
    _add_db(export)
    export.add_argument("--table", choices=list(TABLES), required=True)
    export.add_argument("--format", choices=["csv", "parquet"], default=None)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--run", type=int, help="run id (default: latest complete)")
    _add_profile_options(export)
    _add_hit_options(export)

    status = sub.add_parser("status", help="runs in the store and their progress")
    _add_db(status)

    hits = sub.add_parser("hits", help="the compound hit list of a run")
    _add_db(hits)
    hits.add_argument("--run", type=int, help="run id (default: latest complete)")
    _add_profile_options(hits)
    _add_hit_options(hits)
    hits.add_argument("--top", type=int, default=15, help="rows to print (15)")
    hits.add_argument(
        "--out", type=Path, help="write the full table (.csv or .parquet)"
    )

    moa = sub.add_parser("moa", help="1-NN prediction of an annotation (NSC, NSCB)")
    _add_db(moa)
    moa.add_argument("--reference-column", required=True, help="e.g. moa or target")
    moa.add_argument("--run", type=int, help="run id (default: latest complete)")
    moa.add_argument(
        "--reference-run",
        type=int,
        help="take the annotated neighbours from this run of the store (e.g. an "
        "imported reference set) instead of the run itself",
    )
    moa.add_argument(
        "--reference-feature-set",
        help="feature set of the reference run (default: its default one); it must "
        "share feature names with --feature-set",
    )
    _add_profile_options(moa)
    moa.add_argument("--top", type=int, default=15, help="predictions to print (15)")
    moa.add_argument(
        "--out", type=Path, help="write the predictions (.csv or .parquet)"
    )

    phenomap = sub.add_parser("map", help="compute and store the UMAP phenotype map")
    _add_db(phenomap)
    phenomap.add_argument("--run", type=int, help="run id (default: latest complete)")
    _add_profile_options(phenomap)
    phenomap.add_argument(
        "--cells",
        type=int,
        default=2000,
        help="single cells sampled onto their own map (2000; 0: none)",
    )

    campaign = sub.add_parser(
        "campaign",
        help="a campaign of plates: per-plate trends and the recipe's before/after",
    )
    _add_db(campaign)
    campaign.add_argument("--run", type=int, help="run id (default: latest complete)")
    _add_profile_options(campaign)
    campaign.add_argument(
        "--reference-column",
        help="annotation for MoA NSC / NSCB in the diagnostics (default: moa, when "
        "the plate map has one annotating two or more compounds)",
    )
    campaign.add_argument(
        "--out", type=Path, help="write the per-plate trends (.csv or .parquet)"
    )

    qc = sub.add_parser("qc", help="per-plate Z' and edge effect of a run")
    _add_db(qc)
    qc.add_argument("--run", type=int, help="run id (default: latest complete)")
    _add_profile_options(qc)
    qc.add_argument(
        "--feature",
        action="append",
        default=[],
        help="also Z' of this feature's well medians (repeatable)",
    )
    qc.add_argument(
        "--cell-count-control",
        help="a compound that changes cell count (e.g. a cytotoxic control): Z' of "
        "its cell counts vs DMSO (default: [hits] cell_count_control of the run)",
    )

    demo = sub.add_parser("demo", help="demo plate -> run -> hits, into SQLite")
    demo.add_argument("--out-dir", type=Path, default=Path(DEMO_DIR))
    demo.add_argument(
        "--workers", type=int, help="local worker processes (one per core)"
    )

    dashboard = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    _add_db(dashboard)
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="bind address (localhost)"
    )
    return parser


def _add_profile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--include-flagged",
        action="store_true",
        help="keep fields flagged by image QC (left out by default)",
    )
    parser.add_argument(
        "--feature-set",
        help="classical (default when present), deep (the latest CNN embedding), "
        "combined (classical + deep), or any stored name (phenoscreen status lists runs)",
    )


def _add_hit_options(
    parser: argparse.ArgumentParser, default: str = "(the run's [hits], else "
) -> None:
    parser.add_argument(
        "--fdr",
        type=float,
        help=f"false discovery rate of hits and active doses {default}0.05)",
    )
    parser.add_argument(
        "--toxicity-threshold",
        type=float,
        help="toxic: median cell count below this fraction of the negative "
        f"controls' {default}0.5)",
    )


def _hit_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"fdr": args.fdr, "toxicity_threshold": args.toxicity_threshold}


def _profile_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"include_flagged": args.include_flagged, "feature_set": args.feature_set}


def _run_config(args: argparse.Namespace) -> RunConfig:
    """Return the config file (or defaults) with the command-line flags applied."""
    config = load_config(args.config) if args.config else RunConfig()
    current = config.input
    layout, pattern = current.layout, current.pattern
    if args.layout or args.pattern:
        layout, pattern = args.layout, args.pattern
    input_config = InputConfig(
        layout=layout,
        pattern=pattern,
        channels=parse_channels(args.channels) or current.channels,
        nuclei_channel=args.nuclei_channel or current.nuclei_channel,
        cytoplasm_channel=args.cytoplasm_channel or current.cytoplasm_channel,
        allow_unimaged_wells=bool(
            args.allow_unimaged_wells or current.allow_unimaged_wells
        ),
        plate_format=args.plate_format or current.plate_format,
    )
    return with_overrides(
        replace(config, input=input_config),
        execution={"scheduler": args.scheduler, "n_workers": args.workers},
        embed={"enabled": args.embed},
        hits=_hit_options(args),
    )


def _print_table(table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


def _print_hits(hits: pd.DataFrame, doses: pd.DataFrame, top: int) -> None:
    """Print the top of a hit list; only the most similar compound is shown."""
    names = {"nearest_compounds": "most_similar", "Metadata_Compound": "compound"}
    shown = hits[HIT_COLUMNS].head(top).rename(columns=names)
    shown["most_similar"] = shown["most_similar"].str.split("; ").str[0].str[:40]
    fdr = float(hits["fdr"].iloc[0]) if len(hits) else 0.05
    toxicity = float(hits["toxicity_threshold"].iloc[0]) if len(hits) else 0.5
    print(HITS_HEADER.format(fdr=fdr, toxicity=toxicity))
    replicated = doses["is_replicating"].dropna()
    if len(replicated):
        print(
            f"percent replicating: {100 * replicated.astype(bool).mean():.1f} % of "
            f"{len(replicated)} compound-doses with replicate wells (median replicate "
            f"mAP {doses['replicate_map'].median():.2f})"
        )
    print(f"{int(hits['is_hit'].sum())} of {len(hits)} compounds are hits:")
    _print_table(shown)


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Generate the demo plate."""
    from pipeline.images.demo import write_demo_plate

    paths = write_demo_plate(
        args.out_dir,
        n_plates=args.plates,
        fields_per_well=args.fields_per_well,
        field_size_px=args.field_size,
        cells_per_field=args.cells_per_field,
        nucleus_diameter_px=args.nucleus_diameter,
        plate_format=args.plate_format,
        n_channels=args.n_channels,
        seed=args.seed,
    )
    print(f"demo plate written to {args.out_dir}:")
    for name, path in paths.items():
        print(f"  {name:9s} {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline on an image folder."""
    from pipeline.run import run_experiment

    summary = run_experiment(
        args.images_dir,
        args.platemap,
        config=_run_config(args),
        db_url=_db_url(args),
        experiment_name=args.experiment,
    )
    print(
        f"run {summary.run_id} {summary.status}: {summary.n_fields} fields "
        f"({summary.n_processed} processed, {summary.n_skipped} already done, "
        f"{summary.n_failed} failed), {summary.n_cells} new cells, "
        f"{summary.timings['fields_per_s']:.2f} fields/s"
    )
    if summary.embedding:
        print(
            f"embedded {summary.embedding['n_cells']} cells into "
            f"{summary.embedding['feature_set']} "
            f"({summary.embedding['cells_per_s']:.0f} cells/s)"
        )
    for feature_set in _feature_sets_of(summary):
        try:  # computed once and kept in the store for the dashboard and `hits`
            hits, _ = _hit_tables(
                _db_url(args), summary.run_id, feature_set=feature_set
            )
        except ValueError as exc:
            print(
                f"phenoscreen run: the run is stored, but it has no hit list: {exc}",
                file=sys.stderr,
            )
            return 1
        print(
            f"{feature_set}: {int(hits['is_hit'].sum())} of {len(hits)} compounds are "
            "hits (`phenoscreen hits --feature-set NAME` lists them; `phenoscreen "
            "dashboard` shows them)"
        )
    return 0


def _feature_sets_of(summary: Any) -> list[str]:
    """classical, and deep and combined when the run embedded its cells."""
    if not summary.embedding:
        return ["classical"]
    return ["classical", "deep"] + (
        ["combined"] if summary.embedding["combined_feature_set"] else []
    )


def _profiles(
    db_url: str, run_id: int | None, **options: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw and normalized well profiles of a run (None: the latest complete one)."""
    from db.session import make_engine
    from db.store import resolve_run
    from pipeline.views.export import read_profiles

    engine = make_engine(db_url, create=False)
    return read_profiles(engine, *resolve_run(engine, run_id), **options)


def _write_out(table: pd.DataFrame, out: Path, what: str) -> None:
    from pipeline.views.export import write_tables

    write_tables(
        iter([table]), out, fmt="parquet" if out.suffix == ".parquet" else "csv"
    )
    print(f"{len(table)} {what} written to {out}")


def _hit_tables(
    db_url: str,
    run_id: int | None,
    *,
    fdr: float | None = None,
    toxicity_threshold: float | None = None,
    **options: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hit list and compound-doses of a run (cached in the store once computed).

    `fdr` and `toxicity_threshold` override the run's `[hits]` when given.
    """
    from db.session import make_engine
    from db.store import resolve_run
    from pipeline.views.export import hit_settings, read_hit_tables

    engine = make_engine(db_url, create=False)
    run_id, experiment_id = resolve_run(engine, run_id)
    settings = hit_settings(
        engine, run_id, fdr=fdr, toxicity_threshold=toxicity_threshold
    )
    return read_hit_tables(engine, run_id, experiment_id, settings=settings, **options)


def cmd_hits(args: argparse.Namespace) -> int:
    """Print (and write) the compound hit list."""
    table, doses = _hit_tables(
        _db_url(args), args.run, **_hit_options(args), **_profile_options(args)
    )
    _print_hits(table, doses, args.top)
    if args.out:
        _write_out(table, args.out, "rows")
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    """Print per-plate trends and the profile recipe's before/after diagnostics."""
    from db.session import make_engine
    from db.store import resolve_run
    from pipeline.calls.campaign import plate_trends, recipe_diagnostics
    from pipeline.profiling.profiles import metadata_column
    from pipeline.views.export import plate_qc_table, read_profiles

    engine = make_engine(_db_url(args), create=False)
    run_id, experiment_id = resolve_run(engine, args.run)
    raw, normalized = read_profiles(
        engine, run_id, experiment_id, **_profile_options(args)
    )
    column = args.reference_column
    if column and metadata_column(normalized, column) is None:
        names = ", ".join(c for c in normalized.columns if c.startswith("Metadata_"))
        raise ValueError(
            f"--reference-column {column!r} is not among the metadata columns "
            f"({names}); name one of them, or leave the option out."
        )
    trends = plate_trends(raw, normalized, plate_qc_table(normalized))
    print(
        f"{len(trends)} plates: DMSO cells per well, Z' of the activity, and how well "
        "each plate's treatment wells correlate with their replicates on other plates"
    )
    _print_table(trends)
    diagnostics = recipe_diagnostics(raw, normalized, reference_column=column or "moa")
    print(
        "\nbefore/after the profile recipe: DMSO similarity within vs across plates "
        "(a gap near 0 = no plate effect), replicate mAP of compound-doses"
        + (", MoA 1-NN NSC / NSCB" if "nsc" in diagnostics else "")
    )
    _print_table(diagnostics)
    if args.out:
        _write_out(trends, args.out, "plate rows")
    return 0


def cmd_qc(args: argparse.Namespace) -> int:
    """Print per-plate QC."""
    from db.session import make_engine
    from db.store import resolve_run
    from pipeline.views.export import hit_settings, plate_qc_table, read_profiles

    engine = make_engine(_db_url(args), create=False)
    run_id, experiment_id = resolve_run(engine, args.run)
    control = args.cell_count_control
    if control is None:
        control = hit_settings(engine, run_id).cell_count_control
    raw, normalized = read_profiles(
        engine, run_id, experiment_id, **_profile_options(args)
    )
    table = plate_qc_table(
        normalized, well_profiles=raw, features=args.feature,
        cell_count_control=control,
    )  # fmt: skip
    print(
        "plate QC: Z' of the activity (positive controls vs DMSO; > 0.5 excellent, "
        "0-0.5 usable for phenotypic screens);\nedge effects of the outer ring vs "
        "inner wells: cell count ratio (1 = none), activity difference (0 = none)"
        + (
            f";\nZ' of the cell count: {control} vs DMSO"
            if control
            else " (Z' of the cell count: name a control that changes it with "
            "--cell-count-control)"
        )
    )
    _print_table(table)
    return 0


def cmd_moa(args: argparse.Namespace) -> int:
    """Print 1-NN annotation accuracies (and write the predictions)."""
    from pipeline.calls.moa import KEYS as MOA_KEYS
    from pipeline.calls.moa import moa_table

    url, options = _db_url(args), _profile_options(args)
    reference = None
    if args.reference_run is not None:
        reference = _profiles(url, args.reference_run,
                              include_flagged=args.include_flagged,
                              feature_set=args.reference_feature_set)[1]  # fmt: skip
    predictions, accuracy = moa_table(
        _profiles(url, args.run, **options)[1],
        reference_column=args.reference_column,
        reference=reference,
    )
    scored = predictions["is_correct_nsc"].notna()
    if scored.any():
        n_scored = len(predictions[scored].drop_duplicates(MOA_KEYS))
        nscb = accuracy["nscb"]
        print(
            f"1-NN {args.reference_column} accuracy over {n_scored} annotated "
            f"compound-doses: same compound left out (NSC) {accuracy['nsc']:.3f}, "
            + (f"also same batch left out (NSCB) {nscb:.3f}; " if nscb == nscb else
               "(NSCB: one batch only); ")
            + f"a random other compound: {accuracy['chance_nsc']:.3f}"
        )  # fmt: skip
    shown = ["Metadata_Compound", "Metadata_Concentration", "predicted_nsc",
             "neighbor_nsc", "similarity_nsc"]  # fmt: skip
    unannotated = predictions[~scored].drop_duplicates(shown[:2])
    new = unannotated[unannotated["similarity_nsc"] >= MIN_SIMILARITY]
    print(
        f"{len(unannotated)} unannotated compound-doses; {len(new)} resemble an "
        f"annotated one (cosine >= {MIN_SIMILARITY})"
        + (", most similar first:" if len(new) else ".")
    )
    if len(new):
        _print_table(
            new.sort_values("similarity_nsc", ascending=False)[shown].head(args.top)
        )
    if args.out:
        _write_out(predictions, args.out, "predictions")
    return 0


def _store_map(
    db_url: str, run_id: int | None, *, n_cells: int = 2000, **options: Any
) -> pd.DataFrame:
    from db.session import make_engine
    from db.store import resolve_feature_set, resolve_run, write_phenotype_map
    from pipeline.views.export import phenotype_map_table, read_profiles, sample_cells

    engine = make_engine(db_url, create=False)
    run_id, experiment_id = resolve_run(engine, run_id)
    options["feature_set"], _ = resolve_feature_set(
        engine, run_id, options.get("feature_set")
    )
    cells = (
        sample_cells(engine, run_id, experiment_id, n_cells=n_cells, **options)
        if n_cells
        else None
    )
    points = phenotype_map_table(
        read_profiles(engine, run_id, experiment_id, **options)[1], cells=cells
    )
    write_phenotype_map(engine, run_id, points, feature_set=options["feature_set"])
    return points.assign(feature_set=options["feature_set"])


def cmd_map(args: argparse.Namespace) -> int:
    """Compute the phenotype map of a run and store it for the dashboard."""
    points = _store_map(
        _db_url(args), args.run, n_cells=args.cells, **_profile_options(args)
    )
    print(f"phenotype map of feature set {points['feature_set'].iloc[0]}:")
    for level, group in points.groupby("level"):
        n_clusters = group.loc[group["cluster"] >= 0, "cluster"].nunique()
        print(f"{level}: {len(group)} points, {n_clusters} clusters (HDBSCAN on UMAP)")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment image files into label TIFFs."""
    from pipeline.run import segment_files

    table = segment_files(
        args.images,
        args.out_dir,
        cytoplasm=args.cytoplasm,
        nuclei_index=args.nuclei_index,
        cytoplasm_index=args.cytoplasm_index,
        segment={
            "method": args.method,
            "nucleus_diameter_px": args.nucleus_diameter,
            "weights": args.segmenter_weights,
            "precision": args.segmenter_precision,
        },
    )
    for row in table.itertuples(index=False):
        cells = f", {row.cells_labels}" if row.cells_labels else ""
        print(f"{row.image}: {row.n_nuclei} nuclei -> {row.nuclei_labels}{cells}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a run's cells into a new feature set."""
    from db.session import make_engine
    from models.embed import embed_device, embed_run

    recipe = load_config(args.config).embed if args.config else RunConfig().embed
    given = {
        "model_name": args.model, "weights": args.weights, "strategy": args.strategy,
        "layer": args.layer, "pool": args.pool, "crop_size": args.crop_size,
        "scaling": args.scaling,
        "aggregate": args.aggregate, "batch_size": args.batch_size,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "precision": args.precision,
    }  # fmt: skip
    recipe = replace(recipe, **{k: v for k, v in given.items() if v is not None})
    if args.input_size is not None:
        recipe = replace(recipe, input_size=args.input_size or None)
    warn_if_emulated_bfloat16(
        "embed.precision (--precision)", args.device or embed_device(), recipe.precision
    )
    summary = embed_run(
        make_engine(_db_url(args), create=False), args.run, recipe, device=args.device
    )
    print(
        f"feature set {summary['feature_set']}: {summary['n_cells']} cells of "
        f"{summary['n_fields']} fields embedded ({summary['cells_per_s']:.0f} cells/s)"
    )
    if summary["combined_feature_set"]:
        print(f"feature set {summary['combined_feature_set']}: classical + this one")
    print("use them: phenoscreen hits --feature-set deep (or combined)")
    return 0


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    """Train the unet nuclei segmenter on annotated images."""
    from models.train_segmenter import SegmenterTrainConfig, train_segmenter

    names = ("epochs", "steps_per_epoch", "batch_size", "crop_px", "lr",
             "val_fraction", "seed")  # fmt: skip
    given = {
        name: getattr(args, name) for name in names if getattr(args, name) is not None
    }
    summary = train_segmenter(
        args.images,
        args.masks,
        args.out,
        SegmenterTrainConfig(**given),
        device=args.device,
        init=args.init,
    )
    val = summary["val"]
    print(
        f"wrote {summary['out']} (best epoch {summary['best_epoch']}, "
        f"{summary['seconds']:.0f} s): validation AP@0.5 {val['AP@0.5']:.3f}, "
        f"AP@0.75 {val['AP@0.75']:.3f}, mean AP {val['mAP@0.5:0.95']:.3f} on "
        f"{val['images']} held-out images; log {summary['out']}.log.csv"
    )
    print(
        f"use it: phenoscreen segment --segmenter unet --segmenter-weights {summary['out']}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a backbone on a run's cells and register the checkpoint."""
    from db.session import make_engine
    from models.train import TrainConfig, train_run

    config = TrainConfig(
        model_name=args.model,
        weights=args.weights,
        label=args.label,
        epochs=args.epochs,
        warmup_epochs=min(args.warmup_epochs, args.epochs),
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_cells=args.max_cells,
        crop_size=args.crop_size,
        input_size=args.input_size or None,
        seed=args.seed,
        layer=args.layer,
        pool=args.pool,
        ema_epochs=args.ema_epochs,
    )
    summary = train_run(
        make_engine(_db_url(args), create=False),
        args.run,
        config,
        args.out,
        device=args.device,
    )
    balanced = summary["val_balanced_accuracy"]
    balanced = "n/a" if balanced is None else f"{balanced:.3f}"  # older state file
    held_out = (
        f"on held-out plates {', '.join(summary['val_plates'])}"
        if summary["n_plates"] > 1
        else "from the wells and fields of each treatment on its one plate"
    )
    print(
        f"checkpoint {summary['checkpoint_id']}: {summary['path']} (sha256 "
        f"{summary['sha256'][:12]}...), best epoch {summary['best_epoch']} of "
        f"{summary['epochs']}: validation loss {summary['val_loss']:.3f}, accuracy "
        f"{summary['val_accuracy']:.3f} (largest class {summary['chance_accuracy']:.3f}),"
        f" balanced accuracy {balanced} (chance {summary['balanced_chance']:.3f}; "
        f"{summary['n_classes']} classes, {summary['n_train']} training and "
        f"{summary['n_val']} validation cells {held_out})\n"
        f"embed with it: phenoscreen embed --db {_db_url(args)} --checkpoint "
        f"{summary['path']}"
        + (f" --layer {config.layer}" if config.layer != EmbedConfig.layer else "")
    )
    return 0


def cmd_import_profiles(args: argparse.Namespace) -> int:
    """Import existing profiles as a complete run."""
    from pipeline.profiling.importers import ImportOptions, import_profiles

    options = ImportOptions(
        format=args.format,
        level=args.level,
        table=args.table,
        compound_column=args.compound_column,
        concentration_column=args.concentration_column,
        role_column=args.role_column,
        negative_control=args.negative_control,
        platemap=str(args.platemap) if args.platemap else None,
        feature_set=args.feature_set,
    )
    config = load_config(args.config) if args.config else None
    summary = import_profiles(
        _db_url(args), args.path, options, experiment=args.experiment, config=config
    )
    dropped = summary["n_dropped_features"]
    print(
        f"run {summary['run_id']} ({summary['experiment']}): {summary['n_profiles']} "
        f"{'well profiles' if summary['level'] == 'wells' else 'cells'} of "
        f"{summary['n_wells']} wells on {summary['n_plates']} plate(s), "
        f"{summary['n_features']} features"
        + (f" ({dropped} with missing values left out)" if dropped else "")
        + f"; feature set {summary['feature_set']!r}. Next: phenoscreen hits --db "
        f"{_db_url(args)} --run {summary['run_id']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a table."""
    from db.session import make_engine
    from pipeline.views.export import export_table

    fmt = args.format or ("parquet" if args.out.suffix == ".parquet" else "csv")
    engine = make_engine(_db_url(args), create=False)
    n_rows = export_table(
        engine,
        table=args.table,
        out=args.out,
        fmt=fmt,
        run_id=args.run,
        **_hit_options(args),
        **_profile_options(args),
    )
    print(f"{n_rows} rows of {args.table} written to {args.out} ({fmt})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the runs of a store."""
    from db.session import make_engine
    from db.store import summarize_runs

    runs = summarize_runs(make_engine(_db_url(args), create=False))
    if runs.empty:
        print("no runs in this store yet")
        return 0
    _print_table(runs.drop(columns=["created_at"]))
    return 0


def dashboard_command(*, host: str, port: int) -> list[str]:
    """Return the command that serves the Streamlit app (the store URL comes by env)."""
    app = Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py"
    return [
        sys.executable, "-m", "app.serve", "run", str(app),
        "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
    ]  # fmt: skip


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Start the dashboard: this process becomes the server (until interrupted).

    The process is replaced by the Streamlit server (`os.execve`), so its PID is
    the server's and a signal sent to it (Ctrl+C, ``kill PID``) stops the server;
    no child is left behind.
    """
    from db.session import make_engine

    db_url = _db_url(args)
    make_engine(db_url, create=False)
    print(
        f"PhenoScreen dashboard on http://{args.host}:{args.port} (Ctrl+C stops it)",
        flush=True,
    )
    command = dashboard_command(host=args.host, port=args.port)
    os.execve(command[0], command, os.environ | {"PHENOSCREEN_DB_URL": db_url})


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the demo plate if needed, run it into SQLite and print the hits."""
    from pipeline.config import config_from_dict
    from pipeline.images.demo import CHANNELS, write_demo_plate
    from pipeline.run import run_experiment

    out = args.out_dir
    if not (out / "ground_truth" / "truth.json").is_file():
        print(f"[1/3] generating the demo plates in {out} ...")
        write_demo_plate(out)
    else:
        print(f"[1/3] demo plates already in {out}")
    db_url = f"sqlite:///{(out / 'phenoscreen.db').resolve()}"
    print(f"[2/3] running the pipeline into {db_url} ...")
    config = config_from_dict(
        {
            "input": {
                "layout": "imagexpress",
                "channels": CHANNELS,
                "nuclei_channel": "DNA",
                "cytoplasm_channel": "Actin",
            },
            "embed": {"enabled": True},
            "execution": {"n_workers": args.workers} if args.workers else {},
        }
    )
    summary = run_experiment(
        out / "images",
        out / "platemap.csv",
        config=config,
        db_url=db_url,
        experiment_name="demo",
    )
    print(
        f"      {summary.n_fields} fields, {summary.n_processed} processed now "
        f"({summary.timings['fields_per_s']:.1f} fields/s), {summary.n_failed} failed"
    )
    print(
        "[3/3] hit list (the true actives and EC50s are in "
        f"{out / 'ground_truth' / 'truth.json'}):"
    )
    _print_hits(*_hit_tables(db_url, summary.run_id), 15)
    for feature_set in _feature_sets_of(summary)[1:]:
        hits, _ = _hit_tables(db_url, summary.run_id, feature_set=feature_set)
        called = ", ".join(hits.loc[hits["is_hit"], "Metadata_Compound"])
        print(
            f"      {feature_set} profiles: {int(hits['is_hit'].sum())} hits: {called}"
        )
    print("      storing the phenotype map (UMAP + HDBSCAN) for the dashboard ...")
    _store_map(db_url, summary.run_id)
    script = Path(sys.executable).parent / "phenoscreen"
    command = str(script) if script.exists() else "phenoscreen"
    print(
        "\nOpen the dashboard:\n"
        f"  {command} dashboard --db {db_url}\n"
        "  then browse http://127.0.0.1:8501\n"
        f"Export tables: {command} export --db {db_url} --table hits --out hits.csv"
    )
    return 0


_COMMANDS = {
    "demo-data": cmd_demo_data,
    "run": cmd_run,
    "segment": cmd_segment,
    "embed": cmd_embed,
    "train": cmd_train,
    "train-segmenter": cmd_train_segmenter,
    "import-profiles": cmd_import_profiles,
    "export": cmd_export,
    "status": cmd_status,
    "hits": cmd_hits,
    "qc": cmd_qc,
    "campaign": cmd_campaign,
    "moa": cmd_moa,
    "map": cmd_map,
    "demo": cmd_demo,
    "dashboard": cmd_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``phenoscreen``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.verbose:  # read by dask's config when distributed is first imported
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _COMMANDS[args.command](args)
    except (InputError, FileNotFoundError) as exc:
        print(f"phenoscreen {args.command}: error: {exc}", file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2
    except (PipelineError, StoreConnectionLost) as exc:
        print(f"phenoscreen {args.command}: run failed: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"phenoscreen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
