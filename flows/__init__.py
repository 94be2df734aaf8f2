"""Prefect flows, one per pipeline stage, plus ``pipeline.py`` that runs them all.

``python -m flows <stage>`` is the command line of each (``python -m flows --help`` lists them);
a flow module does nothing when imported but define its flow."""
