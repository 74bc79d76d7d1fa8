"""Hit calls against the demo's truth for 1, 2 and 3 replicate plates.

The demo experiment (`pipeline.images.demo`: 96-well plates, 9 compounds x 8 doses, 7 truly
active, DMSO in columns 1 and 12, one field per well here) is generated with 1, 2
and 3 replicate plates, run through `pipeline.run.run_experiment` into SQLite and
called by the same path as `phenoscreen hits` (`pipeline.views.export.read_hit_tables`,
classical features). Reported per design: the tests used, true actives called,
inactive compounds called, hits without an active dose (must be 0) and the
compounds with an EC50 (fit flag ``ok``).

    python benchmarks/bench_demo_designs.py [--fields-per-well 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_demo, save  # noqa: E402

from db.session import make_engine  # noqa: E402
from db.store import resolve_run  # noqa: E402
from pipeline.views.export import read_hit_tables  # noqa: E402


def score(out: Path, n_plates: int, fields_per_well: int) -> dict[str, object]:
    """Run one demo design and compare its hit list with the truth."""
    start = time.perf_counter()
    url, demo = run_demo(out, n_plates=n_plates, fields_per_well=fields_per_well)
    engine = make_engine(url, create=False)
    hits, doses = read_hit_tables(engine, *resolve_run(engine))
    truth = json.loads(demo["truth"].read_text())["compounds"]
    active = {c["compound"] for c in truth if c["is_active"]}
    called = set(hits.loc[hits["is_hit"], "Metadata_Compound"])
    treated = doses[doses["Metadata_Role"] == "treatment"]
    return {
        "tests": {str(k): int(v) for k, v in treated["test"].value_counts().items()},
        "actives_called": f"{len(called & active)}/{len(active)}",
        "missed_actives": sorted(active - called),
        "inactives_called": sorted(called - active),
        "hits_without_active_dose": int(
            (hits.loc[hits["is_hit"], "n_active_doses"] < 1).sum()
        ),
        "ec50_ok": sorted(hits.loc[hits["ec50_flag"] == "ok", "Metadata_Compound"]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields-per-well", type=int, default=1)
    args = parser.parse_args()
    figures: dict[str, object] = {"fields_per_well": args.fields_per_well}
    with tempfile.TemporaryDirectory() as tmp:
        for n_plates in (1, 2, 3):
            result = score(Path(tmp) / f"p{n_plates}", n_plates, args.fields_per_well)
            figures[f"{n_plates}_plates"] = result
            print(f"{n_plates} plate(s): {result}", flush=True)
    save("demo_designs", figures)


if __name__ == "__main__":
    main()
