"""Phenotype map: UMAP of wells or compound-doses, coloured by cluster, MoA, role..."""

import plotly.express as px
import streamlit as st

from app import data, widgets

st.header("Phenotype map")
st.caption(
    "Each point is a compound-dose (median of its wells), a well, or a sampled single "
    "cell, placed by UMAP of its DMSO-normalized profile; nearby points look alike. "
    "Clusters: HDBSCAN on the map (-1 = unassigned)."
)
run_id = widgets.pick_run()
if run_id is not None:
    points = data.load_phenotype_map(data.db_url(), run_id)
    if points.empty:
        st.info(
            "No phenotype map stored for this run yet: run `phenoscreen map --db URL`."
        )
    else:
        levels = [
            v for v in ("compound_dose", "well", "cell") if v in set(points["level"])
        ]
        level = st.radio("Points", levels, horizontal=True, key="map_level")
        colour = st.selectbox(
            "Colour by", ["cluster", "compound", "moa", "role", "activity"]
        )
        shown = points[points["level"] == level].astype({"cluster": str})
        figure = px.scatter(
            shown, x="umap_x", y="umap_y", color=colour, hover_name="label",
            hover_data=["compound", "concentration", "role", "moa", "activity"],
            height=650,
        )  # fmt: skip
        st.plotly_chart(figure)
        st.dataframe(shown.drop(columns=["umap_x", "umap_y"]), hide_index=True)
