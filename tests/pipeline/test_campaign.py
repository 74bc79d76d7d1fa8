import numpy as np
import pandas as pd
import pytest

from pipeline.calls.campaign import (
    AFTER_RECIPE,
    BEFORE_RECIPE,
    correction_diagnostics,
    dmso_similarity,
    plate_layouts,
    plate_trends,
    recipe_diagnostics,
    replicate_correlation_across_plates,
    uncorrected_profiles,
)
from pipeline.config import ProfileConfig
from pipeline.profiling.profiles import normalize_profiles


def campaign(rng=0, n_plates=4):
    """Replicate plates in 2 batches: 8 DMSO + 4 compounds x 2 doses each; every
    plate is shifted by its own offset (a plate effect) and MoAs a/b share signals."""
    generator = np.random.default_rng(rng)
    signals = {c: generator.normal(size=24) * 2 for c in ("a", "b")}
    rows, values = [], []
    for p in range(n_plates):
        offset = generator.normal(size=24) * 3
        for i in range(8):
            rows.append((f"P{p}", f"A{i + 1:02d}", "DMSO", np.nan, "negative_control",
                         "", f"B{p // 2}", 400 + 10 * p))  # fmt: skip
            values.append(offset + generator.normal(size=24))
        for c, moa in enumerate("aabb"):
            for d, dose in enumerate((1.0, 10.0)):
                rows.append((f"P{p}", f"B{2 * c + d + 1:02d}", f"c{c}", dose, "treatment",
                             moa, f"B{p // 2}", 300))  # fmt: skip
                values.append(
                    offset + signals[moa] * dose / 5 + generator.normal(size=24)
                )
    meta = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well",
                                       "Metadata_Compound", "Metadata_Concentration",
                                       "Metadata_Role", "Metadata_MoA", "Metadata_Batch",
                                       "Metadata_CellCount"])  # fmt: skip
    return pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)


def test_the_recipe_removes_plate_effects_the_uncorrected_profiles_keep():
    raw = campaign()
    before = uncorrected_profiles(raw)
    after = normalize_profiles(raw, ProfileConfig())
    plate_gap = dmso_similarity(before)["within_minus_across"]
    assert plate_gap > 0.5  # DMSO resembles its own plate far more than the others
    assert abs(dmso_similarity(after)["within_minus_across"]) < 0.1
    table = correction_diagnostics(
        {"before": before, "after": after}, reference_column="moa"
    )
    assert list(table["stage"]) == ["before", "after"]
    rows = table.set_index("stage")
    assert rows.loc["after", "replicate_map"] > rows.loc["before", "replicate_map"]
    assert rows.loc["after", "nscb"] >= rows.loc["before", "nscb"]
    assert {"nsc", "n_features", "dmso_across_plates"} <= set(table.columns)
    no_moa = correction_diagnostics({"after": after}, reference_column="target")
    assert "nsc" not in no_moa.columns


def test_plate_trends_report_each_plate_and_its_batch():
    raw = campaign()
    after = normalize_profiles(raw, ProfileConfig())
    qc = pd.DataFrame({"Metadata_Plate": ["P0", "P1", "P2", "P3"],
                       "z_prime_activity": [0.1, 0.2, 0.3, 0.4]})  # fmt: skip
    trends = plate_trends(raw, after, qc)
    assert list(trends["Metadata_Plate"]) == ["P0", "P1", "P2", "P3"]
    assert list(trends["Metadata_Batch"]) == ["B0", "B0", "B1", "B1"]
    assert (trends["layout"] == 1).all()  # four replicate plates
    assert list(trends["dmso_cell_count"]) == [400, 410, 420, 430]
    assert (trends["n_wells"] == 16).all() and (trends["dmso_wells"] == 8).all()
    assert trends["z_prime_activity"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert (trends["replicate_correlation_across_plates"] > 0.3).all()


def test_dmso_similarity_equals_the_mean_over_all_pairs():
    profiles = uncorrected_profiles(campaign())
    dmso = profiles[profiles["Metadata_Role"] == "negative_control"]
    values = dmso.filter(regex="^f").to_numpy()
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    cosine = unit @ unit.T
    plates = dmso["Metadata_Plate"].to_numpy()
    same = (plates[:, None] == plates[None, :]) & ~np.eye(len(plates), dtype=bool)
    figures = dmso_similarity(profiles)
    assert figures["within_plates"] == pytest.approx(cosine[same].mean())
    assert figures["across_plates"] == pytest.approx(
        cosine[plates[:, None] != plates[None, :]].mean()
    )


def test_recipe_diagnostics_compare_the_same_features_before_and_after():
    raw = campaign()
    raw["f_twin"] = raw["f0"] * 2  # dropped by the recipe's feature selection
    after = normalize_profiles(raw, ProfileConfig())
    table = recipe_diagnostics(raw, after).set_index("stage")
    assert list(table.index) == [BEFORE_RECIPE, AFTER_RECIPE]
    assert (table["n_features"] == 24).all()
    with pytest.raises(ValueError, match="features not in raw"):
        uncorrected_profiles(raw, features=["nope"])


def test_plate_layouts_tell_replicate_plates_apart():
    raw = campaign()
    second = raw["Metadata_Plate"].isin(["P2", "P3"]) & (raw["Metadata_Well"] == "B01")
    raw.loc[second, "Metadata_Concentration"] = 3.0  # P2 and P3: another layout
    assert plate_layouts(raw).to_dict() == {"P0": 1, "P1": 1, "P2": 2, "P3": 2}
    with pytest.raises(ValueError, match="Metadata_Well"):
        plate_layouts(raw.drop(columns="Metadata_Well"))


def test_a_plate_with_a_blank_batch_stays_in_the_trends():
    raw = campaign()
    raw.loc[raw["Metadata_Plate"] == "P3", "Metadata_Batch"] = None
    trends = plate_trends(raw, normalize_profiles(raw))
    assert list(trends["Metadata_Plate"]) == ["P0", "P1", "P2", "P3"]
    assert pd.isna(trends["Metadata_Batch"].iloc[3])


def test_a_plate_without_replicates_elsewhere_has_no_replicate_correlation():
    raw = campaign()
    raw.loc[raw["Metadata_Plate"] == "P3", "Metadata_Compound"] += "_only_here"
    correlation = replicate_correlation_across_plates(normalize_profiles(raw))
    assert np.isnan(correlation["P3"]) and np.isfinite(correlation["P0"])


def test_campaign_functions_reject_bad_input():
    raw = campaign()
    with pytest.raises(ValueError, match="Metadata_Plate"):
        uncorrected_profiles(raw.drop(columns="Metadata_Plate"))
    with pytest.raises(ValueError, match="Metadata_Role"):
        dmso_similarity(raw.drop(columns="Metadata_Role"))
    with pytest.raises(ValueError, match="Metadata_Concentration"):
        replicate_correlation_across_plates(raw.drop(columns="Metadata_Concentration"))
    with pytest.raises(ValueError, match="Metadata_CellCount"):
        plate_trends(raw.drop(columns="Metadata_CellCount"), raw)
    with pytest.raises(ValueError, match="stages is empty"):
        correction_diagnostics({})
