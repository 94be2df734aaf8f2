"""The stages' logic as plain functions, a package per stage in the order of the DAG:

- ``ingest/``: sources -> ``data/clean`` (sources, normalize, filters, scrub, dedup, decontam, card)
- ``tokenize/``: ``data/clean`` -> ``data/tokenizer`` + ``data/tokens`` (tokenizer, mixture)
- ``train/``: the run's settings and the torchrun launcher (the trainer itself is ``model/``)
- ``finetune/``: conversations -> ``data/sft`` -> the chat model, through train's launcher
- ``evaluate/``: GPT-4's benchmarks on both models -> ``reports/eval`` and the release gate
- ``release/``: the bundles, their verification, the S3 upload and the MLflow registry

``common/`` holds what more than one stage uses: the params machinery, storage (local and
``s3://``), MLflow tracking, task runners, the environment, human-readable figures, secret
redaction, DVC helpers, the chat format, the benchmark list and the records stages hand each
other. ``params.py`` puts every stage's section of ``params.yaml`` together.

Each stage package has ``config.py`` (its params section, every key declared once) and the
modules its flow (``flows/<stage>.py``) calls. A module imports only ``common``, ``model`` and
the packages of stages upstream of its own (``tests/test_house.py`` checks it)."""
