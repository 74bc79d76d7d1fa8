"""Cells: nuclei and cell segmentation, its accuracy, and single-cell crops."""
