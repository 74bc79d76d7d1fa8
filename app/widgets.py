"""Reusable dashboard pieces: run picker, plate map, downloads, paging, gallery."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import data
from app.glossary import GLOSSARY
from db.session import shown_url
from pipeline.images.platemap import PLATE_FORMATS, parse_well
from pipeline.views.export import escape_formulas
from pipeline.views.gallery import composite, display_limits, draw_outlines

#: Colour of negative controls (DMSO) in every figure.
CONTROL_GREY = "#999999"
#: Compound colours: Plotly's Dark24 and Light24 without greys and pale tints.
PALETTE = tuple(
    c for c in (*px.colors.qualitative.Dark24, *px.colors.qualitative.Light24)
    if c not in {"#222A2A", "#B2828D", "#778AAE", "#6E899C", "#FED4C4", "#C9FBE5"}
)  # fmt: skip


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
        st.error(f"Cannot open the store {shown_url(url)}: {exc}")
        return None
    complete = runs[runs["status"] == "complete"] if not runs.empty else runs
    if complete.empty:
        st.info(
            f"No complete run in {shown_url(url)} yet. "
            "Run `phenoscreen run` or `phenoscreen demo`."
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


def compound_colors(
    compounds: Iterable[str], *, negative_controls: Iterable[str] = ()
) -> dict[str, str]:
    """Return one colour per compound, the same in every view and figure.

    Parameters
    ----------
    compounds : iterable of str
        Every compound of the run (repeats allowed), so that each view gets the
        same mapping whatever subset it shows.
    negative_controls : iterable of str
        Compounds drawn in `CONTROL_GREY` (e.g. DMSO).

    Returns
    -------
    dict
        Compound -> hex colour: the other compounds in sorted order take
        `PALETTE` in turn (a run with more compounds than colours reuses them).
    """
    grey = set(negative_controls)
    others = sorted(set(compounds) - grey)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(others)}
    return colors | dict.fromkeys(sorted(grey), CONTROL_GREY)


def run_compound_colors(run_id: int) -> dict[str, str]:
    """Return `compound_colors` of a run's plate map (negative controls grey)."""
    compounds = data.load_compounds(data.db_url(), run_id)
    negative = compounds["Metadata_Role"] == "negative_control"
    return compound_colors(
        compounds["Metadata_Compound"],
        negative_controls=compounds.loc[negative, "Metadata_Compound"],
    )


def show_glossary(terms: Sequence[str]) -> None:
    """Show an expander "Glossary" defining `terms` (keys of `app.glossary.GLOSSARY`)."""
    with st.expander("Glossary"):
        st.markdown("\n".join(f"- **{term}**: {GLOSSARY[term]}" for term in terms))


def well_metric_options(wells: pd.DataFrame) -> list[str]:
    """Return the numeric per-well columns a plate map can be coloured by.

    Parameters
    ----------
    wells : DataFrame
        `app.data.load_plate_map_metrics`.

    Returns
    -------
    list of str
        Columns with at least one value: cell count, activity, q-value and flagged
        fields first (those present), then the other numeric columns in order.
    """
    numeric = [c for c in wells.columns
               if wells[c].dtype.kind in "fi" and wells[c].notna().any()]  # fmt: skip
    first = ["Metadata_CellCount", "activity", "q_value", "Metadata_FlaggedFields"]
    return [*(c for c in first if c in numeric),
            *(c for c in numeric if c not in first)]  # fmt: skip


def plate_heatmap(
    wells: pd.DataFrame,
    metric: str,
    *,
    title: str,
    color_range: tuple[float, float] | None = None,
    width_px: int = 780,
) -> go.Figure:
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
    color_range : (float, float), optional
        Values at the ends of the colour scale, so maps of several plates share
        one; None: this plate's own range.
    width_px : int
        About the width of the wells' columns in pixels (squares of 4 to 34 px).

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
    side = max(4, min(34, width_px // n_cols))  # marker size in px
    figure = go.Figure(
        go.Scatter(
            x=positions[:, 1] + 1,
            y=[row_names[r] for r in positions[:, 0]],
            mode="markers",
            marker={"symbol": "square", "size": side, "color": wells[metric],
                    "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": {"text": metric[:20]}},
                    "cmin": color_range[0] if color_range else None,
                    "cmax": color_range[1] if color_range else None},
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


def plate_trend_figure(trends: pd.DataFrame, metric: str) -> go.Figure:
    """Return one per-plate metric across a campaign's plates, in plate order.

    Parameters
    ----------
    trends : DataFrame
        One row per plate in plate order (`app.data.load_plate_trends`):
        ``Metadata_Plate``, `metric` and, when present, ``Metadata_Batch``.
    metric : str
        Numeric column to draw.

    Returns
    -------
    plotly Figure
        A grey line through every plate, then one trace of markers per batch
        (named by the batch) or a single one named `metric` without batches.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    missing = [c for c in ("Metadata_Plate", metric) if c not in trends.columns]
    if missing:
        raise ValueError(f"trends lacks columns {missing}.")
    plates = trends["Metadata_Plate"].astype(str)
    figure = go.Figure(
        go.Scatter(
            x=plates, y=trends[metric], mode="lines", showlegend=False,
            line={"color": CONTROL_GREY, "width": 1}, hoverinfo="skip",
        )
    )  # fmt: skip
    has_batch = "Metadata_Batch" in trends.columns
    groups = (
        trends.groupby(trends["Metadata_Batch"].astype(str), sort=False)
        if has_batch
        else [(metric, trends)]
    )
    for name, group in groups:
        figure.add_trace(
            go.Scatter(
                x=group["Metadata_Plate"].astype(str), y=group[metric],
                mode="markers", name=str(name), marker={"size": 9},
                hovertemplate="%{x}: %{y:.3g}<extra>" + str(name) + "</extra>",
            )
        )  # fmt: skip
    figure.update_layout(
        title=f"{metric} across plates", height=340, showlegend=has_batch,
        legend_title_text="batch" if has_batch else None,
        xaxis={"type": "category", "categoryorder": "array",
               "categoryarray": list(plates), "title": "plate"},
        yaxis_title=metric, margin={"t": 50},
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
        f"{name}.csv", lambda: escape_formulas(table).to_csv(index=False),
        file_name=f"{name}.csv",
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


def well_summary(well: pd.Series) -> str:
    """Return e.g. ``312 cells, activity 2.41`` for a row of the plate-map metrics.

    ``every field flagged by QC`` for a well without a profile (no
    ``Metadata_FieldCount``, `app.data.load_plate_map_metrics`); a missing cell
    count (imported profiles without one) or activity is left out.
    """
    if pd.isna(well.get("Metadata_FieldCount")):
        return "every field flagged by QC"
    parts = []
    if pd.notna(well.get("Metadata_CellCount")):
        parts.append(f"{int(well['Metadata_CellCount'])} cells")
    if pd.notna(well.get("activity")):
        parts.append(f"activity {well['activity']:.2f} SDs from DMSO")
    return ", ".join(parts) or "no cell count or activity"


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
    wells: pd.DataFrame,
    fit: pd.Series,
    dmso: pd.Series,
    *,
    compound: str,
    color: str | None = None,
) -> go.Figure:
    """Return one compound's well activities vs dose against the DMSO wells.

    Parameters
    ----------
    wells : DataFrame
        The compound's wells: ``Metadata_Concentration`` (uM; NaN in designs
        without concentrations), ``activity`` (`pipeline.profiling.profiles.well_activity`),
        ``Metadata_Plate``, ``Metadata_Well``.
    fit : Series
        Its hit-list row: ``bottom``, ``top``, ``ec50``, ``hill``, ``ec50_flag``.
    dmso : Series
        Activities of the negative-control wells, drawn as a grey band from
        their 5th to 95th percentile (from two finite values).
    compound : str
        For the title.
    color : str, optional
        The compound's colour (`compound_colors`); None: Plotly's first.

    Returns
    -------
    plotly Figure
        Traces: ``DMSO`` (the band, when drawn), ``wells``, and ``4PL fit`` (with
        a dotted line at the EC50) only when ``ec50_flag`` is ``ok``. Wells with a
        positive concentration go on a log-dose axis (others are left out); when
        none has one, all wells are one box with its points, over the band.

    Raises
    ------
    ValueError
        If `wells` lacks a column.
    """
    needed = ["Metadata_Concentration", "activity", "Metadata_Plate", "Metadata_Well"]
    missing = [c for c in needed if c not in wells.columns]
    if missing:
        raise ValueError(f"wells lacks columns {missing}.")
    doses = wells["Metadata_Concentration"].to_numpy(float)
    dosed = np.isfinite(doses) & (doses > 0)
    labels = wells["Metadata_Plate"] + "/" + wells["Metadata_Well"]
    figure = go.Figure()
    if dosed.any():
        log_range = (np.log10(doses[dosed].min()) - 0.5,
                     np.log10(doses[dosed].max()) + 0.5)  # fmt: skip
        _add_dmso_band(figure, dmso, x=np.power(10.0, log_range))
        figure.add_trace(
            go.Scatter(
                x=doses[dosed], y=wells["activity"][dosed], mode="markers",
                name="wells", marker={"color": color}, text=labels[dosed],
                hovertemplate="%{text}<br>%{x:.3g} uM: activity %{y:.3g}<extra></extra>",
            )
        )  # fmt: skip
        _add_fit(figure, fit, log_range, color=color)
        figure.update_layout(
            title=f"{compound}: activity vs dose (EC50 fit: "
            f"{fit.get('ec50_flag', 'no fit')})",
            xaxis={"type": "log", "range": log_range, "title": "concentration (uM)"},
        )  # fmt: skip
    else:
        _add_dmso_band(figure, dmso, x=(-0.5, 0.5))
        figure.add_trace(
            go.Box(
                x=np.zeros(len(wells)), y=wells["activity"], name="wells",
                boxpoints="all", jitter=0.5, pointpos=0, marker={"color": color},
                text=labels, hovertemplate="%{text}: activity %{y:.3g}<extra></extra>",
            )
        )  # fmt: skip
        figure.update_layout(
            title=f"{compound}: activity of its wells (no concentrations in this "
            "design)",
            xaxis={"range": (-0.5, 0.5), "tickvals": [0], "ticktext": [compound]},
        )  # fmt: skip
    figure.update_layout(yaxis_title="activity (SDs from DMSO)", height=420)
    return figure


def _add_dmso_band(figure: go.Figure, dmso: pd.Series, *, x: Sequence[float]) -> None:
    """Add the negative controls' 5th-95th percentile of activity as a grey band."""
    values = dmso.to_numpy(float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return
    low, high = np.percentile(values, [5, 95])
    figure.add_trace(
        go.Scatter(
            x=[x[0], x[1], x[1], x[0], x[0]], y=[low, low, high, high, low],
            mode="lines", fill="toself", name="DMSO", line={"width": 0},
            fillcolor="rgba(153, 153, 153, 0.3)", hoverinfo="text",
            text=f"DMSO wells, 5th-95th percentile: {low:.2f} to {high:.2f}",
        )
    )  # fmt: skip


def _add_fit(
    figure: go.Figure, fit: pd.Series, log_range: Sequence[float], *, color: str | None
) -> None:
    """Add the 4PL curve and its EC50 when the fit's flag is ``ok``."""
    parameters = [fit.get(k) for k in ("bottom", "top", "ec50", "hill")]
    if fit.get("ec50_flag") != "ok" or not all(
        v is not None and np.isfinite(v) for v in parameters
    ):
        return
    bottom, top, ec50, hill = (float(v) for v in parameters)
    grid = np.logspace(*log_range, 200)
    curve = bottom + (top - bottom) / (1 + (ec50 / grid) ** hill)
    figure.add_trace(
        go.Scatter(x=grid, y=curve, mode="lines", name="4PL fit", line={"color": color})
    )
    figure.add_vline(x=ec50, line_dash="dot")
    # annotations on a log axis take log10(x) (add_vline's own label does not)
    figure.add_annotation(
        x=np.log10(ec50), y=1, yref="paper", text=f"EC50 {ec50:.3g} uM",
        showarrow=False, xanchor="left", yanchor="bottom",
    )  # fmt: skip
