"""Input sources: discover what to read (in a fixed order) and read one item into raw documents.

A source ``uri`` is one of:
- ``stdlib``: the running interpreter's standard-library ``.py`` files (PSF-2.0), the embedded default;
- a local file, folder (walked recursively) or glob;
- ``s3://bucket/prefix``: every object under the prefix, listed with pagination, read through boto3;
- ``hf://<name>``: a Hugging Face dataset (config and split from the source entry), streamed.

Formats by name: ``.jsonl``/``.ndjson``/``.json`` (records with a text field), ``.parquet`` (a text
column), and text or code files; any of them may be gzip-compressed (``.gz``). Reading never raises
for a bad input: it yields a :class:`Bad` with the reason, which ends up in the quarantine.
"""

from __future__ import annotations

import errno
import glob
import gzip
import io
import json
import os
import stat
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.common.errors import UserError
from tasks.common.storage import ObjectInfo, S3Settings, is_s3, list_s3, read_bytes
from tasks.ingest.config import DataConfig, SourceConfig

TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".rst",
        ".tex",
        ".py",
        ".pyi",
        ".pyx",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cu",
        ".java",
        ".kt",
        ".scala",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".js",
        ".jsx",
        ".ts",
        ".tsx",
        ".sh",
        ".bash",
        ".zsh",
        ".ps1",
        ".sql",
        ".r",
        ".jl",
        ".lua",
        ".pl",
        ".swift",
        ".m",
        ".hs",
        ".ml",
        ".ex",
        ".exs",
        ".erl",
        ".clj",
        ".cs",
        ".fs",
        ".vb",
        ".dart",
        ".toml",
        ".yaml",
        ".yml",
        ".ini",
        ".cfg",
        ".html",
        ".htm",
        ".css",
        ".scss",
        ".xml",
        ".csv",
        ".tsv",
    ]
)
RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


class SourceError(UserError):
    """A whole source cannot be reached (missing path or bucket, hub dataset unavailable)."""


@dataclass(frozen=True)
class Item:
    """One unit of input: a file or object to read, or a batch of records already read (Hub)."""

    source: int  # index into DataConfig.sources
    uri: str  # where it came from, as written in the output rows
    location: str = ""  # local path or s3:// URI to read; "" for records
    size: int = 0
    records: tuple[tuple[str, str], ...] = ()  # (uri, text) pairs for Hub datasets
    problem: str = ""  # set when discovery found something that must not be read (quarantined)


@dataclass(frozen=True)
class Raw:
    uri: str
    # bytes still to decode, text already decoded (JSON, Parquet, Hub), or a record's list value
    # (structured reads: conversations)
    data: bytes | str | list
    n_bytes: int


@dataclass(frozen=True)
class Bad:
    uri: str
    reason: str


def _format(name: str) -> str | None:
    name = name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = os.path.splitext(name)[1]
    if suffix in RECORD_SUFFIXES:
        return RECORD_SUFFIXES[suffix]
    return "text" if suffix in TEXT_SUFFIXES else None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _stdlib_items(idx: int) -> list[Item]:
    root = stdlib_root()
    items = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in ("site-packages", "dist-packages") or not path.is_file():
            continue
        items.append(Item(idx, f"stdlib://{rel}", str(path), path.stat().st_size))
    return items


def _glob_root(spec: str) -> Path:
    """The folder a glob can never leave: its longest leading part without wildcards."""
    parts = []
    for part in Path(spec).parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _classify(path: Path, root: Path, follow_symlinks: bool) -> tuple[Path | None, str]:
    """(the regular file to read, "") or (None, why it is not read). Never follows a link out of
    ``root`` unless ``follow_symlinks``; anything but a regular file is refused with a reason."""
    try:
        st = path.lstat()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    target = path
    if stat.S_ISLNK(st.st_mode):
        try:
            target = path.resolve(strict=True)
        except (RuntimeError, OSError) as exc:  # RuntimeError: a loop (Python < 3.13)
            loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", 0) == errno.ELOOP
            return None, "symlink loop" if loop else f"broken symlink -> {os.readlink(path)}"
        if not follow_symlinks and not target.is_relative_to(root):
            return None, (
                f"symlink out of the source root -> {target} (not followed; set the source's "
                "follow_symlinks: true to allow links out)"
            )
        st = target.stat()
        if stat.S_ISDIR(st.st_mode):
            return None, "symlink to a folder (not followed)"
    if stat.S_ISREG(st.st_mode):
        return target, ""
    if stat.S_ISDIR(st.st_mode):
        return None, "a folder with a file's name matched the glob (sources read files)"
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a special file"
    )
    return None, f"not a regular file ({kind})"


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry under ``folder`` except hidden ones, without following links into folders."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir(follow_symlinks=False):
            yield from _walk(Path(e.path))
        else:
            yield Path(e.path)


def _local_items(idx: int, src: SourceConfig) -> list[Item]:
    spec = src.uri
    if any(ch in spec for ch in "*?["):
        root = _glob_root(spec)
        paths = []
        for p in glob.glob(spec, recursive=True):
            p = Path(p)
            # `**` matches every folder on the way; a folder named like a file is reported.
            if p.is_dir() and not p.is_symlink() and _format(p.name) is None:
                continue
            paths.append(p)
        if not paths:
            raise SourceError(f"source {spec!r}: the glob matches no file")
    else:
        p = Path(spec)
        if not p.exists() and not p.is_symlink():
            raise SourceError(f"source {spec!r}: no such file or folder (check data.sources)")
        root = p if p.is_dir() and not p.is_symlink() else p.parent
        paths = list(_walk(p)) if p.is_dir() and not p.is_symlink() else [p]
    root = root.resolve()
    items = []
    for path in sorted(set(paths), key=str):
        target, problem = _classify(path, root, src.follow_symlinks)
        size = target.stat().st_size if target is not None else 0
        items.append(Item(idx, str(path), str(target or path), size, problem=problem))
    return items


def _s3_items(idx: int, uri: str, s3: S3Settings | None) -> list[Item]:
    objects: list[ObjectInfo] = list(list_s3(uri, s3))
    if not objects:
        raise SourceError(f"source {uri!r}: no objects under this prefix")
    return [Item(idx, o.uri, o.uri, o.size) for o in objects]


def _hf_items(idx: int, src: SourceConfig, batch: int, structured: bool = False) -> list[Item]:
    """Stream a Hub (or local) dataset; fail at once when it cannot be loaded offline."""
    import datasets

    name = src.uri[len("hf://") :]
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, src.hf_config, split=src.split, streaming=True)
    except Exception as exc:  # the hub raises many types; the message is what matters
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "")
        hint = (
            " The Hub is offline (HF_HUB_OFFLINE=1) and the dataset is not in the local cache: "
            "run with HF_HUB_OFFLINE=0 where the network is reachable, or point the uri at a local copy."
            if offline
            else " Check the dataset name, config and split, and the network."
        )
        raise SourceError(
            f"source {src.uri!r}: cannot load the dataset ({type(exc).__name__}: {exc}).{hint}"
        ) from exc
    items, records, size = [], [], 0
    base = f"{src.uri}/{src.hf_config or 'default'}/{src.split}"
    for i, row in enumerate(ds):
        if src.max_docs is not None and i >= src.max_docs:
            break
        value = row.get(src.text_field)
        ok = isinstance(value, list) if structured else isinstance(value, str)
        records.append((f"{base}#{i}", value if ok else None))
        size += len(value) if isinstance(value, str) else 0  # characters: near enough for shards
        if len(records) == batch:
            items.append(Item(idx, base, size=size, records=tuple(records)))
            records, size = [], 0
    if records:
        items.append(Item(idx, base, size=size, records=tuple(records)))
    return items


def source_items(
    idx: int, src: SourceConfig, s3: S3Settings | None, batch: int = 200, structured: bool = False
) -> list[Item]:
    """The items of one source, in path order (``structured``: Hub records keep list values;
    ``batch``: Hub records per item)."""
    if src.uri == "stdlib":
        found = _stdlib_items(idx)
    elif is_s3(src.uri):
        found = _s3_items(idx, src.uri, s3)
    elif src.uri.startswith("hf://"):
        return _hf_items(idx, src, batch, structured)
    else:
        found = _local_items(idx, src)
    return found[: src.max_docs] if src.max_docs is not None else found


def discover(cfg: DataConfig, s3: S3Settings | None = None) -> list[Item]:
    """Every item of every source, in a fixed order (source order, then path order)."""
    items: list[Item] = []
    for idx, src in enumerate(cfg.sources):
        items.extend(source_items(idx, src, s3))
    return items


def _value(uri: str, value: object, field: str, structured: bool) -> Raw | Bad:
    """A record's field as a document: a string, or (``structured``) a list such as a
    conversation's messages."""
    if structured:
        if not isinstance(value, list):
            return Bad(uri, f"wrong schema: no list field {field!r} (set the source's text_field)")
        return Raw(uri, value, len(json.dumps(value, default=str)))
    if not isinstance(value, str):
        return Bad(uri, f"wrong schema: no string field {field!r} (set the source's text_field)")
    return Raw(uri, value, len(value.encode("utf-8", "surrogatepass")))


def _records_from_json(
    item: Item, blob: bytes, fmt: str, field: str, structured: bool = False
) -> Iterator[Raw | Bad]:
    def one(uri: str, rec: object) -> Raw | Bad:
        if not isinstance(rec, dict):
            return Bad(uri, f"wrong schema: record is a {type(rec).__name__}, not an object")
        return _value(uri, rec.get(field), field, structured)

    if fmt == "jsonl":
        for n, line in enumerate(blob.split(b"\n"), start=1):
            if not line.strip():
                continue
            uri = f"{item.uri}#L{n}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield Bad(uri, f"invalid JSON line (truncated or corrupt): {exc}")
                continue
            yield one(uri, rec)
        return
    try:
        doc = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        yield Bad(item.uri, f"invalid JSON (truncated or corrupt): {exc}")
        return
    recs = doc if isinstance(doc, list) else [doc]
    for i, rec in enumerate(recs):
        yield one(f"{item.uri}#{i}" if isinstance(doc, list) else item.uri, rec)


def _records_from_parquet(
    item: Item, blob: bytes, field: str, structured: bool = False
) -> Iterator[Raw | Bad]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(blob))
    except Exception as exc:
        yield Bad(item.uri, f"unreadable parquet: {exc}")
        return
    if field not in table.column_names:
        yield Bad(
            item.uri,
            f"wrong schema: no column {field!r} (columns: {', '.join(table.column_names)})",
        )
        return
    for i, value in enumerate(table.column(field).to_pylist()):
        yield _value(f"{item.uri}#{i}", value, field, structured)


def gunzip_bounded(blob: bytes, max_bytes: int) -> bytes | None:
    """Decompress gzip (every member) in a stream, stopping after ``max_bytes`` + 1 bytes: a bomb
    costs at most that much memory. None when the data is larger than ``max_bytes``."""
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as gz:
        out = gz.read(max_bytes + 1)
    return None if len(out) > max_bytes else out


def read_item(
    item: Item,
    src: SourceConfig,
    cfg: DataConfig,
    s3: S3Settings | None = None,
    structured: bool = False,
) -> Iterator[Raw | Bad]:
    """The raw documents of one item; every problem becomes a :class:`Bad`, nothing raises.
    ``structured``: records' fields are lists (conversations), not text."""
    if item.records:
        for uri, value in item.records:
            yield _value(uri, value, src.text_field, structured)
        return
    if item.problem:
        yield Bad(item.uri, item.problem)
        return
    fmt = _format(item.location)
    if fmt is None and not Path(item.location).suffix and src.uri == item.uri:
        fmt = "text"  # a single file named explicitly, without extension
    if fmt is None:
        yield Bad(item.uri, "unsupported file type (not text, code, JSON, JSONL or Parquet)")
        return
    if item.size > cfg.max_file_bytes:
        yield Bad(
            item.uri, f"oversized: {item.size} bytes > data.max_file_bytes={cfg.max_file_bytes}"
        )
        return
    try:
        blob = read_bytes(item.location, s3, cfg.max_file_bytes)
    except Exception as exc:
        yield Bad(item.uri, f"unreadable: {type(exc).__name__}: {exc}")
        return
    if len(blob) > cfg.max_file_bytes:  # it grew after it was listed
        yield Bad(item.uri, f"oversized: more than data.max_file_bytes={cfg.max_file_bytes} bytes")
        return
    if item.location.lower().endswith(".gz"):
        try:
            blob = gunzip_bounded(blob, cfg.max_file_bytes)
        except (OSError, EOFError, zlib.error) as exc:
            yield Bad(item.uri, f"corrupt or truncated gzip: {exc}")
            return
        if blob is None:
            yield Bad(
                item.uri,
                f"oversized: more than data.max_file_bytes={cfg.max_file_bytes} bytes "
                "uncompressed (decompression stopped there)",
            )
            return
    if not blob:
        yield Bad(item.uri, "empty")
        return
    if fmt == "text" and not structured:
        yield Raw(item.uri, blob, len(blob))
    elif fmt == "text":
        yield Bad(item.uri, "not a record file: conversations come in JSONL, JSON or Parquet")
    elif fmt == "parquet":
        yield from _records_from_parquet(item, blob, src.text_field, structured)
    else:
        yield from _records_from_json(item, blob, fmt, src.text_field, structured)
