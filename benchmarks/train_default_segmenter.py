"""Train the shipped default nuclei segmenter on the tuning half of dsb2018_dev.

The images of ../shared/data/segmentation/dsb2018_dev are split into halves exactly
as in ``bench_segmentation_dsb.py`` (numpy seed 0): only the "tune" half is linked
into a temporary folder pair and given to ``phenoscreen train-segmenter``'s training
function (which holds out a fifth of it for checkpoint selection); the "report" half
is never seen and scores the result in ``bench_segmenter_dsb.py``.

Run: ``python benchmarks/train_default_segmenter.py [--epochs 40] [--out FILE]
[--widths 16,32,64,128,256]``;
``--recalibrate`` instead chooses the post-processing of the shipped weights again
on their own held-out images (`models.train_segmenter.recalibrate_segmenter`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import save  # noqa: E402
from benchmarks.bench_segmentation_dsb import DATA, dsb_split  # noqa: E402
from models.segmenter import DEFAULT_WEIGHTS  # noqa: E402
from models.train_segmenter import (  # noqa: E402
    SegmenterTrainConfig,
    recalibrate_segmenter,
    train_segmenter,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=SegmenterTrainConfig.epochs)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=SegmenterTrainConfig.steps_per_epoch
    )
    parser.add_argument("--lr", type=float, default=SegmenterTrainConfig.lr)
    parser.add_argument("--init", help="start from these weights (a second stage)")
    parser.add_argument(
        "--widths", default=",".join(map(str, SegmenterTrainConfig.widths)),
        help="U-Net channels per level, finest first, comma-separated",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument(
        "--recalibrate", action="store_true",
        help="re-choose the post-processing of --out (no training)",
    )  # fmt: skip
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: training needs ../shared/data.")
    meta = dsb_split()
    tune = meta[meta["split"] == "tune"]
    widths = tuple(int(w) for w in args.widths.split(","))
    if widths != SegmenterTrainConfig.widths and (
        args.out.resolve() == DEFAULT_WEIGHTS.resolve() or args.recalibrate
    ):
        parser.error(
            "--widths other than the shipped network's trains a new network: give "
            "--out FILE (not the shipped weights), without --recalibrate."
        )
    config = SegmenterTrainConfig(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, lr=args.lr,
        widths=widths,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        images, masks = Path(tmp, "images"), Path(tmp, "masks")
        images.mkdir()
        masks.mkdir()
        for row in tune.itertuples():
            (images / Path(row.image_file).name).symlink_to(DATA / row.image_file)
            (masks / Path(row.label_file).name).symlink_to(DATA / row.label_file)
        if args.recalibrate:
            summary = recalibrate_segmenter(args.out, images, masks, args.out)
        else:
            summary = train_segmenter(images, masks, args.out, config, init=args.init)
    print(json.dumps(summary, indent=1))
    if args.recalibrate:
        save("train_default_segmenter_recalibrated", {
            "command": "python benchmarks/train_default_segmenter.py --recalibrate "
                       f"--out {args.out}",
            **summary,
        })  # fmt: skip
        return
    command = (
        f"python benchmarks/train_default_segmenter.py --epochs {args.epochs} "
        f"--steps-per-epoch {args.steps_per_epoch} --lr {args.lr} --out {args.out}"
        f" --widths {args.widths}"
    )
    save(
        "train_default_segmenter_"
        + ("stage2" if args.init else "stage1")
        + (
            ""
            if widths == SegmenterTrainConfig.widths
            else "_w" + "-".join(map(str, widths))
        ),
        {
            "command": command + (f" --init {args.init}" if args.init else ""),
            "training_images": len(tune),
            **summary,
        },
    )


if __name__ == "__main__":
    main()
