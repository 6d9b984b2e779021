"""The exhaustive access matrix on the example region (issue 5).

Every site x every study x every path — C-FIND at PATIENT, STUDY, SERIES and
IMAGE level from the site's workstation AE, C-MOVE to that workstation, C-GET,
and the catalog API — matches the source system's policy, after the automatic
grants, after a manual publish, after an unpublish and after a consent
withdrawal. The expectation is written here from the rules themselves, not
from the decision function under test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from catalog.catalog import Catalog
from edge.center import split_part10
from edge.region import RegionalEdge
from renkei import peers, synth
from renkei.sharing import Sharing

from conftest import require_program
from helpers_dicom import Workstation
from helpers_region import layout_of, put_into_edge, region_config

NOT_AUTHORIZED = 0x0124


class Region:
    """Four edges wired into the region, a storescp per site's workstation, the facts of each study."""

    def __init__(self, tmp: Path, prefect_api: str) -> None:
        from flows.sync_site import sync_site

        self.config_path = region_config(tmp, stable_age=0.2, pacs_at=())
        self.layout = layout_of(self.config_path, tmp / "renkei-data")
        self.config = self.layout.config
        self.studies: dict[str, dict] = {}   # study_uid -> facts
        self.files: dict[str, bytes] = {}    # sop_instance_uid -> dataset bytes as sent
        counts = {"hub": 2, "clinic-a": 1, "clinic-b": 1, "clinic-c": 1}
        for site, n in counts.items():
            result = synth.generate_site(self.config, site, n, 9, tmp / "synth" / site, ct_slices=2, size=32,
                                         modalities=("CT",))
            put_into_edge(self.layout, site, result.files)
            for study in result.studies:
                self.studies[study.info.study_uid] = {
                    "origin": site, "patient_id": study.info.patient_id, "instances": study.instance_count,
                    "referring": self.config.site_for_name(study.info.requesting_service)}
            for f in result.files:
                data, _, _, sop = split_part10(f.read_bytes())
                self.files[sop] = data
        time.sleep(0.3)
        for site in counts:
            sync_site(site, str(self.config_path), str(self.layout.data_dir))
        self.edges = [RegionalEdge(self.layout, s.id).start() for s in self.config.sites]
        self.scps = {}
        for s in self.config.sites:
            ws = s.workstations[0]
            self.scps[s.id] = peers.start_storescp(tmp / "ws" / s.id / "out", ae_title=ws.ae_title, port=ws.port,
                                                   extra_args=["+B"])
        self.catalog = Catalog.from_layout(self.layout)
        self.sharing = Sharing(self.config, self.catalog)
        # acts of people, applied phase by phase
        self.published: set[tuple[str, str]] = set()
        self.unpublished: set[tuple[str, str]] = set()
        self.withdrawn: set[tuple[str, str]] = set()

    def close(self) -> None:
        for edge in self.edges:
            edge.stop()
        for scp in self.scps.values():
            scp.stop()
        self.catalog.close()

    def workstation(self, site_id: str) -> Workstation:
        site = self.config.site(site_id)
        return Workstation(site.workstations[0].ae_title, site.edge.host, site.edge.port, site.edge.ae_title)

    def expected(self, site: str, study_uid: str) -> bool:
        """The source system's rules, with the people's acts of the test so far."""
        facts = self.studies[study_uid]
        origin = facts["origin"]
        if origin == site or (study_uid, site) in self.published:
            return True
        if (study_uid, site) in self.unpublished or (origin, facts["patient_id"]) in self.withdrawn:
            return False
        if self.config.site(origin).role == "clinic":
            return self.config.site(site).role == "hub"     # clinics -> hub, never clinic -> clinic
        return facts["referring"] == site                   # hub exam -> the clinic that ordered it


@pytest.fixture(scope="module")
def region(tmp_path_factory, prefect_api):
    require_program("storescp", "dcmtk")
    r = Region(tmp_path_factory.mktemp("matrix"), prefect_api)
    try:
        yield r
    finally:
        r.close()


def check_matrix(region: Region, phase: str) -> None:
    problems: list[str] = []
    for site in region.config.sites:
        ws = region.workstation(site.id)
        dest = site.workstations[0].ae_title
        try:
            catalog_view = {r.study_uid for r in region.catalog.visible_studies(site.id)}
            found_studies = {d.StudyInstanceUID for d in ws.find("STUDY", StudyInstanceUID="")}
            patients = {d.PatientID for d in ws.find("PATIENT", model="patient", PatientID="")}
            for uid, facts in region.studies.items():
                want = region.expected(site.id, uid)
                where = f"{phase}: {site.id} x {facts['origin']} study {uid[-8:]}"
                if (uid in catalog_view) != want:
                    problems.append(f"{where}: catalog API says {uid in catalog_view}, policy {want}")
                if (uid in found_studies) != want:
                    problems.append(f"{where}: C-FIND STUDY says {uid in found_studies}, policy {want}")
                series = ws.find("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="")
                if bool(series) != want:
                    problems.append(f"{where}: C-FIND SERIES found {len(series)}, policy {want}")
                images = ws.find("IMAGE", StudyInstanceUID=uid, SOPInstanceUID="")
                if (len(images) == facts["instances"]) != want or (not want and images):
                    problems.append(f"{where}: C-FIND IMAGE found {len(images)}, policy {want}")
                moved = ws.move(uid, dest)
                if want and (moved.status != 0 or moved.completed != facts["instances"]):
                    problems.append(f"{where}: C-MOVE 0x{moved.status:04X}, {moved.completed} sent")
                if not want and (moved.status != NOT_AUTHORIZED or moved.completed):
                    problems.append(f"{where}: C-MOVE of a study not granted answered 0x{moved.status:04X}")
                got = ws.get(uid)
                if want and (got.status != 0 or len(got.received) != facts["instances"]):
                    problems.append(f"{where}: C-GET 0x{got.status:04X}, {len(got.received)} received")
                if not want and (got.status != NOT_AUTHORIZED or got.received):
                    problems.append(f"{where}: C-GET of a study not granted answered 0x{got.status:04X}")
            # PATIENT level: a patient is listed when any of their studies is visible
            want_patients = {f["patient_id"] for u, f in region.studies.items() if region.expected(site.id, u)}
            if patients != want_patients:
                problems.append(f"{phase}: {site.id} C-FIND PATIENT lists {sorted(patients)}, "
                                f"policy {sorted(want_patients)}")
        finally:
            ws.close()
    assert not problems, "\n".join(problems)


def _pick(region: Region, origin: str, referred: bool) -> str:
    return next(u for u, f in region.studies.items() if f["origin"] == origin and bool(f["referring"]) == referred)


def test_matrix_through_every_phase(region: Region) -> None:
    check_matrix(region, "automatic grants")

    private = _pick(region, "hub", referred=False)
    region.sharing.publish(private, ["clinic-c"], "dr-test", "consultation")
    region.published.add((private, "clinic-c"))
    check_matrix(region, "after publish")

    referred = _pick(region, "hub", referred=True)
    clinic = region.studies[referred]["referring"]
    region.sharing.unpublish(referred, [clinic], "dr-test", "wrong patient")
    region.unpublished.add((referred, clinic))
    check_matrix(region, "after unpublish")

    b_patient = next(f["patient_id"] for f in region.studies.values() if f["origin"] == "clinic-b")
    region.sharing.withdraw_consent("clinic-b", b_patient, "", "clerk", "patient request")
    region.withdrawn.add(("clinic-b", b_patient))
    check_matrix(region, "after consent withdrawal")

    # refusals are audited, as are the cross-site answers and retrievals
    for edge in region.edges:
        edge.audit.flush()
    events = region.catalog.audit()
    denied = [e for e in events if e.action == "retrieve" and e.outcome == "denied"]
    assert denied and all(e.actor in {ws.ae_title for s in region.config.sites for ws in s.workstations}
                          for e in denied)
    assert any(e.action == "find" and e.actor_site == "hub" and e.target_site == "clinic-c" for e in events)
    assert region.catalog.verify_audit().ok


def test_a_published_hub_study_held_only_in_the_center_arrives_byte_for_byte(region: Region) -> None:
    """clinic-a's workstation retrieves a hub study published to clinic-a: the edge fetches it from the center."""
    hub_private = [u for u, f in region.studies.items() if f["origin"] == "hub" and not f["referring"]]
    study_uid = hub_private[-1]
    edge_a = next(e for e in region.edges if e.site_id == "clinic-a")
    assert edge_a.cache.journal.instances(study_uid) == []      # nothing of it at clinic-a yet
    region.sharing.publish(study_uid, ["clinic-a"], "dr-test", "second opinion")
    ws = region.workstation("clinic-a")
    out = region.scps["clinic-a"].workdir
    before = set(out.glob("*"))
    try:
        moved = ws.move(study_uid, region.config.site("clinic-a").workstations[0].ae_title)
    finally:
        ws.close()
    assert moved.status == 0 and moved.completed == region.studies[study_uid]["instances"]
    received = [p for p in out.glob("*") if p not in before]
    assert len(received) == moved.completed
    for path in received:
        data, _, _, sop = split_part10(path.read_bytes())
        assert data == region.files[sop], f"{sop} differs from what the hub's modality sent"
        assert pydicom.dcmread(path).StudyInstanceUID == study_uid
    assert len(edge_a.cache.journal.instances(study_uid)) == moved.completed   # kept in the cache
