"""Campaign view: every plate's QC and trends, plate maps side by side, plate effects."""

import numpy as np
import pandas as pd
import streamlit as st

from app import data, widgets
from pipeline.calls.campaign import AFTER_RECIPE, BEFORE_RECIPE

#: Plate maps per row of the side-by-side view.
MAPS_PER_ROW = 4

st.header("Campaign")
st.caption(
    "A screen is a campaign of plates, often in batches: plates drift (cell "
    "numbers, staining, controls) and profiles can carry their plate's signature. "
    "Compare the plates here, one row per plate, in plate order."
)
run_id = widgets.pick_run()
if run_id is not None:
    url = data.db_url()
    feature_set = widgets.pick_feature_set(run_id)
    st.subheader("Plate QC across the campaign")
    st.caption(
        "dmso_cell_count: median cells per DMSO well; z_prime_activity: how well the "
        "positive controls separate from DMSO (> 0.5 excellent, < 0 they overlap); "
        "replicate_correlation_across_plates: median correlation of a plate's "
        "treatment wells with the same compound-dose on the other plates (low: the "
        "plate disagrees with the rest); layout: plates with the same number hold "
        "the same compound-doses in every well (replicate plates); edge effects as "
        "on the Plates page."
    )
    widgets.show_glossary(["activity", "Z'", "edge effect"])
    try:
        trends = data.load_plate_trends(url, run_id, feature_set)
    except ValueError as exc:  # a cell-count control the run does not hold
        st.error(f"Plate QC: {exc}")
        trends = data.load_plate_trends(url, run_id, feature_set, with_qc=False)
    st.dataframe(trends, hide_index=True)
    widgets.table_downloads(trends, "plate_trends", key="campaign_trends")
    plates = trends["Metadata_Plate"].tolist()
    if len(plates) < 2:
        st.info(
            f"This run has one plate ({', '.join(map(str, plates)) or 'none'}): "
            "trends across plates, plate maps side by side, replicate agreement "
            "across plates and plate-effect diagnostics need two or more. Its plate "
            "map is on the Plates page."
        )
    else:
        numeric = [c for c in trends.columns if c != "layout"
                   and trends[c].dtype.kind in "fiu" and trends[c].notna().any()]  # fmt: skip
        first = ["dmso_cell_count", "z_prime_activity",
                 "replicate_correlation_across_plates"]  # fmt: skip
        numeric = [*(c for c in first if c in numeric),
                   *(c for c in numeric if c not in first)]  # fmt: skip
        metric = st.selectbox(
            "Metric across plates", numeric, key="campaign_metric",
            help="Any numeric column of the table above, drawn in plate order"
            + (", coloured by batch" if "Metadata_Batch" in trends else ""),
        )  # fmt: skip
        widgets.show_figure(
            widgets.plate_trend_figure(trends, metric), f"campaign_{metric}",
            key="campaign_trend",
        )  # fmt: skip

        st.subheader("Plate maps side by side")
        wells = data.load_plate_map_metrics(url, run_id, feature_set)
        left, right = st.columns([2, 1])
        chosen = left.multiselect(
            "Plates", plates, default=plates[:MAPS_PER_ROW], key="campaign_plates"
        )
        well_metric = right.selectbox(
            "Colour wells by", widgets.well_metric_options(wells),
            key="campaign_map_metric",
            help="cell count, activity (SDs from the plate's DMSO wells), q-value of "
            "the well's compound-dose, fields flagged by image QC, or any feature",
        )  # fmt: skip
        if not chosen:
            st.info("Pick plates to map them side by side.")
        else:
            shown = wells[wells["Metadata_Plate"].isin(chosen)]
            values = shown[well_metric].to_numpy(float)
            values = values[np.isfinite(values)]
            color_range = (
                (float(values.min()), float(values.max())) if len(values) else None
            )
            st.caption(
                f"One colour scale for the {len(chosen)} maps"
                + (
                    f": {well_metric} from {color_range[0]:.3g} to "
                    f"{color_range[1]:.3g}."
                    if color_range
                    else f" (no {well_metric} values on these plates)."
                )
                + " A well's fields and cells are on the Plates page."
            )
            batches = data.load_plate_batches(url, run_id)
            for start in range(0, len(chosen), MAPS_PER_ROW):
                row = chosen[start : start + MAPS_PER_ROW]
                for column, plate in zip(st.columns(MAPS_PER_ROW), row, strict=False):
                    batch = batches.get(plate)
                    figure = widgets.plate_heatmap(
                        wells[wells["Metadata_Plate"] == plate], well_metric,
                        title=f"{plate} ({batch})" if pd.notna(batch) else plate,
                        color_range=color_range, width_px=180,
                    )  # fmt: skip
                    figure.update_layout(
                        height=figure.layout.height - 90,
                        margin={"l": 30, "r": 10, "t": 50, "b": 10},
                    )
                    column.plotly_chart(figure, key=f"campaign_map_{plate}")

        st.subheader("Plate effects before and after the profile recipe")
        st.caption(
            f"**{BEFORE_RECIPE}**: every well scaled to the DMSO wells of all "
            f"plates pooled; **{AFTER_RECIPE}**: the profiles every view "
            "uses. dmso_within_minus_across: how much more alike DMSO wells are on "
            "the same plate than across plates (near 0: no plate effect); "
            "replicate_map: how well a compound-dose's wells find each other (higher "
            "is better); nsc / nscb: MoA nearest-neighbour accuracy leaving out the "
            "same compound / also its batch (only when the plate map has a moa "
            "column)."
        )
        try:
            diagnostics = data.load_correction_diagnostics(url, run_id, feature_set)
        except ValueError as exc:
            st.warning(f"No plate-effect diagnostics for this run: {exc}")
        else:
            st.dataframe(diagnostics, hide_index=True)
            widgets.table_downloads(
                diagnostics, "correction_diagnostics", key="campaign_diagnostics"
            )
