"""Phenotype map: UMAP of wells or compound-doses, coloured by cluster, MoA, role..."""

import plotly.express as px
import streamlit as st

from app import data, widgets
from pipeline.views.gallery import parse_cell_label, selection_wells

st.header("Phenotype map")
st.caption(
    "Each point is a compound-dose (median of its wells), a well, or a sampled single "
    "cell, placed by UMAP of its DMSO-normalized profile; nearby points look alike. "
    "Clusters: HDBSCAN on the map (-1 = unassigned). Activity: distance from DMSO in "
    "SDs of the DMSO wells (DMSO: 0 +- 1); a compound keeps its colour on every "
    "level and in every view, DMSO is grey. Click a point, or select points with the "
    "box or lasso tool (toolbar above the map), to list them and open their cells in "
    "the gallery."
)
run_id = widgets.pick_run()
if run_id is not None:
    url = data.db_url()
    feature_set = widgets.pick_feature_set(run_id)
    points = data.load_phenotype_map(url, run_id)
    if points.empty:
        st.info(
            "No phenotype map stored for this run yet: run `phenoscreen map --db URL`."
        )
    else:
        # one map per run: say what it was made from when the store records it
        made_from = points.attrs.get("feature_set")
        if made_from is None and "feature_set" in points.columns:
            made_from = next(iter(points["feature_set"].dropna()), None)
        replace = f"`phenoscreen map --feature-set {feature_set}` replaces it"
        if made_from is not None:
            st.caption(
                f"This map was computed from the feature set **{made_from}**"
                + ("." if made_from == feature_set else
                   f", not the one chosen in the sidebar ({replace}).")
            )  # fmt: skip
        elif len(set(data.load_feature_sets(url, run_id).values())) > 1:
            st.caption(
                "One map is stored per run, computed from the feature set given to "
                "`phenoscreen map --feature-set` (classical by default); the sidebar's "
                f"choice does not change it ({replace})."
            )
        levels = [
            v for v in ("compound_dose", "well", "cell") if v in set(points["level"])
        ]
        # plate and batch (from the plate map) show plate and batch effects
        batches = data.load_plate_batches(url, run_id).dropna().astype(str)
        left, right = st.columns(2)
        level = left.radio("Points", levels, horizontal=True, key="map_level")
        colour = right.selectbox(
            "Colour by",
            ["cluster", "compound", "moa", "role", "activity", "plate",
             *(["batch"] if len(batches) else [])],
            key="map_colour",
            help="plate or batch: wells that gather by plate or batch rather than "
            "by compound show a plate or batch effect",
        )  # fmt: skip
        shown = (
            points[points["level"] == level]
            .astype({"cluster": str})
            .reset_index(drop=True)
        )
        if len(batches):
            shown["batch"] = shown["plate"].map(batches).fillna("no batch")
        if colour in ("plate", "batch") and level == "compound_dose":
            st.info(
                f"A compound-dose pools its wells over plates: choose the well or "
                f"cell points to colour them by {colour}."
            )
            colour = None
        figure = px.scatter(
            shown, x="umap_x", y="umap_y", color=colour, hover_name="label",
            hover_data=["compound", "concentration", "role", "moa", "activity"],
            custom_data=["label"], height=650,
            color_discrete_map=(
                widgets.run_compound_colors(run_id) if colour == "compound" else {}
            ),
        )  # fmt: skip
        event = widgets.show_figure(
            figure, f"phenotype_map_{level}", key=f"map_{level}", on_select="rerun",
            selection_mode=("points", "box", "lasso"),
        )  # fmt: skip
        labels = set(widgets.selected_customdata(event))
        selected = shown[shown["label"].isin(labels)]
        if len(selected):
            st.subheader(f"{len(selected)} selected points")
            table = selected.drop(columns=["umap_x", "umap_y"])
            st.dataframe(table, hide_index=True)
            widgets.table_downloads(table, "map_selection", key="map_selection")
            if st.button("Open their cells in the gallery", key="map_gallery"):
                wells = data.load_well_activity(url, run_id, feature_set)
                if level == "cell":
                    widgets.open_gallery(
                        f"{len(selected)} cells selected on the map",
                        cells=[parse_cell_label(x) for x in selected["label"]],
                    )
                else:
                    chosen = selection_wells(selected, wells)
                    widgets.open_gallery(
                        f"{len(selected)} {level.replace('_', '-')}s selected on "
                        "the map",
                        wells=list(chosen.itertuples(index=False, name=None)),
                    )  # fmt: skip
        else:
            st.caption("No point selected: the table lists all points.")
            widgets.paged(shown.drop(columns=["umap_x", "umap_y"]), key="map_page")
            widgets.table_downloads(shown, f"phenotype_map_{level}", key="map_table")
