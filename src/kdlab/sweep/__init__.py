"""Experiment grids: expansion, deterministic run naming, executors, and the demo."""
