"""The ingest stage: sources -> cleaned, filtered, deduplicated, decontaminated Parquet
(``stage.py``), with its steps in one module each."""
