"""The evaluate stage's errors."""

from __future__ import annotations

from tasks.common.errors import UserError


class EvaluateError(UserError):
    """The stage cannot evaluate (no model, no sandbox, a GPU asked for and absent): the message
    says what to change."""


class NothingScored(RuntimeError):
    """Every answer of a bits-per-byte measure is longer than the context."""
