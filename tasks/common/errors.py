"""The errors a user can fix, and the exit statuses every entry point shares.

Every stage's own error class derives from :class:`UserError`; an entry point (``python -m flows
<stage>``, ``python -m model.train``) turns one into a single line and exit status 2 instead of a
traceback. A run stopped at a checkpoint (SIGTERM, preemption) exits 75 from both: rerunning it
resumes."""

EXIT_USER_ERROR = 2  # bad params or inputs: the message says what to change
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped after writing a checkpoint; rerun to resume


class UserError(RuntimeError):
    """Bad params or inputs: the message names the problem and what to change."""
