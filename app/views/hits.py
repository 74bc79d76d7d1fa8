"""Hits view: compound-doses ranked by baseline activity against DMSO."""

import streamlit as st

from app import data, widgets
from pipeline.profiles import RANKING_COLUMNS

st.header("Ranked compounds")
st.caption(
    "Baseline activity: root mean square of robust z-scores against the plate's DMSO "
    "wells; activity_z is its distance from the DMSO wells' own scores."
)
run_id = widgets.pick_run()
if run_id is not None:
    hits = data.load_hits(data.db_url(), run_id)
    st.dataframe(hits[RANKING_COLUMNS], hide_index=True)
    st.download_button(
        "Download the full table (CSV)", hits.to_csv(index=False), file_name="hits.csv"
    )
