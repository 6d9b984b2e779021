"""A study of another site in an edge's own store is visible there only while granted.

A clinic workstation that received a hub study (published to the clinic) may
C-STORE it into its own edge. That copy is not the clinic's study: the edge
asks the catalog for its origin (`StudyOrigins`), so after the grant is taken
back the study is neither listed nor retrievable at the clinic, whatever its
local store holds. Real parts: the edge on a free port, the catalog and
objects of a local-folder center, pynetdicom as the workstation.
"""

from __future__ import annotations

import time

from edge.center import StudyOrigins
from edge.region import RegionalEdge
from renkei import synth, transfer
from renkei.errors import CatalogError
from renkei.runtime import open_catalog, open_journal, open_store
from renkei.sharing import Sharing

from helpers_dicom import Workstation
from helpers_region import layout_of, put_into_edge, region_config

NOT_AUTHORIZED = 0x0124


def test_study_origins_keep_the_last_answer_through_an_outage() -> None:
    answers = {"1.2.3": "hub", "1.2.4": None}
    down = False

    def origin_of(uid: str) -> str | None:
        if down:
            raise CatalogError("catalog unreachable")
        return answers[uid]

    origins = StudyOrigins("clinic-a", origin_of, ttl=0)
    assert not origins.is_own("1.2.3")        # registered as the hub's
    assert origins.is_own("1.2.4")            # not registered: the site's own (not yet uploaded)
    down = True
    assert not origins.is_own("1.2.3")        # the last answer is kept
    assert origins.is_own("1.2.5")            # never looked up: served as the site's own


def test_a_hub_study_stored_back_at_a_clinic_is_visible_only_while_granted(tmp_path, data_dir) -> None:
    config_path = region_config(tmp_path, stable_age=0.2, pacs_at=())
    layout = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=2, size=32, seed=71)
    uid = study.info.study_uid
    put_into_edge(layout, "hub", study.files)
    time.sleep(0.3)
    store = open_store(layout)
    with open_catalog(layout) as catalog:
        with open_journal(layout, "hub") as journal:
            assert transfer.upload_study(journal, store, "hub", uid).ok
            assert transfer.register_studies(journal, catalog, "hub", [uid]).studies == (uid,)
        sharing = Sharing(layout.config, catalog)
        sharing.publish(uid, ["clinic-a"], "tester", "consultation")
        # the clinic's workstation got it, then C-STOREd it into its own edge
        put_into_edge(layout, "clinic-a", study.files, calling_ae="CLA_WS")

        site = layout.config.site("clinic-a")
        edge = RegionalEdge(layout, "clinic-a").start()
        workstation = Workstation("CLA_WS", site.edge.host, edge.server.port, site.edge.ae_title)
        try:
            listed = workstation.find("STUDY", StudyInstanceUID=uid)
            assert [str(a.StudyInstanceUID) for a in listed] == [uid]
            assert workstation.get(uid).completed == study.instance_count

            sharing.unpublish(uid, ["clinic-a"], "tester", "consultation over")
            deadline = time.monotonic() + 10
            while workstation.find("STUDY", StudyInstanceUID=uid) and time.monotonic() < deadline:
                time.sleep(0.2)  # the edge's catalog refreshes on its own schedule
            assert workstation.find("STUDY", StudyInstanceUID=uid) == []
            assert workstation.find("PATIENT", model="patient", PatientID=study.info.patient_id) == []
            refused = workstation.get(uid)
            assert refused.status == NOT_AUTHORIZED and refused.completed == 0
        finally:
            workstation.close()
            edge.stop()
