"""The exhaustive access matrix on the example region (issue 5).

Every site x every study x every path — C-FIND at PATIENT, STUDY, SERIES and
IMAGE level from the site's workstation AE, C-MOVE to that workstation, C-GET,
and the catalog API — matches the source system's policy, after the automatic
grants, after a manual publish, after an unpublish and after a consent
withdrawal. The expectation is written here from the rules themselves, not
from the decision function under test.

The destination dimension: every calling site x every study x every C-MOVE
destination of the region (each workstation, each PACS, each edge) through the
same phases. An edge sends only to its own site's nodes, and only what that
site may see; anything else is refused (0xA801, or 0x0124 when the caller may
not see the study), nothing arrives anywhere, no edge files another site's
study as its own, and the refusal is in the audit chain. No edge accepts an
association from another site's edge.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from helpers_dicom import Workstation
from helpers_parts import require_program
from helpers_region import LONG_AGO, layout_of, put_into_edge, region_config
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from renkei import peers, synth
from renkei.catalog.catalog import Catalog
from renkei.edge.center import split_part10
from renkei.edge.journal import Journal
from renkei.regional_edge import RegionalEdge
from renkei.sharing import Sharing

NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
AUDIT_WAIT = 5.0  # seconds the edges' audit buffers get to reach the catalog


class Region:
    """Four edges wired into the region, a storescp per site's workstation, the facts of each study."""

    def __init__(self, tmp: Path, prefect_api: str) -> None:
        from renkei.flows.sync_site import sync_site

        self.config_path = region_config(tmp, stable_age=0.2)  # every site with its PACS
        self.layout = layout_of(self.config_path, tmp / "renkei-data")
        self.config = self.layout.config
        self.studies: dict[str, dict] = {}  # study_uid -> facts
        self.files: dict[str, bytes] = {}  # sop_instance_uid -> dataset bytes as sent
        self.study_of: dict[str, str] = {}  # sop_instance_uid -> study_uid
        self.sample: dict[str, Path] = {}  # site -> one of its instance files
        # a listener for every workstation and PACS AE title of the region: whatever is sent to
        # any of them is received and seen (unique file names: a second arrival is a new file)
        self.listeners: dict[str, peers.Peer] = {}
        for s in self.config.sites:
            for node in (*s.workstations, *([s.pacs] if s.pacs else [])):
                self.listeners[node.ae_title] = peers.start_storescp(
                    tmp / "nodes" / node.ae_title / "out",
                    ae_title=node.ae_title,
                    port=node.port,
                    extra_args=["+B", "+uf"],
                )
        counts = {"hub": 2, "clinic-a": 1, "clinic-b": 1, "clinic-c": 1}
        for site, n in counts.items():
            result = synth.generate_site(
                self.config, site, n, 9, tmp / "synth" / site, ct_slices=2, size=32, modalities=("CT",)
            )
            put_into_edge(self.layout, site, result.files, received_ago=LONG_AGO)
            for study in result.studies:
                self.studies[study.info.study_uid] = {
                    "origin": site,
                    "patient_id": study.info.patient_id,
                    "instances": study.instance_count,
                    "referring": self.config.site_for_name(study.info.requesting_service),
                }
            for f in result.files:
                data, _, _, sop = split_part10(f.read_bytes())
                self.files[sop] = data
                self.study_of[sop] = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            self.sample[site] = result.files[0]
        for site in counts:
            sync_site(site, str(self.config_path), str(self.layout.data_dir))
        self.edges = [RegionalEdge(self.layout, s.id).start() for s in self.config.sites]
        self.scps = {s.id: self.listeners[s.workstations[0].ae_title] for s in self.config.sites}
        self.catalog = Catalog.from_layout(self.layout)
        self.sharing = Sharing(self.config, self.catalog)
        # acts of people, applied phase by phase
        self.published: set[tuple[str, str]] = set()
        self.unpublished: set[tuple[str, str]] = set()
        self.withdrawn: set[tuple[str, str]] = set()

    def close(self) -> None:
        for edge in self.edges:
            edge.stop()
        for scp in self.listeners.values():
            scp.stop()
        self.catalog.close()

    def workstation(self, site_id: str) -> Workstation:
        site = self.config.site(site_id)
        return Workstation(site.workstations[0].ae_title, site.edge.host, site.edge.port, site.edge.ae_title)

    def edge_of(self, site_id: str) -> RegionalEdge:
        return next(e for e in self.edges if e.site_id == site_id)

    def arrivals(self) -> dict[str, set[Path]]:
        """The files each listener (by AE title) holds now."""
        return {ae: set(peer.workdir.glob("*.dcm")) for ae, peer in self.listeners.items()}

    def local_studies(self, site_id: str) -> set[str]:
        """The studies in a site edge's own store (its journal; the cache of other sites' copies apart)."""
        journal = Journal.open(self.layout.edge_store(site_id), readonly=True)
        try:
            return set(journal.iter_study_uids())
        finally:
            journal.close()

    def last_audit_event(self) -> int:
        for edge in self.edges:
            edge.audit.flush()
        events = self.catalog.audit()
        return events[-1].event_no if events else 0

    def expected(self, site: str, study_uid: str) -> bool:
        """The source system's rules, with the people's acts of the test so far."""
        facts = self.studies[study_uid]
        origin = facts["origin"]
        if origin == site or (study_uid, site) in self.published:
            return True
        if (study_uid, site) in self.unpublished or (origin, facts["patient_id"]) in self.withdrawn:
            return False
        if self.config.site(origin).role == "clinic":
            return self.config.site(site).role == "hub"  # clinics -> hub, never clinic -> clinic
        return facts["referring"] == site  # hub exam -> the clinic that ordered it


@pytest.fixture(scope="module")
def region(tmp_path_factory, prefect_api):
    require_program("storescp", "dcmtk")
    r = Region(tmp_path_factory.mktemp("matrix"), prefect_api)
    try:
        yield r
    finally:
        r.close()


def matrix_problems(region: Region, phase: str) -> list[str]:
    """Every site x every study x C-FIND (4 levels), C-MOVE to its workstation, C-GET, the catalog API."""
    problems: list[str] = []
    sharing = Sharing(region.config, region.catalog)
    for site in region.config.sites:
        ws = region.workstation(site.id)
        dest = site.workstations[0].ae_title
        try:
            catalog_view = {r.study_uid for r in region.catalog.visible_studies(site.id)}
            page = {r.study_uid for r in region.catalog.studies_page(visible_to=site.id, limit=10_000)[1]}
            found_studies = {d.StudyInstanceUID for d in ws.find("STUDY", StudyInstanceUID="")}
            patients = {d.PatientID for d in ws.find("PATIENT", model="patient", PatientID="")}
            for uid, facts in region.studies.items():
                want = region.expected(site.id, uid)
                where = f"{phase}: {site.id} x {facts['origin']} study {uid[-8:]}"
                if (uid in catalog_view) != want:
                    problems.append(f"{where}: catalog API says {uid in catalog_view}, policy {want}")
                # the one rule's two renderings: the SQL relation (lists, pages, may_see) and the decision
                decided = sharing.decide(site.id, uid).allowed
                may_see = region.catalog.may_see(site.id, uid)
                if not (decided == (uid in page) == may_see == want):
                    problems.append(f"{where}: decide {decided}, page {uid in page}, may_see {may_see}, policy {want}")
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
                problems.append(
                    f"{phase}: {site.id} C-FIND PATIENT lists {sorted(patients)}, policy {sorted(want_patients)}"
                )
        finally:
            ws.close()
    return problems


def destination_problems(region: Region, phase: str) -> list[str]:
    """Every calling site (its first workstation) x every study x every C-MOVE destination AE of the region.

    Expected from the rules: a study reaches a destination only when the destination is a node of the
    called edge's own site (its PACS or a workstation; never an edge) and that site may see the study.
    Otherwise: 0x0124 when only the caller is refused (an own-site destination of a study its site may
    not see), 0xA801 when only the destination is wrong, either when both are; nothing arrives at any
    listener, no edge's own store gains a study of another site, and a denied "retrieve" audit event is
    written (with the destination AE title under "destination" when the answer is 0xA801).
    """
    sites = region.config.sites
    node_site = {n.ae_title: s.id for s in sites for n in (*s.workstations, *([s.pacs] if s.pacs else []))}
    destinations = [*node_site, *(s.edge.ae_title for s in sites)]
    before = region.arrivals()
    audit_from = region.last_audit_event() + 1
    results: dict[tuple[str, str, str], object] = {}  # (site, study_uid, destination) -> Retrieval or error

    def call(site_id: str) -> None:
        ws = region.workstation(site_id)
        try:
            for uid in region.studies:
                for dest in destinations:
                    try:
                        results[(site_id, uid, dest)] = ws.move(uid, dest)
                    except Exception as exc:  # noqa: BLE001 - reported as a problem of this combination
                        results[(site_id, uid, dest)] = exc
        finally:
            ws.close()

    threads = [threading.Thread(target=call, args=(s.id,), name=f"move-from-{s.id}") for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    problems: list[str] = []
    want_arrivals: Counter[tuple[str, str]] = Counter()
    denied_wanted: Counter[tuple[str, str]] = Counter()  # (caller AE, study) -> refused moves
    wrong_destinations: dict[tuple[str, str], set[str]] = {}  # (caller AE, study) -> 0xA801 destinations
    for (site_id, uid, dest), moved in results.items():
        facts = region.studies[uid]
        caller_ae = region.config.site(site_id).workstations[0].ae_title
        where = f"{phase}: {caller_ae} C-MOVE of {facts['origin']} study {uid[-8:]} to {dest}"
        caller_may = region.expected(site_id, uid)
        own_node = node_site.get(dest) == site_id
        dest_may = own_node and region.expected(node_site[dest], uid)
        if isinstance(moved, Exception):
            problems.append(f"{where}: {type(moved).__name__}: {moved}")
            continue
        status = moved.status
        if caller_may and dest_may:
            want_arrivals[(dest, uid)] += facts["instances"]
            if status != 0 or moved.completed != facts["instances"]:
                problems.append(f"{where}: should arrive, answered 0x{status:04X} with {moved.completed} sent")
            continue
        if caller_may:  # only the destination is wrong
            allowed_statuses = {MOVE_DESTINATION_UNKNOWN}
        elif own_node:  # only the caller (its site may not see it; the destination is its own node)
            allowed_statuses = {NOT_AUTHORIZED}
        else:  # both
            allowed_statuses = {NOT_AUTHORIZED, MOVE_DESTINATION_UNKNOWN}
        if status not in allowed_statuses or moved.completed:
            want = " or ".join(f"0x{x:04X}" for x in sorted(allowed_statuses))
            problems.append(
                f"{where}: should be refused with {want}, answered 0x{status:04X} with {moved.completed} sent"
            )
        denied_wanted[(caller_ae, uid)] += 1
        if status == MOVE_DESTINATION_UNKNOWN or allowed_statuses == {MOVE_DESTINATION_UNKNOWN}:
            wrong_destinations.setdefault((caller_ae, uid), set()).add(dest)

    # what arrived where: exactly the allowed moves, nothing else (listed once, after all moves)
    after = region.arrivals()
    got_arrivals: Counter[tuple[str, str]] = Counter()
    for ae, files in after.items():
        for path in files - before[ae]:
            try:
                sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{phase}: unreadable arrival {path.name} at {ae}: {exc}")
                continue
            got_arrivals[(ae, region.study_of.get(sop, f"unknown:{sop}"))] += 1
    for key in sorted(set(want_arrivals) | set(got_arrivals)):
        if want_arrivals[key] != got_arrivals[key]:
            ae, uid = key
            origin = region.studies.get(uid, {}).get("origin", "?")
            problems.append(
                f"{phase}: {ae} received {got_arrivals[key]} instance(s) of {origin} study "
                f"{uid[-8:]}, expected {want_arrivals[key]}"
            )

    # no edge files another site's study in its own store
    for s in sites:
        strangers = {u for u in region.local_studies(s.id) if region.studies.get(u, {}).get("origin") != s.id}
        for uid in sorted(strangers):
            origin = region.studies.get(uid, {}).get("origin", "?")
            problems.append(f"{phase}: edge {s.edge.ae_title}'s own store holds {origin} study {uid[-8:]}")

    # every refusal is in the audit chain
    deadline = time.monotonic() + AUDIT_WAIT
    while True:
        for edge in region.edges:
            edge.audit.flush()
        events = [
            e for e in region.catalog.audit(event_from=audit_from) if e.action == "retrieve" and e.outcome == "denied"
        ]
        denied = Counter((e.actor, e.study_uid) for e in events)
        audited_destinations: dict[tuple[str, str], set[str]] = {}
        for e in events:
            audited_destinations.setdefault((e.actor, e.study_uid), set()).add(str((e.detail or {}).get("destination")))
        missing = [k for k, n in denied_wanted.items() if denied[k] < n]
        unnamed = {k: d - audited_destinations.get(k, set()) for k, d in wrong_destinations.items()}
        unnamed = {k: d for k, d in unnamed.items() if d}
        if (not missing and not unnamed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the edges' audit buffers write every 0.5 s; no event to wait on
    for caller_ae, uid in sorted(missing):
        problems.append(
            f"{phase}: {denied_wanted[(caller_ae, uid)]} C-MOVE(s) of study {uid[-8:]} by {caller_ae} "
            f"refused, {denied[(caller_ae, uid)]} denied retrieve audit event(s)"
        )
    for (caller_ae, uid), dests in sorted(unnamed.items()):
        problems.append(
            f"{phase}: no denied retrieve audit event of study {uid[-8:]} by {caller_ae} names "
            f"destination {', '.join(sorted(dests))}"
        )
    return problems


def check_matrix(region: Region, phase: str) -> list[str]:
    """Both dimensions of one phase; the problems found (asserted once, after every phase)."""
    return matrix_problems(region, phase) + destination_problems(region, phase)


def _pick(region: Region, origin: str, referred: bool) -> str:
    return next(u for u, f in region.studies.items() if f["origin"] == origin and bool(f["referring"]) == referred)


def test_matrix_through_every_phase(region: Region) -> None:
    problems = check_matrix(region, "automatic grants")

    private = _pick(region, "hub", referred=False)
    region.sharing.publish(private, ["clinic-c"], "dr-test", "consultation")
    region.published.add((private, "clinic-c"))
    problems += check_matrix(region, "after publish")

    referred = _pick(region, "hub", referred=True)
    clinic = region.studies[referred]["referring"]
    region.sharing.unpublish(referred, [clinic], "dr-test", "wrong patient")
    region.unpublished.add((referred, clinic))
    problems += check_matrix(region, "after unpublish")

    b_patient = next(f["patient_id"] for f in region.studies.values() if f["origin"] == "clinic-b")
    region.sharing.withdraw_consent("clinic-b", b_patient, "", "clerk", "patient request")
    region.withdrawn.add(("clinic-b", b_patient))
    problems += check_matrix(region, "after consent withdrawal")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)

    # refusals are audited, as are the cross-site answers and retrievals
    for edge in region.edges:
        edge.audit.flush()
    events = region.catalog.audit()
    denied = [e for e in events if e.action == "retrieve" and e.outcome == "denied"]
    assert denied and all(
        e.actor in {ws.ae_title for s in region.config.sites for ws in s.workstations} for e in denied
    )
    assert any(e.action == "find" and e.actor_site == "hub" and e.target_site == "clinic-c" for e in events)
    assert region.catalog.verify_audit().ok


def test_a_published_hub_study_held_only_in_the_center_arrives_byte_for_byte(region: Region) -> None:
    """clinic-a's workstation retrieves a hub study published to clinic-a: the edge fetches it from the center."""
    hub_private = [u for u, f in region.studies.items() if f["origin"] == "hub" and not f["referring"]]
    study_uid = hub_private[-1]
    edge_a = next(e for e in region.edges if e.site_id == "clinic-a")
    assert edge_a.cache.journal.instances(study_uid) == []  # nothing of it at clinic-a yet
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
    assert len(edge_a.cache.journal.instances(study_uid)) == moved.completed  # kept in the cache


def test_no_edge_accepts_another_sites_edge(region: Region) -> None:
    """An association to each edge calling as another site's edge is rejected; a C-STORE from it stores nothing.

    The edge's own workstation is accepted on the same port (the control).
    """
    problems: list[str] = []
    for site in region.config.sites:
        for caller in [
            region.config.site(site.id).workstations[0].ae_title,
            *(o.edge.ae_title for o in region.config.sites if o.id != site.id),
        ]:
            own = caller == site.workstations[0].ae_title
            ds = pydicom.dcmread(region.sample[region.config.site_of_ae(caller).id])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ae = AE(ae_title=caller)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(Verification)
            ae.add_requested_context(CTImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
            assoc = ae.associate(site.edge.host, site.edge.port, ae_title=site.edge.ae_title)
            where = f"{caller} -> {site.edge.ae_title}"
            if own:
                if not assoc.is_established:
                    problems.append(f"{where}: the site's own workstation was not accepted (control)")
                else:
                    assoc.release()
                continue
            if assoc.is_established:
                problems.append(f"{where}: association accepted")
                status = assoc.send_c_store(ds)
                answer = f"0x{status.Status:04X}" if status is not None and "Status" in status else "no answer"
                assoc.release()
                problems.append(f"{where}: C-STORE answered {answer}")
            elif not assoc.is_rejected:
                problems.append(f"{where}: association neither established nor rejected (aborted?)")
            if str(ds.StudyInstanceUID) in region.local_studies(site.id):
                problems.append(f"{where}: the instance is in {site.edge.ae_title}'s own store")
    assert not problems, "\n".join(problems)
