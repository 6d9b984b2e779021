"""sync_site under faults, as real flow runs (issue 6): the S3 endpoint down at first, the flow's
process killed mid-upload, an instance arriving after its study was synced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import anyio
from helpers_region import LONG_AGO, REPO, layout_of, put_into_edge, region_config

from renkei import peers, synth
from renkei.runtime import open_catalog, open_journal, open_store


def test_s3_down_for_the_first_attempts_then_success(tmp_path, data_dir, prefect_api, s3_env) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from renkei.flows.sync_site import sync_site

    port = peers.free_port()
    bucket = "late-bucket"
    config_path = region_config(tmp_path, stable_age=0.2, center_url=f"s3://{bucket}/renkei", pacs_at=())
    lay = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=4, size=64, seed=3)
    put_into_edge(lay, "clinic-b", study.files, received_ago=LONG_AGO)
    os.environ["RENKEI_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"  # nothing listens there yet
    started = {}

    def upload_retrying() -> bool:
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        async def runs():
            async with get_client() as client:
                return await client.read_task_runs(
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=study.info.study_uid))
                )

        return any(t.state and t.state.name in ("AwaitingRetry", "Retrying") for t in anyio.run(runs))

    def bring_s3_up() -> None:
        # keep the endpoint down until Prefect has seen an upload attempt fail and scheduled a retry
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not upload_retrying():
            time.sleep(0.5)
        started["peer"] = peers.start_moto(tmp_path / "late-moto", port=port)
        started["peer"].filesystem().mkdir(bucket)

    thread = threading.Thread(target=bring_s3_up)
    thread.start()
    try:
        state = sync_site("clinic-b", str(config_path), str(data_dir), return_state=True)
        thread.join()
        assert state.is_completed(), state.message
        result = state.result()
        assert result["instances"] == study.instance_count
        with open_catalog(lay) as catalog:
            assert catalog.study(study.info.study_uid).instance_count == study.instance_count

        async def task_runs():
            async with get_client() as client:
                return await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )

        uploads = [t for t in anyio.run(task_runs) if t.name.startswith("upload")]
        assert uploads and max(t.run_count for t in uploads) > 1, "the upload was retried"
    finally:
        thread.join()
        if "peer" in started:
            started["peer"].stop()


def test_flow_killed_mid_upload_then_rerun_duplicates_nothing(
    tmp_path, data_dir, prefect_api, s3_bucket, s3_env
) -> None:
    from renkei.flows.sync_site import sync_site

    config_path = region_config(tmp_path, stable_age=0.2, center_url=s3_bucket, pacs_at=())
    lay = layout_of(config_path, data_dir)
    files = []
    for seed in (1, 2, 3):
        files += synth.write_single_study(tmp_path / "synth", "CT", slices=60, size=512, seed=seed).files
    put_into_edge(lay, "clinic-a", files, received_ago=LONG_AGO)
    store = open_store(lay)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    code = (
        f"from renkei.flows.sync_site import sync_site; sync_site('clinic-a', {str(config_path)!r}, {str(data_dir)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        stored = sum(1 for _ in store.list("objects/"))
        if stored >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the flow finished before it could be killed: make the data bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < stored < len(files)
    with open_journal(lay, "clinic-a") as journal:
        assert journal.summary().upload_states["verified"] < len(files)

    result = sync_site("clinic-a", str(config_path), str(data_dir))
    assert result["failures"] == {}
    keys = list(store.list("objects/"))
    assert len(keys) == len(files) == len(set(keys))  # no duplicate object
    with open_catalog(lay) as catalog:
        rows = [r for batch in catalog.iter_instances() for r in batch]
        assert len(rows) == len(files) == len({r["sop_instance_uid"] for r in rows})  # no duplicate row
        assert catalog.conflicts() == []
    with open_journal(lay, "clinic-a") as journal:
        assert journal.summary().upload_states["verified"] == len(files)


def test_an_instance_after_its_study_was_synced_follows_it(tmp_path, data_dir, prefect_api) -> None:
    from renkei.flows.sync_site import sync_site

    config_path = region_config(tmp_path, stable_age=0.2, pacs_at=())
    lay = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=5, size=64, seed=8)
    early, late = study.files[:-1], study.files[-1:]
    put_into_edge(lay, "clinic-c", early, received_ago=LONG_AGO)
    assert sync_site("clinic-c", str(config_path), str(data_dir))["instances"] == len(early)
    with open_catalog(lay) as catalog:
        assert catalog.study(study.info.study_uid).instance_count == len(early)
    put_into_edge(lay, "clinic-c", late, received_ago=LONG_AGO)
    second = sync_site("clinic-c", str(config_path), str(data_dir))
    assert second["studies"] == 1 and second["instances"] == 1
    with open_catalog(lay) as catalog:
        row = catalog.study(study.info.study_uid)
        assert row.instance_count == len(study.files)
        assert row.bytes == sum(f.stat().st_size for f in study.files)
        assert len(catalog.instances(study.info.study_uid)) == len(study.files)
