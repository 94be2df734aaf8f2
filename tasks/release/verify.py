"""Checking a release anyone received: a bundle folder, a tarball or an ``s3://`` tarball, byte for
byte against its ``SHA256SUMS``, unsafe archives refused before anything is extracted, and the
model loaded."""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
import zlib
from pathlib import Path

from tasks.common.storage import S3Settings, download_file, is_s3, sha256_file
from tasks.release.errors import ReleaseError


class _Capped(io.RawIOBase):
    """A read-only stream that fails once more than ``cap`` bytes came out of ``raw``."""

    def __init__(self, raw, cap: int, what: str):
        self.raw, self.cap, self.what, self.seen = raw, cap, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(min(len(buf), 1 << 20))
        self.seen += len(data)
        if self.seen > self.cap:
            raise ReleaseError(
                f"unsafe archive: {self.what} unpacks to more than {self.cap:,} bytes "
                "(a decompression bomb?); refused before extracting"
            )
        buf[: len(data)] = data
        return len(data)


def unpacked_cap(tarball: Path) -> int:
    """What a release may unpack to: weights hardly compress, so 4x the archive (+64 MiB for
    the small files) is generous for a real release and stops a bomb early."""
    return 4 * tarball.stat().st_size + (64 << 20)


def safe_extract(tarball: Path, dest: Path, cap: int | None = None) -> Path:
    """Extract only plain files and folders under ``dest``; refuse the whole archive otherwise.

    A first pass streams the archive through a byte cap, checking every header (paths, links,
    special and sparse files, declared sizes) before anything is written; only then is it
    extracted, so a bomb or a huge sparse member costs neither disk nor memory."""
    cap = cap or unpacked_cap(tarball)
    names, total = [], 0
    try:
        with (
            gzip.open(tarball, "rb") as gz,
            tarfile.open(fileobj=_Capped(gz, cap, tarball.name), mode="r|") as tar,
        ):
            for m in tar:
                name = m.name
                if name.startswith("/") or Path(name).is_absolute():
                    raise ReleaseError(f"unsafe archive: absolute path {name!r}")
                if ".." in Path(name).parts:
                    raise ReleaseError(f"unsafe archive: path escapes the target {name!r}")
                if m.issym() or m.islnk():
                    raise ReleaseError(f"unsafe archive: link {name!r} -> {m.linkname!r}")
                if m.issparse() or not (m.isfile() or m.isdir()):
                    raise ReleaseError(
                        f"unsafe archive: {name!r} is a sparse, device, fifo or other special file"
                    )
                total += m.size
                if total > cap:
                    raise ReleaseError(
                        f"unsafe archive: members declare more than {cap:,} bytes "
                        f"(at {name!r}); refused before extracting"
                    )
                names.append(name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ReleaseError(f"{tarball}: not a readable .tar.gz ({exc})") from exc
    tops = {Path(n).parts[0] for n in names}
    if len(tops) != 1:
        raise ReleaseError(f"a release archive holds one top-level folder, not {sorted(tops)}")
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / tops.pop()


def verify_dir(bundle: Path, load: bool = True) -> dict:
    sums_file = bundle / "SHA256SUMS"
    if not sums_file.exists():
        raise ReleaseError(f"{bundle}: no SHA256SUMS file")
    listed = {}
    for line in sums_file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        "SHA256SUMS"
    }
    for name in sorted(set(listed) - present):
        raise ReleaseError(f"{bundle}: {name} is listed in SHA256SUMS but missing")
    for name in sorted(present - set(listed)):
        raise ReleaseError(
            f"{bundle}: {name} is not listed in SHA256SUMS (added after the release)"
        )
    for name, digest in sorted(listed.items()):
        if sha256_file(bundle / name) != digest:
            raise ReleaseError(f"{bundle}: checksum mismatch for {name}")
    out = {"bundle": str(bundle), "files": len(listed)}
    if load:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(bundle, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            bundle, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        with torch.no_grad():
            logits = model(**tok("def f(x):", return_tensors="pt")).logits
        out["loaded"] = bool(torch.isfinite(logits).all())
    return out


def verify(target: str, load: bool = True, s3: S3Settings | None = None) -> dict:
    if is_s3(target):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(target).name
            download_file(target, local, s3)
            return verify(str(local), load)
    path = Path(target)
    if path.is_dir():
        return verify_dir(path, load)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory() as tmp:
            return verify_dir(safe_extract(path, Path(tmp)), load)
    raise ReleaseError(f"{target}: not a release folder, .tar.gz or s3:// URI")
