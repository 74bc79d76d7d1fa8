"""Column conventions of profile tables (pycytominer's): ``Metadata_*`` and features.

Below every other profiling module, which all read tables this way.
"""

from __future__ import annotations

import pandas as pd


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """Return the ``Metadata_*`` columns of a profile table, in order."""
    return [c for c in table.columns if c.startswith("Metadata_")]


def feature_columns(table: pd.DataFrame) -> list[str]:
    """Return the feature columns (all but ``Metadata_*``), in order."""
    return [c for c in table.columns if not c.startswith("Metadata_")]
