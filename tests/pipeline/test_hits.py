import json

import numpy as np
import pandas as pd
import pytest

from db.session import make_engine
from db.store import resolve_run
from pipeline.config import config_from_dict
from pipeline.demo import CHANNELS, write_demo_plate
from pipeline.export import hit_tables, read_well_profiles
from pipeline.hits import DOSE_COLUMNS, HIT_COLUMNS, call_hits, simes
from pipeline.run import run_experiment


def make_normalized(*, hit_doses=(10.0,), n_replicates=3, n_controls=24, rng=0):
    """Normalized-looking wells: 4 compounds x 3 doses; `cmpd_0` moves at hit_doses."""
    generator = np.random.default_rng(rng)
    direction = generator.normal(size=25)
    rows, values = [], []
    for _ in range(n_controls):
        rows.append(("DMSO", np.nan, "negative_control", 100))
        values.append(generator.normal(size=25))
    for c in range(4):
        for dose in (0.1, 1.0, 10.0):
            for _ in range(n_replicates):
                moved = c == 0 and dose in hit_doses
                rows.append(
                    (
                        f"cmpd_{c}",
                        dose,
                        "treatment",
                        30 if c == 3 and dose == 10 else 100,
                    )
                )
                values.append(
                    generator.normal(size=25) + (3 * direction if moved else 0)
                )
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Compound",
            "Metadata_Concentration",
            "Metadata_Role",
            "Metadata_CellCount",
        ],
    )
    return pd.concat(
        [meta.assign(Metadata_Plate="P1"), pd.DataFrame(values).add_prefix("f")], axis=1
    )


def test_simes_matches_formula_and_rejects_empty():
    assert simes(np.array([0.01, 0.04, 0.03])) == pytest.approx(
        min(3 * 0.01, 3 * 0.03 / 2, 0.04)
    )
    assert simes(np.array([0.9])) == 0.9
    with pytest.raises(ValueError, match="empty"):
        simes(np.array([]))


def test_call_hits_finds_a_compound_active_at_its_top_dose_only():
    hits, doses = call_hits(make_normalized(), null_size=20_000)
    assert list(hits.columns[: len(HIT_COLUMNS)]) == HIT_COLUMNS or set(
        HIT_COLUMNS
    ) <= set(hits)
    called = hits.set_index("Metadata_Compound")
    assert called.loc["cmpd_0", "is_hit"]
    assert called.loc["cmpd_0", "n_active_doses"] == 1
    assert not called.drop(index="cmpd_0")["is_hit"].any()
    assert called.loc["cmpd_3", "is_toxic"] and not called.loc["cmpd_0", "is_toxic"]
    assert set(DOSE_COLUMNS) <= set(doses.columns)
    top = doses[
        (doses["Metadata_Compound"] == "cmpd_0")
        & (doses["Metadata_Concentration"] == 10)
    ]
    assert top["is_active"].item() and top["q_value"].item() < 0.05


def test_call_hits_single_replicate_design_uses_doses_as_replicates():
    normalized = make_normalized(hit_doses=(0.1, 1.0, 10.0), n_replicates=1)
    hits, doses = call_hits(normalized, null_size=20_000)
    assert doses["p_value"].isna().all()
    called = hits.set_index("Metadata_Compound")
    assert called.loc["cmpd_0", "is_hit"] and called["is_hit"].sum() == 1


def test_call_hits_rejects():
    with pytest.raises(ValueError, match="fdr"):
        call_hits(make_normalized(), fdr=0)
    only_controls = make_normalized()
    only_controls = only_controls[only_controls["Metadata_Role"] == "negative_control"]
    with pytest.raises(ValueError, match="no treatment"):
        call_hits(only_controls)


@pytest.mark.slow
def test_demo_ground_truth_is_recovered(tmp_path):
    """Three replicate demo plates end to end: strong actives are hits, inactive
    compounds are not, and the cytotoxic compound is flagged toxic. (The weak
    compound and the texture phenotype need more cells or texture features.)"""
    demo = write_demo_plate(
        tmp_path / "demo",
        n_plates=3,
        fields_per_well=1,
        field_size_px=192,
        cells_per_field=16,
        seed=3,
    )
    url = f"sqlite:///{tmp_path}/demo.db"
    config = config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    run_experiment(demo["images"], demo["platemap"], config=config, db_url=url)
    engine = make_engine(url)
    hits, _ = hit_tables(read_well_profiles(engine, *resolve_run(engine)))
    called = hits.set_index("Metadata_Compound")
    truth = json.loads(demo["truth"].read_text())["compounds"]
    profile_actives = {
        c["compound"]
        for c in truth
        if c["effect_at_top_dose"] >= 0.5
        and c["effect"] not in ("cell_loss", "organelle_texture")
    }
    inactive = {c["compound"] for c in truth if not c["is_active"]}
    assert called.loc[sorted(profile_actives), "is_hit"].all()
    assert not called.loc[sorted(inactive), "is_hit"].any()
    assert called.loc["Toxicol", "is_toxic"]
    strong = called.loc[["Nucleomax", "Mitoglow", "Condensin-7"]]
    assert (strong["ec50_flag"] == "ok").all()
    # activity is a distance over all features, not the effect itself: its EC50
    # follows the true one within a few-fold (the noise floor shifts it upwards)
    true_ec50 = {c["compound"]: c["ec50_uM"] for c in truth}
    for name, row in strong.iterrows():
        assert 1 / 4 < row["ec50"] / true_ec50[name] < 4, name
