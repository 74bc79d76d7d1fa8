"""Streamlit dashboard; reads the SQL store only."""
