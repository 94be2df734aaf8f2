"""PII and secret scrubbing: e-mail and public IP addresses, credentials that appear in code.

Each match is replaced by a placeholder and counted by kind. The secret patterns are the
high-precision ones (fixed prefixes and shapes) so ordinary code is not mangled.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from tasks.config import DataConfig

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# Candidates only; ipaddress validates (octets <= 255) and keeps private/loopback ones.
IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")

# (kind, literal that every match contains, pattern, replacement). The literal is checked first
# with ``in`` (fast), so a pattern only scans the lines that can match it.
SECRETS: tuple[tuple[str, str, re.Pattern[str], str], ...] = (
    (
        "private_key",
        "PRIVATE KEY-----",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
        "<PRIVATE_KEY>",
    ),
    ("aws_access_key", "A", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<AWS_ACCESS_KEY_ID>"),
    (
        "aws_secret_key",
        "_access_key",
        re.compile(r"(?i)(aws_secret_access_key\s*[=:]\s*['\"]?)[A-Za-z0-9/+=]{40}"),
        r"\1<AWS_SECRET_ACCESS_KEY>",
    ),
    ("github_token", "gh", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), "<GITHUB_TOKEN>"),
    ("slack_token", "xox", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), "<SLACK_TOKEN>"),
    ("google_api_key", "AIza", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "<GOOGLE_API_KEY>"),
    (
        "url_credentials",
        "://",
        re.compile(r"(://)[^\s/:@'\"]+:[^\s/@'\"]+@"),
        r"\1<USER>:<PASSWORD>@",
    ),
    (
        "url_token",
        "=",
        re.compile(
            r"(?i)([?&](?:access_token|token|api_key|apikey|auth|secret|password|sig|signature)=)[^&\s'\"#]{6,}"
        ),
        r"\1<TOKEN>",
    ),
)


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


def _on_lines(text: str, literal: str, fn) -> tuple[str, int]:
    """Apply ``fn(line) -> (line, n)`` only to the lines containing ``literal``."""
    if literal not in text:
        return text, 0
    lines = text.split("\n")
    total = 0
    for i, line in enumerate(lines):
        if literal in line:
            lines[i], n = fn(line)
            total += n
    return ("\n".join(lines), total) if total else (text, 0)


def scrub(text: str, cfg: DataConfig) -> tuple[str, Counter]:
    counts: Counter = Counter()
    if cfg.scrub_secrets:
        for kind, literal, pattern, repl in SECRETS:
            if kind == "private_key":  # spans lines; its literal prefix makes the scan fast
                text, n = pattern.subn(repl, text) if literal in text else (text, 0)
            else:
                text, n = _on_lines(text, literal, lambda line, p=pattern, r=repl: p.subn(r, line))
            if n:
                counts[kind] += n
    if cfg.scrub_emails:
        text, n = _on_lines(text, "@", lambda line: EMAIL.subn("<EMAIL>", line))
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

        text = IPV4.sub(_ip, text)
    return text, counts
