"""sync_site notices a center that lost what the edge's journal calls verified (issue 12).

A wiped object store, a wiped center (objects and catalog), and a loss the edge can no
longer repair: each sync run checks a sample, escalates, and the same run uploads,
registers and flags again what it can; the hub sees the clinic's studies again.
"""

from __future__ import annotations

import random
import shutil
import time

import pytest
from helpers_region import synced_region

from renkei import center_check
from renkei.runtime import open_catalog, open_journal, open_store


@pytest.fixture
def synced(tmp_path, data_dir, prefect_api):
    """clinic-c's studies synced: in the center, registered, granted to the hub by the rules."""
    region = synced_region(tmp_path, data_dir, {"clinic-c": (2, 5)}, modalities=("CT", "CR"))
    hub_sees = region.visible_to("hub", "clinic-c")
    assert hub_sees, "the example region's rules grant clinic-c's studies to the hub"
    return region.config_path, region.layout, region.written["clinic-c"], hub_sees


def _objects(lay) -> list[str]:
    return list(open_store(lay).list("objects/"))


def _flow_state(config_path, lay):
    from renkei.flows.sync_site import sync_site

    return sync_site("clinic-c", str(config_path), str(lay.data_dir), return_state=True)


def test_a_clean_run_samples_and_finds_nothing(synced) -> None:
    config_path, lay, written, _ = synced
    state = _flow_state(config_path, lay)
    assert state.is_completed() and state.name == "Completed"
    check = state.result()["center_check"]
    assert 0 < check["sampled"] <= min(written.instance_count, center_check.SAMPLE_RANDOM + center_check.SAMPLE_RECENT)
    assert not check["escalated"] and check["sample_missing"] == 0 and check["sample_unregistered"] == 0


def test_wiped_object_store_is_uploaded_again(synced) -> None:
    config_path, lay, written, _ = synced
    store = open_store(lay)
    before = sorted(_objects(lay))
    shutil.rmtree(store.path("objects"))
    assert _objects(lay) == []
    state = _flow_state(config_path, lay)
    assert state.is_completed(), state.message
    assert "were missing from the center" in state.message
    result = state.result()
    check = result["center_check"]
    assert check["escalated"] and check["missing"] == check["reupload"] == written.instance_count
    assert check["lost"] == 0
    assert sorted(_objects(lay)) == before
    with open_catalog(lay) as catalog:
        for row in (r for batch in catalog.iter_instances() for r in batch):
            assert store.sha256_of(row["object_key"]) == row["sha256"]
    with open_journal(lay, "clinic-c") as journal:
        assert journal.summary().upload_states["verified"] == written.instance_count
    # the next run samples again and finds the center whole
    again = _flow_state(config_path, lay)
    assert again.name == "Completed" and not again.result()["center_check"]["escalated"]


def test_wiped_center_and_catalog_come_back_with_their_rule_grants(synced) -> None:
    config_path, lay, written, hub_sees = synced
    shutil.rmtree(lay.data_dir / "center")
    shutil.rmtree(lay.catalog_backup_url, ignore_errors=True)  # the whole center, its second location too
    state = _flow_state(config_path, lay)
    assert state.is_completed(), state.message
    check = state.result()["center_check"]
    assert check["escalated"] and check["reupload"] == written.instance_count and check["lost"] == 0
    with open_catalog(lay) as catalog:
        assert sum(r.instance_count for r in catalog.visible_studies("clinic-c")) == written.instance_count
        assert {uid for uid in hub_sees if catalog.may_see("hub", uid)} == hub_sees
        assert not any(catalog.may_see("clinic-a", s.info.study_uid) for s in written.studies)


def test_only_the_catalog_lost_registers_and_flags_again(synced) -> None:
    config_path, lay, written, hub_sees = synced
    objects = sorted(_objects(lay))
    shutil.rmtree(lay.data_dir / "center" / "catalog")
    shutil.rmtree(lay.catalog_backup_url, ignore_errors=True)
    state = _flow_state(config_path, lay)
    assert state.is_completed(), state.message
    check = state.result()["center_check"]
    assert check["escalated"] and check["missing"] == 0
    assert check["unregistered"] == check["reregister"] == written.instance_count
    assert sorted(_objects(lay)) == objects
    with open_catalog(lay) as catalog:
        assert {uid for uid in hub_sees if catalog.may_see("hub", uid)} == hub_sees


def test_lost_with_no_edge_copy_fails_the_run_and_is_not_rescanned_every_run(synced) -> None:
    from renkei.flows.sync_site import LostFromCenter

    config_path, lay, written, _ = synced
    victim = written.studies[0].info.study_uid
    with open_journal(lay, "clinic-c") as journal:
        dropped = len(journal.remove_local_copy(victim))  # as retention does
    shutil.rmtree(open_store(lay).path("objects"))
    state = _flow_state(config_path, lay)
    assert state.is_failed()
    with pytest.raises(LostFromCenter, match=f"^{dropped} instance"):
        state.result()
    with open_journal(lay, "clinic-c") as journal:
        # the others went up again; the lost ones stay 'verified' (nothing to upload them from)
        assert journal.summary().upload_states["verified"] == written.instance_count
    rest = written.instance_count - dropped
    assert len(_objects(lay)) == rest
    # the next sample finds only lost instances: the full check of an hour ago is reported, not redone
    with open_journal(lay, "clinic-c") as journal, open_catalog(lay) as catalog:
        again = center_check.check_site(
            journal, open_store(lay), catalog, "clinic-c", n_random=200, n_recent=0, rng=random.Random(7)
        )
    assert again.sample_missing > 0
    assert again.repeated and not again.escalated and again.lost == dropped


def test_sample_is_bounded_whatever_the_journal_size(tmp_path) -> None:
    """Sampling a journal of 200,000 verified instances costs index probes, not a scan."""
    import sqlite3

    from renkei.edge.journal import Journal

    root = tmp_path / "edge"
    Journal.open(root).close()
    con = sqlite3.connect(root / "journal.sqlite")
    con.executemany(
        "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, transfer_syntax_uid, path, size, sha256, "
        "received_at, upload_state, object_key) VALUES (?, ?, ?, '1.2.840.10008.1.2.1', ?, 10, ?, 0, 'verified', ?)",
        (
            (f"1.2.3.{i}", f"1.2.3.{i // 100}", f"1.2.3.{i // 10}", f"p{i}", "0" * 64, f"objects/x/{i}.dcm")
            for i in range(200_000)
        ),
    )
    con.commit()
    con.close()
    with Journal.open(root) as journal:
        started = time.perf_counter()
        sample = center_check.sample_verified(journal, rng=random.Random(1))
        elapsed = time.perf_counter() - started
    assert len(sample) == center_check.SAMPLE_RANDOM + center_check.SAMPLE_RECENT
    assert elapsed < 0.5, f"sampling took {elapsed:.3f} s"
