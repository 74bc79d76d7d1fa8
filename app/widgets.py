"""Reusable dashboard pieces: run picker and plate heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import data
from pipeline.platemap import PLATE_FORMATS, parse_well


def pick_run() -> int | None:
    """Select box over complete runs; shows why when there is none.

    Returns
    -------
    int or None
        The chosen run id, None when the store has no complete run (the view then
        shows only the message).
    """
    url = data.db_url()
    try:
        runs = data.load_runs(url)
    except ValueError as exc:
        st.error(f"Cannot open the store {url}: {exc}")
        return None
    complete = runs[runs["status"] == "complete"] if not runs.empty else runs
    if complete.empty:
        st.info(
            f"No complete run in {url} yet. Run `phenoscreen run` or `phenoscreen demo`."
        )
        return None
    labels = {
        int(r.run_id): f"run {r.run_id} - {r.experiment} ({r.n_cells:,} cells)"
        for r in complete.itertuples()
    }
    return st.selectbox("Run", list(labels)[::-1], format_func=labels.get, key="run_id")


def plate_heatmap(wells: pd.DataFrame, metric: str, *, title: str) -> go.Figure:
    """Return a plate-shaped heatmap of one per-well metric.

    Parameters
    ----------
    wells : DataFrame
        One plate: ``Metadata_Well``, ``Metadata_Compound`` and `metric`.
    metric : str
        Numeric column to colour by.
    title : str

    Returns
    -------
    plotly Figure
        Rows A.., columns 1.. of the smallest plate format holding the wells.
    """
    positions = np.array([parse_well(w) for w in wells["Metadata_Well"]])
    n_rows, n_cols = next(
        shape
        for shape in PLATE_FORMATS.values()
        if positions[:, 0].max() < shape[0] and positions[:, 1].max() < shape[1]
    )
    grid = np.full((n_rows, n_cols), np.nan)
    text = np.full((n_rows, n_cols), "", dtype=object)
    grid[positions[:, 0], positions[:, 1]] = wells[metric].to_numpy(float)
    for (r, c), well, compound in zip(
        positions, wells["Metadata_Well"], wells["Metadata_Compound"], strict=True
    ):
        text[r, c] = f"{well}: {compound}"
    row_names = [chr(65 + r) if r < 26 else "A" + chr(39 + r) for r in range(n_rows)]
    figure = go.Figure(
        go.Heatmap(
            z=grid,
            x=list(range(1, n_cols + 1)),
            y=row_names,
            text=text,
            hovertemplate="%{text}<br>" + metric + ": %{z:.3g}<extra></extra>",
            colorscale="Viridis",
        )
    )
    figure.update_layout(
        title=title, yaxis_autorange="reversed", height=140 + 28 * n_rows
    )
    return figure


def dose_response_figure(
    wells: pd.DataFrame, fit: pd.Series, dmso: pd.Series, *, compound: str
) -> go.Figure:
    """Return one compound's well activities vs dose with its fitted 4PL curve.

    Parameters
    ----------
    wells : DataFrame
        The compound's wells: ``Metadata_Concentration`` (uM), ``activity``,
        ``Metadata_Plate``, ``Metadata_Well``.
    fit : Series
        Its hit-list row: ``bottom``, ``top``, ``ec50``, ``hill``, ``ec50_flag``.
    dmso : Series
        Activities of the DMSO wells (a band: median +- 1.4826 MAD).
    compound : str
        For the title.

    Returns
    -------
    plotly Figure
        Replicate wells as points (log-dose axis), the curve when it was fitted,
        the DMSO band and a dotted line at the EC50.

    Raises
    ------
    ValueError
        If `wells` lacks a column.
    """
    needed = ["Metadata_Concentration", "activity", "Metadata_Plate", "Metadata_Well"]
    missing = [c for c in needed if c not in wells.columns]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    figure = go.Figure()
    centre = float(dmso.median()) if len(dmso) else 0.0
    spread = 1.4826 * float((dmso - centre).abs().median()) if len(dmso) else 0.0
    doses = wells["Metadata_Concentration"].to_numpy(float)
    if len(dmso):
        figure.add_hrect(
            y0=centre - spread, y1=centre + spread, fillcolor="grey", opacity=0.15,
            line_width=0, annotation_text="DMSO", annotation_position="top left",
        )  # fmt: skip
    figure.add_trace(
        go.Scatter(
            x=doses, y=wells["activity"], mode="markers", name="wells",
            text=wells["Metadata_Plate"] + "/" + wells["Metadata_Well"],
            hovertemplate="%{text}<br>%{x:.3g} uM: activity %{y:.3g}<extra></extra>",
        )
    )  # fmt: skip
    parameters = [fit.get(k) for k in ("bottom", "top", "ec50", "hill")]
    if len(doses) and all(v is not None and np.isfinite(v) for v in parameters):
        bottom, top, ec50, hill = (float(v) for v in parameters)
        grid = np.logspace(
            np.log10(doses.min()) - 0.5, np.log10(doses.max()) + 0.5, 200
        )
        curve = bottom + (top - bottom) / (1 + (ec50 / grid) ** hill)
        figure.add_trace(go.Scatter(x=grid, y=curve, mode="lines", name="4PL fit"))
        figure.add_vline(x=ec50, line_dash="dot", annotation_text=f"EC50 {ec50:.3g} uM")
    figure.update_layout(
        title=f"{compound}: activity vs dose ({fit.get('ec50_flag', 'no fit')})",
        xaxis_type="log", xaxis_title="concentration (uM)",
        yaxis_title="activity (distance from DMSO)", height=420,
    )  # fmt: skip
    return figure
