import numpy as np
import pandas as pd
import pytest

from pipeline.profiling.reduce import cluster_coordinates, umap_coordinates


def two_groups(n=30, rng=0):
    generator = np.random.default_rng(rng)
    a = generator.normal(size=(n, 20)) + np.r_[np.full(10, 6.0), np.zeros(10)]
    b = generator.normal(size=(n, 20)) + np.r_[np.zeros(10), np.full(10, 6.0)]
    meta = pd.DataFrame({"Metadata_Group": ["a"] * n + ["b"] * n})
    return pd.concat([meta, pd.DataFrame(np.vstack([a, b])).add_prefix("f")], axis=1)


def test_umap_and_hdbscan_separate_two_phenotypes():
    profiles = two_groups()
    coordinates = umap_coordinates(profiles, rng=0)
    assert list(coordinates.columns) == ["umap_x", "umap_y"]
    assert coordinates.index.equals(profiles.index)
    clusters = cluster_coordinates(coordinates)
    assigned = clusters[clusters >= 0]
    assert assigned.nunique() == 2
    by_group = pd.crosstab(profiles.loc[assigned.index, "Metadata_Group"], assigned)
    assert (by_group.gt(0).sum(axis=1) == 1).all()  # each group in one cluster
    again = umap_coordinates(profiles, rng=0)
    np.testing.assert_allclose(again.to_numpy(), coordinates.to_numpy())


def test_umap_coordinates_rejects():
    with pytest.raises(ValueError, match="at least 4"):
        umap_coordinates(two_groups().head(3))
    bad = two_groups()
    bad.loc[0, "f0"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        umap_coordinates(bad)


def test_cluster_coordinates_rejects():
    coordinates = pd.DataFrame({"umap_x": [0.0, 1.0], "umap_y": [0.0, 1.0]})
    with pytest.raises(ValueError, match="min_cluster_size"):
        cluster_coordinates(coordinates, min_cluster_size=1)
    with pytest.raises(ValueError, match="lacks columns"):
        cluster_coordinates(coordinates.drop(columns="umap_y"))
