"""Edge retention: only studies whose center copy is verified are dropped, oldest first."""

from __future__ import annotations

import time

from helpers_region import layout_of, put_into_edge, region_config

from renkei import synth, transfer
from renkei.retention import apply_retention
from renkei.runtime import open_catalog, open_journal, open_store


def test_retention_drops_only_verified_studies_and_only_above_the_threshold(tmp_path, data_dir) -> None:
    config_path = region_config(
        tmp_path,
        stable_age=0.1,
        pacs_at=(),
        edit=lambda raw: [
            s["edge"].__setitem__("retention", {"min_age_days": 0, "disk_usage_threshold": 0.5}) for s in raw["sites"]
        ],
    )
    lay = layout_of(config_path, data_dir)
    first = synth.write_single_study(tmp_path / "s", "CT", slices=3, size=32, seed=1)
    second = synth.write_single_study(tmp_path / "s", "CT", slices=3, size=32, seed=2)
    put_into_edge(lay, "clinic-a", first.files)
    time.sleep(0.2)
    with open_journal(lay, "clinic-a") as journal, open_catalog(lay) as catalog:
        uids = transfer.studies_to_sync(journal, 0.1)
        assert uids == [first.info.study_uid]
        transfer.upload_study(journal, open_store(lay), "clinic-a", uids[0])
        transfer.register_studies(journal, catalog, "clinic-a", uids)
    put_into_edge(lay, "clinic-a", second.files)  # received, not uploaded yet

    with open_catalog(lay) as catalog:
        # below the threshold: nothing happens
        calm = apply_retention(lay, catalog, "clinic-a", usage=lambda _p: 0.3)
        assert calm.removed == ()
        # above it: the verified study goes, the pending one stays whatever the pressure
        levels = iter([0.9, 0.9, 0.9])
        full = apply_retention(lay, catalog, "clinic-a", usage=lambda _p: next(levels, 0.9))
        assert full.removed == (first.info.study_uid,) and full.kept_unverified == 1
        assert {l.holder: l.state for l in catalog.locations(first.info.study_uid, False)}["edge:clinic-a"] == "removed"
    with open_journal(lay, "clinic-a") as journal:
        assert all(not e.local for e in journal.instances(first.info.study_uid))
        assert all(e.local and e.path.exists() for e in journal.instances(second.info.study_uid))
    assert not any(
        f.exists() for f in (lay.edge_store("clinic-a") / "instances").rglob("*.dcm") if first.info.study_uid in str(f)
    )


def test_retention_keeps_the_last_copy_when_the_center_lost_it(tmp_path, data_dir) -> None:
    """The catalog still says verified, but the center's object is gone: the edge's copy is the last one."""
    config_path = region_config(
        tmp_path,
        stable_age=0.1,
        pacs_at=(),
        edit=lambda raw: [
            s["edge"].__setitem__("retention", {"min_age_days": 0, "disk_usage_threshold": 0.5}) for s in raw["sites"]
        ],
    )
    lay = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "s", "CT", slices=3, size=32, seed=5)
    put_into_edge(lay, "clinic-a", study.files)
    time.sleep(0.2)
    store = open_store(lay)
    with open_journal(lay, "clinic-a") as journal, open_catalog(lay) as catalog:
        uid = transfer.studies_to_sync(journal, 0.1)[0]
        transfer.upload_study(journal, store, "clinic-a", uid)
        transfer.register_studies(journal, catalog, "clinic-a", [uid])
        lost = catalog.instances(uid)[0]["object_key"]
    store.delete(lost)
    with open_catalog(lay) as catalog:
        result = apply_retention(lay, catalog, "clinic-a", usage=lambda _p: 0.9)
        assert result.removed == () and result.kept_unverified == 1
    with open_journal(lay, "clinic-a") as journal:
        assert all(e.local and e.path.exists() for e in journal.instances(uid))
