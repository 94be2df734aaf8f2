"""Secrets: one recogniser, used everywhere a value could leave the process.

A secret is recognised by its key (exact names such as ``password`` or ``hub_token``, never a
substring: ``tokenize.eos_token`` is not a secret) and by its value (credentials inside URLs, the
shapes of known keys and tokens, and the current values of the environment's secret variables).
Ingest's PII scrubber uses the same value patterns on the corpus; params refuse secrets outright
(``tasks.common.config.check_free_of_secrets``), and MLflow params, log lines and written files pass through
``redact_text``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

# The last component of a dotted key that names a secret (the whole component, not a substring).
SECRET_KEY = re.compile(
    r"^(?:.*_)?(?:password|passwd|secret|secret_key|secret_access_key|api_key|apikey|"
    r"access_token|auth_token|hub_token|session_token|private_key|credentials?)$",
    re.I,
)

# (kind, literal groups, pattern, replacement). Every match contains, in lower case, one literal of
# each group; a pattern is applied to the whole text only when they occur in it. These substring
# tests are far cheaper than the patterns (a single character is a memchr), and most code holds
# none of them. None matches across a line break except the private key block. The token patterns
# begin with their literal prefix and check the word boundary behind it (``gh(?<=\bgh)`` is
# ``\bgh``): a pattern that starts with a literal lets the regex engine skip ahead by fast substring
# search instead of trying every position, about 40 times faster on code.
PATTERNS: tuple[tuple[str, tuple[tuple[str, ...], ...], re.Pattern[str], str], ...] = (
    (
        "private_key",
        (("private key-----",),),
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
        "<PRIVATE_KEY>",
    ),
    (
        "aws_access_key",
        (("a",),),  # the pattern itself skips ahead to each "A" as fast as a test would
        re.compile(r"A(?<=\bA)(?:KI|SI)A[0-9A-Z]{16}\b"),
        "<AWS_ACCESS_KEY_ID>",
    ),
    (
        "aws_secret_key",
        (("_access_key",),),
        re.compile(r"(?i)(aws_secret_access_key[^\S\n]*[=:][^\S\n]*['\"]?)[A-Za-z0-9/+=]{40}"),
        r"\1<AWS_SECRET_ACCESS_KEY>",
    ),
    (
        "github_token",
        (("gh",),),
        re.compile(r"gh(?<=\bgh)[pousr]_[A-Za-z0-9]{36,}\b"),
        "<GITHUB_TOKEN>",
    ),
    (
        "slack_token",
        (("xox",),),
        re.compile(r"xox(?<=\bxox)[abprs]-[A-Za-z0-9-]{10,}\b"),
        "<SLACK_TOKEN>",
    ),
    (
        "google_api_key",
        (("aiza",),),
        re.compile(r"AIza(?<=\bAIza)[0-9A-Za-z_-]{35}\b"),
        "<GOOGLE_API_KEY>",
    ),
    ("hf_token", (("hf_",),), re.compile(r"hf_(?<=\bhf_)[A-Za-z0-9]{30,}\b"), "<HF_TOKEN>"),
    (
        "openai_key",
        (("sk-",),),
        re.compile(r"sk-(?<=\bsk-)(?:proj-)?[A-Za-z0-9_-]{20,}\b"),
        "<OPENAI_API_KEY>",
    ),
    (
        "url_credentials",
        (("://",),),
        re.compile(r"(://)[^\s/:@'\"]+:[^\s/@'\"]+@"),
        r"\1<USER>:<PASSWORD>@",
    ),
    (
        "url_token",
        # a "?" or "&", then a parameter name's end (access_token, x-amz-security-token: "token=")
        (
            ("?", "&"),
            (
                "token=",
                "api_key=",
                "apikey=",
                "auth=",
                "secret=",
                "password=",
                "sig=",
                "signature=",
                "credential=",
            ),
        ),
        re.compile(
            r"(?i)([?&](?:access_token|token|api_key|apikey|auth|secret|password|sig|signature|"
            r"x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"#]{6,}"
        ),
        r"\1<TOKEN>",
    ),
)

# Environment variables whose values are redacted wherever they appear (plus any variable whose
# name ends like a secret key, e.g. MY_SERVICE_PASSWORD).
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
)
MASK = "***"


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.match(key.rsplit(".", 1)[-1]))


def _secret_env_values() -> list[str]:
    values = []
    for name, value in os.environ.items():
        if (name in SECRET_ENV or is_secret_key(name)) and len(value) >= 8:
            values.append(value)
    return sorted(values, key=len, reverse=True)


def replace_patterns(text: str) -> tuple[str, dict[str, int]]:
    """Every credential-shaped value replaced by its placeholder, with counts by kind."""
    counts: dict[str, int] = {}
    lower = _folded(text)
    for kind, groups, pattern, repl in PATTERNS:
        if not all(any(lit in lower for lit in group) for group in groups):
            continue
        text, n = pattern.subn(repl, text)
        if n:
            counts[kind] = n
            lower = _folded(text)
    return text, counts


# Non-ASCII characters that an ignore-case pattern matches as an ASCII letter but ``str.lower``
# does not turn into it (it does for the Kelvin sign): dotless i, long s, and the dot that follows
# the i of a lowered capital dotted I. Mapped, so the literal test never skips a match.
_FOLD = (("\u0131", "i"), ("\u017f", "s"), ("\u0307", ""))


def _folded(text: str) -> str:
    lower = text.lower()
    if not lower.isascii():  # str.replace, not str.translate: a dict lookup per character is slow
        for char, ascii_ in _FOLD:
            if char in lower:
                lower = lower.replace(char, ascii_)
    return lower


def redact_text(text: str) -> str:
    """``text`` with credentials and the environment's secret values masked."""
    if not text:
        return text
    for value in _secret_env_values():
        if value in text:
            text = text.replace(value, MASK)
    return replace_patterns(text)[0]


def redact_value(key: str, value: Any) -> Any:
    if value in (None, ""):
        return value
    if is_secret_key(key):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat ``{dotted.key: value}`` with secret keys and secret-looking values masked."""
    return {k: redact_value(k, v) for k, v in flat.items()}


def secrets_in(flat: dict[str, Any]) -> list[str]:
    """The dotted keys whose value is a secret (by key name or by value); values never returned."""
    found = []
    for key, value in flat.items():
        if value in (None, "", [], {}):
            continue
        strings = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
        if is_secret_key(key) or any(redact_text(v) != v for v in strings):
            found.append(key)
    return found


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record's message before any handler (console, Prefect API) sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is logged as is
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Attach the filter to Prefect's run loggers and to every handler of the root and Prefect
    loggers (idempotent). Called by the flows when they start, not at import."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect", ""):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
