"""RegionRunner.stop leaves nothing of the region running (a flow run outlived its worker before)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers_region import layout_of, region_config
from helpers_wait import eventually

from renkei.regionrun import RegionRunner, running

# a part that starts a child in a session of its own, as a Prefect worker starts a flow run
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def test_stop_ends_what_a_part_started_in_a_session_of_its_own(tmp_path: Path) -> None:
    config_path = region_config(tmp_path, stable_age=1.0, pacs_at=())
    layout = layout_of(config_path, tmp_path / "renkei-data")
    runner = RegionRunner(config_path, layout, "http://127.0.0.1:9/api")
    pidfile = tmp_path / "child.pid"
    # an unrelated process with the same program: it must survive the stop
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        runner.spawn("parent", [sys.executable, "-c", PARENT, str(pidfile)])
        eventually(lambda: pidfile.exists() and pidfile.read_text(), 30, "the part starting its child")
        child = int(pidfile.read_text())
        assert running(child)
        runner.stop()
        assert not running(child), "the child started in its own session outlived the region's stop"
        assert bystander.poll() is None, "a process of no region was stopped"
    finally:
        bystander.kill()
        bystander.wait()
