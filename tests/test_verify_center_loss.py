"""verify_backups after a center loss, and what it reports beside the catalog (issue 12).

The center and its catalog wiped: the edge check uploads and registers again and the
sharing rules grant the hub its studies again. Objects no catalog row points to are
counted and named in the report only; temporary files of killed writers are removed
after their grace period.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
from helpers_region import synced_region

from renkei.runtime import open_catalog, open_store


@pytest.fixture
def synced(tmp_path, data_dir, prefect_api):
    region = synced_region(tmp_path, data_dir, {"clinic-c": (1, 3)})
    hub_sees = region.visible_to("hub", "clinic-c")
    assert hub_sees
    return region.config_path, region.layout, region.written["clinic-c"], hub_sees


def test_center_and_catalog_lost_come_back_with_the_rule_grants(synced) -> None:
    from renkei.flows.verify_backups import verify_backups

    config_path, lay, written, hub_sees = synced
    shutil.rmtree(lay.data_dir / "center")
    shutil.rmtree(lay.catalog_backup_url, ignore_errors=True)
    report = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir))
    assert report["unrecoverable"] == 0
    assert {f["kind"] for f in report["findings"]} == {"not-in-center"}
    assert all(f["repaired"] for f in report["findings"])
    assert report["rule_grants_reapplied"] >= len(hub_sees)
    with open_catalog(lay) as catalog:
        assert sum(r.instance_count for r in catalog.visible_studies("clinic-c")) == written.instance_count
        assert {uid for uid in hub_sees if catalog.may_see("hub", uid)} == hub_sees
    # the next night finds it whole and writes no grant again
    again = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir))
    assert again["findings"] == [] and again["rule_grants_reapplied"] == 0 and again["unreferenced"] == 0


def test_unreferenced_objects_are_reported_and_stray_temp_files_swept(synced) -> None:
    from renkei.flows.verify_backups import verify_backups

    config_path, lay, written, _ = synced
    store = open_store(lay)
    keys = list(store.list("objects/"))
    study_dir = os.path.dirname(store.path(keys[0]))
    hour_ago = time.time() - 2 * 3600
    strays = []
    for n in range(3):  # objects a lost registration left, older than the grace period
        path = os.path.join(study_dir, f"1.2.826.0.1.3680043.99.{n}.dcm")
        open(path, "wb").write(b"x" * 10)
        os.utime(path, (hour_ago, hour_ago))
        strays.append(os.path.relpath(path, store.root))
    young = os.path.join(study_dir, "1.2.826.0.1.3680043.99.9.dcm")
    open(young, "wb").write(b"y")  # an upload whose registration is still to come
    old_temp = os.path.join(study_dir, ".tmp-0123abcd-1.2.3.dcm")
    open(old_temp, "wb").write(b"partial")
    os.utime(old_temp, (hour_ago, hour_ago))
    new_temp = os.path.join(study_dir, ".tmp-4567ef01-1.2.4.dcm")
    open(new_temp, "wb").write(b"partial")  # a writer at work now

    run_logger = logging.getLogger("prefect.task_runs")
    level = run_logger.level
    run_logger.setLevel(logging.INFO)  # the suite runs Prefect at WARNING; this test reads the INFO lines
    try:
        state = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir), return_state=True)
    finally:
        run_logger.setLevel(level)
    report = state.result()
    assert report["findings"] == [] and report["unrecoverable"] == 0
    assert report["objects_listed"] == len(keys) + 4
    assert report["unreferenced"] == 3 and report["unreferenced_recent"] == 1
    assert sorted(report["unreferenced_keys"]) == sorted(strays)
    assert report["temp_removed"] == 1
    assert not os.path.exists(old_temp) and os.path.exists(new_temp)
    assert all(os.path.exists(os.path.join(store.root, k)) for k in strays)  # reported, never deleted
    logged = "\n".join(m for level, m in _run_logs(state.state_details.flow_run_id) if level >= logging.INFO)
    assert "3 unreferenced" in logged and not any(k in logged for k in strays)  # counts in the log, keys not


def _run_logs(flow_run_id) -> list[tuple[int, str]]:
    import anyio
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    deadline = time.monotonic() + 20
    while True:  # run logs reach the API in the background
        logs = anyio.run(read)
        if any("unreferenced" in log.message for log in logs) or time.monotonic() > deadline:
            return [(log.level, log.message) for log in logs]
        time.sleep(0.5)
