"""How a training process ends and what its launcher reads from that: ``model.train``'s own exit
status for a run that cannot go on (the shared ones, 2 and 75, are ``tasks.common.errors``'), the
line a stopped run prints, and dying with the process that started it. Torch-free: the flow that
launches torchrun imports it."""

from __future__ import annotations

import contextlib
import signal

EXIT_CANNOT_GO_ON = 3  # non-finite loss, mismatched or tampered checkpoint, failed export check
STOPPED_PREFIX = "stopped:"  # a stopped run's last line (torchrun itself exits 1)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: this process receives ``sig`` when its parent dies (PR_SET_PDEATHSIG), so no
    launcher or worker outlives the process that started it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, sig)
