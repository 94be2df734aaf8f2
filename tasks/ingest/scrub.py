"""PII and secret scrubbing: e-mail and public IP addresses, credentials that appear in code.

Each match is replaced by a placeholder and counted by kind. The secret patterns are the
high-precision ones (fixed prefixes and shapes) so ordinary code is not mangled; they live in
``tasks.common.redaction``, which masks the same credentials in logs, params and written files.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from tasks.common.redaction import replace_patterns
from tasks.ingest.config import DataConfig

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# Candidates only; ipaddress validates (octets <= 255) and keeps private/loopback ones.
IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
# Every IPv4 candidate contains this; it starts with a literal, so the regex engine finds it by fast
# substring search, and most files (which have none) skip the full pattern, tried at every digit.
_IPV4_GATE = re.compile(r"\.\d{1,3}\.\d{1,3}\.")


def _public_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text)
    # Loopback, private, link-local and documentation-style addresses identify nobody.
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_unspecified
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_link_local
    )


# Every address has this around its ``@``; starting with the literal, it is found by fast substring
# search. In code most ``@`` are decorators (``@property``, or ``@functools.wraps`` after spaces),
# which it rejects, so most files skip the line-by-line pass.
_EMAIL_GATE = re.compile(
    r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)


def _emails(text: str) -> tuple[str, int]:
    """E-mail addresses replaced, scanning only the lines that hold a candidate: the pattern starts
    with a character class, so over a whole file it would be tried at every position."""
    if "@" not in text or not _EMAIL_GATE.search(text):
        return text, 0
    lines = text.split("\n")
    total = 0
    for i, line in enumerate(lines):
        if "@" in line and _EMAIL_GATE.search(line):
            lines[i], n = EMAIL.subn("<EMAIL>", line)
            total += n
    return ("\n".join(lines), total) if total else (text, 0)


def scrub(text: str, cfg: DataConfig) -> tuple[str, Counter]:
    counts: Counter = Counter()
    if cfg.scrub_secrets:
        text, found = replace_patterns(text)
        counts.update(found)
    if cfg.scrub_emails:
        text, n = _emails(text)
        if n:
            counts["email"] += n
    if cfg.scrub_ips:

        def _ip(m: re.Match) -> str:
            s = m.group(0)
            start, end = m.span()
            line = m.string
            # Not part of a longer dotted number or identifier (versions like 1.2.3.4.5).
            if (start and (line[start - 1].isalnum() or line[start - 1] in "._")) or (
                end < len(line) and (line[end].isalnum() or line[end] in "._")
            ):
                return s
            try:
                public = _public_ip(s)
            except ValueError:  # an octet above 255
                return s
            if public:
                counts["ip_address"] += 1
                return "<IP_ADDRESS>"
            return s

        if _IPV4_GATE.search(text):
            text = IPV4.sub(_ip, text)
    return text, counts
