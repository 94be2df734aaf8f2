"""One storage layer for local paths and ``s3://bucket/key`` URIs.

S3 goes through boto3 with standard-mode retries and an endpoint from config or
``AWS_ENDPOINT_URL``, so real S3, MinIO and moto's server all work. Local writes are atomic: data
goes to a temporary sibling that is renamed into place only once complete, so a crash never leaves a
file or folder that a later stage would take for a whole one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StorageError(RuntimeError):
    """A location cannot be reached or used; the message says which and what to do."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name (expected s3://bucket/prefix)")
    return bucket, key


@lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str, max_attempts: int):
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=60,
        region_name=region,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)


def s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5):
    """A boto3 S3 client. ``endpoint_url`` falls back to ``AWS_ENDPOINT_URL`` (boto3 reads it too)."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _client(endpoint, region, max_attempts)


def explain_s3_error(exc: Exception, uri: str) -> StorageError:
    """Turn a botocore exception into a message that names the location and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint ({exc}); check infra.s3_endpoint_url or AWS_ENDPOINT_URL"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return StorageError(f"{uri}: bucket or key does not exist ({code}); check the URI")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{uri}: access denied ({code}); check the credentials and the bucket policy"
            )
        return StorageError(f"{uri}: S3 error {code}: {exc}")
    if "NoSuchBucket" in str(exc):  # boto3's managed transfers wrap the ClientError
        return StorageError(f"{uri}: bucket does not exist (NoSuchBucket); check the URI")
    if "AccessDenied" in str(exc) or "InvalidAccessKeyId" in str(exc):
        return StorageError(f"{uri}: access denied; check the credentials and the bucket policy")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


def list_s3(uri: str, client=None, page_size: int = 1000) -> Iterator[ObjectInfo]:
    """Every object under an ``s3://bucket/prefix``, in key order, through paginated listing."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
    except Exception as exc:  # botocore raises many types; all are explained the same way
        raise explain_s3_error(exc, uri) from exc


def read_bytes(uri: str, client=None) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = client or s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise explain_s3_error(exc, uri) from exc
    return Path(uri).read_bytes()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on success it replaces ``path`` whole.

    On any error the temporary folder is removed and the previous ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def upload_file(local: str | Path, uri: str, client=None) -> None:
    """Upload with boto3's managed transfer (multipart for large files, with retries)."""
    bucket, key = split_s3(uri)
    client = client or s3_client()
    try:
        client.upload_file(str(local), bucket, key)
    except Exception as exc:
        raise explain_s3_error(exc, uri) from exc


def download_file(uri: str, local: str | Path, client=None) -> None:
    bucket, key = split_s3(uri)
    client = client or s3_client()
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, local)
    except Exception as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise explain_s3_error(exc, uri) from exc
