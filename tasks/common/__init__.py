"""What more than one stage uses: plumbing (params machinery, storage, tracking, runners,
environment, summary, redaction, DVC) and the contracts between stages (the chat format, the
benchmark list, the records)."""
