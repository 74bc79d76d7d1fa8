import json

import numpy as np
import pandas as pd
import pytest

from db.session import make_engine
from db.store import resolve_run
from pipeline.config import config_from_dict
from pipeline.demo import CHANNELS, write_demo_plate
from pipeline.export import hit_tables, read_profiles
from pipeline.hits import (
    DOSE_COLUMNS,
    HIT_COLUMNS,
    call_hits,
    dose_distances,
    nearest_compounds,
    replicate_consistency,
    simes,
)
from pipeline.run import run_experiment

DOSE_KEYS_NO_ROLE = ["Metadata_Compound", "Metadata_Concentration"]


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
    # 100 DMSO wells: single-well p-values go down to 1 / 101
    normalized = make_normalized(
        hit_doses=(0.1, 1.0, 10.0), n_replicates=1, n_controls=100, rng=1
    )
    hits, doses = call_hits(normalized, null_size=20_000)
    assert doses["p_value"].isna().all()
    called = hits.set_index("Metadata_Compound")
    assert called.loc["cmpd_0", "is_hit"] and called["is_hit"].sum() == 1
    # one well per dose: doses are called on their Mahalanobis distance to DMSO
    assert (doses["active_by"] == "mahalanobis").all()
    active = doses.loc[doses["is_active"], "Metadata_Compound"]
    assert set(active) == {"cmpd_0"} and len(active) == 3
    assert called.loc["cmpd_0", "distance_q"] < 0.05
    assert (called.drop(index="cmpd_0")["distance_q"] > 0.05).all()


def test_dose_distances_and_replicate_consistency():
    normalized = make_normalized()
    distances = dose_distances(normalized).set_index(DOSE_KEYS_NO_ROLE)
    assert distances.loc[("cmpd_0", 10.0), "mahalanobis_q"].item() < 0.05
    assert (distances.drop(index=("cmpd_0", 10.0))["mahalanobis_q"] > 0.05).all()
    consistency = replicate_consistency(
        normalized[normalized["Metadata_Role"] != "negative_control"]
    ).set_index(DOSE_KEYS_NO_ROLE)
    assert consistency.loc[("cmpd_0", 10.0), "is_replicating"].item()
    assert consistency.loc[("cmpd_0", 10.0), "replicate_map"].item() == 1.0
    assert consistency.drop(index=("cmpd_0", 10.0))["replicate_map"].median() < 0.5
    assert consistency["is_replicating"].sum() <= 2
    few_controls = normalized.drop(index=normalized.index[3:24])  # 3 DMSO wells
    assert dose_distances(few_controls).empty  # logged, not fatal
    assert replicate_consistency(normalized.iloc[:27]).empty  # one compound-dose
    with pytest.raises(ValueError, match="Metadata_Role"):
        dose_distances(normalized.drop(columns="Metadata_Role"))
    with pytest.raises(ValueError, match="Metadata_Role"):
        replicate_consistency(normalized.drop(columns="Metadata_Role"))


def test_nearest_compounds_lists_the_most_similar_annotated_compounds():
    normalized = make_normalized(hit_doses=(10.0,))
    # cmpd_1 copies cmpd_0's phenotype at its top dose
    moved = (normalized["Metadata_Compound"] == "cmpd_0") & (
        normalized["Metadata_Concentration"] == 10.0
    )
    twin = (normalized["Metadata_Compound"] == "cmpd_1") & (
        normalized["Metadata_Concentration"] == 10.0
    )
    features = [c for c in normalized.columns if c.startswith("f")]
    normalized.loc[twin, features] = normalized.loc[moved, features].to_numpy() + 0.1
    _, doses = call_hits(normalized, null_size=2_000)
    nearest = nearest_compounds(normalized, doses, k=2)
    assert nearest["cmpd_0"].startswith("cmpd_1 ") and nearest["cmpd_0"].count(";") == 1
    annotated = normalized.assign(
        Metadata_MoA=normalized["Metadata_Compound"].map(
            {"cmpd_1": "tubulin", "cmpd_2": "HDAC"}
        )
    )
    nearest = nearest_compounds(annotated, doses, k=3)
    assert (
        nearest["cmpd_0"].startswith("cmpd_1 (tubulin) ")
        and "(HDAC)" in nearest["cmpd_0"]
    )
    assert "cmpd_3" not in nearest["cmpd_0"]  # not annotated
    with pytest.raises(ValueError, match="k = 0"):
        nearest_compounds(normalized, doses, k=0)
    with pytest.raises(ValueError, match="activity_z"):
        nearest_compounds(normalized, doses.drop(columns="activity_z"))


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
    hits, _ = hit_tables(read_profiles(engine, *resolve_run(engine))[1])
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
