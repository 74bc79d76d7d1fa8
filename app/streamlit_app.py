"""PhenoScreen dashboard entry: page config, navigation and cache warm-up."""

from pathlib import Path

import streamlit as st

from app import data

st.set_page_config(page_title="PhenoScreen", layout="wide")
views = Path(__file__).parent / "views"
page = st.navigation(
    [
        st.Page(views / "hits.py", title="Hits", default=True),
        st.Page(views / "plate.py", title="Plates"),
        st.Page(views / "campaign.py", title="Campaign"),
        st.Page(views / "phenotype_map.py", title="Phenotype map"),
        st.Page(views / "compare.py", title="Compare compounds"),
        st.Page(views / "gallery.py", title="Cell gallery"),
        st.Page(views / "runs.py", title="Runs"),
    ]
)
try:
    page.run()
    # after the page went out: load what the other views show first for this run
    # and feature set (the one the page picked, `widgets.pick_feature_set`)
    run_id = st.session_state.get("run_id")
    feature_set = st.session_state.get("feature_set_name")
    if run_id is not None and st.session_state.get("warmed") != (run_id, feature_set):
        data.warm_up(data.db_url(), run_id, feature_set)
        st.session_state["warmed"] = (run_id, feature_set)
except Exception as exc:  # a server down or restarting: a message, not a traceback
    message = data.unreachable_store_message(exc, data.db_url())
    if message is None:
        raise
    st.error(message)
