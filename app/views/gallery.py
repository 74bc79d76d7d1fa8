"""Cell gallery: single cells of a well, compound, cluster or map selection."""

import streamlit as st

from app import data, widgets
from pipeline.views.gallery import selection_wells

st.header("Cell gallery")
st.caption(
    "Single cells cropped from the stored images (illumination-corrected), each "
    "channel in its own colour on a shared scale, cell outline in white. Cells are "
    "sampled from a few fields of the chosen wells; QC-flagged fields are left out."
)
run_id = widgets.pick_run()
feature_set = widgets.pick_feature_set(run_id) if run_id is not None else None
if run_id is not None and not data.load_channels(data.db_url(), run_id):
    st.info("This run holds imported profiles: it has no images or single cells.")
elif run_id is not None:
    url = data.db_url()
    wells = data.load_well_activity(url, run_id, feature_set)
    selection = st.session_state.get("gallery_selection")
    cells: list = []
    if selection:
        st.subheader(f"Selection: {selection['title']}")
        chosen, cells = selection["wells"], selection["cells"]
        if st.button("Clear the selection", key="gallery_clear"):
            st.session_state.pop("gallery_selection")
            st.rerun()
    else:
        source = st.radio(
            "Show cells of", ["compound", "well", "cluster"], horizontal=True,
            key="gallery_source",
        )  # fmt: skip
        if source == "compound":
            compound = st.selectbox(
                "Compound", sorted(wells["Metadata_Compound"].unique()),
                key="gallery_compound",
            )  # fmt: skip
            of = wells[wells["Metadata_Compound"] == compound]
            doses = sorted(of["Metadata_Concentration"].dropna().unique())
            if doses:
                dose = st.selectbox(
                    "Dose (uM)", ["all", *doses], key="gallery_dose",
                    format_func=lambda d: d if d == "all" else f"{d:g}",
                )  # fmt: skip
                if dose != "all":
                    of = of[of["Metadata_Concentration"] == dose]
            chosen = list(zip(of["Metadata_Plate"], of["Metadata_Well"], strict=True))
        elif source == "well":
            left, right = st.columns(2)
            plate = left.selectbox(
                "Plate", sorted(wells["Metadata_Plate"].unique()), key="gallery_plate"
            )
            well = right.selectbox(
                "Well", wells.loc[wells["Metadata_Plate"] == plate, "Metadata_Well"],
                key="gallery_well",
            )  # fmt: skip
            chosen = [(plate, well)]
        else:
            points = data.load_phenotype_map(url, run_id)
            points = points[points["level"] != "cell"]
            if points.empty:
                st.info("No phenotype map yet: run `phenoscreen map --db URL`.")
                chosen = []
            else:
                level = st.radio(
                    "Clusters of", sorted(points["level"].unique()), horizontal=True,
                    key="gallery_level",
                )  # fmt: skip
                points = points[points["level"] == level]
                cluster = st.selectbox(
                    "Cluster", sorted(points["cluster"].unique()),
                    key="gallery_cluster",
                )  # fmt: skip
                in_cluster = selection_wells(
                    points[points["cluster"] == cluster], wells
                )
                chosen = list(in_cluster.itertuples(index=False, name=None))
    left, middle, right = st.columns(3)
    n_cells = left.slider("Cells", 8, 64, 24, step=8, key="gallery_n")
    seed = int(st.session_state.get("gallery_seed", 0))
    if middle.button("Another sample", key="gallery_resample"):
        st.session_state["gallery_seed"] = seed = seed + 1
    with right:
        channels = widgets.pick_channels(
            data.load_channels(url, run_id), key="gallery_channels"
        )
    st.caption(f"{len(chosen):,} wells selected" if not cells else
               f"{len(cells):,} cells selected")  # fmt: skip
    crops, masks, shown = data.load_gallery(
        url, run_id, tuple(map(tuple, chosen)), tuple(map(tuple, cells)), n_cells, seed
    )
    shown = shown.merge(wells, how="left", on=["Metadata_Plate", "Metadata_Well"])
    captions = [
        f"{widgets.treatment_label(row).rsplit(' (', 1)[0]} · {row['Metadata_Plate']}/"
        f"{row['Metadata_Well']} s{row['Metadata_Site']} #{row['Metadata_ObjectNumber']}"
        for _, row in shown.iterrows()
    ]
    widgets.cell_gallery(crops, masks, captions, channels=channels)
    if len(shown):
        widgets.table_downloads(shown, "gallery_cells", key="gallery_table")
