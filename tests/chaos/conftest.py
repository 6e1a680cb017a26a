"""The chaos suite (every module is marked ``chaos``: ``make chaos``; excluded from the default
run): its table printed at the end of the session (also written to ``$LSCALE_CHAOS_TABLE``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.chaos.harness import ROWS, render


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    table = render(ROWS)
    terminalreporter.write_sep("=", "chaos table")
    terminalreporter.write_line(table)
    if out := os.environ.get("LSCALE_CHAOS_TABLE"):
        Path(out).write_text(table + "\n")
