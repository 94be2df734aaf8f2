"""The release stage's errors."""

from __future__ import annotations

from tasks.common.errors import UserError


class ReleaseError(UserError):
    """A release cannot be built, or a bundle fails verification: the message says why."""
