"""Phenotypic dose response: 4-parameter logistic fits of activity vs concentration."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import curve_fit

#: Every value `fit_dose_responses` can put in its ``flag`` column.
FLAGS = (
    "ok", "flat", "non_monotone", "ec50_outside_range", "ec50_uncertain", "no_fit",
    "too_few_doses",
)  # fmt: skip


def four_parameter_logistic(
    log_concentration: np.ndarray,
    bottom: float,
    top: float,
    log_ec50: float,
    hill: float,
) -> np.ndarray:
    """Return the 4PL curve at log10 concentrations (increasing for hill > 0)."""
    return bottom + (top - bottom) / (1 + 10 ** ((log_ec50 - log_concentration) * hill))


def _jacobian_4pl(
    x: np.ndarray, bottom: float, top: float, log_ec50: float, hill: float
) -> np.ndarray:
    """Partial derivatives of `four_parameter_logistic`, shape (N, 4)."""
    u = 10 ** ((log_ec50 - x) * hill)
    s = 1 / (1 + u)
    ds = -np.log(10) * u * s**2  # d s / d((log_ec50 - x) * hill)
    return np.column_stack(
        [1 - s, s, (top - bottom) * ds * hill, (top - bottom) * ds * (log_ec50 - x)]
    )


def _fit_4pl(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return least-squares 4PL parameters and their covariance.

    A grid over (log_ec50, hill) with bottom and top solved linearly at each grid
    point, then a `curve_fit` polish with the analytic Jacobian; the covariance comes
    from the Jacobian at the optimum.

    The grid makes the fit independent of starting values and fast on flat data,
    where a plain optimizer wanders along the EC50 axis.
    """
    log_ec50s = np.linspace(x.min() - 2, x.max() + 2, 61)
    hills = np.geomspace(0.3, 8, 15)
    grid_e, grid_h = (g.ravel() for g in np.meshgrid(log_ec50s, hills))
    s = 1 / (1 + 10 ** ((grid_e[:, None] - x[None, :]) * grid_h[:, None]))  # (G, N)
    r = 1 - s
    a, b, c = (r * r).sum(1), (r * s).sum(1), (s * s).sum(1)
    y1, y2 = (r * y).sum(1), (s * y).sum(1)
    det = a * c - b * b
    ok = det > 1e-12
    bottom = np.where(ok, (c * y1 - b * y2) / np.where(ok, det, 1), y.mean())
    top = np.where(ok, (a * y2 - b * y1) / np.where(ok, det, 1), y.mean())
    rss = ((y - bottom[:, None] * r - top[:, None] * s) ** 2).sum(1)
    best = int(np.argmin(rss))
    start = (bottom[best], top[best], grid_e[best], grid_h[best])
    span = max(float(np.ptp(y)), 1e-9)
    bounds = (
        (y.min() - 2 * span, y.min() - 2 * span, x.min() - 3, 0.1),
        (y.max() + 2 * span, y.max() + 2 * span, x.max() + 3, 10.0),
    )
    params = np.clip(start, bounds[0], bounds[1])
    with contextlib.suppress(RuntimeError):  # no convergence: keep the grid optimum
        params, _ = curve_fit(
            four_parameter_logistic, x, y, p0=params, bounds=bounds, max_nfev=200,
            jac=lambda x, *p: _jacobian_4pl(x, *p),
        )  # fmt: skip
    jacobian = _jacobian_4pl(x, *params)
    residual = y - four_parameter_logistic(x, *params)
    dof = max(len(x) - 4, 1)
    covariance = np.linalg.pinv(jacobian.T @ jacobian) * (residual @ residual) / dof
    return params, covariance


def fit_dose_response(
    concentrations: np.ndarray,
    responses: np.ndarray,
    *,
    alpha: float = 0.05,
    max_ci_decades: float = 2.0,
) -> dict[str, float | str]:
    """Fit a 4-parameter logistic to responses vs log10 concentration.

    Parameters
    ----------
    concentrations : ndarray of shape (N,)
        Positive concentrations (any unit; EC50 comes in the same unit). Replicates
        may repeat a concentration.
    responses : ndarray of shape (N,)
        Activity per well (e.g. a distance to DMSO); higher = stronger phenotype.
    alpha : float
        Level of the F-test of the 4PL against a flat line, and of the EC50
        confidence interval (1 - alpha).
    max_ci_decades : float
        An EC50 whose confidence interval spans more decades is flagged uncertain.

    Returns
    -------
    dict
        ``ec50``, ``ec50_ci_low``, ``ec50_ci_high``, ``hill``, ``top``, ``bottom``,
        ``r_squared``, ``p_flat`` (F-test p-value of the 4PL vs a constant) and
        ``flag``: ``ok``; ``flat`` (neither the 4PL nor, with replicates, a one-way
        ANOVA over doses shows dose dependence at `alpha`);
        ``non_monotone`` (the response falls by more than half its range after an
        interior maximum, e.g. cytotoxicity at top doses); ``ec50_outside_range``
        (fitted EC50 beyond the tested doses); ``ec50_uncertain`` (its confidence
        interval spans more than `max_ci_decades`); ``no_fit`` (the optimizer failed).
        Parameters are NaN when not estimable.

    Raises
    ------
    ValueError
        If lengths differ, fewer than 5 points or 3 distinct concentrations are
        given, or a concentration is not positive or a value is not finite.
    """
    conc = np.asarray(concentrations, dtype=float)
    resp = np.asarray(responses, dtype=float)
    if conc.shape != resp.shape or conc.ndim != 1:
        raise ValueError(
            f"concentrations {conc.shape} and responses {resp.shape} must be equal-length 1-D."
        )
    if not (np.isfinite(conc).all() and np.isfinite(resp).all()) or (conc <= 0).any():
        raise ValueError("concentrations must be positive and all values finite.")
    if len(conc) < 5 or len(np.unique(conc)) < 3:
        raise ValueError(
            f"a 4PL fit needs at least 5 points at 3 concentrations; got {len(conc)} "
            f"points at {len(np.unique(conc))}."
        )
    x = np.log10(conc)
    result: dict[str, float | str] = dict.fromkeys(
        ("ec50", "ec50_ci_low", "ec50_ci_high", "hill", "top", "bottom", "r_squared"),
        np.nan,
    )
    try:
        params, covariance = _fit_4pl(x, resp)
    except (ValueError, np.linalg.LinAlgError):
        return result | {"p_flat": np.nan, "flag": "no_fit"}
    bottom, top, log_ec50, hill = params
    rss = float(np.sum((resp - four_parameter_logistic(x, *params)) ** 2))
    tss = float(np.sum((resp - resp.mean()) ** 2))
    dof = len(x) - 4
    if dof > 0 and rss > 0:
        f_stat = ((tss - rss) / 3) / (rss / dof)
        p_flat = float(stats.f.sf(f_stat, 3, dof))
    else:
        p_flat = 0.0 if rss == 0 and tss > 0 else 1.0
    se = float(np.sqrt(covariance[2, 2])) if np.isfinite(covariance[2, 2]) else np.nan
    half_width = stats.t.ppf(1 - alpha / 2, max(dof, 1)) * se
    with np.errstate(over="ignore"):  # an unbounded CI is reported as inf
        ci_low, ci_high = np.power(10.0, [log_ec50 - half_width, log_ec50 + half_width])
    result |= {
        "ec50": 10**log_ec50,
        "ec50_ci_low": ci_low,
        "ec50_ci_high": ci_high,
        "hill": hill,
        "top": top,
        "bottom": bottom,
        "r_squared": 1 - rss / tss if tss > 0 else np.nan,
        "p_flat": p_flat,
    }
    groups = [resp[x == level] for level in np.unique(x)]
    p_dose = (  # any dose dependence, whatever its shape (needs replicates)
        float(stats.f_oneway(*groups).pvalue) if len(x) > len(groups) else p_flat
    )
    means = pd.Series(resp).groupby(x).mean()
    peak = int(np.argmax(means.to_numpy()))
    drop = means.iloc[peak] - means.iloc[-1]
    if min(p_flat, p_dose) > alpha:
        flag = "flat"
    elif 0 < peak < len(means) - 1 and drop > 0.5 * np.ptp(means.to_numpy()):
        flag = "non_monotone"
    elif not x.min() <= log_ec50 <= x.max():
        flag = "ec50_outside_range"
    elif not half_width <= max_ci_decades / 2:
        flag = "ec50_uncertain"
    else:
        flag = "ok"
    return result | {"flag": flag}


def fit_dose_responses(
    wells: pd.DataFrame,
    *,
    response: str,
    compound: str = "Metadata_Compound",
    concentration: str = "Metadata_Concentration",
) -> pd.DataFrame:
    """Fit every compound's dose response (see `fit_dose_response`).

    Parameters
    ----------
    wells : DataFrame
        One row per well (or per compound-dose) with the three columns; rows with a
        missing or non-positive concentration or a missing response are left out.
    response, compound, concentration : str
        Column names.

    Returns
    -------
    DataFrame
        One row per compound with a positive concentration: the `compound`
        column, ``n_points``, ``n_doses`` and the fit's values (every column, also
        when no compound has one); compounds with too few doses get
        ``flag = "too_few_doses"`` and NaN values.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    missing = [c for c in (response, compound, concentration) if c not in wells]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    usable = wells[(wells[concentration] > 0) & wells[response].notna()]
    rows = []
    for name, group in usable.groupby(compound, sort=True):
        conc, resp = (
            group[concentration].to_numpy(float),
            group[response].to_numpy(float),
        )
        info = {compound: name, "n_points": len(group), "n_doses": len(np.unique(conc))}
        if len(conc) < 5 or info["n_doses"] < 3:
            rows.append(info | {"flag": "too_few_doses"})
            continue
        rows.append(info | fit_dose_response(conc, resp))
    columns = [
        compound, "n_points", "n_doses", "ec50", "ec50_ci_low", "ec50_ci_high",
        "hill", "top", "bottom", "r_squared", "p_flat", "flag",
    ]  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=columns)
