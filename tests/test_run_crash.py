"""A site's sync run killed with its worker (kill -9) frees the site's slot within 2 minutes (issue 12).

The deployment is the `sync-clinic-b` entry of prefect.yaml (its concurrency limit of 1, its
heartbeat setting, its tag) on a pool of the test's own; the automation is the one
`renkei deploy` creates. The run is kept busy by a center that refuses connections (its
uploads retry), the worker and the run's process are killed with SIGKILL while a second
run of the site waits for the slot, and a new worker starts (as systemd restarts it). The
dead run must be marked Crashed and the waiting one start, each within 120 s of the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers_region import REPO, layout_of, put_into_edge, region_config

from renkei import peers, synth

LIMIT_S = 120.0


def _sync_entry() -> dict:
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    return next(d for d in raw["deployments"] if d["name"] == "sync-clinic-b")


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_run_process(run_id, infrastructure_pid: str | None) -> None:
    """SIGKILL the flow run's process, if that pid is still the process of that run (never another's)."""
    try:
        pid = int(str(infrastructure_pid or "").rpartition(":")[2])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (ValueError, OSError):
        return
    if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_worker_and_run_free_the_sites_slot_within_two_minutes(tmp_path, data_dir, prefect_api) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import ConcurrencyOptions, StateType
    from prefect.states import Cancelled
    from prefect.workers.process import ProcessWorker

    from renkei.cli.prefect_cmd import CRASH_AFTER_S, ensure_crash_detection

    config_path = region_config(tmp_path, stable_age=0.2, center_url="s3://nowhere/renkei", pacs_at=())
    lay = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=3, size=64, seed=11)
    put_into_edge(lay, "clinic-b", study.files)
    entry = _sync_entry()
    limit = entry["concurrency_limit"]
    assert limit["limit"] == 1
    job_variables = entry["work_pool"]["job_variables"]
    assert job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    pool = f"crash-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "RENKEI_CONFIG": str(config_path),
        "RENKEI_DATA_DIR": str(data_dir),
        "RENKEI_HOME": str(REPO),
        # the center refuses connections: the run's uploads retry for a while (it stays Running)
        "RENKEI_S3_ENDPOINT_URL": f"http://127.0.0.1:{peers.free_port()}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    workers: list[subprocess.Popen] = []
    runs: list = []

    def start_worker(n: int) -> subprocess.Popen:
        log = open(tmp_path / f"worker-{n}.log", "ab")
        proc = subprocess.Popen(
            [_prefect(), "worker", "start", "--pool", pool, "--type", "process"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        workers.append(proc)
        return proc

    with get_client(sync_client=True) as client:
        automation_id = ensure_crash_detection()
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
            deployment_id = client.create_deployment(
                client.create_flow_from_name("sync_site"),
                f"{entry['name']}-{pool}",
                entrypoint=entry["entrypoint"],
                work_pool_name=pool,
                parameters=entry["parameters"],
                tags=entry["tags"],
                job_variables=job_variables,
                concurrency_limit=limit["limit"],
                concurrency_options=ConcurrencyOptions(
                    collision_strategy=limit["collision_strategy"], grace_period_seconds=limit["grace_period_seconds"]
                ),
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
            )

            def state_of(run) -> StateType | None:
                got = client.read_flow_run(run.id)
                return got.state.type if got.state else None

            def wait(run, wanted: StateType, timeout: float, what: str) -> float:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if state_of(run) == wanted:
                        return time.monotonic()
                    time.sleep(0.5)
                logs = "\n".join(
                    (tmp_path / f"worker-{n}.log").read_text(errors="replace")[-2000:] for n in range(len(workers))
                )
                raise AssertionError(f"{what}: not {wanted.value} after {timeout:.0f} s but {state_of(run)}\n{logs}")

            first_worker = start_worker(1)
            runs.append(client.create_flow_run_from_deployment(deployment_id))
            wait(runs[0], StateType.RUNNING, 120, "the first run")
            time.sleep(3)  # its first heartbeat is in
            runs.append(client.create_flow_run_from_deployment(deployment_id))
            time.sleep(2)  # the worker has seen it: it waits for the site's slot
            assert state_of(runs[1]) == StateType.SCHEDULED
            dead_pid = client.read_flow_run(runs[0].id).infrastructure_pid
            killed, killed_wall = time.monotonic(), time.time()
            _kill_group(first_worker)
            _kill_run_process(runs[0].id, dead_pid)
            start_worker(2)  # the service manager restarts the worker
            started = wait(runs[1], StateType.RUNNING, LIMIT_S + 30, "the waiting run")
            crashed = client.read_flow_run(runs[0].id)
            assert crashed.state.type == StateType.CRASHED, crashed.state
            assert "no heartbeat" in (crashed.state.message or "")
            freed = crashed.state.timestamp.timestamp() - killed_wall
            print(
                f"\nkilled run marked Crashed {freed:.1f} s after the kill; the waiting run Running after "
                f"{started - killed:.1f} s (automation window {CRASH_AFTER_S} s)"
            )
            assert freed <= LIMIT_S and started - killed <= LIMIT_S
        finally:
            for proc in workers:
                _kill_group(proc)
            for run in runs:
                try:
                    _kill_run_process(run.id, client.read_flow_run(run.id).infrastructure_pid)
                    client.set_flow_run_state(run.id, Cancelled(message="test over"), force=True)
                except Exception:
                    pass
            client.delete_automation(uuid.UUID(automation_id))
