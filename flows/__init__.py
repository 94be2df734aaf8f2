"""Prefect flows, one per pipeline stage, plus ``pipeline.py`` that runs them all."""

from tasks.env import apply_offline_defaults

apply_offline_defaults()
