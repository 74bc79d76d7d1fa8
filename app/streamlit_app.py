"""PhenoScreen dashboard entry: page config and navigation only."""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="PhenoScreen", layout="wide")
views = Path(__file__).parent / "views"
st.navigation(
    [
        st.Page(views / "hits.py", title="Hits", default=True),
        st.Page(views / "plate.py", title="Plates"),
        st.Page(views / "phenotype_map.py", title="Phenotype map"),
        st.Page(views / "compare.py", title="Compare compounds"),
        st.Page(views / "gallery.py", title="Cell gallery"),
        st.Page(views / "runs.py", title="Runs"),
    ]
).run()
