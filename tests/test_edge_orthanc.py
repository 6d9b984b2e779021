"""Orthanc as the site PACS: it sends to the edge, the edge sends to it, the edge pulls from it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_wait import eventually
from pydicom.uid import generate_uid

from renkei import peers
from renkei.edge import scu
from renkei.edge.server import EdgeServer
from tests.conftest import require_program
from tests.helpers_edge import CHARSET_UTF8, Region, dataset_bytes, make_study, meta_of, write_region


@dataclass
class Site:
    region: Region
    orthanc: peers.OrthancPeer
    edge: EdgeServer


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_program("Orthanc", "orthanc")
    folder = tmp_path_factory.mktemp("orthanc-site")
    region = write_region(folder / "region")
    orthanc = peers.start_orthanc(
        folder / "orthanc",
        ae_title="ORTHANC",
        dicom_port=region.pacs_port,
        modalities={"edge": ("HUB_SVR", "127.0.0.1", region.edge_port)},
    )
    try:
        edge = EdgeServer(region.config, "hub", region.store_dir).start()
        try:
            yield Site(region, orthanc, edge)
        finally:
            edge.stop(timeout=10)
    finally:
        orthanc.stop()


def _upload(orthanc: peers.OrthancPeer, files: list[Path]) -> str:
    """Put files into Orthanc through its REST API; returns Orthanc's study id."""
    study_id = ""
    for path in files:
        answer = orthanc.rest("POST", "/instances", path.read_bytes())
        study_id = answer["ParentStudy"]  # type: ignore[index]
    return study_id


def _wait_instances(edge: EdgeServer, study_uid: str, count: int, timeout: float = 30) -> None:
    eventually(lambda: len(edge.journal.instances(study_uid)) >= count, timeout, f"{count} instances at the edge")


def test_orthanc_sends_a_study_to_the_edge(site: Site, tmp_path: Path) -> None:
    name = "Suzuki^Ichiro=鈴木^一郎=すずき^いちろう"
    study_uid, files = make_study(
        tmp_path / "s", 6, series=2, patient_id="OR1", patient_name=name, charset=CHARSET_UTF8
    )
    study_id = _upload(site.orthanc, files)
    site.orthanc.rest("POST", "/modalities/edge/store", {"Resources": [study_id], "Synchronous": True})
    _wait_instances(site.edge, study_uid, 6)
    entries = site.edge.journal.instances(study_uid)
    assert len(entries) == 6
    originals = {meta_of(f)["MediaStorageSOPInstanceUID"]: f for f in files}
    for entry in entries:
        assert dataset_bytes(entry.path) == dataset_bytes(originals[entry.instance.sop_instance_uid])
        assert entry.calling_ae == "ORTHANC"
    assert site.edge.journal.study_info(study_uid, "hub").patient_name == name


def test_the_edge_sends_a_study_to_orthanc(site: Site, tmp_path: Path) -> None:
    study_uid, files = make_study(tmp_path / "s", 5, patient_id="OR2")
    peers.run_dcmtk(
        ["storescu", "-aet", "STORESCU", "-aec", "HUB_SVR", "127.0.0.1", str(site.region.edge_port), *map(str, files)]
    )
    report = scu.send_study(site.region.config, "hub", site.region.store_dir, study_uid)
    assert (report.sent, report.failed, report.peer) == (5, 0, "ORTHANC")
    found = site.orthanc.rest("POST", "/tools/lookup", study_uid.encode())
    assert found and found[0]["Type"] == "Study"  # type: ignore[index]
    instances = site.orthanc.rest("GET", f"/studies/{found[0]['ID']}/instances")  # type: ignore[index]
    assert len(instances) == 5  # type: ignore[arg-type]
    for instance in instances:  # type: ignore[union-attr]
        raw = site.orthanc.rest("GET", f"/instances/{instance['ID']}/file")
        assert isinstance(raw, bytes)
        path = tmp_path / "back.dcm"
        path.write_bytes(raw)
        entry = site.edge.journal.entry(meta_of(path)["MediaStorageSOPInstanceUID"])
        assert entry is not None and dataset_bytes(path) == dataset_bytes(entry.path)


def test_the_edge_pulls_from_orthanc_by_study_patient_and_date(site: Site, tmp_path: Path) -> None:
    config = site.region.config
    uid_a, files_a = make_study(tmp_path / "a", 4, patient_id="PULL1", study_date="20250301")
    uid_b, files_b = make_study(tmp_path / "b", 3, patient_id="PULL2", study_date="20250415")
    uid_c, files_c = make_study(tmp_path / "c", 2, patient_id="PULL2", study_date="20240101")
    for files in (files_a, files_b, files_c):
        _upload(site.orthanc, files)
    report = scu.pull(config, "hub", study_uid=uid_a)
    assert report.studies == (uid_a,) and report.completed == 4 and not report.failures
    assert len(site.edge.journal.instances(uid_a)) == 4
    report = scu.pull(config, "hub", patient_id="PULL2")
    assert set(report.studies) == {uid_b, uid_c} and report.completed == 5
    report = scu.pull(config, "hub", date_from="20250401", date_to="20250430")
    assert report.studies == (uid_b,)
    for uid, files in ((uid_a, files_a), (uid_b, files_b), (uid_c, files_c)):
        stored = {e.instance.sop_instance_uid: e.path for e in site.edge.journal.instances(uid)}
        for path in files:
            assert dataset_bytes(stored[meta_of(path)["MediaStorageSOPInstanceUID"]]) == dataset_bytes(path)
    assert scu.echo(config, "hub") > 0
    with pytest.raises(Exception, match="no DICOM node"):
        scu.echo(config, "hub", "NOBODY")
    assert scu.find_studies(config, "hub", study_uid=generate_uid()) == []
