"""Fixtures of the model tests: one small demo run shared by embedding and training."""

import pytest

from pipeline.config import config_from_dict
from pipeline.demo import CHANNELS
from pipeline.run import run_experiment


@pytest.fixture(scope="session")
def demo_run(demo_plate, tmp_path_factory):
    """The small demo plate analysed into SQLite: (url, run summary)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('embed')}/t.db"
    config = config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    summary = run_experiment(
        demo_plate["images"], demo_plate["platemap"], config=config, db_url=url
    )
    return url, summary
