import numpy as np
import pandas as pd
import pytest

from pipeline.calls.moa import (
    compare_compound,
    consensus_profiles,
    nearest_neighbors,
    predict_moa,
)


def make_wells(rng=0, n_batches=2):
    """3 MoAs x 2 compounds x 2 doses x 2 wells per batch, plus DMSO."""
    generator = np.random.default_rng(rng)
    signatures = {moa: generator.normal(size=30) * 3 for moa in ("a", "b", "c")}
    rows, values = [], []
    for batch in range(n_batches):
        for _ in range(4):
            rows.append(("DMSO", np.nan, "negative_control", "", f"B{batch}"))
            values.append(generator.normal(size=30))
        for moa, signature in signatures.items():
            for c in range(2):
                for dose in (1.0, 10.0):
                    for _ in range(2):
                        rows.append((f"{moa}{c}", dose, "treatment", moa, f"B{batch}"))
                        values.append(signature * dose / 10 + generator.normal(size=30))
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Compound",
            "Metadata_Concentration",
            "Metadata_Role",
            "Metadata_MoA",
            "Metadata_Batch",
        ],
    )
    return pd.concat([meta, pd.DataFrame(values).add_prefix("f")], axis=1)


def test_consensus_profiles_median_per_compound_dose_and_batch():
    wells = make_wells()
    consensus = consensus_profiles(
        wells, batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    assert len(consensus) == 6 * 2 * 2
    assert (consensus["n_wells"] == 2).all()
    assert "DMSO" not in set(consensus["Metadata_Compound"])
    first = consensus.iloc[0]
    members = wells[
        (wells["Metadata_Compound"] == first["Metadata_Compound"])
        & (wells["Metadata_Concentration"] == first["Metadata_Concentration"])
        & (wells["Metadata_Batch"] == first["Metadata_Batch"])
    ]
    assert first["f0"] == pytest.approx(members["f0"].median())


def test_predict_moa_nsc_and_nscb():
    consensus = consensus_profiles(
        make_wells(), batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    predictions, accuracy = predict_moa(
        consensus, reference_column="Metadata_MoA", batch_column="Metadata_Batch"
    )
    top = predictions[predictions["Metadata_Concentration"] == 10.0]
    assert top["is_correct_nsc"].all() and top["is_correct_nscb"].all()
    assert (top["neighbor_nsc"] != top["Metadata_Compound"]).all()
    assert accuracy["nsc"] > accuracy["chance_nsc"]
    assert accuracy["chance_nsc"] == pytest.approx(
        2 / 10
    )  # 2 same-MoA rows of 10 others
    single = consensus_profiles(
        make_wells(n_batches=1), batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    _, accuracy = predict_moa(
        single, reference_column="Metadata_MoA", batch_column="Metadata_Batch"
    )
    assert np.isnan(accuracy["nscb"])


def test_predict_moa_multilabel_counts_one_shared_label():
    consensus = consensus_profiles(
        make_wells(), batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    consensus["Metadata_MoA"] = consensus["Metadata_MoA"].replace({"a": "a|x"})
    _, accuracy = predict_moa(
        consensus, reference_column="Metadata_MoA", batch_column="Metadata_Batch"
    )
    assert accuracy["nsc"] > 0.5


def test_nearest_neighbors_are_other_compounds_of_the_same_moa_first():
    consensus = consensus_profiles(
        make_wells(), batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    neighbors = nearest_neighbors(consensus, k=3)
    first = neighbors[
        (neighbors["query_compound"] == "a0")
        & (neighbors["query_concentration"] == 10.0)
        & (neighbors["neighbor_rank"] == 1)
    ]
    assert set(first["neighbor_compound"]) == {"a1"}
    assert (neighbors["query_compound"] != neighbors["neighbor_compound"]).all()
    assert len(neighbors) == 3 * len(consensus)  # one query per consensus row


def test_moa_functions_reject_bad_input():
    wells = make_wells()
    with pytest.raises(ValueError, match="lacks columns"):
        consensus_profiles(wells, batch_column="Metadata_Plate")
    consensus = consensus_profiles(
        wells, batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    with pytest.raises(ValueError, match="lacks columns"):
        predict_moa(
            consensus, reference_column="Metadata_Target", batch_column="Metadata_Batch"
        )
    with pytest.raises(ValueError, match="fewer than two compounds"):
        predict_moa(
            consensus.assign(Metadata_MoA=""),
            reference_column="Metadata_MoA",
            batch_column="Metadata_Batch",
        )
    with pytest.raises(ValueError, match="k = 0"):
        nearest_neighbors(consensus, k=0)


def test_compare_compound_ranks_neighbours_and_lists_top_features():
    consensus = pd.DataFrame(
        {"Metadata_Compound": ["A", "A", "B", "C", "C"],
         "Metadata_Concentration": [0.1, 1.0, 1.0, 1.0, 10.0],
         "Metadata_MoA": ["m", "m", "m", "n", "n"],
         "f1": [0.1, 5.0, 4.0, -1.0, 0.0], "f2": [0.0, 1.0, 1.5, 3.0, 0.5],
         "f3": [0.0, -3.0, -2.0, 0.0, 0.1]}
    )  # fmt: skip
    neighbors, features = compare_compound(consensus, "A", k=2, n_features=2)
    assert neighbors["Metadata_Compound"].tolist() == ["A", "B", "C"]
    assert neighbors.loc[0, "Metadata_Concentration"] == 1.0  # most active dose
    assert neighbors.loc[0, "cosine_similarity"] == pytest.approx(1.0)
    assert neighbors["rank"].tolist() == [0, 1, 2] and "Metadata_MoA" in neighbors
    assert neighbors.loc[2, "Metadata_Concentration"] == 10.0  # C's closest dose
    assert features["feature"].tolist()[:2] == ["f1", "f3"]  # |5| then |-3|
    assert features.loc[features["label"] == "B @ 1", "value"].tolist() == [4.0, -2.0]
    low, _ = compare_compound(consensus, "A", concentration=0.1, k=1)
    assert low.loc[0, "Metadata_Concentration"] == 0.1
    with pytest.raises(ValueError, match="no profile"):
        compare_compound(consensus, "Z")
    with pytest.raises(ValueError, match="doses are"):
        compare_compound(consensus, "A", concentration=3.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        compare_compound(consensus, "A", k=0)


def test_consensus_over_all_batches_pools_replicates_and_predicts_nsc_only():
    wells = make_wells()
    pooled = consensus_profiles(wells, batch_column=None, carry=["Metadata_MoA"])
    assert len(pooled) == 6 * 2 and (pooled["n_wells"] == 4).all()
    assert "Metadata_Batch" not in pooled.columns
    predictions, accuracy = predict_moa(
        pooled, reference_column="Metadata_MoA", batch_column=None
    )
    assert np.isnan(accuracy["nscb"]) and accuracy["nsc"] > accuracy["chance_nsc"]
    assert predictions["is_correct_nscb"].isna().all()


def test_moa_table_takes_nsc_from_all_replicates_and_nscb_per_batch():
    from pipeline.calls.moa import moa_table

    wells = make_wells(rng=3)
    noisy = wells.copy()  # each batch's wells alone are too noisy to tell MoAs apart
    features = [c for c in wells.columns if not c.startswith("Metadata_")]
    generator = np.random.default_rng(4)
    noisy[features] += generator.normal(scale=3.5, size=(len(wells), len(features)))
    predictions, accuracy = moa_table(noisy, reference_column="moa")
    per_batch = consensus_profiles(
        noisy, batch_column="Metadata_Batch", carry=["Metadata_MoA"]
    )
    _, batch_accuracy = predict_moa(
        per_batch, reference_column="Metadata_MoA", batch_column="Metadata_Batch"
    )
    assert accuracy["nscb"] == batch_accuracy["nscb"]
    pooled_alone = predict_moa(
        consensus_profiles(noisy, batch_column=None, carry=["Metadata_MoA"]),
        reference_column="Metadata_MoA",
        batch_column=None,
    )[1]
    assert accuracy["nsc"] == pooled_alone["nsc"]  # NSC is the pooled consensus's
    assert len(predictions) == len(per_batch)  # a row per compound-dose and batch
    pooled = predictions.groupby(["Metadata_Compound", "Metadata_Concentration"])
    assert (pooled["predicted_nsc"].nunique() == 1).all()  # one NSC call per dose
    with pytest.raises(ValueError, match="is not among the metadata columns"):
        moa_table(noisy, reference_column="target")


def test_unannotated_compounds_get_the_moa_of_their_nearest_annotated_one():
    wells = make_wells()
    wells.loc[wells["Metadata_Compound"] == "b1", "Metadata_MoA"] = ""
    pooled = consensus_profiles(wells, batch_column=None, carry=["Metadata_MoA"])
    predictions, accuracy = predict_moa(
        pooled, reference_column="Metadata_MoA", batch_column=None
    )
    new = predictions[predictions["Metadata_Compound"] == "b1"]
    top = new[new["Metadata_Concentration"] == 10.0].iloc[0]
    assert top["predicted_nsc"] == "b" and top["neighbor_nsc"] == "b0"
    assert top["similarity_nsc"] > 0.5 and pd.isna(top["is_correct_nsc"])
    scored = predictions["is_correct_nsc"].notna()
    assert scored.sum() == len(predictions) - 2  # b1's two doses are not scored
    assert accuracy["nsc"] == pytest.approx(
        predictions["is_correct_nsc"].dropna().mean()
    )


def test_predictions_from_a_reference_run_on_the_shared_features():
    from pipeline.calls.moa import moa_table

    reference = make_wells()
    screen = make_wells().drop(columns=["Metadata_MoA", "f29"])  # same biology
    screen["Metadata_Compound"] = "new_" + screen["Metadata_Compound"]
    screen.loc[screen["Metadata_Role"] == "negative_control", "Metadata_Compound"] = (
        "DMSO"
    )
    predictions, accuracy = moa_table(
        screen, reference_column="moa", reference=reference
    )
    strong = predictions[predictions["Metadata_Concentration"] == 10.0]
    expected = strong["Metadata_Compound"].str[4]  # new_a0 -> a
    assert (strong["predicted_nsc"] == expected).all()
    assert predictions["is_correct_nsc"].isna().all() and np.isnan(accuracy["nsc"])
    with pytest.raises(ValueError, match="shares no feature"):
        moa_table(screen.rename(columns=lambda c: c.replace("f", "g", 1)
                                if c.startswith("f") else c),
                  reference_column="moa", reference=reference)  # fmt: skip
    with pytest.raises(ValueError, match="of the reference run"):
        moa_table(screen, reference_column="target", reference=reference)
