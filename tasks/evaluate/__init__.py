"""The evaluate stage: GPT-4's benchmarks offline on the base and chat models, the report and
the release gate (``stage.py`` runs them)."""
