"""Compare compounds: nearest neighbours by profile and the features that differ."""

import plotly.express as px
import streamlit as st

from app import data, widgets
from pipeline.moa import compare_compound

st.header("Compare compounds")
st.caption(
    "Profiles are per compound-dose: the median of its wells, each feature as a "
    "robust z-score against its plate's DMSO wells. Neighbours: the most similar "
    "compounds (cosine similarity, each at its closest dose). The bars show the "
    "features that move the chosen compound most, side by side with its neighbours."
)
run_id = widgets.pick_run()
if run_id is not None:
    url = data.db_url()
    feature_set = widgets.pick_feature_set(run_id)
    consensus = data.load_consensus(url, run_id, feature_set)
    hits, _ = data.load_hits(url, run_id, feature_set)
    profiled = set(consensus["Metadata_Compound"])
    compounds = [c for c in hits["Metadata_Compound"] if c in profiled]  # by rank
    if not compounds:
        st.info("This run has no compound besides the negative controls.")
    else:
        left, middle, right = st.columns(3)
        compound = left.selectbox("Compound", compounds, key="compare_compound")
        doses = sorted(
            consensus.loc[consensus["Metadata_Compound"] == compound,
                          "Metadata_Concentration"].dropna().unique()
        )  # fmt: skip
        dose = middle.selectbox(
            "Dose (uM)", ["most active", *doses], key="compare_dose",
            format_func=lambda d: d if isinstance(d, str) else f"{d:g}",
        )  # fmt: skip
        k = right.slider("Neighbours", 1, 10, 3, key="compare_k")
        neighbors, features = compare_compound(
            consensus, compound, k=k, n_features=12,
            concentration=None if isinstance(dose, str) else float(dose),
        )  # fmt: skip
        moa = hits.set_index("Metadata_Compound")
        shown = neighbors.assign(
            is_hit=neighbors["Metadata_Compound"].map(moa["is_hit"]),
            q_value=neighbors["Metadata_Compound"].map(moa["q_value"]),
        )
        st.dataframe(shown, hide_index=True)
        widgets.table_downloads(shown, f"neighbors_{compound}", key="compare_table")
        figure = px.bar(
            features, x="feature", y="value", color="label", barmode="group",
            labels={"value": "robust z vs DMSO", "label": "compound @ dose (uM)"},
            title=f"Top features of {compound} vs its nearest compounds", height=520,
        )  # fmt: skip
        figure.update_xaxes(tickangle=35)
        widgets.show_figure(figure, f"compare_{compound}", key="compare_figure")
