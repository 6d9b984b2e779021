"""A corrected image reaches the center (issue 12, point 2).

A real edge process receives a study by C-STORE (dcmtk's storescu), the site
is synced as a real flow run; then one instance is sent again under the same
SOP Instance UID with other bytes. The edge answers success and keeps both;
the next sync uploads the new bytes under their own key and registers them
as a new version: both versions are in the center, the catalog says which
is current and why, a retrieval from the center returns the new bytes byte
for byte, and the nightly verification checks both and can repair the new
one from the edge.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from helpers_edge import edge_subprocess, make_instance, storescu, write_region
from helpers_wait import eventually

from renkei import peers
from renkei.catalog import keys
from renkei.config import Layout, load_config
from renkei.runtime import open_catalog, open_journal, open_store


def _wait(predicate, timeout: float = 60.0) -> None:
    eventually(predicate, timeout, "the edge and the center", every=0.2)


def test_resent_instance_with_other_bytes_becomes_the_current_version(
    tmp_path: Path, data_dir: Path, prefect_api
) -> None:
    from renkei.flows.sync_site import sync_site
    from renkei.verification import verify_center

    region = write_region(tmp_path / "region", stable_age=0.3)
    layout = Layout(load_config(region.path), data_dir)
    study, series = "1.2.826.0.1.3680043.10.543.77", "1.2.826.0.1.3680043.10.543.77.1"
    first = [
        make_instance(
            tmp_path / f"first-{n}.dcm",
            study_uid=study,
            series_uid=series,
            sop_uid=f"{series}.{n}",
            instance_number=n,
            seed=n,
        )
        for n in (1, 2, 3)
    ]
    sop = f"{series}.2"
    corrected = make_instance(
        tmp_path / "corrected.dcm", study_uid=study, series_uid=series, sop_uid=sop, instance_number=2, seed=99
    )  # same SOP Instance UID, other pixels
    edge = edge_subprocess(region, data_dir, tmp_path / "edge.log")
    try:
        peers.wait_for_port("127.0.0.1", region.edge_port, 60, edge, "edge")
        storescu(region.edge_port, first)
        synced = []
        _wait(
            lambda: synced.append(sync_site("hub", str(region.path), str(data_dir))["instances"]) or sum(synced) == 3,
            timeout=30,
        )
        with open_catalog(layout) as cat:
            assert cat.study(study).instance_count == 3
            old = {r["sop_instance_uid"]: r for r in cat.instances(study)}[sop]

        proc = storescu(region.edge_port, [corrected])  # answered success: both kept at the edge
        assert proc.returncode == 0
        with open_journal(layout, "hub") as journal:
            _wait(lambda: any(c.sop_instance_uid == sop for c in journal.conflicts()))
            version = next(c for c in journal.conflicts() if c.sop_instance_uid == sop)
        new_bytes = version.path.read_bytes()
        assert version.received_sha256 != old["sha256"]

        result = sync_site("hub", str(region.path), str(data_dir))
        assert "1 corrected instance(s) registered" in str(result)
        store = open_store(layout)
        with open_catalog(layout) as cat:
            current = {r["sop_instance_uid"]: r for r in cat.instances(study)}
            assert current[sop]["sha256"] == version.received_sha256 and current[sop]["corrected"]
            assert current[sop]["object_key"] == keys.object_key(
                "hub", study, series, sop, conflict_sha256=version.received_sha256
            )
            # both versions in the center, never one over the other
            assert store.read_verified(old["object_key"], old["sha256"]) != new_bytes
            assert store.read_verified(current[sop]["object_key"], current[sop]["sha256"]) == new_bytes
            assert {r["sop_instance_uid"]: r["sha256"] for r in cat.instances(study, version="first")}[sop] == old[
                "sha256"
            ]
            records = cat.conflicts(study)
            assert len(records) == 1 and "sent again" in records[0].why
            assert cat.study(study).instance_count == 3  # a version is not another instance

            # the nightly verification reads both versions, and repairs the new one from the edge
            report = verify_center(cat, store, layout)
            assert report.instances_checked == 4 and not report.findings
            path = Path(store.root) / current[sop]["object_key"]
            os.chmod(path, 0o600)
            path.write_bytes(new_bytes[:-10] + b"\0" * 10)
            report = verify_center(cat, store, layout)
            assert [f.repaired for f in report.findings] == [True]
            assert store.read_verified(current[sop]["object_key"], current[sop]["sha256"]) == new_bytes

        again = sync_site("hub", str(region.path), str(data_dir))  # nothing registered twice
        assert "corrected" not in str(again)
        with open_catalog(layout) as cat:
            assert len(cat.conflicts(study)) == 1
    finally:
        os.killpg(edge.pid, signal.SIGTERM)
        edge.wait(30)
