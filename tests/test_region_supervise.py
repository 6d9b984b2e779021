"""The staying-up region survives a part stopping, and says which (issue 13, point 6).

`renkei demo` keeps the region running after its scenarios and looks at its
parts every second with RegionRunner.supervise: a part that exits is named
with its exit code and log, started again, and the other parts are not
touched; one that keeps dying is left stopped after a few restarts, said so.
"""

from __future__ import annotations

import os
import signal
import time

from helpers_region import layout_of, region_config

from renkei import peers
from renkei.regionrun import RegionRunner


def test_a_killed_edge_is_named_and_started_again_while_the_rest_runs(tmp_path, data_dir) -> None:
    config_path = region_config(tmp_path, pacs_at=())
    layout = layout_of(config_path, data_dir)
    runner = RegionRunner(config_path, layout, "http://127.0.0.1:9/api")
    said: list[str] = []
    try:
        runner.start_edges(["hub", "clinic-a"])
        hub = next(p for p in runner.procs if p.name == "edge-hub")
        hub_pid = hub.process.pid
        assert runner.supervise(said.append) == [] and said == []
        site = layout.config.site("clinic-a")
        for attempt in range(RegionRunner.MAX_RESTARTS + 1):
            edge = next(p for p in runner.procs if p.name == "edge-clinic-a")
            os.killpg(edge.process.pid, signal.SIGKILL)
            edge.process.wait(10)
            assert runner.supervise(said.append) == ["edge-clinic-a"]
            if attempt < RegionRunner.MAX_RESTARTS:
                assert "edge-clinic-a stopped (exit code -9" in said[-1] and "starting it again" in said[-1]
                again = next(p for p in runner.procs if p.name == "edge-clinic-a")
                peers.wait_for_port(site.edge.host, site.edge.port, 60, again.process, "the restarted edge")
            else:
                assert "left stopped" in said[-1] and "edge-clinic-a" in said[-1]
                assert not [p for p in runner.procs if p.name == "edge-clinic-a"]
        # the hub's edge was never touched: same process, still serving
        assert hub.alive() and hub.process.pid == hub_pid
        hub_site = layout.config.site("hub")
        peers.wait_for_port(hub_site.edge.host, hub_site.edge.port, 5, hub.process, "the hub's edge")
        time.sleep(0.1)
        assert runner.supervise(said.append) == []
    finally:
        runner.stop()
