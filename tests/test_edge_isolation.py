"""A study of another site in an edge's own store is visible there only while granted.

A clinic workstation that received a hub study (published to the clinic) may
C-STORE it into its own edge. That copy is not the clinic's study: the edge
asks the catalog for its origin (`StudyOrigins`), so after the grant is taken
back the study is neither listed nor retrievable at the clinic, whatever its
local store holds. Real parts: the edge on a free port, the catalog and
objects of a local-folder center, pynetdicom as the workstation.
"""

from __future__ import annotations

import subprocess
import sys

from helpers_dicom import Workstation
from helpers_region import LONG_AGO, layout_of, put_into_edge, region_config
from helpers_wait import eventually

from renkei import synth, transfer
from renkei.edge.center import StudyOrigins
from renkei.errors import CatalogError
from renkei.regional_edge import RegionalEdge
from renkei.runtime import open_catalog, open_journal, open_store
from renkei.sharing import Sharing

NOT_AUTHORIZED = 0x0124


def test_study_origins_keep_the_last_answer_through_an_outage() -> None:
    answers = {"1.2.3": "hub", "1.2.4": None}
    down = False

    def origin_of(uid: str) -> str | None:
        if down:
            raise CatalogError("catalog unreachable")
        return answers[uid]

    origins = StudyOrigins("clinic-a", origin_of, ttl=0)
    assert not origins.is_own("1.2.3")  # registered as the hub's
    assert origins.is_own("1.2.4")  # not registered: the site's own (not yet uploaded)
    down = True
    assert not origins.is_own("1.2.3")  # the last answer is kept
    assert origins.is_own("1.2.5")  # never looked up: served as the site's own


def test_a_hub_study_stored_back_at_a_clinic_is_visible_only_while_granted(tmp_path, data_dir) -> None:
    config_path = region_config(tmp_path, stable_age=0.2, pacs_at=())
    layout = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=2, size=32, seed=71)
    uid = study.info.study_uid
    put_into_edge(layout, "hub", study.files, received_ago=LONG_AGO)
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
            # the edge's catalog refreshes on its own schedule
            eventually(lambda: workstation.find("STUDY", StudyInstanceUID=uid) == [], 10, "the study hidden", 0.2)
            assert workstation.find("PATIENT", model="patient", PatientID=study.info.patient_id) == []
            refused = workstation.get(uid)
            assert refused.status == NOT_AUTHORIZED and refused.completed == 0
        finally:
            workstation.close()
            edge.stop()


def test_patient_data_on_disk_is_owner_only(tmp_path, data_dir) -> None:
    """The edge's files are 0600 and its folders 0700, and every file the `renkei` command writes is too."""
    config_path = region_config(tmp_path, pacs_at=())
    layout = layout_of(config_path, data_dir)
    study = synth.write_single_study(tmp_path / "synth", "CT", slices=2, size=32, seed=72)
    put_into_edge(layout, "clinic-a", study.files)
    store = layout.edge_store("clinic-a")
    instances = [p for p in (store / "instances").rglob("*") if p.is_file()]
    folders = [p for p in (store / "instances").rglob("*") if p.is_dir()]
    assert len(instances) == study.instance_count and folders
    assert {p.stat().st_mode & 0o777 for p in instances} == {0o600}
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o700}

    out = tmp_path / "written-by-the-cli"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "renkei.cli.main",
            "--config",
            str(config_path),
            "--data-dir",
            str(data_dir),
            "synth",
            "--site",
            "clinic-a",
            "--patients",
            "1",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and {p.stat().st_mode & 0o077 for p in written} == {0}


def test_patient_level_counts_only_the_studies_the_caller_may_see(tmp_path, data_dir) -> None:
    """A patient with one own study and one hidden study of another site: PATIENT level counts one."""
    config_path = region_config(tmp_path, stable_age=0.2, pacs_at=())
    layout = layout_of(config_path, data_dir)
    hub_study = synth.write_single_study(tmp_path / "hub", "CT", slices=2, size=32, seed=74)
    own = synth.write_single_study(
        tmp_path / "own",
        "CT",
        slices=3,
        size=32,
        seed=75,
        patient=hub_study.patient,
        study_date=synth.REFERENCE_DATE.replace(year=synth.REFERENCE_DATE.year - 1),
    )
    put_into_edge(layout, "hub", hub_study.files, received_ago=LONG_AGO)
    with open_catalog(layout) as catalog:
        with open_journal(layout, "hub") as journal:
            assert transfer.upload_study(journal, open_store(layout), "hub", hub_study.info.study_uid).ok
            assert transfer.register_studies(journal, catalog, "hub", [hub_study.info.study_uid]).studies
        put_into_edge(layout, "clinic-a", hub_study.files, calling_ae="CLA_WS")  # not granted to clinic-a
        put_into_edge(layout, "clinic-a", own.files, calling_ae="CLA_WS")  # clinic-a's own study
        site = layout.config.site("clinic-a")
        edge = RegionalEdge(layout, "clinic-a").start()
        workstation = Workstation("CLA_WS", site.edge.host, edge.server.port, site.edge.ae_title)
        try:
            (patient,) = workstation.find(
                "PATIENT",
                model="patient",
                PatientID=own.info.patient_id,
                NumberOfPatientRelatedStudies="",
                NumberOfPatientRelatedInstances="",
            )
            assert int(patient.NumberOfPatientRelatedStudies) == 1
            assert int(patient.NumberOfPatientRelatedInstances) == own.instance_count
        finally:
            workstation.close()
            edge.stop()
