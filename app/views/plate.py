"""Plate view: plate QC, a plate map of any per-well metric, a well's fields and cells."""

import streamlit as st

from app import data, widgets

st.header("Plates")
run_id = widgets.pick_run()
if run_id is not None:
    url = data.db_url()
    feature_set = widgets.pick_feature_set(run_id)
    st.subheader("Plate QC")
    control = data.load_hit_settings(url, run_id).cell_count_control
    st.caption(
        "z_prime_activity and robust_z_prime_activity: how well the positive "
        "controls' activity separates from the DMSO wells' (> 0.5 excellent, 0 to "
        "0.5 usable for phenotypic screens, < 0 the controls overlap; blank without "
        "two wells of each). Edge effect, outer ring vs inner wells: "
        "edge_to_inner_cell_count (ratio of median cell counts, 1 = none) and "
        "edge_minus_inner_activity (difference of median activity, 0 = none), over "
        "the wells named in edge_wells. "
        + (
            f"z_prime_cell_count: cell count of the {control} wells vs DMSO "
            "([hits] cell_count_control of the run's config)."
            if control
            else "No cell-count Z': the run declares no compound that changes cell "
            "count ([hits] cell_count_control in its config)."
        )
    )
    widgets.show_glossary(["activity", "Z'", "edge effect"])
    try:
        st.dataframe(data.load_plate_qc(url, run_id, feature_set), hide_index=True)
    except ValueError as exc:  # a cell-count control the run does not hold
        st.error(f"Plate QC: {exc}")
    wells = data.load_plate_map_metrics(url, run_id, feature_set)
    st.subheader("Plate map")
    numeric = widgets.well_metric_options(wells)
    left, right = st.columns(2)
    plate = left.selectbox("Plate", sorted(wells["Metadata_Plate"].unique()))
    metric = right.selectbox(
        "Colour wells by", numeric, key="plate_metric",
        help="cell count, activity (SDs from the plate's DMSO wells), q-value of "
        "the well's compound-dose, fields flagged by image QC, or any feature",
    )  # fmt: skip
    on_plate = wells[wells["Metadata_Plate"] == plate]
    event = widgets.show_figure(
        widgets.plate_heatmap(on_plate, metric, title=f"{plate}: {metric}"),
        f"plate_{plate}_{metric}", key="plate_map", on_select="rerun",
        selection_mode=("points", "box", "lasso"),
    )  # fmt: skip
    widgets.table_downloads(wells, "well_profiles", key="wells_table")

    st.subheader("Well")
    st.caption(
        "Click a well on the map (or pick it here) to see its fields and cells; "
        "box- or lasso-select several wells (toolbar above the map) to open their "
        "cells in the gallery."
    )
    names = on_plate["Metadata_Well"].tolist()
    clicked = [w for w in widgets.selected_customdata(event) if w in names]
    if clicked:
        st.session_state["plate_well"] = clicked[0]
    elif st.session_state.get("plate_well") not in names:
        st.session_state.pop("plate_well", None)
    if len(clicked) > 1 and st.button(
        f"Open the cells of the {len(clicked)} selected wells in the gallery",
        key="wells_to_gallery",
    ):
        widgets.open_gallery(
            f"{len(clicked)} wells of {plate}", wells=[(plate, w) for w in clicked]
        )
    well = st.selectbox("Well", names, key="plate_well")
    row = on_plate[on_plate["Metadata_Well"] == well].iloc[0]
    st.markdown(
        f"**{plate} {well}**: {widgets.treatment_label(row)}, "
        f"{widgets.well_summary(row)}"
    )
    names = data.load_channels(url, run_id)
    if not names:
        st.info("This run holds imported profiles: it has no images or single cells.")
        st.stop()
    channels = widgets.pick_channels(names, key="well_ch")
    thumbnails = data.load_field_thumbnails(url, run_id, plate, well, channels)
    if not thumbnails:
        st.info("This well has no completed field that passed QC.")
    for column, (caption, image) in zip(
        st.columns(max(len(thumbnails), 3)), thumbnails, strict=False
    ):
        if isinstance(image, str):
            column.warning(f"{caption}: {image}")
        else:
            column.image(
                image, caption=f"{caption}: cells white, nuclei yellow",
                width="stretch", output_format="PNG",
            )  # fmt: skip
    if st.button("Open this well's cells in the gallery", key="well_to_gallery"):
        widgets.open_gallery(f"{plate} {well}", wells=[(plate, well)])
    if st.toggle("Show this well's cells as a table", key="well_cells_table"):
        cells = data.load_well_cells(url, run_id, plate, well, feature_set)
        st.caption(f"{len(cells):,} cells of {plate} {well} (one row per cell)")
        widgets.paged(cells, key="well_cells_page")
        widgets.table_downloads(cells, f"cells_{plate}_{well}", key="well_cells")
