"""Measurements: CellProfiler-style features of every cell."""
