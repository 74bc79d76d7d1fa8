import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from pipeline.profiling.activity import (
    average_precision,
    leave_out_null,
    ledoit_wolf_shrinkage_gram,
    mahalanobis_to_controls,
    mean_average_precision,
    null_average_precision,
    percent_replicating,
    replicate_average_precision,
)
from pipeline.profiling.profiles import sphere_to_controls
from tests.conftest import shared_data


def make_wells(
    *, n_controls=16, n_compounds=10, n_replicates=4, hit=None, shift=3.0, rng=0
):
    """Gaussian well profiles; compound `hit` is moved along a random direction."""
    generator = np.random.default_rng(rng)
    rows, values = [], []
    direction = generator.normal(size=30)
    for _ in range(n_controls):
        rows.append(("DMSO", "negative_control"))
        values.append(generator.normal(size=30))
    for c in range(n_compounds):
        for _ in range(n_replicates):
            rows.append((f"cmpd_{c}", "treatment"))
            values.append(
                generator.normal(size=30) + (shift * direction if c == hit else 0)
            )
    meta = pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_Role"])
    return pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)


def test_average_precision_matches_sklearn_per_query():
    wells = make_wells(hit=3)
    ap = average_precision(wells, group_by=["Metadata_Compound"])
    features = wells.filter(like="f").to_numpy()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    controls = np.flatnonzero(wells["Metadata_Role"] == "negative_control")
    for index, row in ap.sample(8, random_state=0).iterrows():
        group = wells.index[(wells["Metadata_Compound"] == row["Metadata_Compound"])]
        positives = [i for i in group if i != index]
        candidates = np.r_[positives, controls]
        scores = unit[candidates] @ unit[index]
        labels = np.r_[np.ones(len(positives)), np.zeros(len(controls))]
        assert row["average_precision"] == pytest.approx(
            average_precision_score(labels, scores)
        )
        assert (row["n_pos"], row["n_total"]) == (3, 3 + 16)


def test_null_average_precision_matches_exact_enumeration():
    n_pos, n_total = 2, 6
    exact = [
        np.mean(np.arange(1, n_pos + 1) / (np.array(ranks) + 1))
        for ranks in itertools.combinations(range(n_total), n_pos)
    ]
    null = null_average_precision(n_pos, n_total, null_size=60_000, rng=0)
    values, counts = np.unique(np.round(exact, 9), return_counts=True)
    sampled = np.array([np.mean(np.isclose(null, v)) for v in values])
    np.testing.assert_allclose(sampled, counts / len(exact), atol=0.01)


@pytest.mark.parametrize(("args", "match"), [((0, 5), "n_pos"), ((6, 5), "n_pos")])
def test_null_average_precision_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        null_average_precision(*args, null_size=10, rng=0)


def test_mean_average_precision_finds_the_planted_hit_only():
    wells = make_wells(hit=7)
    ap = average_precision(wells, group_by=["Metadata_Compound"])
    result = mean_average_precision(
        ap, group_by=["Metadata_Compound"], null_size=20_000, rng=0
    )
    active = result.loc[result["is_active"], "Metadata_Compound"].tolist()
    assert active == ["cmpd_7"]
    hit = result.set_index("Metadata_Compound").loc["cmpd_7"]
    assert hit["mean_average_precision"] > 0.9 and hit["q_value"] < 0.05
    # AP = 1 for 3 positives among 19 items has null probability 1 / C(19, 3)
    assert hit["p_value"] == pytest.approx(1 / 969, rel=0.2)
    assert (result["q_value"] >= result["p_value"]).all()
    assert (result["n_replicates"] == 4).all()


def test_dmso_only_null_gives_few_hits():
    """Calibration: treatments drawn from the control distribution are rarely called."""
    calls = []
    for seed in range(5):
        wells = make_wells(n_controls=30, n_compounds=40, n_replicates=3, rng=seed)
        ap = average_precision(wells, group_by=["Metadata_Compound"])
        result = mean_average_precision(
            ap, group_by=["Metadata_Compound"], null_size=10_000, rng=seed
        )
        calls.append(result["is_active"].mean())
    assert np.mean(calls) <= 0.05


def test_real_lincs_plate_matches_copairs_reference():
    """copairs 0.5.5 on this plate: mean mAP 0.618, 33/58 compounds at q < 0.05."""
    path = shared_data("profiles/lincs_cpg0004_plate_SQ00015054")
    raw = pd.read_csv(path / "SQ00015054_normalized_feature_select.csv.gz")
    is_dmso = raw["Metadata_broad_sample"] == "DMSO"
    profiles = pd.concat(
        [
            pd.DataFrame(
                {
                    "Metadata_Compound": raw["Metadata_broad_sample"],
                    "Metadata_Role": np.where(is_dmso, "negative_control", "treatment"),
                }
            ),
            raw.loc[:, ~raw.columns.str.startswith("Metadata_")],
        ],
        axis=1,
    )
    ap = average_precision(profiles, group_by=["Metadata_Compound"])
    result = mean_average_precision(
        ap, group_by=["Metadata_Compound"], null_size=50_000, rng=0
    )
    assert len(result) == 58
    assert result["mean_average_precision"].mean() == pytest.approx(0.618, abs=0.001)
    assert 31 <= result["is_active"].sum() <= 34


def test_average_precision_rejects_bad_input():
    wells = make_wells()
    with pytest.raises(ValueError, match="lacks columns"):
        average_precision(wells, group_by=["Metadata_Dose"])
    with pytest.raises(ValueError, match="no negative_control rows"):
        average_precision(
            wells.assign(Metadata_Role="treatment"), group_by=["Metadata_Compound"]
        )
    with_nan = wells.copy()
    with_nan.loc[3, "f0"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        average_precision(with_nan, group_by=["Metadata_Compound"])
    with pytest.raises(ValueError, match="two replicates"):
        average_precision(make_wells(n_replicates=1), group_by=["Metadata_Compound"])


def test_mean_average_precision_rejects_bad_input():
    ap = average_precision(make_wells(), group_by=["Metadata_Compound"])
    with pytest.raises(ValueError, match="lacks columns"):
        mean_average_precision(ap.drop(columns="n_pos"), group_by=["Metadata_Compound"])
    with pytest.raises(ValueError, match="fdr"):
        mean_average_precision(ap, group_by=["Metadata_Compound"], fdr=1.5)


def test_p_value_counts_ties_with_the_null():
    """Two replicates that retrieve each other first among 20 controls: AP = 1 has
    probability 1/21 under the null, so p must be about 1/21, not 1/null_size."""
    ap = pd.DataFrame(
        {
            "Metadata_Compound": ["x", "x"],
            "average_precision": [1.0, 1.0],
            "n_pos": [1, 1],
            "n_total": [21, 21],
        }
    )
    result = mean_average_precision(
        ap, group_by=["Metadata_Compound"], null_size=50_000, rng=0
    )
    assert result.loc[0, "p_value"] == pytest.approx(1 / 21, rel=0.1)


def test_percent_replicating_separates_replicating_from_random_groups():
    generator = np.random.default_rng(0)
    rows, values = [], []
    for c in range(20):
        centre = generator.normal(size=40) * (3 if c < 10 else 0)  # 10 with a signature
        for _ in range(4):
            rows.append((f"cmpd_{c}", "treatment"))
            values.append(centre + generator.normal(size=40))
    meta = pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_Role"])
    profiles = pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)
    percent, table = percent_replicating(
        profiles, group_by=["Metadata_Compound"], rng=0
    )
    assert percent == pytest.approx(50.0, abs=10)
    replicating = set(table.loc[table["is_replicating"], "Metadata_Compound"])
    assert {f"cmpd_{c}" for c in range(10)} <= replicating
    assert (table["n_replicates"] == 4).all()


def test_percent_replicating_rejects():
    with pytest.raises(ValueError, match="lacks columns"):
        percent_replicating(make_wells(), group_by=["Metadata_Dose"])
    with pytest.raises(ValueError, match="fewer than two treatments"):
        percent_replicating(make_wells(n_compounds=1), group_by=["Metadata_Compound"])


def test_percent_replicating_real_jump_moa_plate_matches_published():
    """Published for BR00117060a10x (sphered profiles): Percent Replicating 42.2."""
    path = shared_data("profiles/jump_moa_cpg0002_plate_BR00117060a10x")
    raw = pd.read_csv(
        path / "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"
    )
    is_negcon = raw["Metadata_control_type"] == "negcon"
    meta = pd.DataFrame(
        {
            "Metadata_Plate": raw["Metadata_Plate"],
            "Metadata_Compound": raw["Metadata_broad_sample"],
            "Metadata_Role": np.where(is_negcon, "negative_control", "treatment"),
        }
    )
    profiles = pd.concat(
        [meta, raw.loc[:, ~raw.columns.str.startswith("Metadata_")]], axis=1
    )
    percent, table = percent_replicating(
        sphere_to_controls(profiles), group_by=["Metadata_Compound"], rng=0
    )
    assert len(table) == 88
    assert percent == pytest.approx(42.2, abs=5)


def test_mahalanobis_matches_ledoit_wolf_and_is_calibrated_on_controls():
    from sklearn.covariance import LedoitWolf

    pvals = []
    for seed in range(10):
        wells = make_wells(n_controls=24, n_compounds=20, n_replicates=1, rng=seed)
        wells = wells.assign(Metadata_Plate="P1")
        scores = mahalanobis_to_controls(wells)
        is_control = wells["Metadata_Role"] == "negative_control"
        pvals.append(scores.loc[~is_control, "mahalanobis_p"].to_numpy())
        values = wells.filter(like="f").to_numpy()
        controls = values[is_control]
        mean, std = controls.mean(axis=0), controls.std(axis=0, ddof=1)
        reference = (
            LedoitWolf()
            .fit((controls - mean) / std)
            .mahalanobis((values[~is_control] - mean) / std)
        )
        np.testing.assert_allclose(
            scores.loc[~is_control, "mahalanobis"] ** 2, reference, rtol=1e-8
        )
    pvals = np.concatenate(pvals)  # treatments drawn from the controls' distribution
    assert 0.01 <= (pvals < 0.05).mean() <= 0.09 and 0.4 < np.median(pvals) < 0.6
    moved = make_wells(n_compounds=3, n_replicates=1, hit=0, shift=3.0).assign(
        Metadata_Plate="P1"
    )
    scores = mahalanobis_to_controls(moved)
    hit = moved["Metadata_Compound"] == "cmpd_0"
    # conformal p: farther than all 16 controls' leave-one-out distances
    assert scores.loc[hit, "mahalanobis_p"].item() == 1 / 17
    rescaled = moved.assign(f0=moved["f0"] * 100 + 5)  # per-feature scaling
    pd.testing.assert_frame_equal(mahalanobis_to_controls(rescaled), scores)


@pytest.mark.parametrize("shape", [(12, 450), (30, 40), (5, 3000)])
def test_ledoit_wolf_shrinkage_gram_equals_sklearn(shape):
    from sklearn.covariance import ledoit_wolf_shrinkage

    generator = np.random.default_rng(0)
    values = generator.normal(size=shape) * generator.uniform(0.5, 2, shape[1])
    values -= values.mean(axis=0)
    assert ledoit_wolf_shrinkage_gram(values) == pytest.approx(
        ledoit_wolf_shrinkage(values, assume_centered=True), rel=1e-10
    )


def test_ledoit_wolf_shrinkage_gram_rejects():
    with pytest.raises(ValueError, match="shape"):
        ledoit_wolf_shrinkage_gram(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="shape"):
        ledoit_wolf_shrinkage_gram(np.zeros(3))


def test_leave_out_null_matches_the_distance_of_left_out_wells():
    wells = make_wells(n_controls=20, n_compounds=0)
    controls = wells.filter(like="f").to_numpy()
    null = leave_out_null(controls, 3, null_size=200, rng=0)
    loo = mahalanobis_to_controls(wells.assign(Metadata_Plate="P1"))["mahalanobis"]
    assert null.shape == (200, 3) and (null > 0).all()
    assert 0.7 < np.median(null) / np.median(loo**2) < 1.5  # same scale
    with pytest.raises(ValueError, match="k"):
        leave_out_null(controls, 18)
    with pytest.raises(ValueError, match="null_size"):
        leave_out_null(controls, 2, null_size=0)


def test_mahalanobis_to_controls_rejects():
    wells = make_wells(n_controls=3, n_compounds=2).assign(Metadata_Plate="P1")
    with pytest.raises(ValueError, match="at least four"):
        mahalanobis_to_controls(wells)
    with pytest.raises(ValueError, match="Metadata_Plate"):
        mahalanobis_to_controls(make_wells())


def test_replicate_average_precision_retrieves_moved_replicates_only():
    wells = make_wells(n_compounds=6, n_replicates=3, hit=2, shift=4.0)
    table = replicate_average_precision(wells, group_by=["Metadata_Compound"])
    scores = table.set_index("Metadata_Compound")["replicate_map"]
    assert len(scores) == 6 and scores["cmpd_2"] == 1.0
    assert scores.drop(index="cmpd_2").max() < 0.9
    with pytest.raises(ValueError, match="Metadata_Dose"):
        replicate_average_precision(wells, group_by=["Metadata_Dose"])
    broken = wells.assign(f0=np.where(wells.index == 20, np.nan, wells["f0"]))
    with pytest.raises(ValueError, match="NaN"):
        replicate_average_precision(broken, group_by=["Metadata_Compound"])
