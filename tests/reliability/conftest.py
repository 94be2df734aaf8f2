"""The reliability suite: hostile inputs, faults and attacks, each check printing its figure
(``inputs quarantined 9/9``, ``sandbox escapes 0/9``...) in a summary at the end of the run."""

from __future__ import annotations

import pytest

FIGURES: list[str] = []


@pytest.fixture
def figure():
    """``figure("sandbox escapes", "0/9")``: printed in the run's summary."""

    def record(name: str, value: object) -> None:
        FIGURES.append(f"{name} {value}")
        print(f"figure: {name} {value}")

    return record


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
