import numpy as np
import pandas as pd
import pytest

from pipeline.profiling.featureselect import select_features
from pipeline.profiling.profiles import sphere_to_controls
from tests.conftest import shared_data


def make_table(n=60, rng=0):
    generator = np.random.default_rng(rng)
    base = generator.normal(size=(n, 6))
    table = pd.DataFrame(base, columns=[f"f{i}" for i in range(6)])
    table["constant"] = 1.0
    table["mostly_nan"] = np.where(np.arange(n) % 2, np.nan, 1.0)
    table["copy_of_f1"] = 2 * table["f1"] + 1 + generator.normal(0, 0.01, n)
    table["rare_value"] = np.where(np.arange(n) == 0, 5.0, 0.0)
    return pd.concat([pd.DataFrame({"Metadata_Well": range(n)}), table], axis=1)


def test_select_features_drops_constant_missing_rare_and_correlated():
    kept = select_features(make_table())
    assert kept == [f"f{i}" for i in range(6)]


def greedy_full_matrix(values, threshold):
    corr = np.abs(np.corrcoef(values, rowvar=False))
    kept = []
    for j in range(values.shape[1]):
        if all(corr[j, k] <= threshold for k in kept):
            kept.append(j)
    return kept


def test_select_features_blocks_match_the_full_matrix_greedy():
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(80, 10))
    values = latent @ rng.normal(size=(10, 40)) + rng.normal(0, 0.3, (80, 40))
    table = pd.DataFrame(values).add_prefix("f")
    expected = [f"f{j}" for j in greedy_full_matrix(values, 0.8)]
    for block_size in (1, 7, 512):
        assert (
            select_features(table, corr_threshold=0.8, block_size=block_size)
            == expected
        )


def test_select_features_real_lincs_profiles():
    path = shared_data("profiles/lincs_cpg0004_plate_SQ00015054")
    raw = pd.read_csv(path / "SQ00015054_normalized_feature_select.csv.gz")
    kept = select_features(raw)
    features = [c for c in raw.columns if not c.startswith("Metadata_")]
    assert 0.5 * len(features) < len(kept) <= len(features)
    corr = np.abs(np.corrcoef(raw[kept].to_numpy(), rowvar=False))
    np.fill_diagonal(corr, 0)
    assert corr.max() <= 0.9


def test_select_features_measures_correlations_on_the_rows_given():
    table = make_table()
    shifted = np.arange(len(table)) >= 40  # a treatment moves f0 and f3 together
    table.loc[shifted, ["f0", "f3"]] += 50.0
    assert "f3" not in select_features(table)  # all rows: one phenotype, one feature
    kept = select_features(table, correlation_rows=~shifted)
    assert kept == [f"f{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"corr_threshold": 2}, "corr_threshold"),
        ({"block_size": 0}, "block_size"),
        ({"correlation_rows": np.ones(3, bool)}, "60 booleans"),
        ({"correlation_rows": np.arange(60) == 0}, "selects 1 row\\(s\\)"),
    ],
)
def test_select_features_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_features(make_table(), **kwargs)


def test_select_features_rejects_no_features():
    with pytest.raises(ValueError, match="no feature columns"):
        select_features(pd.DataFrame({"Metadata_Well": [1]}))


def sphere_input(n_controls=200, rng=0):
    generator = np.random.default_rng(rng)
    mixing = generator.normal(size=(5, 5))
    values = generator.normal(size=(n_controls + 20, 5)) @ mixing
    meta = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Role": ["negative_control"] * n_controls + ["treatment"] * 20,
        }
    )
    return pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)


def test_sphere_to_controls_whitens_the_controls():
    profiles = sphere_input(n_controls=20_000)
    sphered = sphere_to_controls(profiles)
    controls = sphered[sphered["Metadata_Role"] == "negative_control"].filter(like="f")
    # Ledoit-Wolf shrinks little with 200 controls in 5 dimensions
    np.testing.assert_allclose(
        np.cov(controls.to_numpy(), rowvar=False, ddof=0), np.eye(5), atol=0.05
    )
    np.testing.assert_allclose(controls.mean(), 0, atol=1e-9)
    assert list(sphered.columns) == list(profiles.columns)


def test_sphere_to_controls_pools_plates_with_scope_all():
    two = pd.concat(
        [sphere_input(20_000), sphere_input(20_000).assign(Metadata_Plate="P2")],
        ignore_index=True,
    )
    pooled = sphere_to_controls(two, scope="all")
    per_plate = sphere_to_controls(two, scope="plate")
    np.testing.assert_allclose(  # identical plates: one fit equals two
        pooled.filter(like="f").to_numpy(),
        per_plate.filter(like="f").to_numpy(),
        atol=0.02,
    )


def test_sphere_to_controls_regularizes_fewer_controls_than_features(caplog):
    profiles = sphere_input(n_controls=3)
    sphered = sphere_to_controls(profiles)
    assert np.isfinite(sphered.filter(like="f").to_numpy()).all()
    assert "shrunk by Ledoit-Wolf" in caplog.text


def test_sphere_to_controls_keeps_a_missing_value_to_itself():
    profiles = sphere_input()
    complete = sphere_to_controls(profiles)
    profiles.loc[210, "f0"] = np.nan  # one value of a treated well
    profiles.loc[3, "f1"] = np.nan  # one value of a control well
    sphered = sphere_to_controls(profiles)
    assert np.isnan(sphered.loc[210, "f0"]) and np.isnan(sphered.loc[3, "f1"])
    assert sphered.filter(like="f").isna().sum().sum() == 2  # nothing else lost
    assert np.isfinite(sphered.loc[210, ["f1", "f2", "f3", "f4"]]).all()
    np.testing.assert_allclose(  # other wells barely move (one control value)
        sphered.loc[100:110].filter(like="f"),
        complete.loc[100:110].filter(like="f"),
        atol=0.1,
    )


def test_sphere_to_controls_rejects():
    with pytest.raises(ValueError, match="scope"):
        sphere_to_controls(sphere_input(), scope="well")
    with pytest.raises(ValueError, match="at least two"):
        sphere_to_controls(sphere_input(n_controls=1))
    with pytest.raises(ValueError, match="lacks columns"):
        sphere_to_controls(sphere_input().drop(columns="Metadata_Role"))
