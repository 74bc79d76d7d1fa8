"""PhenoScreen pipeline: plate images to single-cell features and profiles."""

__version__ = "0.1.0"
