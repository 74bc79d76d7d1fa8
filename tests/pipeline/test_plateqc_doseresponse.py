import numpy as np
import pandas as pd
import pytest

from pipeline.calls.doseresponse import (
    FLAGS,
    fit_dose_response,
    fit_dose_responses,
    four_parameter_logistic,
)
from pipeline.calls.plateqc import edge_effect, plate_z_prime, z_prime
from pipeline.profiling.profiles import normalize_to_controls, well_activity
from tests.conftest import shared_data

DOSES = np.repeat([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], 3)


def test_z_prime_matches_formula():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(10, 1, 32), rng.normal(0, 1, 32)
    expected = 1 - 3 * (pos.std(ddof=1) + neg.std(ddof=1)) / abs(
        pos.mean() - neg.mean()
    )
    assert z_prime(pos, neg) == pytest.approx(expected)
    mad = lambda v: 1.4826 * np.median(np.abs(v - np.median(v)))  # noqa: E731
    robust = 1 - 3 * (mad(pos) + mad(neg)) / abs(np.median(pos) - np.median(neg))
    assert z_prime(pos, neg, robust=True) == pytest.approx(robust)


def test_robust_z_prime_resists_an_outlier():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(10, 1, 32), rng.normal(0, 1, 32)
    clean = z_prime(pos, neg, robust=True)
    pos[0] = 1000
    assert z_prime(pos, neg) < 0
    assert z_prime(pos, neg, robust=True) == pytest.approx(clean, abs=0.1)


def test_z_prime_rejects_too_few_values():
    with pytest.raises(ValueError, match="at least two finite values"):
        z_prime(np.array([1.0, np.nan]), np.array([0.0, 1.0]))


def test_plate_z_prime_per_plate_and_rejects():
    wells = pd.DataFrame(
        {
            "Metadata_Plate": ["P1"] * 8,
            "Metadata_Role": ["positive_control"] * 4 + ["negative_control"] * 4,
            "score": [10, 11, 9, 10, 0, 1, -1, 0],
        }
    )
    table = plate_z_prime(wells, "score")
    assert table.loc[0, "n_positive"] == 4 and table.loc[0, "z_prime"] > 0.5
    with pytest.raises(ValueError, match="lacks columns"):
        plate_z_prime(wells, "nope")
    with pytest.raises(ValueError, match="no plate has"):
        plate_z_prime(wells.assign(Metadata_Role="negative_control"), "score")


def test_edge_effect_finds_low_counts_in_outer_wells():
    names = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]
    edge = [n[0] in "AH" or n[1:] in ("01", "12") for n in names]
    wells = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": names,
            "Metadata_Role": "negative_control",
            "Metadata_CellCount": np.where(edge, 500, 1000),
        }
    )
    table = edge_effect(wells, "Metadata_CellCount")
    assert table.loc[0, "edge_effect"] == pytest.approx(0.5)
    assert table.loc[0, "edge_wells"] == "negative controls"
    # DMSO only in the edge columns (the demo layout): all wells are compared
    screen = wells.assign(
        Metadata_Role=np.where(
            [n[1:] in ("01", "12") for n in names], "negative_control", "treatment"
        )
    )
    table = edge_effect(screen, "Metadata_CellCount")
    assert table.loc[0, "edge_effect"] == pytest.approx(0.5)
    assert table.loc[0, "edge_wells"] == "all wells"
    shift = edge_effect(
        screen.assign(activity=np.where(edge, 2.0, 0.5)), "activity",
        statistic="difference",
    )  # fmt: skip
    assert shift.loc[0, "edge_effect"] == pytest.approx(1.5)
    inner_only = edge_effect(screen[~np.array(edge)], "Metadata_CellCount")
    assert np.isnan(inner_only.loc[0, "edge_effect"])
    assert inner_only.loc[0, "edge_wells"] == "no edge wells"
    no_counts = edge_effect(
        screen.assign(Metadata_CellCount=np.nan), "Metadata_CellCount"
    )
    assert no_counts.loc[0, "edge_wells"] == "no values"


def test_edge_effect_rejects_missing_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        edge_effect(pd.DataFrame({"Metadata_Plate": ["P1"]}), "x")
    wells = pd.DataFrame(
        {"Metadata_Plate": ["P1"], "Metadata_Well": ["A01"],
         "Metadata_Role": ["treatment"], "x": [1.0]}
    )  # fmt: skip
    with pytest.raises(ValueError, match="statistic 'mean' is unknown"):
        edge_effect(wells, "x", statistic="mean")


def test_fit_dose_response_recovers_ec50_and_hill():
    truth = four_parameter_logistic(np.log10(DOSES), 1.0, 5.0, np.log10(0.5), 1.5)
    fits = [
        fit_dose_response(
            DOSES, truth + np.random.default_rng(seed).normal(0, 0.15, len(DOSES))
        )
        for seed in range(20)
    ]
    assert all(fit["flag"] == "ok" for fit in fits)
    assert np.median([fit["ec50"] for fit in fits]) == pytest.approx(0.5, rel=0.1)
    assert np.median([fit["hill"] for fit in fits]) == pytest.approx(1.5, rel=0.2)
    assert np.median([fit["top"] for fit in fits]) == pytest.approx(5.0, abs=0.2)
    coverage = np.mean([fit["ec50_ci_low"] < 0.5 < fit["ec50_ci_high"] for fit in fits])
    assert coverage >= 0.8  # a 95% interval, 20 noisy replicates of the experiment


def test_fit_dose_response_flags_flat_and_non_monotone():
    rng = np.random.default_rng(2)
    assert fit_dose_response(DOSES, rng.normal(0, 1, len(DOSES)))["flag"] == "flat"
    rising = four_parameter_logistic(np.log10(DOSES), 1.0, 5.0, np.log10(0.1), 1.5)
    bell = np.where(DOSES > 3, 1.0, rising) + rng.normal(0, 0.1, len(DOSES))
    assert fit_dose_response(DOSES, bell)["flag"] == "non_monotone"


def test_fit_dose_response_flags_ec50_beyond_tested_doses():
    rng = np.random.default_rng(3)
    late = four_parameter_logistic(np.log10(DOSES), 0.0, 5.0, np.log10(300.0), 2.0)
    fit = fit_dose_response(DOSES, late + rng.normal(0, 0.05, len(DOSES)))
    assert fit["flag"] in ("ec50_outside_range", "flat")


@pytest.mark.parametrize(
    ("conc", "resp", "match"),
    [
        ([1, 2, 3], [1, 2, 3], "at least 5 points"),
        ([1, 1, 1, 2, 2], [1, 2, 3, 4, 5], "3 concentrations"),
        ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5], "positive"),
        ([1, 2, 3, 4, 5], [1, 2, np.nan, 4, 5], "finite"),
        ([1, 2, 3, 4, 5], [1, 2, 3], "equal-length"),
    ],
)
def test_fit_dose_response_rejects(conc, resp, match):
    with pytest.raises(ValueError, match=match):
        fit_dose_response(np.array(conc, float), np.array(resp, float))


def test_fit_dose_responses_real_lincs_58_compounds():
    """Activity (RMS robust z vs DMSO) of 58 real compounds x 6 doses: every compound
    gets a fit or a flag, and the fitted EC50s lie in or near the tested range."""
    path = shared_data("profiles/lincs_cpg0004_plate_SQ00015054")
    raw = pd.read_csv(path / "SQ00015054_normalized_feature_select.csv.gz")
    is_dmso = raw["Metadata_broad_sample"] == "DMSO"
    meta = pd.DataFrame(
        {
            "Metadata_Plate": raw["Metadata_Plate"],
            "Metadata_Compound": raw["Metadata_broad_sample"],
            "Metadata_Concentration": raw["Metadata_mmoles_per_liter"],
            "Metadata_Role": np.where(is_dmso, "negative_control", "treatment"),
        }
    )
    profiles = pd.concat(
        [meta, raw.loc[:, ~raw.columns.str.startswith("Metadata_")]], axis=1
    )
    normalized = normalize_to_controls(profiles)
    wells = meta.assign(activity=well_activity(normalized))
    fits = fit_dose_responses(wells[~is_dmso], response="activity")
    assert len(fits) == 58
    assert set(fits["flag"]) <= set(FLAGS)
    ok = fits[fits["flag"] == "ok"]
    assert len(ok) >= 3
    assert ok["ec50"].between(0.04, 10).all()


def test_fit_dose_responses_rejects_missing_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        fit_dose_responses(pd.DataFrame({"a": [1]}), response="activity")


def test_plate_qc_table_on_the_demo_plate(demo_plate, sqlite_url):
    from db.session import make_engine
    from db.store import resolve_run
    from pipeline.config import config_from_dict
    from pipeline.images.demo import CHANNELS
    from pipeline.run import run_experiment
    from pipeline.views.export import plate_qc_table, read_profiles

    config = config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    run_experiment(
        demo_plate["images"], demo_plate["platemap"], config=config, db_url=sqlite_url
    )
    engine = make_engine(sqlite_url)
    normalized = read_profiles(engine, *resolve_run(engine))[1]
    table = plate_qc_table(normalized)
    row = table.iloc[0]
    assert (row["n_positive"], row["n_negative"]) == (8, 16)
    # 8 cells per well on this tiny plate: Z' is defined but far from assay quality
    assert -np.inf < row["z_prime_activity"] <= 1
    assert -np.inf < row["robust_z_prime_activity"] <= 1
    assert "z_prime_cell_count" not in table  # no control declared to change it
    # all DMSO wells are on the edge: the edge effect comes from all wells
    assert row["edge_wells"] == "all wells"
    assert 0 < row["edge_to_inner_cell_count"] < 10
    assert np.isfinite(row["edge_minus_inner_activity"])
    toxic = plate_qc_table(normalized, cell_count_control="Toxicol")
    assert np.isfinite(toxic.loc[0, "z_prime_cell_count"])
    with pytest.raises(ValueError, match="'Nope' is not a compound"):
        plate_qc_table(normalized, cell_count_control="Nope")
