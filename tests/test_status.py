"""`renkei status`: what needs action, each with its cause (issue 13, point 4 — the command-line part).

A real edge runs for the hub and not for the clinics; a real Prefect API
holds a failed run and a paused work pool; the catalog has no backup and no
verification yet. `renkei status` lists each with its cause and exits 1;
after a verification, a backup and with the clinics' edges counted out, the
same checks say fine. A stopped edge is told apart from an idle one by its
heartbeat.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import anyio
from helpers_region import layout_of, region_config

from renkei.regionrun import REPO, RegionRunner
from renkei.status import EDGE_SILENT_S, region_status


def test_status_lists_what_needs_action_with_causes(tmp_path, data_dir, prefect_api) -> None:
    from prefect import flow, get_client

    config_path = region_config(tmp_path, stable_age=0.5, pacs_at=())
    layout = layout_of(config_path, data_dir)
    runner = RegionRunner(config_path, layout, prefect_api)

    @flow(name="status-test-broken", flow_run_name="broken-run-for-status")
    def broken() -> None:
        raise RuntimeError("the PACS refused the association")

    broken(return_state=True)

    async def pause_pool() -> None:
        from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(name="renkei-clinic-b", type="process"))
            except Exception:
                pass
            await client.update_work_pool("renkei-clinic-b", WorkPoolUpdate(is_paused=True))

    anyio.run(pause_pool)
    try:
        runner.start_edges(["hub"])
        time.sleep(2.5)  # a few heartbeats
        status = region_status(layout, prefect_api)
        causes = {(p.what, p.site): p for p in status.problems}
        assert ("edge", "hub") not in causes and "edge of hub running" in status.ok
        for site in ("clinic-a", "clinic-b", "clinic-c"):
            assert ("edge", site) in causes, status.problems
        assert "never run" in causes[("verification", None)].cause
        assert "never been backed up" in causes[("backup", None)].cause
        assert causes[("pool", "clinic-b")].cause == "work pool renkei-clinic-b is paused"
        failed = [p for p in status.problems if p.what == "run" and "broken-run-for-status" in p.cause]
        assert failed and "refused the association" in failed[0].cause and "/runs/flow-run/" in failed[0].link

        # the command line: the same list, exit 1, JSON for monitoring
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "renkei.cli.main",
                "status",
                "--json",
                "--config",
                str(config_path),
                "--data-dir",
                str(data_dir),
            ],
            cwd=REPO,
            env=runner.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report["needs_action"] and {p["what"] for p in report["problems"]} >= {
            "edge",
            "verification",
            "backup",
            "pool",
            "run",
        }

        # a verification and a backup later, those two are fine
        from renkei.catalog import Catalog
        from renkei.catalog.backup import backup

        with Catalog.from_layout(layout) as cat:
            cat.append_audit(
                "center", "verify_backups", "verify-backups", outcome="ok", detail={"instances": 0, "findings": 0}
            )
            backup(cat, cat.backup)
        status = region_status(layout, prefect_api)
        whats = {p.what for p in status.problems}
        assert "verification" not in whats and "backup" not in whats

        # the hub's edge stops: once its heartbeats are older than the limit it is reported, with the cause
        runner.stop()
        later = region_status(layout, prefect_api, now=time.time() + EDGE_SILENT_S + 5)
        hub = [p for p in later.problems if p.what == "edge" and p.site == "hub"]
        assert hub and "not running" in hub[0].cause
    finally:
        runner.stop()
