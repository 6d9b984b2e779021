"""A region comes back from its backups: the catalog and the Prefect database (issue 13, point 7).

A real `renkei server` (Prefect's server on SQLite, as `renkei server` runs
it), the project's deployments, a real sync run that registers a clinic's
studies. The catalog is backed up (`renkei catalog backup`) and so is the
Prefect database (`renkei server-db backup`, while the server runs). Then the
center loses both (the catalog folder and the server's database deleted);
`renkei catalog restore` and `renkei server-db restore` bring them back, and
the restarted server has the same deployments, schedules and run history,
the catalog the same totals and the same audit chain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers_region import layout_of, put_into_edge, region_config

from renkei import peers, synth
from renkei.regionrun import REPO, RegionRunner


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _cli(runner: RegionRunner, *args: str, api: str | None = None) -> subprocess.CompletedProcess:
    env = runner.env({"PREFECT_API_URL": api} if api else None)
    return subprocess.run(runner.renkei(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _catalog_facts(layout) -> tuple:
    from renkei.catalog import Catalog

    with Catalog.from_layout(layout, auto_compact=None) as cat:
        totals = sorted((t.site, t.studies, t.instances, t.bytes) for t in cat.totals())
        audit = cat.verify_audit()
        events = cat.audit()
        return totals, audit.ok, len(events), events[-1].hash if events else None


def _prefect_facts(api: str) -> tuple:
    deployments = sorted((d["name"], len(d.get("schedules") or [])) for d in _post(api, "/deployments/filter", {}))
    runs = {
        r["id"]: r["state"]["type"]
        for r in _post(
            api, "/flow_runs/filter", {"limit": 200, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        )
    }
    pools = sorted(p["name"] for p in _post(api, "/work_pools/filter", {}))
    return deployments, runs, pools


@pytest.mark.slow
def test_a_region_is_restored_from_its_backups(tmp_path: Path) -> None:
    config_path = region_config(tmp_path, stable_age=0.3, pacs_at=())
    layout = layout_of(config_path, tmp_path / "renkei-data")
    layout.data_dir.mkdir()
    port = peers.free_port()
    api = f"http://127.0.0.1:{port}/api"
    runner = RegionRunner(config_path, layout, api)
    backups = tmp_path / "backups"
    try:
        server = runner.spawn("prefect-server", runner.renkei("server", "--port", str(port)))
        runner.wait_until(lambda: _healthy(api), 120, "the Prefect server", every=1)
        runner.deploy()
        patients = synth.site_patients(layout.config, "clinic-a", 2, 21)
        made = synth.generate_site(
            layout.config, "clinic-a", patients, 2, tmp_path / "synth", ct_slices=2, size=32, modalities=("CT", "CR")
        )
        put_into_edge(layout, "clinic-a", made.files)
        time.sleep(0.5)
        sync = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from renkei.flows.sync_site import sync_site; "
                "sync_site('clinic-a', sys.argv[1], sys.argv[2])",
                str(config_path),
                str(layout.data_dir),
            ],
            cwd=REPO,
            env=runner.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sync.returncode == 0, sync.stderr[-3000:]
        catalog_before = _catalog_facts(layout)
        assert catalog_before[0] and catalog_before[1] and catalog_before[2] > 0
        prefect_before = _prefect_facts(api)
        assert prefect_before[1], "the sync run is not in the server's history"
        assert ("verify-backups", 1) in prefect_before[0] and "renkei-clinic-a" in prefect_before[2]

        proc = _cli(runner, "catalog", "backup")
        assert proc.returncode == 0, proc.stderr[-2000:]
        proc = _cli(runner, "server-db", "backup", "--to", str(backups / "prefect.db"))  # while it runs
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "deployment" in proc.stdout and "flow run" in proc.stdout
        refused = _cli(runner, "server-db", "restore", str(backups / "prefect.db"))
        assert refused.returncode == 2 and "still running" in refused.stderr and "Traceback" not in refused.stderr

        # the center loses its catalog and the server's database
        runner.stop_one(server.name)
        shutil.rmtree(layout.catalog_url)
        shutil.rmtree(layout.data_dir / "prefect")

        proc = _cli(runner, "catalog", "restore")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        proc = _cli(runner, "server-db", "restore", str(backups / "prefect.db"))
        assert proc.returncode == 0, proc.stderr[-2000:]

        port2 = peers.free_port()
        api2 = f"http://127.0.0.1:{port2}/api"
        runner.spawn("prefect-server-restored", runner.renkei("server", "--port", str(port2)))
        runner.wait_until(lambda: _healthy(api2), 120, "the restored Prefect server", every=1)
        assert _catalog_facts(layout) == catalog_before
        deployments, runs, pools = _prefect_facts(api2)
        assert deployments == prefect_before[0] and pools == prefect_before[2]
        assert set(prefect_before[1]) <= set(runs)
        status = _cli(runner, "status", "--json", api=api2)
        report = json.loads(status.stdout)
        assert "catalog readable" in report["ok"], report
    finally:
        runner.stop()
