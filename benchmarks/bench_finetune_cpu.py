"""Time of the default fine-tuning (`phenoscreen train`) on one 96-well plate, CPU.

A demo plate of one 96-well plate (8 fields of 256 px per well, 40 DMSO cells per
field: about 30,000 cells, more than the default's 16,000, so the default cap
binds) is generated and run into SQLite with the demo's config; then
`models.train.train_run` fine-tunes with the default `models.train.TrainConfig`
(8 epochs, 64 px, compound-dose labels, one plate: treatments' wells and fields
held out), as ``phenoscreen train`` does, on the CPU with torch's default
threads. Reported: wall time of the training (crop reading included), per-epoch
seconds, cells trained on and held out, validation accuracy against the largest
class and balanced accuracy against one over the classes, the run's cells, and
the process's peak RSS (``peak_rss_gb``: the segmentation run and the training
together; `phenoscreen train` under GNU ``time -v`` gives the training's alone).
The issue's goal is <= 30 minutes.

    python benchmarks/bench_finetune_cpu.py [--fields-per-well 8] [--cells-per-field 40]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402

from db import store  # noqa: E402
from db.session import make_engine  # noqa: E402
from models.train import TrainConfig, train_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields-per-well", type=int, default=8)
    parser.add_argument("--cells-per-field", type=int, default=40)
    args = parser.parse_args()
    config = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        url, _ = run_demo(
            Path(tmp) / "plate", n_plates=1, fields_per_well=args.fields_per_well,
            cells_per_field=args.cells_per_field,
        )  # fmt: skip
        run_s = time.perf_counter() - start
        start = time.perf_counter()
        engine = make_engine(url)
        summary = train_run(engine, None, config, Path(tmp) / "finetuned.pt",
                            device="cpu")  # fmt: skip
        train_s = time.perf_counter() - start
        log = store.read_training_log(engine, summary["checkpoint_id"])
        run_id, _ = store.resolve_run(engine)
        n_cells = int(store.read_run_fields(engine, run_id)[2]["n_cells"].sum())
    figures = {
        "command": "python benchmarks/bench_finetune_cpu.py "
        f"--fields-per-well {args.fields_per_well} "
        f"--cells-per-field {args.cells_per_field}",
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
        "plate": "one 96-well demo plate, 256 px fields",
        "segment_and_measure_s": round(run_s, 1),
        "n_cells_in_run": n_cells,
        "train_s": round(train_s, 1),
        "train_min": round(train_s / 60, 2),
        "goal_min": 30,
        "epoch_seconds": [round(s, 1) for s in log["seconds"]],
        "peak_rss_gb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2
        ),
        **{k: summary[k] for k in ("n_train", "n_val", "n_classes", "best_epoch",
                                   "epochs")},
        **{k: round(summary[k], 3) for k in ("val_accuracy", "chance_accuracy",
                                             "val_balanced_accuracy", "balanced_chance")},
    }  # fmt: skip
    for key, value in figures.items():
        if key != "config":
            print(f"{key}: {value}")
    save("finetune_cpu", figures)


if __name__ == "__main__":
    main()
