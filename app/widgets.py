"""Reusable dashboard pieces: run picker, plate map, downloads, paging, gallery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import data
from pipeline.gallery import composite, display_limits, draw_outlines
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


def pick_feature_set(run_id: int) -> str | None:
    """Sidebar select box over a run's feature sets; shown only when it has several.

    The options are ``classical``, ``deep`` (the latest CNN embedding), ``combined``
    (the latest classical + embedding set) and any other stored set
    (`app.data.load_feature_sets`); the default is the run's default
    (``classical`` when present). The choice is remembered over page switches
    (``feature_set_choice`` in the session state) and the stored name chosen is
    kept as ``feature_set_name`` (the entry page warms its caches).

    Returns
    -------
    str or None
        The stored name of the chosen feature set (an alias resolved), so the
        loaders' caches are keyed by it; None for a run without feature sets.
    """
    options = data.load_feature_sets(data.db_url(), run_id)
    if not options:
        return None
    names = list(options)
    choice = names[0]
    if len(set(options.values())) > 1:
        remembered = st.session_state.get("feature_set_choice")
        choice = st.sidebar.selectbox(
            "Feature set", names,
            index=names.index(remembered) if remembered in names else 0,
            format_func=lambda o: o if options[o] == o else f"{o} ({options[o]})",
            key="feature_set",
            help="Profiles every view is computed from: classical features, the "
            "latest CNN embedding (deep), both (combined), or another stored set.",
        )  # fmt: skip
        st.session_state["feature_set_choice"] = choice
    st.session_state["feature_set_name"] = options[choice]
    return options[choice]


def plate_heatmap(wells: pd.DataFrame, metric: str, *, title: str) -> go.Figure:
    """Return a plate-shaped map of one per-well metric, one square per well.

    Squares (not a heatmap image, whose cells Streamlit cannot select) so a click,
    box or lasso selects wells in the browser.

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
        Rows A.. (top to bottom), columns 1.. of the smallest plate format holding
        the wells; each point's ``customdata`` is its well name.

    Raises
    ------
    ValueError
        If a column is missing or the wells fit no plate format.
    """
    missing = [c for c in ("Metadata_Well", "Metadata_Compound", metric)
               if c not in wells.columns]  # fmt: skip
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    positions = np.array([parse_well(w) for w in wells["Metadata_Well"]]).reshape(-1, 2)
    shape = next(
        (shape for shape in PLATE_FORMATS.values()
         if (positions[:, 0] < shape[0]).all() and (positions[:, 1] < shape[1]).all()),
        None,
    )  # fmt: skip
    if shape is None:
        raise ValueError("the wells fit no 96/384/1536-well plate.")
    n_rows, n_cols = shape
    row_names = [chr(65 + r) if r < 26 else "A" + chr(39 + r) for r in range(n_rows)]
    side = max(4, min(34, 780 // n_cols))  # marker size in px
    figure = go.Figure(
        go.Scatter(
            x=positions[:, 1] + 1,
            y=[row_names[r] for r in positions[:, 0]],
            mode="markers",
            marker={"symbol": "square", "size": side, "color": wells[metric],
                    "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": {"text": metric[:20]}}},
            customdata=wells["Metadata_Well"],
            text=wells["Metadata_Compound"],
            hovertemplate="%{customdata}: %{text}<br>" + metric
            + ": %{marker.color:.3g}<extra></extra>",
        )
    )  # fmt: skip
    figure.update_layout(
        title=title, height=150 + (side + 4) * n_rows, width=160 + (side + 4) * n_cols,
        xaxis={"range": [0.5, n_cols + 0.5], "dtick": 1 if n_cols <= 24 else 4,
               "side": "top", "showgrid": False},
        yaxis={"categoryorder": "array", "categoryarray": row_names[::-1],
               "range": [-0.5, n_rows - 0.5], "showgrid": False},
        plot_bgcolor="#eeeeee", clickmode="event+select",
        margin={"t": 80},
    )  # fmt: skip
    return figure


def selected_customdata(event: object) -> list[str]:
    """Return the ``customdata`` of points selected in a plotly chart event."""
    points = getattr(getattr(event, "selection", None), "points", None) or []
    out = []
    for point in points:
        value = point.get("customdata")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            out.append(value)
    return out


def table_downloads(table: pd.DataFrame, name: str, *, key: str) -> None:
    """CSV and Parquet download buttons for a table, generated on click."""
    left, right = st.columns(2)
    left.download_button(
        f"{name}.csv", lambda: table.to_csv(index=False), file_name=f"{name}.csv",
        mime="text/csv", key=f"{key}_csv", icon=":material/download:",
        on_click="ignore",
    )  # fmt: skip
    right.download_button(
        f"{name}.parquet", lambda: table.to_parquet(index=False),
        file_name=f"{name}.parquet", mime="application/vnd.apache.parquet",
        key=f"{key}_parquet", icon=":material/download:", on_click="ignore",
    )  # fmt: skip


def show_figure(figure: go.Figure, name: str, *, key: str, **kwargs: object) -> object:
    """Show a Plotly figure with HTML and PNG download buttons (made on click).

    The HTML embeds plotly.js (about 4 MB), so it opens on a closed network.

    PNG is rendered by kaleido with the local Chrome/Chromium; the plot's camera
    icon saves a PNG from the browser too. Extra keyword arguments go to
    `st.plotly_chart` (e.g. ``on_select``); its return value is returned.
    """
    config = {"toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}}
    event = st.plotly_chart(figure, key=key, config=config, **kwargs)
    left, right = st.columns(2)
    left.download_button(
        f"{name}.html", lambda: figure.to_html(include_plotlyjs=True),  # offline
        file_name=f"{name}.html", mime="text/html", key=f"{key}_html",
        icon=":material/download:", on_click="ignore",
    )  # fmt: skip
    right.download_button(
        f"{name}.png", lambda: figure.to_image(format="png", scale=2),
        file_name=f"{name}.png", mime="image/png", key=f"{key}_png",
        icon=":material/download:", on_click="ignore",
    )  # fmt: skip
    return event


def paged(table: pd.DataFrame, *, key: str, page_size: int = 100) -> pd.DataFrame:
    """Show a long table one page at a time; return the page shown."""
    n_pages = max(1, -(-len(table) // page_size))
    page = 1
    if n_pages > 1:
        page = int(
            st.number_input(
                f"Page (of {n_pages}, {len(table):,} rows)", min_value=1,
                max_value=n_pages, value=1, key=key,
            )
        )  # fmt: skip
    shown = table.iloc[(page - 1) * page_size : page * page_size]
    st.dataframe(shown, hide_index=True)
    return shown


def pick_channels(names: list[str], *, key: str) -> tuple[int, ...]:
    """Multiselect of channels to composite; returns their indexes (all by default)."""
    chosen = st.multiselect("Channels", names, default=names, key=key)
    return tuple(names.index(c) for c in chosen) or tuple(range(len(names)))


def treatment_label(well: pd.Series) -> str:
    """Return e.g. ``Mitoglow 1 uM (treatment)`` for a well's metadata row."""
    dose = well.get("Metadata_Concentration")
    unit = well.get("Metadata_ConcentrationUnit")
    unit = unit if isinstance(unit, str) and unit else "uM"
    amount = f" {dose:.3g} {unit}" if pd.notna(dose) else ""
    return f"{well['Metadata_Compound']}{amount} ({well['Metadata_Role']})"


def open_gallery(
    title: str,
    *,
    wells: list[tuple[str, str]] = (),  # type: ignore[assignment]
    cells: list[tuple[str, str, int, int]] = (),  # type: ignore[assignment]
) -> None:
    """Hand a selection of wells or cells to the Cell gallery view and open it."""
    st.session_state["gallery_selection"] = {
        "title": title, "wells": [tuple(w) for w in wells],
        "cells": [tuple(c) for c in cells],
    }  # fmt: skip
    st.switch_page("views/gallery.py")


def cell_gallery(
    crops: np.ndarray,
    masks: np.ndarray,
    captions: list[str],
    *,
    channels: tuple[int, ...],
    per_row: int = 8,
) -> None:
    """Show cell crops composited on one scale with their cell outlines, captioned."""
    if not len(crops):
        st.info("No cells to show here (no cells, or all fields flagged by QC).")
        return
    rgb = composite(crops, display_limits(crops), channels=channels)
    rgb = draw_outlines(rgb, masks, color=(255, 255, 255))
    for start in range(0, len(rgb), per_row):
        for column, image, caption in zip(
            st.columns(per_row), rgb[start : start + per_row],
            captions[start : start + per_row], strict=False,
        ):  # fmt: skip
            column.image(image, caption=caption, width="stretch", output_format="PNG")


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
        figure.add_vline(x=ec50, line_dash="dot")
        # annotations on a log axis take log10(x) (add_vline's own label does not)
        figure.add_annotation(
            x=np.log10(ec50), y=1, yref="paper", text=f"EC50 {ec50:.3g} uM",
            showarrow=False, xanchor="left", yanchor="bottom",
        )  # fmt: skip
    figure.update_layout(
        title=f"{compound}: activity vs dose ({fit.get('ec50_flag', 'no fit')})",
        xaxis_type="log", xaxis_title="concentration (uM)",
        yaxis_title="activity (distance from DMSO)", height=420,
    )  # fmt: skip
    return figure
