"""Recovery of the demo's planted phenotypes by each feature set.

The demo experiment (3 replicate 96-well plates, 9 compounds x 8 doses with known
effects, `pipeline.images.demo`) is analysed once; then hits are called on each feature
set: ``classical`` features; ImageNet embeddings of ``tf_efficientnet_lite0``: the
earlier default (``imagenet_pooled_stem``: 3-channel stem, final pooled layer, crops
at their size, wells averaged), the default recipe (``imagenet_recipe``,
`pipeline.config.EmbedConfig`) and the recipe averaged over the whole crop instead
of the cell (``imagenet_recipe_crop_pool``); ``combined`` (classical + recipe); a fine-tuned
embedding (``finetuned``, default `models.train.TrainConfig`, embedded with the
recipe's layer) and ``combined_finetuned``. The fine-tuned network is trained
(`phenoscreen train`, compound-dose labels) on a *separate* demo experiment (another
seed, 2 plates), so it never saw the evaluated cells, as when a model from earlier
screens is applied to a new one. Reported per feature set: which true actives are
hits, false hits among the inactive compounds, and the EC50 of the strong actives
against the truth; hits come from the same path as `phenoscreen hits`
(`pipeline.views.export.read_profiles`, the run's profile recipe).

    python benchmarks/bench_demo_feature_sets.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402

from db.session import make_engine  # noqa: E402
from db.store import resolve_run  # noqa: E402
from models.embed import embed_run  # noqa: E402
from models.train import TrainConfig, train_run  # noqa: E402
from pipeline.config import EmbedConfig  # noqa: E402
from pipeline.views.export import hit_tables, read_profiles  # noqa: E402


def analyse(out: Path, *, n_plates: int, seed: int) -> tuple[str, dict, Path]:
    """Generate and run a demo experiment; return its store URL, truth and folder."""
    url, demo = run_demo(out, n_plates=n_plates, seed=seed)
    return url, json.loads(demo["truth"].read_text()), out


def recovery(url: str, feature_set: str, truth: dict) -> dict[str, object]:
    engine = make_engine(url, create=False)
    hits, _ = hit_tables(
        read_profiles(engine, *resolve_run(engine), feature_set=feature_set)[1]
    )
    called = hits.set_index("Metadata_Compound")
    compounds = truth["compounds"]
    actives = [c["compound"] for c in compounds if c["is_active"]]
    inactive = [c["compound"] for c in compounds if not c["is_active"]]
    ec50 = {}
    for c in compounds:
        if c["is_active"] and c["effect"] != "cell_loss":
            fitted = called.loc[c["compound"]].get("ec50", np.nan)
            ec50[c["compound"]] = {
                "true": c["ec50_uM"],
                "fitted": round(float(fitted), 3),
            }
    return {
        "hits": sorted(called.index[called["is_hit"]]),
        "actives_recovered": f"{int(called.loc[actives, 'is_hit'].sum())}/{len(actives)}",
        "missed_actives": sorted(set(actives) - set(called.index[called["is_hit"]])),
        "false_hits": sorted(set(inactive) & set(called.index[called["is_hit"]])),
        "ec50_uM": ec50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args()
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        url, truth, _ = analyse(Path(tmp) / "screen", n_plates=3, seed=0)
        seconds["pipeline"] = time.perf_counter() - start
        results["classical"] = recovery(url, "classical", truth)
        engine = make_engine(url, create=False)
        recipes = {
            "imagenet_pooled_stem": EmbedConfig(
                strategy="stem",
                layer="pooled",
                pool="crop",
                input_size=None,
                aggregate="mean",
            ),
            "imagenet_recipe_crop_pool": EmbedConfig(pool="crop"),
            "imagenet_recipe": EmbedConfig(),  # last: `combined` is built on it
        }
        for name, recipe in recipes.items():
            start = time.perf_counter()
            summary = embed_run(engine, None, recipe)
            seconds[name] = time.perf_counter() - start
            results[name] = recovery(url, summary["feature_set"], truth)
        results["combined"] = recovery(url, summary["combined_feature_set"], truth)
        start = time.perf_counter()
        train_url, _, train_dir = analyse(Path(tmp) / "earlier", n_plates=2, seed=1)
        trained = train_run(
            make_engine(train_url, create=False),
            None,
            TrainConfig(epochs=args.epochs, val_fraction=0.5),
            train_dir / "finetuned.pt",
        )
        seconds["fine_tuning"] = time.perf_counter() - start
        start = time.perf_counter()
        summary = embed_run(
            engine, None, EmbedConfig(checkpoint=str(train_dir / "finetuned.pt"))
        )
        seconds["finetuned"] = time.perf_counter() - start
        results["finetuned"] = recovery(url, summary["feature_set"], truth) | {
            "training": {k: trained[k] for k in
                         ("best_epoch", "epochs", "val_accuracy", "chance_accuracy",
                          "val_balanced_accuracy", "balanced_chance", "n_classes",
                          "n_train", "n_val")}
        }  # fmt: skip
        results["combined_finetuned"] = recovery(
            url, summary["combined_feature_set"], truth
        )
    for name, figures in results.items():
        print(f"{name}: {figures}")
    save(
        "demo_feature_sets",
        {"command": f"python benchmarks/bench_demo_feature_sets.py --epochs {args.epochs}",
         "seconds": {k: round(v, 1) for k, v in seconds.items()}, "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
