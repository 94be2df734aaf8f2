"""Ingest from a real S3-compatible server (moto's, on 127.0.0.1) through boto3."""

import json

import boto3
import pytest

from tasks.common.storage import StorageError, download_file, list_s3, read_bytes, upload_file
from tasks.ingest.config import DataConfig, SourceConfig
from tasks.ingest.stage import run_ingest
from tests.conftest import make_corpus

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    name = f"corpus-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=name)
    return name


def test_ingest_from_s3_matches_local(bucket, tmp_path):
    root = tmp_path / "corpus"
    expect = make_corpus(root)
    for f in sorted(root.iterdir()):
        upload_file(f, f"s3://{bucket}/raw/{f.name}")
    cfg = DataConfig(
        sources=[SourceConfig(uri=f"s3://{bucket}/raw/", name="s3", license="CC0-1.0")],
        metrics_file=str(tmp_path / "m.json"),
        min_chars=50,
    )
    summary = run_ingest(cfg, out_dir=str(tmp_path / "out"), log=lambda m: None)
    t = summary.metrics
    assert t["docs_out"] == expect["docs_out"] and t["quarantined"] == expect["quarantined"]
    assert t["exact_duplicates"] == expect["exact"] and t["near_duplicates"] == expect["near"]
    q = (tmp_path / "out" / "quarantine.jsonl").read_text()
    assert f"s3://{bucket}/raw/empty.txt" in q
    assert json.loads((tmp_path / "out" / "card.json").read_text())["sources"][0]["uri"].startswith(
        "s3://"
    )


def test_paginated_listing_sees_every_object(bucket):
    s3 = boto3.client("s3")
    for i in range(7):
        s3.put_object(Bucket=bucket, Key=f"p/{i:03d}.txt", Body=b"x")
    found = list(list_s3(f"s3://{bucket}/p/", page_size=2))
    assert [o.uri for o in found] == [f"s3://{bucket}/p/{i:03d}.txt" for i in range(7)]


def test_round_trip_and_missing_bucket(bucket, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello" * 1000)
    upload_file(src, f"s3://{bucket}/x/f.bin")
    download_file(f"s3://{bucket}/x/f.bin", tmp_path / "g.bin")
    assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
    with pytest.raises(StorageError, match="does not exist"):
        list(list_s3("s3://no-such-bucket-llmforge/x/"))
    with pytest.raises(StorageError, match="does not exist"):
        read_bytes(f"s3://{bucket}/missing-key")
