"""Phenotype maps: UMAP coordinates and HDBSCAN clusters of profiles.

The choice: UMAP (cosine metric) to two dimensions, then HDBSCAN on those
coordinates, so clusters are the groups a user sees on the map; points HDBSCAN
cannot assign get cluster -1. Both are seeded for reproducible maps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.profiling.profiles import feature_columns


def umap_coordinates(
    profiles: pd.DataFrame,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    rng: int = 0,
) -> pd.DataFrame:
    """Return 2-D UMAP coordinates of profiles (cosine distance).

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_*`` and finite feature columns; one row per well or compound-dose.
    n_neighbors : int
        UMAP neighbourhood (capped at rows - 1).
    min_dist : float
        UMAP minimum distance.
    rng : int
        Seed (UMAP then runs single-threaded, so maps are reproducible).

    Returns
    -------
    DataFrame
        ``umap_x``, ``umap_y``; index of `profiles`.

    Raises
    ------
    ValueError
        If there are fewer than 4 rows or a feature is not finite.
    """
    import umap  # slow import (numba); only when a map is made

    values = profiles[feature_columns(profiles)].to_numpy(np.float64)
    if len(values) < 4:
        raise ValueError(f"profiles has {len(values)} rows; a map needs at least 4.")
    if not np.isfinite(values).all():
        raise ValueError(
            "profiles has NaN or infinite features; drop those rows first."
        )
    reducer = umap.UMAP(
        n_neighbors=min(n_neighbors, len(values) - 1),
        min_dist=min_dist,
        metric="cosine",
        random_state=rng,
        n_jobs=1,  # a seed makes UMAP single-threaded anyway
    )
    coordinates = reducer.fit_transform(values)
    return pd.DataFrame(coordinates, columns=["umap_x", "umap_y"], index=profiles.index)


def cluster_coordinates(
    coordinates: pd.DataFrame, *, min_cluster_size: int = 5
) -> pd.Series:
    """Return HDBSCAN cluster labels of map coordinates (-1 = unassigned).

    Raises
    ------
    ValueError
        If `min_cluster_size` < 2 or the coordinate columns are missing.
    """
    from sklearn.cluster import HDBSCAN

    if min_cluster_size < 2:
        raise ValueError(f"min_cluster_size = {min_cluster_size} must be >= 2.")
    missing = {"umap_x", "umap_y"} - set(coordinates.columns)
    if missing:
        raise ValueError(f"coordinates lacks columns {sorted(missing)}.")
    size = min(min_cluster_size, max(len(coordinates), 2))
    labels = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(
        coordinates[["umap_x", "umap_y"]]
    )
    return pd.Series(labels, index=coordinates.index, name="cluster")
