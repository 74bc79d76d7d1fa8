"""Mechanism-of-action similarity: nearest neighbours and 1-NN MoA prediction.

Consensus profiles (median of a compound-dose's normalized wells, per batch) are
compared by cosine similarity. A compound-dose's MoA is predicted from its most
similar annotated compound-dose of *another* compound (not-same-compound, NSC) and,
when there are several batches, of another compound in another batch (NSCB), the
evaluation used for JUMP-CP and by Way et al. Multi-label annotations
(``"a|b"``) count as correct when one label is shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.profiles import dose_labels, feature_columns

KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def consensus_profiles(
    normalized: pd.DataFrame,
    *,
    batch_column: str,
    carry: Sequence[str] = (),
    control_role: str = "negative_control",
) -> pd.DataFrame:
    """Return one median profile per (compound, concentration, batch), controls left out.

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with ``Metadata_Compound``,
        ``Metadata_Concentration``, ``Metadata_Role`` and `batch_column`.
    batch_column : str
        E.g. ``Metadata_Batch`` or ``Metadata_Plate``.
    carry : sequence of str
        Metadata columns constant within a compound (e.g. the MoA) to keep.
    control_role : str
        Wells of this role are left out.

    Returns
    -------
    DataFrame
        ``Metadata_Compound``, ``Metadata_Concentration``, `batch_column`, `carry`,
        ``n_wells`` and the features; wells without finite features are left out.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    needed = [*KEYS, "Metadata_Role", batch_column, *carry]
    missing = [c for c in needed if c not in normalized.columns]
    if missing:
        raise ValueError(f"normalized lacks columns {missing}.")
    features = feature_columns(normalized)
    finite = np.isfinite(normalized[features].to_numpy(float)).all(axis=1)
    wells = normalized[finite & (normalized["Metadata_Role"] != control_role)]
    group = [*KEYS, batch_column]
    grouped = wells.groupby(group, dropna=False, sort=True)
    parts = [grouped[list(carry)].first(), grouped.size().rename("n_wells")]
    consensus = pd.concat([*parts, grouped[features].median()], axis=1)
    keys = consensus.index.to_frame(index=False)
    return pd.concat([keys, consensus.reset_index(drop=True)], axis=1)


def _cosine(values: np.ndarray) -> np.ndarray:
    unit = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def nearest_neighbors(consensus: pd.DataFrame, *, k: int = 5) -> pd.DataFrame:
    """Return each compound-dose's `k` most similar compound-doses of other compounds.

    Parameters
    ----------
    consensus : DataFrame
        From `consensus_profiles`.
    k : int
        Neighbours per query.

    Returns
    -------
    DataFrame
        ``query_compound``, ``query_concentration``, ``neighbor_compound``,
        ``neighbor_concentration``, ``cosine_similarity``, ``neighbor_rank`` (1 =
        most similar); each neighbour compound appears once per query (its most
        similar dose).

    Raises
    ------
    ValueError
        If `k` < 1.
    """
    if k < 1:
        raise ValueError(f"k = {k} must be >= 1.")
    similarity = _cosine(
        consensus[feature_columns(consensus.drop(columns="n_wells"))].to_numpy(float)
    )
    compounds = consensus["Metadata_Compound"].to_numpy()
    rows = []
    for i in range(len(consensus)):
        order = np.argsort(-similarity[i])
        seen: set[str] = set()
        for j in order:
            if compounds[j] == compounds[i] or compounds[j] in seen:
                continue
            seen.add(compounds[j])
            rows.append(
                (compounds[i], consensus["Metadata_Concentration"].iloc[i], compounds[j],
                 consensus["Metadata_Concentration"].iloc[j], similarity[i, j], len(seen))
            )  # fmt: skip
            if len(seen) == k:
                break
    return pd.DataFrame(
        rows,
        columns=["query_compound", "query_concentration", "neighbor_compound",
                 "neighbor_concentration", "cosine_similarity", "neighbor_rank"],
    )  # fmt: skip


def _labels(value: object) -> set[str]:
    return {part.strip() for part in str(value).split("|") if part.strip()}


def predict_moa(
    consensus: pd.DataFrame, *, reference_column: str, batch_column: str
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict each annotated compound-dose's MoA by 1-NN (NSC and NSCB).

    Parameters
    ----------
    consensus : DataFrame
        From `consensus_profiles` with `reference_column` carried.
    reference_column : str
        The annotation to predict (e.g. ``Metadata_MoA``); rows where it is empty
        are neither queried nor used as neighbours.
    batch_column : str
        Batch of each consensus profile; NSCB excludes neighbours of the same batch.

    Returns
    -------
    predictions : DataFrame
        Per annotated compound-dose and batch: ``Metadata_Compound``,
        ``Metadata_Concentration``, `batch_column`, `reference_column`,
        ``predicted_nsc``, ``neighbor_nsc``, ``is_correct_nsc`` and the same for
        ``nscb`` (empty when there is a single batch).
    accuracy : dict
        ``nsc`` and ``nscb`` (NaN with a single batch): fraction correct;
        ``chance_nsc``: the expected accuracy of a random other compound.

    Raises
    ------
    ValueError
        If columns are missing or fewer than two compounds are annotated.
    """
    missing = [
        c for c in (reference_column, batch_column) if c not in consensus.columns
    ]
    if missing:
        raise ValueError(
            f"consensus lacks columns {missing}; carry them from the wells."
        )
    annotated = consensus[consensus[reference_column].map(lambda v: bool(_labels(v)) and
                                                          str(v) != "nan")]  # fmt: skip
    annotated = annotated.reset_index(drop=True)
    if annotated["Metadata_Compound"].nunique() < 2:
        raise ValueError(
            f"fewer than two compounds have a {reference_column} annotation."
        )
    features = feature_columns(annotated.drop(columns="n_wells"))
    similarity = _cosine(annotated[features].to_numpy(float))
    compounds = annotated["Metadata_Compound"].to_numpy()
    batches = annotated[batch_column].to_numpy()
    labels = [_labels(v) for v in annotated[reference_column]]
    several_batches = len(set(batches)) > 1
    predictions = annotated[[*KEYS, batch_column, reference_column]].copy()
    for name, exclude_batch in (("nsc", False), ("nscb", True)):
        allowed = compounds[None, :] != compounds[:, None]
        if exclude_batch:
            allowed &= batches[None, :] != batches[:, None]
        masked = np.where(allowed, similarity, -np.inf)
        best = masked.argmax(axis=1)
        valid = np.isfinite(masked[np.arange(len(best)), best]) & (
            not exclude_batch or several_batches
        )
        predictions[f"neighbor_{name}"] = np.where(valid, compounds[best], None)
        predictions[f"predicted_{name}"] = np.where(
            valid, annotated[reference_column].to_numpy()[best], None
        )
        predictions[f"is_correct_{name}"] = [
            bool(ok and labels[i] & labels[j])
            for i, (j, ok) in enumerate(zip(best, valid, strict=True))
        ]
        if not valid.any():
            predictions[f"is_correct_{name}"] = np.nan
    shares = np.array([[bool(a & b) for b in labels] for a in labels])
    allowed = compounds[None, :] != compounds[:, None]
    chance = (shares & allowed).sum(axis=1) / np.maximum(allowed.sum(axis=1), 1)
    accuracy = {
        "chance_nsc": float(chance.mean()),
        "nsc": float(predictions["is_correct_nsc"].mean()),
        "nscb": float(predictions["is_correct_nscb"].mean())
        if several_batches
        else float("nan"),
    }
    return predictions, accuracy


def compare_compound(
    consensus: pd.DataFrame,
    compound: str,
    *,
    concentration: float | None = None,
    k: int = 5,
    n_features: int = 12,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a compound's nearest compounds and the features that set it apart.

    Parameters
    ----------
    consensus : DataFrame
        One DMSO-normalized profile per compound-dose: ``Metadata_Compound``,
        ``Metadata_Concentration`` and features (other ``Metadata_*`` columns are
        carried, not compared).
    compound : str
    concentration : float, optional
        The dose to compare; default the compound's dose farthest from DMSO
        (largest profile norm).
    k : int
        Neighbour compounds, each at its most similar dose.
    n_features : int
        Features shown: the query's largest absolute (z-scored) values.

    Returns
    -------
    neighbors : DataFrame
        ``Metadata_Compound``, ``Metadata_Concentration``, ``cosine_similarity``,
        ``rank`` (0 = the query itself) and the carried metadata; the query first.
    features : DataFrame
        Long format for side-by-side bars: ``feature``, ``label`` (compound @
        dose), ``value``, ``rank``; features ordered by the query's |value|.

    Raises
    ------
    ValueError
        If the compound or dose is absent, or `k` or `n_features` < 1.
    """
    if k < 1 or n_features < 1:
        raise ValueError(f"k = {k} and n_features = {n_features} must be >= 1.")
    consensus = consensus.reset_index(drop=True)  # positions = labels below
    features = feature_columns(consensus)
    values = np.nan_to_num(consensus[features].to_numpy(float))
    own = (consensus["Metadata_Compound"] == compound).to_numpy()
    if not own.any():
        raise ValueError(f"compound {compound!r} has no profile in this run.")
    candidates = np.flatnonzero(own)
    if concentration is None:
        query = candidates[np.argmax(np.linalg.norm(values[candidates], axis=1))]
    else:
        doses = consensus["Metadata_Concentration"].to_numpy(float)[candidates]
        match = candidates[np.isclose(doses, concentration)]
        if not len(match):
            raise ValueError(
                f"{compound!r} was not profiled at {concentration:g}; its doses are "
                f"{sorted(set(doses.tolist()))}."
            )
        query = match[0]
    unit = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit[query]
    table = consensus.drop(columns=features).assign(cosine_similarity=similarity)
    others = table[~own].sort_values("cosine_similarity", ascending=False)
    best = others.drop_duplicates("Metadata_Compound").head(k)
    neighbors = pd.concat([table.iloc[[query]], best]).assign(rank=range(len(best) + 1))
    top = np.argsort(-np.abs(values[query]), kind="stable")[:n_features]
    rows = values[neighbors.index.to_numpy()][:, top]
    labels = dose_labels(neighbors)
    long = pd.DataFrame(
        {
            "feature": np.tile(np.asarray(features)[top], len(neighbors)),
            "label": np.repeat(labels.to_numpy(), len(top)),
            "value": rows.ravel(),
            "rank": np.repeat(neighbors["rank"].to_numpy(), len(top)),
        }
    )
    return neighbors.reset_index(drop=True), long
