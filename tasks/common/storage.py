"""One storage layer for local paths and ``s3://bucket/key`` URIs.

S3 goes through boto3 with standard-mode retries and an endpoint from config or
``AWS_ENDPOINT_URL``, so real S3, MinIO and moto's server all work. Local writes are atomic: data
goes to a temporary sibling that is renamed into place only once complete, so a crash never leaves a
file or folder that a later stage would take for a whole one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasks.common.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StorageError(UserError):
    """A location cannot be reached or used; the message says which and what to do."""


class DiskFullError(StorageError):
    """The disk holding an output filled up; the message names the path and the fix."""


def _errnos(exc: BaseException) -> set[int]:
    """Every errno in the exception's chain, and in the per-rank failures that torch's
    distributed checkpoint collects (CheckpointException.failures)."""
    seen, out, todo = set(), set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            out.add(e.errno)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # values: an exception, or (exception, stack)
            for f in failures.values():
                f = f[0] if isinstance(f, tuple) and f else f
                if isinstance(f, BaseException):
                    todo.append(f)
        todo += [e.__cause__, e.__context__]
    return out


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain, or (for libraries that lose the errno, as torch's
    zip writer does: "unexpected pos ...") a failure while the disk holding ``path`` is full."""
    if _errnos(exc) & {errno.ENOSPC, errno.EDQUOT}:
        return True
    try:
        return shutil.disk_usage(_existing(path)).free < (1 << 20)
    except OSError:
        return False


def _existing(path: str | Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def disk_guard(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn a write failure on a full disk into :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except (DiskFullError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if not is_disk_full(exc, path):
            raise
        usage = shutil.disk_usage(_existing(path))
        raise DiskFullError(
            f"disk full: no space left on the device holding {path} "
            f"({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB) while writing "
            f"{what or 'it'}; free some space or point this output at a larger disk, then rerun "
            f"(completed outputs and checkpoints are kept; the partial one was removed). "
            f"Underlying error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        ) from exc


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_prefix(name: str) -> str:
    """Temporary siblings carry host and pid, so a later run can remove those of dead runs."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove ``.<name>.*.tmp`` siblings left by killed runs on this host (a live run's stay)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        owner = p.name[len(path.name) + 2 :].split(".", 1)[0]
        h, _, pid = owner.rpartition("-")
        if h and h != host:
            continue  # another host's run, on a shared filesystem
        if h and pid.isdigit() and _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name (expected s3://bucket/prefix)")
    return bucket, key


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: ``infra``'s endpoint, region, retry budget and timeouts. Picklable, so it
    travels with the tasks to worker processes and Dask workers."""

    endpoint_url: str | None
    region: str
    max_attempts: int
    connect_timeout_s: float
    read_timeout_s: float

    @classmethod
    def from_infra(cls, infra=None) -> S3Settings:
        """From ``infra`` (its defaults when None); ``AWS_ENDPOINT_URL`` and ``AWS_DEFAULT_REGION``
        win where set, as the README documents."""
        from tasks.common.infra import InfraConfig

        infra = infra or InfraConfig()
        return cls(
            os.environ.get("AWS_ENDPOINT_URL") or infra.s3_endpoint_url or None,
            os.environ.get("AWS_DEFAULT_REGION") or infra.s3_region,
            infra.s3_max_attempts,
            infra.s3_connect_timeout_s,
            infra.s3_read_timeout_s,
        )

    @property
    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


@lru_cache(maxsize=8)
def _client(s3: S3Settings):
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"mode": "standard", "total_max_attempts": s3.max_attempts},  # first one included
        connect_timeout=s3.connect_timeout_s,
        read_timeout=s3.read_timeout_s,
        region_name=s3.region,
    )
    return boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url, config=cfg)


def s3_client(s3: S3Settings | None = None):
    """A boto3 S3 client configured from ``infra`` (see :class:`S3Settings`)."""
    return _client(s3 or S3Settings.from_infra())


def explain_s3_error(exc: Exception, uri: str, s3: S3Settings | None = None) -> StorageError:
    """Turn a botocore exception into a message that names the location and the fix."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    s3 = s3 or S3Settings.from_infra()
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        what = "did not answer" if isinstance(exc, ReadTimeoutError) else "could not be connected"
        return StorageError(
            f"{uri}: the S3 endpoint {s3.where} {what} within "
            f"{s3.read_timeout_s if isinstance(exc, ReadTimeoutError) else s3.connect_timeout_s:g} s "
            f"({s3.max_attempts} attempts); check infra.s3_endpoint_url / AWS_ENDPOINT_URL and "
            "that the server is up (timeouts: infra.s3_connect_timeout_s, infra.s3_read_timeout_s)"
        )
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {s3.where} ({exc}); check infra.s3_endpoint_url or AWS_ENDPOINT_URL"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return StorageError(f"{uri}: bucket or key does not exist ({code}); check the URI")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{uri}: access denied ({code}); check the credentials and the bucket policy"
            )
        if code in ("SlowDown", "503", "500", "InternalError", "ServiceUnavailable"):
            return StorageError(
                f"{uri}: S3 at {s3.where} kept failing ({code}) after {s3.max_attempts} attempts; "
                "retry later or raise infra.s3_max_attempts"
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


def list_s3(uri: str, s3: S3Settings | None = None, page_size: int = 1000) -> Iterator[ObjectInfo]:
    """Every object under an ``s3://bucket/prefix``, in key order, through paginated listing."""
    bucket, prefix = split_s3(uri)
    client = s3_client(s3)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
    except Exception as exc:  # botocore raises many types; all are explained the same way
        raise explain_s3_error(exc, uri, s3) from exc


def read_bytes(uri: str, s3: S3Settings | None = None, max_bytes: int | None = None) -> bytes:
    """An object's or a local file's bytes, at most ``max_bytes`` + 1 of them when given (so a
    caller sees that it is larger, whatever it grew to since it was listed). A local path must
    still be a regular file when opened: no link is followed at the open, no FIFO or device read."""
    limit = -1 if max_bytes is None else max_bytes + 1
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read(limit)
        except Exception as exc:
            raise explain_s3_error(exc, uri, s3) from exc
    fd = os.open(uri, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{uri} is not a regular file")
        return f.read(limit)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with disk_guard(path), os.fdopen(fd, "wb") as f:
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


def temp_sibling(path: Path) -> Path:
    """A new empty folder beside ``path``, named so that a later run can tell it was this run's
    (host and pid); the temporary folders of dead runs are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))


@contextlib.contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for intermediate files, removed when the block ends,
    whether it succeeded or failed; a killed run's is removed by the next run (as atomic_dir's)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with disk_guard(path):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on success it replaces ``path`` whole.

    On any error the temporary folder is removed and the previous ``path`` (if any) is untouched;
    a full disk is reported as :class:`DiskFullError` naming ``path``. Temporary folders of killed
    runs are removed first.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with disk_guard(path):
            yield tmp
        # mkdtemp creates 0700, and some writers 0600 files (safetensors does): a published
        # folder gets a normal folder's and files' modes (0755/0644 under the usual umask).
        mask = _umask()
        for sub in tmp.rglob("*"):
            if not sub.is_symlink():
                os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
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


def upload_file(local: str | Path, uri: str, s3: S3Settings | None = None) -> None:
    """Upload with boto3's managed transfer (multipart for large files, with retries; a failed
    multipart upload is aborted, so no partial object appears under the key)."""
    bucket, key = split_s3(uri)
    try:
        s3_client(s3).upload_file(str(local), bucket, key)
    except Exception as exc:
        raise explain_s3_error(exc, uri, s3) from exc


def download_file(uri: str, local: str | Path, s3: S3Settings | None = None) -> None:
    bucket, key = split_s3(uri)
    client = s3_client(s3)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, local)
    except Exception as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise explain_s3_error(exc, uri, s3) from exc
