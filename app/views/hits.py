"""Hits view: compounds active against DMSO, with potency, toxicity and per-dose detail."""

import streamlit as st

from app import data, widgets
from app.glossary import GLOSSARY
from pipeline.calls.hits import DOSE_COLUMNS, HIT_COLUMNS

st.header("Hits")
run_id = widgets.pick_run()
if run_id is not None:
    feature_set = widgets.pick_feature_set(run_id)
    hits, doses = data.load_hits(data.db_url(), run_id, feature_set)
    fdr, toxic = hits["fdr"].iloc[0], hits["toxicity_threshold"].iloc[0]
    st.caption(
        "A compound is a hit when at least one of its doses is active against the "
        f"DMSO wells at a false discovery rate of {fdr:g}. Each compound-dose is "
        "tested by mAP (its replicate wells retrieve each other ahead of the DMSO "
        "wells) when it has at least 3 replicate wells and the permutation test can "
        "reach that level, otherwise by its Mahalanobis distance to the DMSO wells. "
        "Its doses' p-values are combined (Simes) and corrected over compounds "
        f"(Benjamini-Hochberg): a hit has q < {fdr:g}; the doses of hits are then "
        "called active (n_active_doses, at least 1 per hit). Activity: distance "
        "from DMSO in SDs of the DMSO wells (DMSO: 0 +- 1). EC50: only where the "
        f"dose-response fit is ok. Toxic: a dose with fewer than {toxic:.0%} of the "
        "DMSO wells' cells."
    )
    widgets.show_glossary(list(GLOSSARY))
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
    of = activity[activity["Metadata_Compound"] == compound]
    figure = widgets.dose_response_figure(
        of,
        hits.set_index("Metadata_Compound").loc[compound],
        activity.loc[activity["Metadata_Role"] == "negative_control", "activity"],
        compound=compound,
        color=widgets.run_compound_colors(run_id).get(compound),
    )
    widgets.show_figure(figure, f"dose_response_{compound}", key="dose_figure")
    st.caption(
        "Each point is a well; the grey band holds the middle 90% of the DMSO "
        "wells' activity (5th to 95th percentile)."
    )
    if st.button(f"Open the cells of {compound} in the gallery", key="hit_gallery"):
        widgets.open_gallery(
            compound,
            wells=list(zip(of["Metadata_Plate"], of["Metadata_Well"], strict=True)),
        )
    st.subheader("Compound-doses")
    widgets.paged(doses.reindex(columns=DOSE_COLUMNS), key="doses_page")
    st.caption("Downloads carry each compound-dose's consensus profile too.")
    widgets.table_downloads(doses, "compound_doses", key="doses_table")
