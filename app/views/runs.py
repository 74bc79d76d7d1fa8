"""Runs view: every run in the store with its progress."""

import streamlit as st

from app import data
from db.session import shown_url

st.header("Runs")
url = data.db_url()
try:
    runs = data.load_runs(url)
except ValueError as exc:
    st.error(f"Cannot open the store {shown_url(url)}: {exc}")
else:
    if runs.empty:
        st.info(f"No run in {shown_url(url)} yet.")
    else:
        st.dataframe(runs, hide_index=True)
        st.subheader("Provenance")
        run_id = st.selectbox(
            "Run", runs["run_id"].tolist()[::-1], key="provenance_run"
        )
        provenance = data.load_run_provenance(url, int(run_id))
        st.caption(
            f"segmenter {provenance['segmenter']}, status {provenance['status']}; "
            "the config below reproduces the run (phenoscreen run --config)."
        )
        aliases = {
            name: option
            for option, name in data.load_feature_sets(url, int(run_id)).items()
            if option != name
        }
        feature_sets = provenance["feature_sets"]
        st.dataframe(
            feature_sets.assign(alias=feature_sets["name"].map(aliases)),
            hide_index=True,
        )
        if aliases:
            st.caption(
                "Feature sets: the dashboard's sidebar and `--feature-set` take a "
                "name or an alias (deep: the latest CNN embedding; combined: the "
                "latest classical + embedding set)."
            )
        st.code(provenance["config_toml"], language="toml")
        st.caption("Software versions of the run")
        st.json(provenance["versions"], expanded=False)
