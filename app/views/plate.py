"""Plate view: a heatmap of a per-well metric for each plate."""

import streamlit as st

from app import data, widgets

st.header("Plates")
run_id = widgets.pick_run()
if run_id is not None:
    st.subheader("Plate QC")
    st.caption(
        "Z' of the activity score: positive controls vs DMSO (> 0.5 is a good assay). "
        "Edge: DMSO cell count on the outer ring / inner wells (1 = no edge effect)."
    )
    st.dataframe(data.load_plate_qc(data.db_url(), run_id), hide_index=True)
    wells = data.load_well_profiles(data.db_url(), run_id)
    numeric = [c for c in wells.columns if wells[c].dtype.kind in "fi"]
    metric = st.selectbox("Metric", numeric, index=numeric.index("Metadata_CellCount"))
    for plate, group in wells.groupby("Metadata_Plate"):
        st.plotly_chart(
            widgets.plate_heatmap(group, metric, title=f"{plate}: {metric}")
        )
