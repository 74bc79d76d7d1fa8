"""Serve the dashboard with its modules imported before the first visitor arrives.

``python -m app.serve run app/streamlit_app.py [streamlit options]`` is
``streamlit run`` after importing the dashboard's data layer (pandas, SciPy,
scikit-image, Dask, SQLAlchemy: ~3 s), which the first page view would otherwise
wait for.
"""

import sys

from streamlit.web.cli import main

import app.data  # noqa: F401 - imported for its side effect: warm module cache
import app.widgets  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
