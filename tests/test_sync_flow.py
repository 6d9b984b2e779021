"""sync_site as a real flow run against a Prefect API: edge journal -> center -> catalog -> grants."""

from __future__ import annotations

import pytest
from helpers_region import synced_region

from renkei.runtime import open_catalog, open_journal, open_store


@pytest.fixture
def small_region(tmp_path, data_dir):
    region = synced_region(tmp_path, data_dir, {"hub": (2, 7), "clinic-c": (2, 7)}, sync=False, modalities=("CT", "CR"))
    return region.config_path, region.layout, region.written


def test_sync_site_uploads_registers_and_flags(prefect_api, small_region) -> None:
    from renkei.flows.sync_site import sync_site

    config_path, lay, written = small_region
    result = sync_site("clinic-c", str(config_path), str(lay.data_dir))
    expected = written["clinic-c"]
    assert result["studies"] == len(expected.studies)
    assert result["instances"] == expected.instance_count
    with open_journal(lay, "clinic-c") as journal:
        assert journal.summary().upload_states["verified"] == expected.instance_count
    store = open_store(lay)
    with open_catalog(lay) as catalog:
        for study in expected.studies:
            row = catalog.study(study.info.study_uid)
            assert row is not None and row.instance_count == study.instance_count
            assert {l.holder: l.state for l in catalog.locations(study.info.study_uid, False)}["center"] == "verified"
            for inst in catalog.instances(study.info.study_uid):
                assert store.sha256_of(inst["object_key"]) == inst["sha256"]
            assert catalog.may_see("hub", study.info.study_uid)
            assert not catalog.may_see("clinic-a", study.info.study_uid)
    # a second run finds nothing to do and duplicates nothing
    again = sync_site("clinic-c", str(config_path), str(lay.data_dir))
    assert again["studies"] == 0
    with open_catalog(lay) as catalog:
        assert sum(r.instance_count for r in catalog.visible_studies("clinic-c")) == expected.instance_count
