"""Crash detection for flow runs whose process died without a word (SIGKILL, the OOM killer, a
lost node or spot instance). Such a run never reports an end, so the Prefect UI would show it
Running forever. Every flow run sends a heartbeat event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (Prefect's default 180). This module puts on the
server Prefect's own remedy: an automation that marks a flow run Crashed once it has missed
three heartbeats in a row without ending.

``python -m tasks.common.crash_detection`` (``make up`` runs it) creates the automation, or updates it
to the heartbeat frequency in effect; run it again after changing that frequency, which the
flows must use too. A SIGTERM (preemption notice, Ctrl-C) does not need it: the stages end
their runs themselves.
"""

from __future__ import annotations

import sys
from datetime import timedelta

NAME = "llmforge: crash flow runs that stop sending heartbeats"
MISSED_BEATS = 3  # Prefect's documented choice: one late heartbeat is no crash


def crash_automation(heartbeat_seconds: int):
    """Prefect's zombie-flow automation, for flow runs beating every ``heartbeat_seconds``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    ends = ("Completed", "Failed", "Cancelled", "Crashed")
    return Automation(
        name=NAME,
        description="Marks a flow run Crashed when its process stops sending heartbeats "
        "(killed, out of memory, node lost). Created by `python -m tasks.common.crash_detection`.",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ends)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_BEATS * heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {MISSED_BEATS * heartbeat_seconds} s: the flow run's "
                "process died (killed, out of memory, or its machine lost). Rerun the stage: "
                "completed stages are kept, and training resumes from its last checkpoint.",
            )
        ],
    )


def ensure_crash_detection(heartbeat_seconds: int | None = None) -> str:
    """Create or update the automation on the server at ``PREFECT_API_URL``; idempotent.
    ``heartbeat_seconds`` defaults to the frequency in this process's Prefect settings. Returns
    what it did, in one line."""
    from prefect.automations import Automation
    from prefect.settings import get_current_settings

    if heartbeat_seconds is None:
        heartbeat_seconds = get_current_settings().flows.heartbeat_frequency
    if heartbeat_seconds is None:
        return "crash detection off: PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset, no heartbeats"
    wanted = crash_automation(heartbeat_seconds)
    try:
        current = Automation.read(name=NAME)
    except ValueError:  # Prefect's "not found"
        wanted.create()
        verb = "created"
    else:
        if current.model_dump(exclude={"id"}) == wanted.model_dump(exclude={"id"}):
            verb = "already in place"
        else:
            wanted.id = current.id
            wanted.update()
            verb = "updated"
    after = MISSED_BEATS * heartbeat_seconds
    return f"crash detection {verb}: a flow run silent for {after} s is marked Crashed"


def main() -> int:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:  # Prefect would start a temporary server, and the automation would die with it
        print("error: set PREFECT_API_URL to the Prefect server to protect", file=sys.stderr)
        return 2
    try:
        print(ensure_crash_detection())
    except Exception as exc:  # the server is the user's to fix: say which, no traceback
        print(f"error: cannot set up crash detection on {url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
