"""Orchestration: run directory, stages, configuration and presets, progress reporting, the run lock, the demo."""
