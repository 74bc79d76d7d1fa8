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
    feature_set = widgets.pick_feature_set(run_id)
    hits, doses = data.load_hits(data.db_url(), run_id, feature_set)
    st.subheader(f"{int(hits['is_hit'].sum())} of {len(hits)} compounds are hits")
    show = st.radio(
        "Show", ["all compounds", "hits only", "toxic only"], horizontal=True,
        key="hits_filter",
    )  # fmt: skip
    shown = {"all compounds": hits, "hits only": hits[hits["is_hit"]],
             "toxic only": hits[hits["is_toxic"]]}[show]  # fmt: skip
    st.dataframe(shown.reindex(columns=HIT_COLUMNS), hide_index=True)
    widgets.table_downloads(hits, "hits", key="hits_table")
    st.subheader("Dose response")
    compounds = hits["Metadata_Compound"].tolist()
    compound = st.selectbox("Compound", compounds, key="dose_response_compound")
    activity = data.load_well_activity(data.db_url(), run_id, feature_set)
    figure = widgets.dose_response_figure(
        activity[activity["Metadata_Compound"] == compound],
        hits.set_index("Metadata_Compound").loc[compound],
        activity.loc[activity["Metadata_Role"] == "negative_control", "activity"],
        compound=compound,
    )
    widgets.show_figure(figure, f"dose_response_{compound}", key="dose_figure")
    of = activity[activity["Metadata_Compound"] == compound]
    if st.button(f"Open the cells of {compound} in the gallery", key="hit_gallery"):
        widgets.open_gallery(
            compound,
            wells=list(zip(of["Metadata_Plate"], of["Metadata_Well"], strict=True)),
        )
    st.subheader("Compound-doses")
    widgets.paged(doses.reindex(columns=DOSE_COLUMNS), key="doses_page")
    st.caption("Downloads carry each compound-dose's consensus profile too.")
    widgets.table_downloads(doses, "compound_doses", key="doses_table")
