"""The console handler renkei gives Prefect's processes (server, workers, flow runs, deploy).

Prefect's own (PrefectConsoleHandler) renders every record with rich, on the
server's event loop. One "database is locked" error of the event persister
carries its whole batch's SQL parameters, and rendering it held a test
server's loop for about a minute (py-spy: rich.text.Text.divide under
PrefectConsoleHandler.emit): every websocket of the workers and runs timed
out, and runs stopped being picked up. This one writes plain text, each record
cut at MAX_CHARS. It replaces only the class of the `console` handler of
Prefect's logging.yml, through Prefect's own override by environment (ENV), so
the rest of Prefect's configuration stays Prefect's across upgrades.
"""

from __future__ import annotations

import logging
from typing import Any

MAX_CHARS = 8000  # of one rendered record, traceback included; the rest is counted, not printed


class PlainConsoleHandler(logging.StreamHandler):
    """A stream handler taking the `console` entry of Prefect's logging.yml (its rich `styles` are ignored)."""

    def __init__(self, stream: Any = None, styles: Any = None, **_rich_options: Any) -> None:
        super().__init__(stream)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if len(text) <= MAX_CHARS:
            return text
        return f"{text[:MAX_CHARS]} [... {len(text) - MAX_CHARS} more characters not logged]"


# PREFECT_LOGGING_<path of the key in logging.yml>: Prefect's override of one key by environment
ENV = {"PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS": f"{__name__}.{PlainConsoleHandler.__qualname__}"}
