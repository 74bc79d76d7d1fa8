"""Hits view: compounds active against DMSO, with potency, toxicity and per-dose detail."""

import streamlit as st

from app import data, widgets
from pipeline.hits import DOSE_COLUMNS, HIT_COLUMNS

st.header("Hits")
st.caption(
    "A compound is a hit when one of its doses is phenotypically active: its replicate "
    "wells retrieve each other before the DMSO wells (mAP), p-values from a permutation "
    "null, combined over doses (Simes) and corrected over compounds (Benjamini-Hochberg, "
    "q < 0.05). activity_z: distance from DMSO. EC50: 4PL fit of activity vs dose. "
    "Toxic: a dose with fewer than half the DMSO cell count."
)
run_id = widgets.pick_run()
if run_id is not None:
    hits, doses = data.load_hits(data.db_url(), run_id)
    st.subheader(f"{int(hits['is_hit'].sum())} of {len(hits)} compounds are hits")
    st.dataframe(hits[HIT_COLUMNS], hide_index=True)
    st.download_button(
        "Download the hit list (CSV)", hits.to_csv(index=False), file_name="hits.csv"
    )
    st.subheader("Dose response")
    compounds = hits["Metadata_Compound"].tolist()
    compound = st.selectbox("Compound", compounds, key="dose_response_compound")
    activity = data.load_well_activity(data.db_url(), run_id)
    figure = widgets.dose_response_figure(
        activity[activity["Metadata_Compound"] == compound],
        hits.set_index("Metadata_Compound").loc[compound],
        activity.loc[activity["Metadata_Role"] == "negative_control", "activity"],
        compound=compound,
    )
    st.plotly_chart(figure)
    st.subheader("Compound-doses")
    st.dataframe(doses[DOSE_COLUMNS], hide_index=True)
    st.download_button(
        "Download compound-doses with consensus profiles (CSV)",
        doses.to_csv(index=False),
        file_name="compound_doses.csv",
    )
