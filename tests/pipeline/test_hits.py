import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from db.session import make_engine
from db.store import resolve_run
from pipeline.calls.hits import (
    DOSE_COLUMNS,
    HIT_COLUMNS,
    _hierarchical_calls,
    call_hits,
    choose_tests,
    dose_distances,
    lower_median,
    map_p_floor,
    nearest_compounds,
    replicate_consistency,
    simes,
)
from pipeline.config import config_from_dict
from pipeline.images.demo import CHANNELS, write_demo_plate
from pipeline.run import run_experiment
from pipeline.views.export import hit_tables, read_profiles

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
    # 3 replicates, 24 controls, 12 doses: mAP's floor (1/325) x 12 <= 0.05
    hits, doses = call_hits(make_normalized(), null_size=20_000)
    assert set(HIT_COLUMNS) <= set(hits) and set(DOSE_COLUMNS) <= set(doses)
    called = hits.set_index("Metadata_Compound")
    assert called.loc["cmpd_0", "is_hit"]
    assert called.loc["cmpd_0", "n_active_doses"] == 1
    assert called.loc["cmpd_0", "test"] == "mAP"
    assert not called.drop(index="cmpd_0")["is_hit"].any()
    assert called.loc["cmpd_3", "is_toxic"] and not called.loc["cmpd_0", "is_toxic"]
    top = doses[
        (doses["Metadata_Compound"] == "cmpd_0")
        & (doses["Metadata_Concentration"] == 10)
    ]
    assert top["is_active"].item() and top["q_value"].item() < 0.05
    assert top["p_value"].item() == top["map_p"].item()


def test_call_hits_single_replicate_design_uses_the_distance_test():
    normalized = make_normalized(
        hit_doses=(0.1, 1.0, 10.0), n_replicates=1, n_controls=16, rng=1
    )
    hits, doses = call_hits(normalized, null_size=20_000)
    assert (doses["test"] == "distance").all()
    assert doses["map_p"].isna().all()
    assert (doses["p_value"] == doses["mahalanobis_p"]).all()
    called = hits.set_index("Metadata_Compound")
    assert called.loc["cmpd_0", "is_hit"] and called["is_hit"].sum() == 1
    # no floor at 1 / 17: the parametric tail reaches far below 0.05
    active = doses.loc[doses["is_active"], "Metadata_Compound"]
    assert set(active) == {"cmpd_0"} and len(active) == 3
    assert called.loc["cmpd_0", "q_value"] < 0.01


def test_hierarchical_calls_never_leave_a_hit_without_an_active_dose():
    # cmpd_0 moves weakly at every dose: Simes over doses may call the compound
    # only through its strongest dose, which is then active
    normalized = make_normalized(hit_doses=(0.1, 1.0, 10.0), n_replicates=2, rng=4)
    for shift in (0.3, 0.5, 0.8):
        moved = normalized["Metadata_Compound"] == "cmpd_0"
        weak = normalized.copy()
        features = [c for c in weak.columns if c.startswith("f")]
        weak.loc[moved, features] = weak.loc[moved, features] * shift
        hits, doses = call_hits(weak, null_size=2_000)
        n_active = doses.groupby("Metadata_Compound")["is_active"].sum()
        for _, row in hits.iterrows():
            assert row["is_hit"] == (n_active[row["Metadata_Compound"]] >= 1)


def test_choose_tests_and_map_p_floor():
    assert map_p_floor(2, 32) == pytest.approx(1 / 33)
    assert map_p_floor(3, 16) == pytest.approx(1 / 153)
    n_wells = pd.Series([1, 2, 3, 4])
    assert list(choose_tests(n_wells, n_controls=48, multiplier=20, fdr=0.05)) == [
        "distance", "distance", "mAP", "mAP"
    ]  # fmt: skip
    # a 1/1225 floor cannot reach 0.05 over 72 doses: the distance test instead
    assert list(choose_tests(n_wells, n_controls=48, multiplier=72, fdr=0.05)) == [
        "distance", "distance", "distance", "mAP"
    ]  # fmt: skip
    # many controls: the permutation null's own size is the floor (1 / 100,001)
    big = choose_tests(pd.Series([4]), n_controls=300, multiplier=8000, fdr=0.05)
    assert list(big) == ["distance"]
    with pytest.raises(ValueError, match="n_replicates >= 2"):
        map_p_floor(1, 10)
    with pytest.raises(ValueError, match="multiplier >= 1"):
        choose_tests(n_wells, n_controls=48, multiplier=0, fdr=0.05)


def test_every_hit_has_an_active_dose_even_at_rounding_ties():
    # 5 of 6 compounds at p = 0.25 / 6: BH puts their q right at 0.05 - 1 ulp
    doses = pd.DataFrame(
        {
            "Metadata_Compound": [f"c{i}" for i in range(6)],
            "p_value": [0.25 / 6] * 5 + [0.9],
        }
    )
    calls, compound_q = _hierarchical_calls(doses, 0.05)
    hits = compound_q[compound_q < 0.05].index
    active = calls.loc[calls["q_value"] < 0.05, "Metadata_Compound"]
    assert set(active) == set(hits)


def test_lower_median_takes_the_smaller_of_two_and_rejects_1d():
    assert lower_median(np.array([[4.0, 1.0, 9.0]])).tolist() == [4.0]
    with pytest.raises(ValueError, match="shape"):
        lower_median(np.array([1.0, 2.0]))


def test_dose_distances_and_replicate_consistency():
    normalized = make_normalized()
    distances = dose_distances(normalized).set_index(DOSE_KEYS_NO_ROLE)
    assert distances.loc[("cmpd_0", 10.0), "mahalanobis_p"].item() < 1e-3
    rest = distances.drop(index=("cmpd_0", 10.0))["mahalanobis_p"]
    assert (false_discovery_control(rest, method="bh") > 0.05).all()
    # one aberrant well of a duplicate does not make the dose look active
    outlier = normalized.copy()
    row = outlier.index[(outlier["Metadata_Compound"] == "cmpd_2")][0]
    features = [c for c in outlier.columns if c.startswith("f")]
    outlier.loc[row, features] = 20.0
    pair = outlier.drop(index=[row + 2])  # cmpd_2 at 0.1: two wells left
    distances = dose_distances(pair).set_index(DOSE_KEYS_NO_ROLE)
    assert distances.loc[("cmpd_2", 0.1), "mahalanobis_p"].item() > 0.01
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
    with pytest.raises(ValueError, match="null_size"):
        dose_distances(normalized, null_size=1)
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
    # only cmpd_1 passes the cosine cut-off: unrelated noise profiles do not
    assert nearest["cmpd_0"].startswith("cmpd_1 ") and ";" not in nearest["cmpd_0"]
    assert nearest["cmpd_2"] == ""
    every = nearest_compounds(normalized, doses, k=2, min_similarity=-1)
    assert every["cmpd_0"].count(";") == 1
    annotated = normalized.assign(
        Metadata_MoA=normalized["Metadata_Compound"].map(
            {"cmpd_1": "tubulin", "cmpd_2": "HDAC"}
        )
    )
    nearest = nearest_compounds(annotated, doses, k=3, min_similarity=-1)
    assert (
        nearest["cmpd_0"].startswith("cmpd_1 (tubulin) ")
        and "(HDAC)" in nearest["cmpd_0"]
    )
    assert "cmpd_3" not in nearest["cmpd_0"]  # not annotated
    with pytest.raises(ValueError, match="k = 0"):
        nearest_compounds(normalized, doses, k=0)
    with pytest.raises(ValueError, match="min_similarity"):
        nearest_compounds(normalized, doses, min_similarity=2)
    with pytest.raises(ValueError, match="activity"):
        nearest_compounds(normalized, doses.drop(columns="activity"))


def test_call_hits_rejects():
    with pytest.raises(ValueError, match="fdr"):
        call_hits(make_normalized(), fdr=0)
    only_controls = make_normalized()
    only_controls = only_controls[only_controls["Metadata_Role"] == "negative_control"]
    with pytest.raises(ValueError, match="no treatment"):
        call_hits(only_controls)
    single = make_normalized(n_replicates=1, n_controls=3)
    with pytest.raises(ValueError, match="at least 4 negative-control wells"):
        call_hits(single)


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


def test_a_single_positive_control_well_does_not_block_the_hit_call():
    # 3 DMSO wells: no distance test, so treatments in triplicate go to mAP; the
    # lone positive-control well simply gets no p-value
    normalized = make_normalized(n_controls=3)
    control = normalized.iloc[[-1]].assign(
        Metadata_Compound="STS", Metadata_Concentration=1.0,
        Metadata_Role="positive_control",
    )  # fmt: skip
    hits, doses = call_hits(pd.concat([normalized, control], ignore_index=True))
    sts = doses[doses["Metadata_Compound"] == "STS"]
    assert sts["p_value"].isna().all() and not sts["is_active"].any()
    assert (doses.loc[doses["Metadata_Role"] == "treatment", "test"] == "mAP").all()
    assert "STS" not in set(hits["Metadata_Compound"])
