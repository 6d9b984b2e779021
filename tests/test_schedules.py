"""The region runs itself: the deployments' schedules fire on a real Prefect server (issue 13, point 1).

Not the test harness: `renkei server` (Prefect's own server, its scheduler
service and database) as a process, `renkei deploy` of the project's
prefect.yaml as it is. Nobody starts a run: the scheduler must create the
coming runs of the catch-up sync, the nightly verification, the compaction
and the catalog backup. (With Prefect 3.9.0 on SQLAlchemy
2.1 the scheduler failed every minute and created nothing; the pin in
pyproject.toml and requirements.lock is what makes this pass.)
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from renkei import peers
from renkei.errors import RenkeiError
from renkei.regionrun import REPO, RegionRunner

from helpers_region import layout_of, region_config

WATCHED = ("sync-hub", "verify-backups", "compact-catalog", "backup-catalog")


def _runs(api: str) -> list[dict]:
    """Flow runs with their deployment's name ([] while the server is too busy to answer: ask again)."""
    try:
        return _read_runs(api)
    except OSError:
        return []


def _read_runs(api: str) -> list[dict]:
    import json

    body = json.dumps({"limit": 200}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        runs = json.loads(resp.read())
    deployments = {}
    for run in runs:
        dep = run.get("deployment_id")
        if dep and dep not in deployments:
            with urllib.request.urlopen(f"{api}/deployments/{dep}", timeout=30) as resp:
                deployments[dep] = json.loads(resp.read())["name"]
        run["deployment_name"] = deployments.get(dep)
    return runs


@pytest.mark.slow
def test_the_scheduler_creates_the_scheduled_runs_of_every_deployment(tmp_path: Path) -> None:
    config_path = region_config(tmp_path, stable_age=0.5, pacs_at=())
    layout = layout_of(config_path, tmp_path / "renkei-data")
    port = peers.free_port()
    api = f"http://127.0.0.1:{port}/api"
    runner = RegionRunner(config_path, layout, api)
    try:
        runner.spawn("prefect-server", runner.renkei("server", "--port", str(port)))
        runner.wait_until(lambda: _healthy(api), 120, "the Prefect server", every=1)
        import subprocess

        proc = subprocess.run(runner.renkei("deploy"), cwd=REPO, env=runner.env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        # the project's own prefect.yaml, unchanged: the scheduler (not a test, not a trigger) must
        # create the coming runs of the catch-up syncs, the nightly verification, the compaction and
        # the catalog backup
        try:
            runner.wait_until(lambda: {r["deployment_name"] for r in _runs(api) if r.get("auto_scheduled")}
                              >= set(WATCHED), 150, "scheduled runs of " + ", ".join(WATCHED), every=2)
        except RenkeiError:
            log = runner.procs[0].tail(4000)
            raise AssertionError(f"the scheduler created no runs; the server's log:\n{log}") from None
        runs = [r for r in _runs(api) if r.get("auto_scheduled")]
        assert all((r.get("state") or {}).get("type") == "SCHEDULED" for r in runs)
        by_name = {}
        for r in runs:
            by_name.setdefault(r["deployment_name"], []).append(r["expected_start_time"])
        assert len(by_name["sync-hub"]) >= 3  # every 5 minutes, several ahead
    finally:
        runner.stop()


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
    finally:
        time.sleep(0)
