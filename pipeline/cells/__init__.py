"""Cells: segmentation, its accuracy, single-cell crops, a run's cells read back."""
