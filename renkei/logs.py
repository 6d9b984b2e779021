"""Logging set-up for renkei's commands.

Patient data (names, IDs, birth dates) is logged only at DEBUG. At INFO and
above, log lines name AE titles, peers, sites and UIDs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(verbosity: int = 0, log_file: Path | None = None) -> None:
    """Log to stderr (and to `log_file` when given): INFO by default, DEBUG with -vv."""
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_renkei", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._renkei = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
    # pynetdicom is chatty at INFO and logs peers' identifiers: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
    # HTTP client chatter (Prefect's API calls) only when asked for
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
