"""Decoding and text normalisation.

Decoding policy, in order: UTF-8 (a BOM is stripped); the encoding a file declares for itself (a
PEP 263 ``coding:`` cookie in its first two lines, as several stdlib files have); then the
configured fallbacks. Input that none of these decode, or that looks binary (a NUL byte in its
first 8 KiB), is quarantined with that reason, never guessed at.
"""

from __future__ import annotations

import codecs
import re
import unicodedata

_COOKIE = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)", re.MULTILINE)
# C0 controls except \t and \n, DEL, and C1 controls. \r is handled by newline normalisation.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x80-\x9f]")
_ASCII_CONTROL = bytes(c for c in range(128) if _CONTROL.match(chr(c)))


class DecodeError(ValueError):
    """The bytes cannot be turned into text under the policy; ``reason`` goes to the quarantine."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def declared_encoding(data: bytes) -> str | None:
    head = b"\n".join(data.split(b"\n", 2)[:2])
    m = _COOKIE.search(head)
    if not m:
        return None
    name = m.group(1).decode("ascii", "replace")
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode(data: bytes, fallbacks: tuple[str, ...] | list[str] = ()) -> tuple[str, str]:
    """Return ``(text, encoding_used)`` or raise :class:`DecodeError`."""
    if not data:
        raise DecodeError("empty")
    if b"\x00" in data[:8192]:
        raise DecodeError("binary: NUL byte in the first 8 KiB")
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        first_error = exc
    candidates = [declared_encoding(data), *fallbacks]
    for enc in candidates:
        if not enc or enc == "utf-8":
            continue
        try:
            return data.decode(enc), enc
        except (UnicodeDecodeError, LookupError):
            continue
    raise DecodeError(
        f"undecodable: not UTF-8 ({first_error.reason} at byte {first_error.start}) and no declared "
        "or fallback encoding decodes it (add one to data.fallback_encodings to accept such files)"
    )


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode normal form, ``\\n`` newlines, no NUL or control characters (tabs kept)."""
    if form != "none" and not text.isascii():
        text = unicodedata.normalize(form, text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # bytes.translate finds them in C, far faster than the regex
        data = text.encode("ascii")
        if len(data.translate(None, _ASCII_CONTROL)) == len(data):
            return text
    return _CONTROL.sub("", text)
