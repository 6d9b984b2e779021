"""verify_backups as real flow runs: a flipped byte, a deleted and a truncated object are repaired
from the edge's copy; with no copy left the run fails."""

from __future__ import annotations

import os

import pytest
from helpers_region import synced_region

from renkei.runtime import open_catalog, open_store


@pytest.fixture
def synced(tmp_path, data_dir, prefect_api):
    region = synced_region(tmp_path, data_dir, {"clinic-a": (1, 3)}, ct_slices=4)
    return region.config_path, region.layout


def _objects(lay) -> list[dict]:
    with open_catalog(lay) as catalog:
        return [row for batch in catalog.iter_instances() for row in batch]


def test_damage_is_found_and_repaired_from_the_edge(synced) -> None:
    from renkei.flows.verify_backups import verify_backups

    config_path, lay = synced
    store = open_store(lay)
    objs = _objects(lay)
    assert len(objs) >= 4
    flipped, deleted, truncated = objs[0], objs[1], objs[2]
    path = store.path(flipped["object_key"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    os.unlink(store.path(deleted["object_key"]))
    with open(store.path(truncated["object_key"]), "r+b") as handle:
        handle.truncate(100)

    report = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir))
    kinds = {f["sop_instance_uid"]: f["kind"] for f in report["findings"]}
    assert kinds == {
        flipped["sop_instance_uid"]: "corrupt",
        deleted["sop_instance_uid"]: "missing",
        truncated["sop_instance_uid"]: "truncated",
    }
    assert report["repaired"] == 3 and report["unrecoverable"] == 0
    assert all(f["repaired_from"] == "clinic-a" for f in report["findings"])
    for row in objs:
        assert store.sha256_of(row["object_key"]) == row["sha256"]
    again = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir))
    assert again["findings"] == [] and again["instances_checked"] == len(objs)


def test_damage_without_an_edge_copy_fails_the_run(synced) -> None:
    from renkei.flows.verify_backups import UnrecoverableBackup, verify_backups

    config_path, lay = synced
    store = open_store(lay)
    victim = _objects(lay)[0]
    # the edge's copy is gone too (its file was lost)
    for f in lay.edge_store("clinic-a").rglob(f"{victim['sop_instance_uid']}*"):
        f.unlink()
    kept = open(store.path(victim["object_key"]), "rb").read()
    os.unlink(store.path(victim["object_key"]))
    state = verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir), return_state=True)
    assert state.is_failed()
    with pytest.raises(UnrecoverableBackup):
        state.result()
    with open_catalog(lay) as catalog:
        locs = {(l.sop_instance_uid, l.holder): l.state for l in catalog.locations(victim["study_uid"])}
    assert locs[(victim["sop_instance_uid"], "center")] == "missing"
    assert locs[(None, "center")] == "corrupt"
    # someone puts the object back by hand: the next night clears it and the study is verified again
    with open(store.path(victim["object_key"]), "wb") as handle:
        handle.write(kept)
    assert verify_backups(full=True, config=str(config_path), data_dir=str(lay.data_dir))["findings"] == []
    with open_catalog(lay) as catalog:
        locs = {(l.sop_instance_uid, l.holder): l.state for l in catalog.locations(victim["study_uid"])}
    assert locs[(victim["sop_instance_uid"], "center")] == "verified" and locs[(None, "center")] == "verified"
