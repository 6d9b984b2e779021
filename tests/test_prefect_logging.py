"""Prefect's processes log through renkei's console handler: plain, capped records (renkei/prefect_logging.py).

Prefect's own console handler renders each record with rich on the server's event loop; one "database
is locked" error carrying a batch's SQL parameters held a test server's loop for about a minute, every
websocket timed out, and runs stopped being picked up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from helpers_parts import EXAMPLE_CONFIG

from renkei.cli.prefect_cmd import prefect_env
from renkei.prefect_logging import ENV, MAX_CHARS

PROBE = """
import logging
from prefect.logging.configuration import setup_logging
setup_logging()
print(",".join(type(h).__name__ for h in logging.getLogger().handlers))
print(",".join(type(h).__name__ for h in logging.getLogger("prefect.flow_runs").handlers))
logging.getLogger("prefect.server.events").error("locked: " + "p" * 1_000_000)
try:
    raise RuntimeError("q" * 1_000_000)
except RuntimeError:
    logging.getLogger("prefect.server.events").exception("failed in consume_loop")
"""


def test_every_prefect_process_renkei_starts_uses_the_handler(tmp_path) -> None:
    args = argparse.Namespace(config=str(EXAMPLE_CONFIG), data_dir=str(tmp_path))
    env = prefect_env(args)
    assert ENV and all(env[key] == value for key, value in ENV.items())


def test_a_huge_record_is_written_plain_and_cut() -> None:
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root, flow_runs = proc.stdout.split()
    assert root == "PlainConsoleHandler", proc.stdout  # not PrefectConsoleHandler (rich)
    assert flow_runs == "APILogHandler", proc.stdout  # the rest of Prefect's configuration is Prefect's
    records = [line for line in proc.stderr.splitlines() if " | ERROR " in line]
    assert len(records) == 2, proc.stderr[:2000]
    assert len(proc.stderr) < 2 * (MAX_CHARS + 200)
    assert proc.stderr.count("more characters not logged") == 2
    assert "Traceback (most recent call last)" in proc.stderr  # the traceback's start is kept
