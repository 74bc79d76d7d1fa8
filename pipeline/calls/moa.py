"""Mechanism-of-action similarity: nearest neighbours and 1-NN MoA prediction.

Consensus profiles (median of a compound-dose's normalized wells, over all its
replicates or per batch) are compared by cosine similarity. A compound-dose's MoA
is predicted from its most similar annotated compound-dose of *another* compound
(not-same-compound, NSC, on profiles over all replicates) and, when there are
several batches, of another compound in another batch (NSCB, on per-batch
profiles), the evaluation of Ljosa et al. (2013) used for JUMP-CP and by Way et
al. Multi-label annotations (``"a|b"``) count as correct when one label is shared.
Compound-doses without an annotation get the annotation of their nearest annotated
one (of the run, or of a reference run) as a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.profiling.activity import unit_rows
from pipeline.profiling.profiles import dose_labels, feature_columns, metadata_column

KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def consensus_profiles(
    normalized: pd.DataFrame,
    *,
    batch_column: str | None,
    carry: Sequence[str] = (),
    control_role: str = "negative_control",
) -> pd.DataFrame:
    """Return one median profile per (compound, concentration[, batch]), no controls.

    Parameters
    ----------
    normalized : DataFrame
        Normalized well profiles with ``Metadata_Compound``,
        ``Metadata_Concentration``, ``Metadata_Role`` and `batch_column`.
    batch_column : str or None
        E.g. ``Metadata_Batch`` or ``Metadata_Plate``; None pools every batch.
    carry : sequence of str
        Metadata columns constant within a compound (e.g. the MoA) to keep.
    control_role : str
        Wells of this role are left out.

    Returns
    -------
    DataFrame
        ``Metadata_Compound``, ``Metadata_Concentration``, `batch_column` (if given),
        `carry`, ``n_wells`` and the features; wells without finite features are
        left out.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    by = [*KEYS, batch_column] if batch_column else list(KEYS)
    needed = [*by, "Metadata_Role", *carry]
    missing = [c for c in needed if c not in normalized.columns]
    if missing:
        raise ValueError(f"normalized lacks columns {missing}.")
    features = feature_columns(normalized)
    finite = np.isfinite(normalized[features].to_numpy(float)).all(axis=1)
    wells = normalized[finite & (normalized["Metadata_Role"] != control_role)]
    grouped = wells.groupby(by, dropna=False, sort=True)
    parts = [grouped[list(carry)].first(), grouped.size().rename("n_wells")]
    consensus = pd.concat([*parts, grouped[features].median()], axis=1)
    keys = consensus.index.to_frame(index=False)
    return pd.concat([keys, consensus.reset_index(drop=True)], axis=1)


def _cosine(values: np.ndarray) -> np.ndarray:
    unit = unit_rows(values)
    return unit @ unit.T


def _cosine_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` (n, d) to every row of `b` (m, d)."""
    return unit_rows(a) @ unit_rows(b).T


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


def annotated_rows(table: pd.DataFrame, column: str) -> np.ndarray:
    """Return which rows of `table` hold at least one label in `column`.

    Parameters
    ----------
    table : DataFrame
    column : str
        An annotation column, e.g. ``Metadata_MoA`` (``"a|b"``: two labels).

    Returns
    -------
    ndarray of bool, shape (n_rows,)
        False for missing, empty or blank values.

    Raises
    ------
    KeyError
        If `column` is not a column of `table`.
    """
    values = table[column].astype(object)
    return np.array([not pd.isna(v) and bool(_labels(v)) for v in values], bool)


def predict_moa(
    consensus: pd.DataFrame,
    *,
    reference_column: str,
    batch_column: str | None,
    reference: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict every compound-dose's MoA by 1-NN among annotated ones (NSC and NSCB).

    Each compound-dose gets the annotation of its most similar (cosine) annotated
    compound-dose of another compound: annotated ones to score the profiles
    (accuracy), unannotated ones as the prediction a screen is after.

    Parameters
    ----------
    consensus : DataFrame
        From `consensus_profiles` with `reference_column` carried.
    reference_column : str
        The annotation to predict (e.g. ``Metadata_MoA``); rows where it is empty
        are predicted but never used as neighbours.
    batch_column : str or None
        Batch of each consensus profile; NSCB excludes neighbours of the same batch.
        None: consensus over all batches (no NSCB).
    reference : DataFrame, optional
        Annotated compound-doses of another run (`consensus_profiles` with
        `reference_column` carried) to take neighbours from instead; the features
        both have are compared, and NSCB is not computed.

    Returns
    -------
    predictions : DataFrame
        Per compound-dose (and batch): ``Metadata_Compound``,
        ``Metadata_Concentration``, `batch_column`, `reference_column`,
        ``neighbor_nsc``, ``predicted_nsc``, ``similarity_nsc``, ``is_correct_nsc``
        (missing for unannotated rows) and the same for ``nscb`` (empty with a
        single batch or a `reference`).
    accuracy : dict
        Over the annotated rows: ``nsc`` and ``nscb`` (NaN with a single batch):
        fraction correct; ``chance_nsc``: the expected accuracy of a random other
        compound.

    Raises
    ------
    ValueError
        If columns are missing, fewer than two compounds are annotated (in
        `reference` when given), or `reference` shares no feature with `consensus`.
    """
    references = consensus if reference is None else reference
    missing = [c for c in (reference_column, batch_column)
               if c and c not in consensus.columns]  # fmt: skip
    if reference_column not in references.columns:
        missing.append(f"{reference_column} (in reference)")
    if missing:
        raise ValueError(
            f"consensus lacks columns {missing}; carry them from the wells."
        )
    references = references[annotated_rows(references, reference_column)]
    references = references.reset_index(drop=True)
    if references["Metadata_Compound"].nunique() < 2:
        raise ValueError(
            f"fewer than two compounds have a {reference_column} annotation; annotate "
            "them (e.g. a moa column in the plate map) or take the neighbours from an "
            "annotated reference run (phenoscreen moa --reference-run ID)."
        )
    queries = consensus.reset_index(drop=True)
    ours = feature_columns(queries.drop(columns="n_wells"))
    theirs = set(feature_columns(references.drop(columns="n_wells")))
    features = [f for f in ours if f in theirs]
    if not features:
        raise ValueError(
            "the reference shares no feature with these profiles; use a reference "
            "run of the same feature set (e.g. classical features of both)."
        )
    similarity = _cosine_between(
        queries[features].to_numpy(float), references[features].to_numpy(float)
    )
    compounds = queries["Metadata_Compound"].to_numpy()
    ref_compounds = references["Metadata_Compound"].to_numpy()
    if batch_column and reference is None:  # a blank batch is one batch of its own
        batches = queries[batch_column].astype(object).fillna("(blank)").to_numpy()
        ref_batches = (
            references[batch_column].astype(object).fillna("(blank)").to_numpy()
        )
    else:
        batches, ref_batches = np.zeros(len(queries)), np.zeros(len(references))
    several_batches = len(set(batches)) > 1
    is_annotated = annotated_rows(queries, reference_column)
    labels = [_labels(v) if a else set() for v, a in
              zip(queries[reference_column], is_annotated, strict=True)]  # fmt: skip
    ref_labels = [_labels(v) for v in references[reference_column]]
    keep = [*KEYS, batch_column] if batch_column else list(KEYS)
    predictions = queries[[*keep, reference_column]].copy()
    other_compound = ref_compounds[None, :] != compounds[:, None]
    for name, exclude_batch in (("nsc", False), ("nscb", True)):
        allowed = other_compound.copy()
        if exclude_batch:
            allowed &= ref_batches[None, :] != batches[:, None]
        masked = np.where(allowed, similarity, -np.inf)
        best = masked.argmax(axis=1)
        score = masked[np.arange(len(best)), best]
        valid = np.isfinite(score) & (not exclude_batch or several_batches)
        predictions[f"neighbor_{name}"] = np.where(valid, ref_compounds[best], None)
        predictions[f"predicted_{name}"] = np.where(
            valid, references[reference_column].to_numpy()[best], None
        )
        predictions[f"similarity_{name}"] = np.where(valid, score, np.nan)
        predictions[f"is_correct_{name}"] = pd.array(
            [bool(ref_labels[j] & labels[i]) if ok and is_annotated[i] else pd.NA
             for i, (j, ok) in enumerate(zip(best, valid, strict=True))],
            dtype="boolean",
        )  # fmt: skip
    shares = np.array([[bool(a & b) for b in ref_labels] for a in labels])
    chance = (shares & other_compound).sum(axis=1) / np.maximum(
        other_compound.sum(axis=1), 1
    )
    accuracy = {
        "chance_nsc": float(chance[is_annotated].mean()) if is_annotated.any() else
        float("nan"),
        "nsc": _fraction(predictions["is_correct_nsc"]),
        "nscb": _fraction(predictions["is_correct_nscb"]),
    }  # fmt: skip
    return predictions, accuracy


def _fraction(correct: pd.Series) -> float:
    """Fraction of True among the scored (non-missing) rows; NaN if none."""
    scored = correct.dropna()
    return float(scored.mean()) if len(scored) else float("nan")


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


def moa_table(
    normalized: pd.DataFrame,
    *,
    reference_column: str,
    reference: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict an annotation (e.g. MoA) of every compound-dose by 1-NN, NSC and NSCB.

    Parameters
    ----------
    normalized : DataFrame
        Well profiles after the run's recipe (`pipeline.views.export.read_profiles`).
    reference_column : str
        ``moa`` finds the plate map's ``Metadata_MoA`` (or an imported
        ``Metadata_moa``); any other name ``X`` finds ``Metadata_X`` or ``X``,
        case-insensitively. Batches are ``Metadata_Batch`` when present, else plates.
    reference : DataFrame, optional
        Normalized well profiles of another run (e.g. an imported reference set)
        whose annotated compound-doses are the neighbours; then `normalized` needs
        no annotation of its own (where it has one, it scores the predictions) and
        only NSC is computed.

    Returns
    -------
    predictions : DataFrame
        One row per compound-dose and batch: its NSCB prediction from its batch's
        consensus, and its NSC prediction from the consensus of all its wells;
        unannotated compound-doses get predictions but no ``is_correct_*``.
    accuracy : dict
        See `predict_moa`; ``nsc`` and ``chance_nsc`` over the pooled
        compound-doses, ``nscb`` over the per-batch ones.

    Raises
    ------
    ValueError
        If the column is not found (the message lists the metadata columns), or as
        `predict_moa`.
    """
    source = normalized if reference is None else reference
    column = metadata_column(source, reference_column)
    if column is None:
        names = sorted(c for c in source.columns if c.startswith("Metadata_"))
        where = "the plate map" if reference is None else "the reference run"
        raise ValueError(
            f"reference column {reference_column!r} is not among the metadata columns "
            f"of {where} ({', '.join(names)}); add it to {where}."
        )
    if reference is not None:
        ours = metadata_column(normalized, reference_column)
        queries = (
            normalized.rename(columns={ours: column})
            if ours
            else normalized.assign(**{column: ""})
        )  # its own annotations, if any, score the reference's predictions
        return predict_moa(
            consensus_profiles(queries, batch_column=None, carry=[column]),
            reference_column=column,
            batch_column=None,
            reference=consensus_profiles(reference, batch_column=None, carry=[column]),
        )
    batch = metadata_column(normalized, "batch") or "Metadata_Plate"
    pooled, pooled_accuracy = predict_moa(
        consensus_profiles(normalized, batch_column=None, carry=[column]),
        reference_column=column,
        batch_column=None,
    )
    per_batch, accuracy = predict_moa(
        consensus_profiles(normalized, batch_column=batch, carry=[column]),
        reference_column=column,
        batch_column=batch,
    )
    nsc = [c for c in pooled.columns if c.endswith("_nsc")]
    predictions = per_batch.drop(columns=nsc).merge(
        pooled[[*KEYS, *nsc]], on=KEYS, how="left"
    )
    accuracy |= {k: pooled_accuracy[k] for k in ("nsc", "chance_nsc")}
    return predictions[list(per_batch.columns)], accuracy
