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
from helpers_region import layout_of, region_config

from renkei import peers
from renkei.errors import RenkeiError
from renkei.regionrun import REPO, RegionRunner

WATCHED = ("sync-hub", "verify-backups", "compact-catalog", "backup-catalog")


def _runs(api: str, state_types: list[str] | None = None) -> list[dict]:
    """Flow runs with their deployment's name ([] while the server is too busy to answer: ask again)."""
    try:
        return _read_runs(api, state_types)
    except OSError:
        return []


def _read_runs(api: str, state_types: list[str] | None = None) -> list[dict]:
    """At most 200 runs, those in `state_types` if given (the scheduler keeps ~100 ahead per deployment)."""
    import json

    query: dict = {"limit": 200}
    if state_types:
        query["flow_runs"] = {"state": {"type": {"any_": state_types}}}
    body = json.dumps(query).encode()
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


SCHEDULED = WATCHED  # every minute in the second part


def _short_schedules(tmp_path: Path) -> Path:
    """The project's prefect.yaml with the watched schedules every minute (the others hourly)."""
    import yaml

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    for dep in doc["deployments"]:
        if dep.get("schedules"):
            every = 60 if dep["name"] in SCHEDULED else 3600
            dep["schedules"] = [{"interval": every, "timezone": "Asia/Tokyo"}]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_scheduled_runs_are_created_and_run_by_the_workers_on_postgresql(tmp_path: Path) -> None:
    """Nobody starts a run: the scheduler creates them, the hub's and the center's workers run them.

    The region's Prefect server as docs/operations.md runs it, on PostgreSQL
    (SQLite under this many scheduled runs answers "database is locked").
    First the project's prefect.yaml as it is: the scheduler creates the coming
    runs of every watched deployment, and `renkei deploy` names one gone from
    the server. Then the same deployments every minute: the workers run them.
    Last, the database is backed up and restored with pg_dump/pg_restore.
    """
    config_path = region_config(tmp_path, stable_age=0.5, pacs_at=())
    layout = layout_of(config_path, tmp_path / "renkei-data")
    layout.data_dir.mkdir()
    try:
        pg = peers.start_postgres()
    except RenkeiError as exc:
        pytest.skip(f"PostgreSQL: {exc}")
    db_env = {"PREFECT_API_DATABASE_CONNECTION_URL": pg.url, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    port = peers.free_port()
    api = f"http://127.0.0.1:{port}/api"
    runner = RegionRunner(config_path, layout, api)
    try:
        server = runner.spawn("prefect-server", runner.renkei("server", "--port", str(port)), extra_env=db_env)
        runner.wait_until(lambda: _healthy(api), 180, "the Prefect server on PostgreSQL", every=1)
        import subprocess

        proc = subprocess.run(
            runner.renkei("deploy"), cwd=REPO, env=runner.env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        _the_scheduler_creates_the_coming_runs(runner, api, layout.config, proc.stdout)

        proc = subprocess.run(
            runner.renkei("deploy", "--prefect-file", str(_short_schedules(tmp_path))),
            cwd=REPO,
            env=runner.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runner.start_workers(["hub"], center=True)

        def completed() -> set[str]:
            return completed_at(api)

        try:
            runner.wait_until(
                lambda: completed() >= set(SCHEDULED),
                420,
                "scheduled runs of " + ", ".join(SCHEDULED) + " completed by the workers",
                every=3,
            )
        except RenkeiError:
            import datetime as dt

            runs = _runs(api)
            states = sorted({(r["deployment_name"], (r.get("state") or {}).get("name")) for r in runs})
            first = {}
            for r in sorted(runs, key=lambda r: r["expected_start_time"]):
                first.setdefault(
                    r["deployment_name"],
                    (
                        r["expected_start_time"],
                        r.get("work_queue_name"),
                        r.get("work_pool_name"),
                        (r.get("state") or {}).get("name"),
                    ),
                )
            states = [states, dt.datetime.now(dt.UTC).isoformat(), first]
            logs = "\n".join(p.name + ":\n" + p.tail(1500) for p in runner.procs)
            raise AssertionError(f"runs: {states}\n{logs}") from None
        # what they did is in the catalog: the verification and the backup ran for real
        from renkei.catalog import Catalog

        with Catalog.from_layout(layout, auto_compact=None) as cat:
            assert cat.recent_audit(["verify-backups"], limit=1)
        assert (Path(layout.catalog_backup_url) / "catalog" / "BACKUP.json").is_file()

        # the PostgreSQL database is backed up while the server runs, and restored with it stopped
        dump = tmp_path / "prefect.dump"
        backup = subprocess.run(
            runner.renkei("server-db", "backup", "--to", str(dump)),
            cwd=REPO,
            env=runner.env(db_env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert backup.returncode == 0 and dump.stat().st_size > 0, backup.stderr[-2000:]
        assert "postgresql://127.0.0.1" in backup.stdout and "postgres@" not in backup.stdout
        before = _deployments(api)
        runner.stop_one("worker-hub")
        runner.stop_one("worker-center")
        runner.stop_one(server.name)
        wiped = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(pg.port),
                "-d",
                "prefect",
                "-c",
                "DROP SCHEMA public CASCADE; CREATE SCHEMA public",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wiped.returncode == 0, wiped.stderr
        restore = subprocess.run(
            runner.renkei("server-db", "restore", str(dump)),
            cwd=REPO,
            env=runner.env(db_env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert restore.returncode == 0, restore.stderr[-2000:]
        port2 = peers.free_port()
        api2 = f"http://127.0.0.1:{port2}/api"
        runner.spawn("prefect-server-restored", runner.renkei("server", "--port", str(port2)), extra_env=db_env)
        runner.wait_until(lambda: _healthy(api2), 180, "the restored Prefect server", every=1)
        assert _deployments(api2) == before
        assert completed_at(api2) >= set(SCHEDULED)
    finally:
        runner.stop()
        pg.stop()


def _the_scheduler_creates_the_coming_runs(runner: RegionRunner, api: str, config, deploy_stdout: str) -> None:
    """The project's own prefect.yaml, unchanged: the scheduler (not a test, not a trigger) creates the
    coming runs of the catch-up syncs, the nightly verification, the compaction and the catalog backup."""
    try:
        runner.wait_until(
            lambda: {r["deployment_name"] for r in _runs(api) if r.get("auto_scheduled")} >= set(WATCHED),
            150,
            "scheduled runs of " + ", ".join(WATCHED),
            every=2,
        )
    except RenkeiError:
        log = runner.procs[0].tail(4000)
        raise AssertionError(f"the scheduler created no runs; the server's log:\n{log}") from None
    runs = [r for r in _runs(api) if r.get("auto_scheduled")]
    assert all((r.get("state") or {}).get("type") == "SCHEDULED" for r in runs)
    by_name: dict[str, list[str]] = {}
    for r in runs:
        by_name.setdefault(r["deployment_name"], []).append(r["expected_start_time"])
    assert len(by_name["sync-hub"]) >= 3  # every 5 minutes, several ahead
    # `renkei deploy` reads every deployment back: one gone from the server is named
    assert "read back" in deploy_stdout
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from renkei.cli.prefect_cmd import absent_deployments

    with temporary_settings(updates={PREFECT_API_URL: api}):
        assert absent_deployments(config) == []
        with get_client(sync_client=True) as client:
            client.delete_deployment(client.read_deployment_by_name("verify_backups/verify-backups").id)
        assert absent_deployments(config) == ["verify_backups/verify-backups"]


def _deployments(api: str) -> list[tuple[str, str]]:
    import json

    req = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return sorted(
            (d["name"], json.dumps(d.get("schedules") and [x["schedule"] for x in d["schedules"]], sort_keys=True))
            for d in json.loads(resp.read())
        )


def completed_at(api: str) -> set[str]:
    return {r["deployment_name"] for r in _runs(api, ["COMPLETED"]) if r.get("auto_scheduled")}


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
    finally:
        time.sleep(0)
