"""The release stage: verifiable bundles of the base and chat models, S3 upload, MLflow registry."""
