"""Compare compounds: nearest neighbours by profile and the features that differ."""

import plotly.express as px
import streamlit as st

from app import data, widgets
from pipeline.calls.hits import MIN_SIMILARITY
from pipeline.calls.moa import compare_compound

st.header("Compare compounds")
st.caption(
    "Profiles are per compound-dose: the median of its wells, each feature as a "
    "robust z-score against its plate's DMSO wells. Neighbours: the most similar "
    "compounds (cosine similarity, each at its closest dose); only those at or "
    f"above {MIN_SIMILARITY:g} count as similar (is_similar), as in the hit list's "
    "nearest_compounds: unrelated profiles reach 0.1-0.3 by chance. The bars show "
    "the features that move the chosen compound most, side by side with its similar "
    "neighbours, each compound in its colour of every view."
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
        similarity = neighbors.pop("cosine_similarity")
        shown = neighbors.assign(
            cosine_similarity=similarity,
            is_similar=similarity >= MIN_SIMILARITY,
            is_hit=neighbors["Metadata_Compound"].map(moa["is_hit"]),
            q_value=neighbors["Metadata_Compound"].map(moa["q_value"]),
        )
        n_below = int((~shown["is_similar"]).sum())
        if n_below:
            st.caption(
                f"{n_below} of the {len(shown) - 1} nearest compounds are below the "
                f"cut-off ({MIN_SIMILARITY:g}; is_similar = False): not similar, and "
                "left out of the bars."
            )
        st.dataframe(shown, hide_index=True)
        widgets.table_downloads(shown, f"neighbors_{compound}", key="compare_table")
        similar = shown.loc[shown["is_similar"], ["rank", "Metadata_Compound"]]
        bars = features.merge(similar, on="rank")
        colors = widgets.run_compound_colors(run_id)
        label_colors = dict(
            zip(bars["label"], bars["Metadata_Compound"].map(colors), strict=True)
        )
        # colours repeat past the palette's length: then patterns tell bars apart
        repeated = len(set(label_colors.values())) < len(label_colors)
        figure = px.bar(
            bars, x="feature", y="value", color="label", barmode="group",
            color_discrete_map=label_colors,
            pattern_shape="label" if repeated else None,
            labels={"value": "robust z vs DMSO", "label": "compound @ dose (uM)"},
            title=f"Top features of {compound} vs its similar compounds", height=520,
        )  # fmt: skip
        figure.update_xaxes(tickangle=35)
        widgets.show_figure(figure, f"compare_{compound}", key="compare_figure")
