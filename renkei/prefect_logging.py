"""The logging configuration renkei gives Prefect's processes (see prefect_logging.yaml for why)."""

from __future__ import annotations

import logging

from prefect.logging.formatters import PrefectFormatter

MAX_CHARS = 8000  # of one rendered record, traceback included; the rest is counted, not printed


class CappedFormatter(PrefectFormatter):
    """Prefect's formatter, with each rendered record cut at MAX_CHARS characters."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if len(text) <= MAX_CHARS:
            return text
        return f"{text[:MAX_CHARS]} [... {len(text) - MAX_CHARS} more characters not logged]"
