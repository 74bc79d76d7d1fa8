"""Well profiles, DMSO normalization and the activity scale.

Pure functions on DataFrames. Profiles follow pycytominer: ``Metadata_*`` columns
plus feature columns. `well_activity` defines the one activity scale (distance from
DMSO in robust standard deviations of the DMSO wells' own distances); hit calling
(mAP, distance tests, FDR) lives in `pipeline.calls.hits`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.config import ProfileConfig
from pipeline.profiling.columns import feature_columns, metadata_columns
from pipeline.profiling.featureselect import select_features

logger = logging.getLogger(__name__)

MAD_SCALE = 1.4826
#: Negative-control wells (with cells) each plate needs.
MIN_CONTROLS = 2
#: Negative-control wells that feature selection needs to measure correlations on
#: them: with 12 wells, two independent features pass |r| > 0.95 with p ~ 2e-6 (per
#: pair: about 0.2 spurious merges among 400 independent features, 28 among 5,000).
MIN_CORRELATION_CONTROLS = 12


def metadata_column(table: pd.DataFrame, name: str) -> str | None:
    """Return the ``Metadata_`` column called `name`, case-insensitively, or None.

    Parameters
    ----------
    table : DataFrame
        Any table with ``Metadata_*`` columns.
    name : str
        ``moa``, ``MoA`` and ``Metadata_moa`` all find ``Metadata_MoA``.

    Returns
    -------
    str or None
        The column's name as spelled in `table`; None if there is none.
    """
    lower = {c.lower(): c for c in table.columns if c.startswith("Metadata_")}
    return lower.get(f"metadata_{name.lower().removeprefix('metadata_')}")


def dose_labels(table: pd.DataFrame) -> pd.Series:
    """Return ``"compound @ concentration"`` per row, or the compound alone without one.

    Parameters
    ----------
    table : DataFrame
        ``Metadata_Compound`` and ``Metadata_Concentration`` (may be NaN).

    Returns
    -------
    Series
        Same index.

    Raises
    ------
    ValueError
        If a column is missing.

    Examples
    --------
    >>> frame = pd.DataFrame({"Metadata_Compound": ["a", "b"],
    ...                       "Metadata_Concentration": [0.5, np.nan]})
    >>> dose_labels(frame).tolist()
    ['a @ 0.5', 'b']
    """
    missing = {"Metadata_Compound", "Metadata_Concentration"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}.")
    doses = table["Metadata_Concentration"].map(
        lambda c: "" if pd.isna(c) else f" @ {c:g}"
    )
    return table["Metadata_Compound"].astype(str) + doses.astype(str)


def aggregate_cells(
    cells: pd.DataFrame,
    features: pd.DataFrame,
    *,
    by: Sequence[str],
    method: str = "median",
) -> pd.DataFrame:
    """Aggregate single cells into one profile per group (usually per well).

    Parameters
    ----------
    cells : DataFrame
        One row per cell holding the `by` columns.
    features : DataFrame
        Same rows as `cells`; numeric feature columns.
    by : sequence of str
        Grouping columns of `cells` (e.g. ``["Metadata_Plate", "Metadata_Well"]``).
    method : {"median", "mean"}

    Returns
    -------
    DataFrame
        One row per group: the `by` columns, ``Metadata_CellCount`` and the
        aggregated features; sorted by `by`.

    Raises
    ------
    ValueError
        If lengths differ, a `by` column is missing, or `method` is unknown.
    """
    if method not in ("median", "mean"):
        raise ValueError(f"method {method!r} is unknown; use 'median' or 'mean'.")
    if len(cells) != len(features):
        raise ValueError(
            f"cells has {len(cells)} rows but features has {len(features)}."
        )
    missing = [c for c in by if c not in cells.columns]
    if missing:
        raise ValueError(f"cells lacks the grouping columns {missing}.")
    keys = [cells[c].to_numpy() for c in by]
    grouped = features.set_axis(
        pd.MultiIndex.from_arrays(keys, names=list(by))
    ).groupby(level=list(range(len(by))), sort=True)
    profiles = grouped.median() if method == "median" else grouped.mean()
    profiles.insert(0, "Metadata_CellCount", grouped.size().to_numpy())
    return profiles.reset_index()


def _by_column(reduce, values: np.ndarray) -> np.ndarray:
    """`reduce` (``np.nanmedian`` or ``np.nanmean``) of each column of `values`.

    Equal to ``reduce(values, axis=0)``, NaN for a column without a value, but
    without numpy's warning for such columns: silencing it with
    `warnings.catch_warnings` is not thread-safe (the dashboard runs on threads).

    Parameters
    ----------
    reduce : callable
        A NaN-ignoring reduction taking ``axis=0``.
    values : ndarray of shape (N, F)

    Returns
    -------
    ndarray of shape (F,)

    Raises
    ------
    ValueError
        If `values` is not 2-D.
    """
    if values.ndim != 2:
        raise ValueError(f"values has shape {values.shape}; expected (N, F).")
    if not len(values):
        return np.full(values.shape[1], np.nan)
    measured = ~np.isnan(values).all(axis=0)
    # the empty columns are filled rather than left out: the other columns' sums then
    # run in numpy's order for the whole array (a narrower one can change the order)
    return np.where(measured, reduce(np.where(measured, values, 0.0), axis=0), np.nan)


def _spread(
    from_centre: np.ndarray,
    from_mean: np.ndarray,
    plates: np.ndarray,
    method: str,
    min_spread: float,
) -> np.ndarray:
    """Spread of each column of control profiles, each taken relative to its plate.

    Parameters
    ----------
    from_centre, from_mean : ndarray of shape (N, F)
        The controls minus their plate's centre (median for ``robust_z``) and
        minus their plate's mean; NaN where not measured.
    plates : ndarray of shape (N,)
        Each control's plate.
    method : {"robust_z", "z"}
    min_spread : float

    Returns
    -------
    ndarray of shape (F,)
        ``robust_z``: 1.4826 times the median of ``|from_centre|``, or where that
        is at most `min_spread` (e.g. a count, or an embedding dimension that is 0
        in most controls) the standard deviation; ``z``: the standard deviation,
        pooled within plates (sum of squares over N - plates degrees of freedom;
        NaN without any).
    """
    measured = np.isfinite(from_mean)
    n_plates = sum(measured[plates == p].any(axis=0) for p in pd.unique(plates))
    dof = measured.sum(axis=0) - n_plates
    squares = np.nansum(from_mean**2, axis=0)
    std = np.sqrt(np.divide(squares, dof, out=np.full(dof.shape, np.nan),
                            where=dof > 0))  # fmt: skip
    if method != "robust_z":
        return std
    scale = _by_column(np.nanmedian, np.abs(from_centre)) * MAD_SCALE
    return np.where(scale > min_spread, scale, std)


def normalize_to_controls(
    profiles: pd.DataFrame,
    *,
    method: str = "robust_z",
    control_role: str = "negative_control",
    spread_by: str | None = "Metadata_Plate",
    min_spread: float = 1e-6,
) -> pd.DataFrame:
    """Normalize each plate's profiles to that plate's negative-control wells.

    Each plate is centred on its controls; the spread that features are divided
    by comes from the controls of the plate alone (``spread_by =
    "Metadata_Plate"``) or, after centring, from the pooled controls of every
    plate sharing its `spread_by` value (e.g. its ``Metadata_Batch``), or of all
    plates (None).

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_Plate``, ``Metadata_Role``, `spread_by` and feature columns.
    method : {"robust_z", "z"}
        ``robust_z``: (x - median) / (1.4826 MAD) of the controls; ``z``: (x - mean)
        / std of the controls.
    control_role : str or None
        Value of ``Metadata_Role`` that marks the controls; None scales each plate
        to all its wells.
    spread_by : str or None
        Column whose groups of plates share one spread (constant within a plate;
        plates without a value share one); None: all plates.
    min_spread : float
        With ``robust_z``, a feature whose MAD is at most this uses the controls'
        standard deviation instead; features whose spread is still at most this
        in any group are dropped (they would divide by zero).

    Returns
    -------
    DataFrame
        Same rows and metadata; the kept features, normalized.

    Raises
    ------
    ValueError
        If `method` is unknown, columns are missing, a plate has several
        `spread_by` values or fewer than `MIN_CONTROLS` control wells with
        features, or no feature is measured and varies within the controls.
    """
    if method not in ("robust_z", "z"):
        raise ValueError(f"method {method!r} is unknown; use 'robust_z' or 'z'.")
    missing = {"Metadata_Plate", "Metadata_Role", spread_by} - {None}
    missing -= set(profiles.columns)
    if missing:
        hint = (
            " (a plate map batch column), or pool the spread over all plates "
            "(spread_by=None)"
            if spread_by in missing
            else ""
        )
        raise ValueError(f"profiles lacks columns {sorted(missing)}; add them{hint}.")
    if spread_by and spread_by != "Metadata_Plate":
        mixed = profiles.groupby("Metadata_Plate")[spread_by].nunique(dropna=False)
        if (mixed > 1).any():
            raise ValueError(
                f"plate {mixed.index[mixed > 1][0]!r} has several {spread_by} values; "
                f"give all rows of a plate the same {spread_by}."
            )
    features = feature_columns(profiles)
    values = profiles[features].to_numpy(float)
    plates = profiles["Metadata_Plate"].to_numpy()
    is_control = (
        (profiles["Metadata_Role"] == control_role).to_numpy()
        if control_role
        else np.ones(len(profiles), bool)
    )
    reference = f"{control_role} wells" if control_role else "wells"
    average = np.nanmedian if method == "robust_z" else np.nanmean
    centre = np.full_like(values, np.nan)
    from_mean = np.full_like(values, np.nan)
    spread = np.full_like(values, np.nan)
    # an infinite control value can give NaN centres and spreads, without numpy's
    # warning (np.errstate is per thread; warnings.catch_warnings is not)
    with np.errstate(invalid="ignore"):
        for plate in pd.unique(plates):
            rows = plates == plate
            controls = values[rows & is_control]
            n_usable = int(np.isfinite(controls).any(axis=1).sum())
            if n_usable < MIN_CONTROLS:
                fix = (
                    f"Add DMSO wells to the plate map (Metadata_Role = {control_role})"
                    if control_role
                    else "The plate has too few wells with cells to scale"
                )
                raise ValueError(
                    f"at least {MIN_CONTROLS} {reference} (with cells) per "
                    f"plate are needed, as profiles are scaled to them; you have "
                    f"{n_usable} on plate {plate!r}. {fix}, or leave the plate out."
                )
            # a feature none of the plate's controls measured: NaN, dropped below
            centre[rows] = _by_column(average, controls)
            from_mean[rows & is_control] = controls - _by_column(np.nanmean, controls)
        groups = (  # plates without a value (None / NaN) share one spread
            pd.factorize(profiles[spread_by], use_na_sentinel=False)[0]
            if spread_by
            else np.zeros(len(profiles), int)
        )
        for group in np.unique(groups):
            rows = groups == group
            in_group = rows & is_control
            spread[rows] = _spread(
                values[in_group] - centre[in_group], from_mean[in_group],
                plates[in_group], method, min_spread,
            )  # fmt: skip
    # a feature no control of some plate measured has no centre there: dropped
    kept = (spread > min_spread).all(axis=0) & np.isfinite(centre).all(axis=0)
    if features and not kept.any():
        raise ValueError(
            f"none of the {len(features)} features is measured and varies within "
            f"the {reference} of every plate; nothing can be normalized."
        )
    normalized = pd.DataFrame(
        (values[:, kept] - centre[:, kept]) / spread[:, kept],
        index=profiles.index,
        columns=[f for f, k in zip(features, kept, strict=True) if k],
    )
    joined = pd.concat([profiles[metadata_columns(profiles)], normalized], axis=1)
    return joined.copy()  # one block per dtype: later column inserts stay cheap


def sphere_to_controls(
    normalized: pd.DataFrame,
    *,
    scope: str = "plate",
    control_role: str = "negative_control",
) -> pd.DataFrame:
    """Whiten profiles on their negative controls (TVN / ZCA sphering).

    After `normalize_to_controls` (features on the controls' scale, controls
    centred), the controls' covariance C, shrunk towards a scaled identity by
    Ledoit-Wolf (`sklearn.covariance.LedoitWolf`), gives C = U diag(l) U^T and
    W = U diag(1 / sqrt(l)) U^T; every profile becomes (x - mean_controls) W.
    Correlated control variation is removed while the features keep their axes
    (ZCA, as pycytominer's Spherize). The shrinkage keeps the whitening well
    conditioned when there are fewer control wells than features (it is logged).

    Parameters
    ----------
    normalized : DataFrame
        ``Metadata_Plate``, ``Metadata_Role`` and feature columns.
    scope : {"plate", "batch", "all"}
        Fit on each plate's controls, each ``Metadata_Batch``'s, or once on the
        controls of all plates.
    control_role : str
        ``Metadata_Role`` of the controls.

    Returns
    -------
    DataFrame
        Same shape, index and columns. A missing value is taken at the controls'
        centre for the whitening (so it does not spread to the other features)
        and stays missing; rows without any value stay missing.

    Raises
    ------
    ValueError
        If `scope` is unknown, columns are missing (``Metadata_Batch`` with scope
        ``batch``), or a group has fewer than two control wells with values.
    """
    from sklearn.covariance import LedoitWolf

    group_column = {"plate": "Metadata_Plate", "batch": "Metadata_Batch", "all": None}
    if scope not in group_column:
        raise ValueError(f"scope {scope!r} is unknown; use 'plate', 'batch' or 'all'.")
    missing = {"Metadata_Plate", "Metadata_Role"} - set(normalized.columns)
    if scope == "batch" and "Metadata_Batch" not in normalized.columns:
        missing.add("Metadata_Batch (add a batch column to the plate map)")
    if missing:
        raise ValueError(f"normalized lacks columns {sorted(missing)}.")
    column = group_column[scope]
    if column == "Metadata_Batch" and normalized[column].isna().any():
        blank = sorted(map(str, normalized.loc[normalized[column].isna(),
                                               "Metadata_Plate"].unique()))  # fmt: skip
        raise ValueError(
            f"plates {', '.join(blank)} have no batch; whitening per batch needs one "
            "for every plate: fill the plate map's batch column (or use whiten_scope "
            '"plate" or "all").'
        )
    features = feature_columns(normalized)
    out = normalized.copy()
    groups = (
        normalized.groupby(column, sort=False)
        if column
        else [("all plates", normalized)]
    )
    for plate, group in groups:
        values = group[features].to_numpy(np.float64)
        finite = np.isfinite(values)
        # a missing value sits at the controls' centre (0 after robust z), so it
        # does not spread to the row's other features; it stays missing below
        values = np.where(finite, values, 0.0)
        is_control = (group["Metadata_Role"] == control_role).to_numpy()
        controls = values[is_control & finite.any(axis=1)]
        if len(controls) < 2:
            raise ValueError(
                f"{scope} {plate!r} has {len(controls)} {control_role} wells with values; "
                "whitening needs at least two (add control wells, or set "
                '[profile] whiten = "none").'
            )
        estimate = LedoitWolf().fit(controls)
        if len(controls) <= len(features):
            logger.warning(
                "whitening on %d %s wells of %s in %d dimensions: fewer wells than "
                "features, so their covariance is shrunk by Ledoit-Wolf (shrinkage "
                "%.2f)", len(controls), control_role, plate, len(features),
                estimate.shrinkage_,
            )  # fmt: skip
        eigenvalues, eigenvectors = np.linalg.eigh(estimate.covariance_)
        floor = max(eigenvalues.max(), 1e-12) * 1e-9
        scale = 1 / np.sqrt(np.clip(eigenvalues, floor, None))
        whitening = (eigenvectors * scale) @ eigenvectors.T
        whitened = (values - estimate.location_) @ whitening
        out.loc[group.index, features] = np.where(finite, whitened, np.nan)
    return out


def correlation_wells(
    profiles: pd.DataFrame, *, control_role: str = "negative_control"
) -> np.ndarray | None:
    """Flag the wells on which feature selection measures correlations.

    The negative controls, so that features moved together by treatments are not
    taken for redundant ones; None (all wells) when fewer than
    `MIN_CORRELATION_CONTROLS` controls have profiles (logged).

    Parameters
    ----------
    profiles : DataFrame
        Well profiles with ``Metadata_Role``.
    control_role : str
        The ``Metadata_Role`` of the controls.

    Returns
    -------
    ndarray of shape (N,), bool, or None
        True for the control wells with at least one measured feature; None to
        measure correlations on all wells.

    Raises
    ------
    ValueError
        If ``Metadata_Role`` is missing.
    """
    if "Metadata_Role" not in profiles.columns:
        raise ValueError(
            "profiles lacks Metadata_Role; the controls cannot be found (give the "
            "plate map a role column)."
        )
    is_control = (profiles["Metadata_Role"] == control_role).to_numpy()
    features = feature_columns(profiles)
    if features:
        is_control = is_control & profiles[features].notna().any(axis=1).to_numpy()
    if is_control.sum() < MIN_CORRELATION_CONTROLS:
        logger.info(
            "feature selection measures correlations on all %d wells: only %d "
            "%s wells have profiles (it needs %d).",
            len(profiles), int(is_control.sum()), control_role,
            MIN_CORRELATION_CONTROLS,
        )  # fmt: skip
        return None
    return is_control


def normalize_profiles(
    profiles: pd.DataFrame,
    recipe: ProfileConfig | None = None,
    *,
    blocks: Sequence[Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Apply a run's profile recipe: the one path from well profiles to comparable ones.

    Every feature set goes through it: robust z to each plate's negative
    controls or all its wells (`normalize_to_controls`; the spread pooled over
    the plates of a batch, or of the run, unless the recipe says per plate),
    feature selection (`pipeline.profiling.featureselect.select_features`, correlations
    measured on the controls unless the recipe says otherwise), then whitening
    on the controls when the recipe asks (`sphere_to_controls`). With `blocks`
    (a combined feature set, e.g. classical features and a CNN embedding) each
    block is normalized on its own and weighted so that every block contributes
    equally to distances
    (a block of d of the D features is scaled by sqrt(D / (n_blocks d))).

    Parameters
    ----------
    profiles : DataFrame
        Well profiles: ``Metadata_*`` columns and features.
    recipe : ProfileConfig, optional
        Default: `pipeline.config.ProfileConfig()` (robust z to the controls,
        feature selection, no whitening).
    blocks : sequence of sequence of str, optional
        Feature columns of each block; together all the feature columns.

    Returns
    -------
    DataFrame
        Metadata and the normalized features (features constant in the controls
        are dropped, as by `normalize_to_controls`, and those the selection drops).

    Raises
    ------
    ValueError
        As `normalize_to_controls` and `sphere_to_controls`, or if `blocks` do not
        partition the feature columns.
    """
    recipe = recipe or ProfileConfig()
    features = feature_columns(profiles)
    if blocks is None:
        blocks = [features]
    elif sorted(c for block in blocks for c in block) != sorted(features):
        raise ValueError("blocks must split the feature columns, each column once.")
    meta = profiles[metadata_columns(profiles)]
    control_role = "negative_control" if recipe.normalize_to == "controls" else None
    spread_by = "Metadata_Plate"
    if recipe.scale_by == "batch":
        spread_by = "Metadata_Batch" if "Metadata_Batch" in profiles.columns else None
    correlation_rows = None
    if recipe.feature_select and recipe.corr_on == "controls":
        correlation_rows = correlation_wells(profiles)
    parts = []
    for block in blocks:
        part = normalize_to_controls(
            pd.concat([meta, profiles[list(block)]], axis=1),
            control_role=control_role,
            spread_by=spread_by,
        )
        if recipe.feature_select:
            kept = select_features(
                part,
                corr_threshold=recipe.corr_threshold,
                correlation_rows=correlation_rows,
            )
            if not kept:
                raise ValueError(
                    f"feature selection kept none of {len(feature_columns(part))} "
                    "features (all missing or constant); set [profile] "
                    "feature_select = false to see them."
                )
            part = part[[*metadata_columns(part), *kept]]
        if recipe.whiten == "controls":
            part = sphere_to_controls(part, scope=recipe.whiten_scope)
        parts.append(part[feature_columns(part)])
    return pd.concat([meta, *weight_blocks(parts)], axis=1).copy()


def weight_blocks(blocks: Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
    """Scale feature blocks so that each adds the same share to squared distances.

    A block of d of the D features of n blocks is multiplied by sqrt(D / (n d)),
    so a 240-dimension embedding and 500 classical features weigh the same.

    Parameters
    ----------
    blocks : sequence of DataFrame
        Feature columns only, one frame per block, same rows.

    Returns
    -------
    list of DataFrame
        The scaled blocks (a single block is returned as it is).

    Raises
    ------
    ValueError
        If a block has no column.
    """
    if any(block.shape[1] == 0 for block in blocks):
        raise ValueError("every block needs at least one feature column.")
    if len(blocks) < 2:
        return list(blocks)
    total = sum(block.shape[1] for block in blocks)
    return [b * np.sqrt(total / (len(blocks) * b.shape[1])) for b in blocks]


def well_distance(normalized: pd.DataFrame) -> pd.Series:
    """Return each well's distance from DMSO: the root mean square of its features.

    Parameters
    ----------
    normalized : DataFrame
        Normalized profiles (features on the controls' scale, controls at 0):
        ``Metadata_*`` and feature columns.

    Returns
    -------
    Series
        Same index, name ``distance``; missing (NaN or infinite) features are
        left out of the mean, and a well without finite features is NaN.

    Raises
    ------
    ValueError
        If there is no feature column.
    """
    features = feature_columns(normalized)
    if not features:
        raise ValueError("normalized has no feature column (only Metadata_*).")
    values = normalized[features].to_numpy(np.float64)
    finite = np.isfinite(values)
    n_values = finite.sum(axis=1)
    sum_squares = np.square(values, out=np.zeros_like(values), where=finite).sum(axis=1)
    distance = np.sqrt(
        np.divide(
            sum_squares, n_values, out=np.full(len(values), np.nan), where=n_values > 0
        )
    )
    return pd.Series(distance, index=normalized.index, name="distance")


def well_activity(normalized: pd.DataFrame) -> pd.Series:
    """Return each well's activity: PhenoScreen's one activity scale.

    A well's distance from DMSO is the root mean square of its normalized features
    (`well_distance`); its activity is that distance in robust standard deviations above the
    distances of its plate's negative-control wells:
    ``(d - median(d_controls)) / (1.4826 MAD(d_controls))``. DMSO wells therefore
    scatter around 0 with spread 1 on every plate, and a compound-dose's activity
    (`rank_compounds`), the hit list, the phenotype map, dose-response curves and
    exports all use this number.

    Parameters
    ----------
    normalized : DataFrame
        From `normalize_to_controls`: ``Metadata_Role`` (and ``Metadata_Plate``;
        without it, all rows are one plate) and feature columns.

    Returns
    -------
    Series
        Same index, name ``activity``; NaN for a well without finite features
        (e.g. no cells), and everywhere on a plate without two negative-control
        wells with features.

    Raises
    ------
    ValueError
        If ``Metadata_Role`` or every feature column is missing.
    """
    if "Metadata_Role" not in normalized.columns:
        raise ValueError("normalized lacks column Metadata_Role.")
    distance = well_distance(normalized).to_numpy()
    plates = (
        normalized["Metadata_Plate"].to_numpy()
        if "Metadata_Plate" in normalized.columns
        else np.zeros(len(normalized))
    )
    is_control = (normalized["Metadata_Role"] == "negative_control").to_numpy()
    activity = np.full(len(distance), np.nan)
    for plate in pd.unique(plates):
        rows = plates == plate
        reference = distance[rows & is_control]
        reference = reference[np.isfinite(reference)]
        if len(reference) < 2:
            continue
        centre = np.median(reference)
        spread = MAD_SCALE * np.median(np.abs(reference - centre))
        if not spread > 0:
            spread = max(float(np.std(reference, ddof=1)), 1e-9)
        activity[rows] = (distance[rows] - centre) / spread
    return pd.Series(activity, index=normalized.index, name="activity")


def rank_compounds(normalized: pd.DataFrame) -> pd.DataFrame:
    """Rank compound-doses by activity (`well_activity`, median over their wells).

    Parameters
    ----------
    normalized : DataFrame
        From `normalize_to_controls`; needs ``Metadata_Compound``,
        ``Metadata_Concentration``, ``Metadata_Role`` and ``Metadata_CellCount``.

    Returns
    -------
    DataFrame
        One row per non-control (compound, concentration, role), sorted by
        ``activity`` descending: ``Metadata_Compound``, ``Metadata_Concentration``,
        ``Metadata_Role``, ``n_wells``, ``activity``, ``cell_count_ratio`` (median
        cell count over the negative controls' median) and ``rank``.

    Raises
    ------
    ValueError
        If columns are missing or there are no negative-control wells.
    """
    needed = {
        "Metadata_Compound",
        "Metadata_Concentration",
        "Metadata_Role",
        "Metadata_CellCount",
    }
    if not needed <= set(normalized.columns):
        raise ValueError(
            f"normalized lacks columns {sorted(needed - set(normalized.columns))}."
        )
    wells = normalized[list(needed)].assign(activity=well_activity(normalized))
    controls = wells[wells["Metadata_Role"] == "negative_control"]
    if controls.empty:
        raise ValueError("normalized has no negative_control wells to compare with.")
    count_ref = controls["Metadata_CellCount"].median()
    treated = wells[wells["Metadata_Role"] != "negative_control"]
    ranked = (
        treated.groupby(
            ["Metadata_Compound", "Metadata_Concentration", "Metadata_Role"],
            dropna=False,
        )
        .agg(
            n_wells=("activity", "size"),
            activity=("activity", "median"),
            cell_count=("Metadata_CellCount", "median"),
        )
        .reset_index()
    )
    ranked["cell_count_ratio"] = ranked.pop("cell_count") / count_ref
    ranked = ranked.sort_values("activity", ascending=False, ignore_index=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    return ranked
