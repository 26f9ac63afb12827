"""Diagnostics, plots and the run report, computed from a run's outputs."""
