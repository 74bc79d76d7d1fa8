import numpy as np
import pandas as pd
import pytest

from pipeline.config import ProfileConfig
from pipeline.errors import InputError
from pipeline.profiling.profiles import (
    MAD_SCALE,
    aggregate_cells,
    correlation_wells,
    dose_labels,
    feature_columns,
    metadata_columns,
    normalize_profiles,
    normalize_to_controls,
    rank_compounds,
    sphere_to_controls,
    weight_blocks,
    well_activity,
    well_distance,
)


def make_profiles(rng=0, *, hit="cmpd_1", n_features=20):
    """Two plates: 8 DMSO wells, 3 compounds x 2 doses; `hit` shifts all features."""
    generator = np.random.default_rng(rng)
    rows = []
    for plate in ("P1", "P2"):
        offset = 5.0 if plate == "P2" else 0.0  # plate effect, removed by normalization
        for i in range(8):
            rows.append(
                (plate, f"A{i + 1:02d}", "DMSO", np.nan, "negative_control", offset)
            )
        for c in range(3):
            for dose in (1.0, 10.0):
                shift = offset + (4.0 if f"cmpd_{c}" == hit else 0.0)
                rows.append(
                    (
                        plate,
                        f"B{c * 2 + int(dose > 1) + 1:02d}",
                        f"cmpd_{c}",
                        dose,
                        "treatment",
                        shift,
                    )
                )
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Compound",
            "Metadata_Concentration",
            "Metadata_Role",
            "shift",
        ],
    )
    values = (
        generator.normal(0, 1, (len(meta), n_features))
        + meta.pop("shift").to_numpy()[:, None]
    )
    features = pd.DataFrame(values, columns=[f"f{i}" for i in range(n_features)])
    meta["Metadata_CellCount"] = 100
    return pd.concat([meta, features], axis=1)


def test_aggregate_cells_median_and_count():
    cells = pd.DataFrame({"Metadata_Well": ["A01", "A01", "A01", "B02"]})
    features = pd.DataFrame({"f": [1.0, 2.0, 10.0, 5.0]})
    wells = aggregate_cells(cells, features, by=["Metadata_Well"])
    assert list(wells["Metadata_Well"]) == ["A01", "B02"]
    assert list(wells["Metadata_CellCount"]) == [3, 1]
    assert list(wells["f"]) == [2.0, 5.0]
    assert list(
        aggregate_cells(cells, features, by=["Metadata_Well"], method="mean")["f"]
    ) == [pytest.approx(13 / 3), 5.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "mode"}, "unknown"), ({"by": ["Metadata_Plate"]}, "grouping columns")],
)
def test_aggregate_cells_rejects(kwargs, match):
    cells = pd.DataFrame({"Metadata_Well": ["A01"]})
    with pytest.raises(ValueError, match=match):
        aggregate_cells(
            cells, pd.DataFrame({"f": [1.0]}), **({"by": ["Metadata_Well"]} | kwargs)
        )


def test_aggregate_cells_rejects_length_mismatch():
    with pytest.raises(ValueError, match="rows"):
        aggregate_cells(
            pd.DataFrame({"w": [1, 2]}), pd.DataFrame({"f": [1.0]}), by=["w"]
        )


def test_normalize_to_controls_robust_z_matches_formula():
    profiles = make_profiles()
    normalized = normalize_to_controls(profiles)
    for plate in ("P1", "P2"):
        rows = profiles["Metadata_Plate"] == plate
        controls = profiles.loc[
            rows & (profiles["Metadata_Role"] == "negative_control"), "f3"
        ]
        median = controls.median()
        mad = np.median(np.abs(controls - median)) * 1.4826
        expected = (profiles.loc[rows, "f3"] - median) / mad
        np.testing.assert_allclose(normalized.loc[rows, "f3"], expected)
    assert MAD_SCALE == 1.4826
    assert metadata_columns(normalized) == metadata_columns(profiles)


def test_normalize_to_controls_pools_the_spread_over_plates_when_asked():
    profiles = make_profiles()
    profiles.loc[profiles["Metadata_Plate"] == "P2", "f3"] *= 3.0  # a wider plate
    is_control = (profiles["Metadata_Role"] == "negative_control").to_numpy()
    pooled = normalize_to_controls(profiles, spread_by=None)
    centred = profiles["f3"].copy()
    for rows in profiles.groupby("Metadata_Plate").groups.values():
        on_plate = profiles.index.isin(rows)
        centred[on_plate] -= profiles.loc[on_plate & is_control, "f3"].median()
    mad = np.median(np.abs(centred[is_control]))  # from each plate's own median
    np.testing.assert_allclose(pooled["f3"], centred / (mad * MAD_SCALE))
    profiles["Metadata_Batch"] = profiles["Metadata_Plate"]  # one plate per batch
    pd.testing.assert_frame_equal(
        normalize_to_controls(profiles, spread_by="Metadata_Batch"),
        normalize_to_controls(profiles),
    )
    profiles["Metadata_Batch"] = None  # no batch named: the plates share a spread
    np.testing.assert_allclose(
        normalize_to_controls(profiles, spread_by="Metadata_Batch")["f3"],
        pooled["f3"],
    )


def four_plates_in_two_batches():
    """P1, P2 (batch A; P2 twice as wide) and P3, P4 (batch B, P4 three times)."""
    first, second = make_profiles(), make_profiles(rng=1)
    second["Metadata_Plate"] = second["Metadata_Plate"].map({"P1": "P3", "P2": "P4"})
    profiles = pd.concat([first, second], ignore_index=True)
    features = feature_columns(profiles)
    for plate, gain in (("P2", 2.0), ("P4", 3.0)):
        profiles.loc[profiles["Metadata_Plate"] == plate, features] *= gain
    batch = profiles["Metadata_Plate"].map({"P1": "A", "P2": "A", "P3": "B", "P4": "B"})
    return profiles.assign(Metadata_Batch=batch)


def test_normalize_profiles_scales_per_batch_by_default_or_per_plate():
    profiles = four_plates_in_two_batches()
    no_selection = ProfileConfig(feature_select=False)
    by_batch = normalize_profiles(profiles, no_selection)
    pd.testing.assert_frame_equal(
        by_batch, normalize_to_controls(profiles, spread_by="Metadata_Batch")
    )
    per_plate = normalize_profiles(
        profiles, ProfileConfig(feature_select=False, scale_by="plate")
    )
    pd.testing.assert_frame_equal(per_plate, normalize_to_controls(profiles))
    assert not np.allclose(by_batch["f0"], per_plate["f0"])
    no_batch = normalize_profiles(profiles.drop(columns="Metadata_Batch"), no_selection)
    pd.testing.assert_frame_equal(
        no_batch, normalize_to_controls(profiles.drop(columns="Metadata_Batch"),
                                        spread_by=None),
    )  # fmt: skip
    # each batch's controls, centred per plate, have a pooled MAD of 1
    for _, batch in by_batch.groupby("Metadata_Batch"):
        controls = batch.loc[batch["Metadata_Role"] == "negative_control", "f0"]
        np.testing.assert_allclose(np.median(np.abs(controls)) * MAD_SCALE, 1.0)


def test_plates_without_a_batch_share_a_spread_and_z_pools_too():
    profiles = four_plates_in_two_batches()
    profiles["Metadata_Batch"] = profiles["Metadata_Batch"].where(
        profiles["Metadata_Plate"].isin(["P1", "P2"]), None
    )  # P3 and P4 blank: they share one spread
    blank = normalize_to_controls(profiles, spread_by="Metadata_Batch")
    named = normalize_to_controls(
        profiles.fillna({"Metadata_Batch": "B"}), spread_by="Metadata_Batch"
    )
    pd.testing.assert_frame_equal(
        blank, named.assign(Metadata_Batch=blank["Metadata_Batch"])
    )
    z = normalize_to_controls(profiles, method="z", spread_by=None)
    controls = z[z["Metadata_Role"] == "negative_control"]
    np.testing.assert_allclose(controls.groupby("Metadata_Plate")["f0"].mean(), 0,
                               atol=1e-12)  # fmt: skip
    # pooled within plates: 32 controls - 4 plate means = 28 degrees of freedom
    np.testing.assert_allclose((controls["f0"] ** 2).sum() / (len(controls) - 4), 1.0)


def test_a_feature_one_plate_never_measured_is_dropped_when_pooling():
    profiles = four_plates_in_two_batches()
    on_p1 = (profiles["Metadata_Plate"] == "P1") & (
        profiles["Metadata_Role"] == "negative_control"
    )
    profiles.loc[on_p1, "f1"] = np.nan  # no P1 control measured f1
    normalized = normalize_profiles(profiles, ProfileConfig(feature_select=False))
    assert "f1" not in normalized.columns
    assert np.isfinite(normalized[feature_columns(normalized)].to_numpy()).all()


def test_normalize_profiles_measures_correlations_on_all_wells_with_few_controls(
    caplog,
):
    profiles = make_profiles()
    profiles = profiles.drop(index=profiles.index[
        profiles["Metadata_Role"] == "negative_control"][::2])  # fmt: skip
    with caplog.at_level("INFO", logger="pipeline.profiling.profiles"):
        fallback = normalize_profiles(profiles)
    assert "measures correlations on all 20 wells: only 8" in caplog.text
    pd.testing.assert_frame_equal(
        fallback, normalize_profiles(profiles, ProfileConfig(corr_on="all"))
    )


def test_normalize_to_controls_rejects_a_missing_or_mixed_spread_column():
    with pytest.raises(ValueError, match="lacks columns.*Metadata_Batch"):
        normalize_to_controls(make_profiles(), spread_by="Metadata_Batch")
    profiles = make_profiles().assign(Metadata_Batch="A")
    profiles.loc[profiles.index[-1], "Metadata_Batch"] = None  # one unmapped well
    with pytest.raises(ValueError, match="plate 'P2' has several Metadata_Batch"):
        normalize_to_controls(profiles, spread_by="Metadata_Batch")


def test_normalize_to_controls_z_and_drops_constant_features():
    profiles = make_profiles().assign(const=1.0)
    normalized = normalize_to_controls(profiles, method="z")
    assert "const" not in feature_columns(normalized)
    controls = normalized[normalized["Metadata_Role"] == "negative_control"]
    np.testing.assert_allclose(
        controls.groupby("Metadata_Plate")["f0"].mean(), 0, atol=1e-12
    )


def test_robust_z_falls_back_to_std_when_the_mad_is_zero():
    profiles = make_profiles()
    is_control = profiles["Metadata_Role"] == "negative_control"
    sparse = np.zeros(len(profiles))  # most controls exactly 0, as a ReLU unit
    sparse[np.flatnonzero(is_control)[::4]] = 1.0
    sparse[~is_control.to_numpy()] = 3.0
    normalized = normalize_to_controls(profiles.assign(sparse=sparse))
    assert "sparse" in feature_columns(normalized)
    for _, group in profiles.assign(sparse=sparse).groupby("Metadata_Plate"):
        controls = group.loc[group["Metadata_Role"] == "negative_control", "sparse"]
        treated = normalized.loc[
            group.index[~(group["Metadata_Role"] == "negative_control")], "sparse"
        ]
        np.testing.assert_allclose(treated, 3.0 / controls.std(ddof=1))  # median 0
    only_constant = profiles[["Metadata_Plate", "Metadata_Role"]].assign(c=1.0)
    with pytest.raises(
        ValueError, match="none of the 1 features is measured and varies"
    ):
        normalize_to_controls(only_constant)


def test_normalize_to_controls_rejects_plate_without_controls():
    profiles = make_profiles()
    profiles = profiles[
        ~(
            (profiles["Metadata_Plate"] == "P2")
            & (profiles["Metadata_Role"] == "negative_control")
        )
    ]
    with pytest.raises(ValueError, match="you have 0 on plate 'P2'"):
        normalize_to_controls(profiles)


def test_normalize_to_controls_names_the_plate_with_one_control():
    profiles = make_profiles()
    one_left = profiles.drop(
        index=profiles.index[
            (profiles["Metadata_Plate"] == "P1")
            & (profiles["Metadata_Role"] == "negative_control")
        ][1:]
    )
    with pytest.raises(ValueError, match="at least 2 negative_control wells.*you "
                       "have 1 on plate 'P1'.*Add DMSO wells"):  # fmt: skip
        normalize_to_controls(one_left)


def test_well_activity_puts_dmso_at_zero_with_unit_spread_on_every_plate():
    normalized = normalize_to_controls(make_profiles(hit="cmpd_2"))
    activity = well_activity(normalized)
    controls = normalized["Metadata_Role"] == "negative_control"
    for _, plate in activity[controls].groupby(normalized["Metadata_Plate"]):
        assert plate.median() == pytest.approx(0, abs=1e-9)
        spread = MAD_SCALE * (plate - plate.median()).abs().median()
        assert spread == pytest.approx(1)
    hit = normalized["Metadata_Compound"] == "cmpd_2"
    assert activity[hit].min() > activity[~hit].max()
    # rank_compounds' activity is the median of its wells' activity
    ranked = rank_compounds(normalized).set_index(
        ["Metadata_Compound", "Metadata_Concentration"]
    )
    wells = normalized.assign(activity=activity)[~controls]
    medians = wells.groupby(["Metadata_Compound", "Metadata_Concentration"])[
        "activity"
    ].median()
    pd.testing.assert_series_equal(
        ranked["activity"].sort_index(), medians.sort_index(), check_names=False
    )
    # a plate without two controls with features has no activity scale
    lonely = normalized.drop(
        index=normalized.index[controls & (normalized["Metadata_Plate"] == "P2")][1:]
    )
    assert well_activity(lonely)[lonely["Metadata_Plate"] == "P2"].isna().all()


def test_dose_labels_leave_out_a_missing_concentration_and_reject_missing_columns():
    table = pd.DataFrame(
        {"Metadata_Compound": ["a", "b"], "Metadata_Concentration": [0.25, np.nan]}
    )
    assert dose_labels(table).tolist() == ["a @ 0.25", "b"]
    with pytest.raises(ValueError, match="Metadata_Concentration"):
        dose_labels(table.drop(columns="Metadata_Concentration"))


def test_well_distance_is_the_rms_of_finite_features_and_rejects():
    table = pd.DataFrame(
        {"Metadata_Role": ["treatment"] * 3, "f1": [3.0, np.nan, np.nan],
         "f2": [4.0, 2.0, np.inf]}
    )  # fmt: skip
    distance = well_distance(table)
    assert distance.name == "distance" and distance.index.equals(table.index)
    np.testing.assert_allclose(distance[:2], [np.sqrt(12.5), 2.0])
    assert np.isnan(distance[2])  # no finite feature (infinity is left out too)
    with pytest.raises(ValueError, match="no feature column"):
        well_distance(table[["Metadata_Role"]])


def test_well_activity_rejects_missing_role():
    with pytest.raises(ValueError, match="Metadata_Role"):
        well_activity(pd.DataFrame({"f": [1.0]}))


def test_normalize_to_controls_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown"):
        normalize_to_controls(make_profiles(), method="minmax")


def test_rank_compounds_finds_the_planted_hit_only():
    ranked = rank_compounds(normalize_to_controls(make_profiles(hit="cmpd_2")))
    top = ranked.head(2)
    assert set(top["Metadata_Compound"]) == {"cmpd_2"}
    assert (top["activity"] > 5).all()
    assert (ranked.iloc[2:]["activity"] < 5).all()
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert (ranked["n_wells"] == 2).all()
    np.testing.assert_allclose(ranked["cell_count_ratio"], 1.0)


def test_rank_compounds_rejects_missing_controls():
    normalized = normalize_to_controls(make_profiles())
    with pytest.raises(ValueError, match="no negative_control"):
        rank_compounds(normalized[normalized["Metadata_Role"] != "negative_control"])


def test_rank_compounds_rejects_missing_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        rank_compounds(pd.DataFrame({"f": [1.0]}))


def test_normalize_profiles_selects_features_and_scales_to_all_wells_when_asked():
    profiles = make_profiles()
    profiles["f_twin"] = 2 * profiles["f0"] + 1  # redundant: correlation 1 with f0
    selected = normalize_profiles(profiles)
    assert "f_twin" not in selected.columns and "f0" in selected.columns
    kept = normalize_profiles(profiles, ProfileConfig(feature_select=False))
    assert "f_twin" in kept.columns
    to_all = normalize_profiles(profiles, ProfileConfig(normalize_to="all"))
    medians = to_all.groupby("Metadata_Plate")[feature_columns(to_all)].median()
    np.testing.assert_allclose(
        medians, 0, atol=1e-12
    )  # every plate centred on its wells
    with pytest.raises(ValueError, match="at least 2 wells.*too few wells with cells"):
        normalize_to_controls(profiles.iloc[[0]], control_role=None)


def test_the_recipe_never_returns_nan_profiles_from_awkward_features():
    profiles = make_profiles()
    profiles["f_nan"] = np.nan  # a feature nobody measured
    profiles["f_dmso_flat"] = np.where(
        profiles["Metadata_Role"] == "negative_control", 1.0, profiles["f1"]
    )  # constant in the controls: no scale to divide by
    profiles["Metadata_Batch"] = profiles["Metadata_Plate"]  # one plate per batch
    recipe = ProfileConfig(whiten="controls", whiten_scope="batch")
    normalized = normalize_profiles(profiles, recipe)
    features = feature_columns(normalized)
    assert "f_nan" not in features and "f_dmso_flat" not in features
    assert np.isfinite(normalized[features].to_numpy()).all()


def test_features_moved_together_by_a_treatment_are_both_kept():
    profiles = make_profiles(hit="cmpd_1")  # cmpd_1 shifts every feature
    treated = (profiles["Metadata_Compound"] == "cmpd_1").to_numpy()
    rng = np.random.default_rng(3)
    for name in ("readout_a", "readout_b"):  # independent in DMSO, one phenotype
        profiles[name] = rng.normal(size=len(profiles)) + 40.0 * treated
    default = normalize_profiles(profiles)
    assert {"readout_a", "readout_b"} <= set(default.columns)
    pooled = normalize_profiles(profiles, ProfileConfig(corr_on="all"))
    assert len({"readout_a", "readout_b"} & set(pooled.columns)) == 1


def test_correlation_wells_are_the_controls_when_there_are_enough(caplog):
    profiles = make_profiles()  # 16 DMSO wells
    wells = correlation_wells(profiles)
    np.testing.assert_array_equal(
        wells, (profiles["Metadata_Role"] == "negative_control").to_numpy()
    )
    few = profiles.drop(index=profiles.index[profiles["Metadata_Role"]
                                              == "negative_control"][:6])  # fmt: skip
    with caplog.at_level("INFO", logger="pipeline.profiling.profiles"):
        assert correlation_wells(few) is None
    assert "only 10 negative_control wells" in caplog.text
    features = feature_columns(profiles)
    empty = profiles.copy()
    empty.loc[empty.index[:5], features] = np.nan  # 5 DMSO wells without cells
    assert correlation_wells(empty) is None


def test_correlation_wells_rejects_a_table_without_roles():
    with pytest.raises(ValueError, match="lacks Metadata_Role"):
        correlation_wells(pd.DataFrame({"f": [1.0]}))


def test_profile_recipe_rejects_unknown_choices():
    with pytest.raises(InputError, match="normalize_to = 'dmso' is unknown"):
        ProfileConfig(normalize_to="dmso")
    with pytest.raises(InputError, match="corr_on = 'dmso' is unknown"):
        ProfileConfig(corr_on="dmso")
    with pytest.raises(InputError, match="scale_by = 'well' is unknown"):
        ProfileConfig(scale_by="well")
    with pytest.raises(
        InputError, match=r"corr_threshold = 0.2 must lie in \[0.5, 1\]"
    ):
        ProfileConfig(corr_threshold=0.2)
    with pytest.raises(InputError, match="whiten_scope = 'week' is unknown"):
        ProfileConfig(whiten_scope="week")


def test_a_run_saved_before_feature_selection_keeps_its_recipe():
    from pipeline.config import config_from_dict

    old = config_from_dict({"profile": {"whiten": "none"}}, stored=True).profile
    assert old.feature_select is False  # its hit list stays as it was computed
    assert config_from_dict({}, stored=True).profile.feature_select is False
    assert config_from_dict({"profile": {}}).profile.feature_select is True  # new runs
    before_corr_on = {"profile": {"feature_select": True}}
    stored = config_from_dict(before_corr_on, stored=True).profile
    assert stored.corr_on == "all" and stored.scale_by == "plate"
    new = config_from_dict(before_corr_on).profile
    assert new.corr_on == "controls" and new.scale_by == "batch"


def test_whitening_per_batch_refuses_plates_without_a_batch():
    profiles = normalize_to_controls(make_profiles())
    batched = profiles.assign(
        Metadata_Batch=profiles["Metadata_Plate"].map({"P1": "week1", "P2": None})
    )
    with pytest.raises(ValueError, match="plates P2 have no batch"):
        sphere_to_controls(batched, scope="batch")


def test_whitening_per_batch_needs_a_batch_column_and_matches_per_plate_batches():
    profiles = normalize_to_controls(make_profiles())
    with pytest.raises(ValueError, match="add a batch column to the plate map"):
        sphere_to_controls(profiles, scope="batch")
    batched = profiles.assign(Metadata_Batch=profiles["Metadata_Plate"])
    pd.testing.assert_frame_equal(
        sphere_to_controls(batched, scope="batch"),
        sphere_to_controls(batched, scope="plate"),
    )
    one_batch = profiles.assign(Metadata_Batch="week1")
    pd.testing.assert_frame_equal(
        sphere_to_controls(one_batch, scope="batch"),
        sphere_to_controls(one_batch, scope="all"),
    )


def test_normalize_profiles_is_robust_z_by_default_and_whitens_when_asked():
    profiles = make_profiles()
    pd.testing.assert_frame_equal(
        normalize_profiles(profiles), normalize_to_controls(profiles, spread_by=None)
    )
    whitened = normalize_profiles(profiles, ProfileConfig(whiten="controls"))
    controls = whitened[whitened["Metadata_Role"] == "negative_control"]
    assert np.isfinite(whitened[feature_columns(whitened)].to_numpy()).all()
    # 16 controls in 20 dimensions: shrunk, so the controls come out near unit scale
    assert 0.3 < controls[feature_columns(controls)].to_numpy().std() < 1.5
    per_plate = normalize_profiles(
        profiles, ProfileConfig(whiten="controls", whiten_scope="plate")
    )
    assert not np.allclose(
        per_plate[feature_columns(per_plate)], whitened[feature_columns(whitened)]
    )


def test_normalize_profiles_weights_blocks_equally():
    small = make_profiles(n_features=4).rename(columns=lambda c: c.replace("f", "a"))
    large = make_profiles(rng=1, n_features=40)
    profiles = pd.concat([small, large[feature_columns(large)]], axis=1)
    blocks = [feature_columns(small), feature_columns(large)]
    no_selection = ProfileConfig(feature_select=False)  # the weights alone
    combined = normalize_profiles(profiles, no_selection, blocks=blocks)
    plain = normalize_to_controls(profiles, spread_by=None)
    share = (combined[blocks[0]] ** 2).sum(axis=1) / (combined[blocks[1]] ** 2).sum(
        axis=1
    )
    plain_share = (plain[blocks[0]] ** 2).sum(axis=1) / (plain[blocks[1]] ** 2).sum(
        axis=1
    )
    # each block's squared distance is scaled to the same total share
    np.testing.assert_allclose(share, plain_share * (40 / 4), rtol=1e-9)
    assert list(combined.columns) == list(plain.columns)
    with pytest.raises(ValueError, match="blocks must split"):
        normalize_profiles(profiles, blocks=blocks[:1])


def test_weight_blocks_gives_each_block_the_same_share_and_rejects():
    small, large = pd.DataFrame(np.ones((3, 2))), pd.DataFrame(np.ones((3, 8)))
    a, b = weight_blocks([small, large])
    assert (a**2).sum(axis=1).iloc[0] == pytest.approx((b**2).sum(axis=1).iloc[0])
    assert (a**2).sum(axis=1).iloc[0] + (b**2).sum(axis=1).iloc[0] == pytest.approx(10)
    assert weight_blocks([small])[0] is small
    with pytest.raises(ValueError, match="at least one feature"):
        weight_blocks([small, large.iloc[:, :0]])


@pytest.mark.parametrize("method", ["robust_z", "z"])
def test_a_feature_a_plate_never_measured_warns_nothing(method):
    """Without a thread-unsafe `warnings.catch_warnings`, numpy's all-NaN warnings
    are avoided; the feature is dropped and the others are what they were."""
    import warnings

    profiles = make_profiles()
    unmeasured = profiles.copy()
    unmeasured.loc[unmeasured["Metadata_Plate"] == "P1", "f3"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized = normalize_to_controls(unmeasured, method=method)
    expected = normalize_to_controls(profiles.drop(columns="f3"), method=method)
    pd.testing.assert_frame_equal(normalized, expected, check_exact=True)


def test_by_column_equals_numpy_to_the_bit():
    import warnings

    from pipeline.profiling.profiles import _by_column

    rng = np.random.default_rng(5)
    values = rng.normal(size=(37, 9)) * 10 ** rng.uniform(-3, 6, size=(37, 9))
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, [2, 7]] = np.nan
    for reduce in (np.nanmedian, np.nanmean):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = reduce(values, axis=0)
        np.testing.assert_array_equal(_by_column(reduce, values), expected)
        assert np.isnan(_by_column(reduce, values[:0])).all()
    with pytest.raises(ValueError, match="expected"):
        _by_column(np.nanmean, np.zeros(3))


@pytest.mark.parametrize("method", ["robust_z", "z"])
def test_an_infinite_control_value_warns_nothing(method):
    import warnings

    profiles = make_profiles()
    infinite = profiles.copy()
    control = infinite.index[infinite["Metadata_Role"] == "negative_control"][0]
    infinite.loc[control, "f5"] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized = normalize_to_controls(infinite, method=method)
    expected = normalize_to_controls(profiles.drop(columns="f5"), method=method)
    pd.testing.assert_frame_equal(
        normalized.drop(columns="f5", errors="ignore"), expected, check_exact=True
    )
