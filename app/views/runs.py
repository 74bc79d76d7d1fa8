"""Runs view: every run in the store with its progress."""

import streamlit as st

from app import data

st.header("Runs")
url = data.db_url()
try:
    runs = data.load_runs(url)
except ValueError as exc:
    st.error(f"Cannot open the store {url}: {exc}")
else:
    if runs.empty:
        st.info(f"No run in {url} yet.")
    else:
        st.dataframe(runs, hide_index=True)
