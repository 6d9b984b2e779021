"""The example region end to end, as real processes against a real Prefect API (issues 6 and 7).

Deployments from prefect.yaml (`renkei deploy`), a Prefect worker per site and
the center's, the four edges (`renkei edge serve`), Orthanc as the hub's PACS.
Studies go in with dcmtk's storescu; nobody starts a flow run by hand.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import hl7
import hl7.mllp
import pytest
from helpers_parts import require_program
from helpers_region import layout_of, region_config

from renkei import peers, synth
from renkei.catalog.catalog import Catalog
from renkei.edge.center import split_part10
from renkei.regionrun import RegionRunner
from renkei.uids import derive_uid


def storescu(site, files: list[Path]) -> None:
    sender = site.pacs.ae_title if site.pacs else site.workstations[0].ae_title  # both may send to the edge
    peers.run_dcmtk(
        ["storescu", "-aet", sender, "-aec", site.edge.ae_title, site.edge.host, str(site.edge.port), *map(str, files)]
    )


def findscu(site, ws_ae: str, **keys: str) -> list[str]:
    """Study Instance UIDs a workstation finds at its site's edge (dcmtk's findscu)."""
    return peers.findscu_study_uids(site.edge.host, site.edge.port, ws_ae, site.edge.ae_title, **keys)


class E2E:
    def __init__(self, tmp: Path, api_url: str) -> None:
        self.tmp = tmp
        self.config_path = region_config(tmp, stable_age=1.0, pacs_at=("hub",))
        self.layout = layout_of(self.config_path, tmp / "renkei-data")
        self.config = self.layout.config
        self.runner = RegionRunner(self.config_path, self.layout, api_url)
        self.studies: dict[str, dict] = {}
        self.sent: dict[str, bytes] = {}

    def write(self, site_id: str, patients, seed: int = 21, **kw) -> list:
        result = synth.generate_site(
            self.config,
            site_id,
            patients,
            seed,
            self.tmp / "synth" / site_id,
            ct_slices=kw.pop("ct_slices", 3),
            size=kw.pop("size", 64),
            modalities=kw.pop("modalities", ("CT", "CR")),
        )
        for study in result.studies:
            self.studies[study.info.study_uid] = {
                "site": site_id,
                "info": study.info,
                "instances": study.instance_count,
                "files": study.files,
            }
            for f in study.files:
                data, _, _, sop = split_part10(f.read_bytes())
                self.sent[sop] = data
        return list(result.studies)

    def catalog(self) -> Catalog:
        return Catalog.from_layout(self.layout)

    def expected_grants(self, uid) -> set[str]:
        """A clinic study is granted to the hub; a hub study to the clinic that ordered it, if one did."""
        facts = self.studies[uid]
        if facts["site"] != "hub":
            return {"hub"}
        ref = self.config.site_for_name(facts["info"].requesting_service)
        return {ref} if ref else set()

    def granted(self, uids) -> bool:
        """Every study has its grants (applying the rules commits after the registration: a hub study's too)."""
        with self.catalog() as cat:
            return all(self.expected_grants(uid) <= {g.site for g in cat.grants(uid) if g.active} for uid in uids)

    def verified(self, uids) -> bool:
        with self.catalog() as cat:
            for uid in uids:
                row = cat.study(uid)
                if row is None or row.instance_count < self.studies[uid]["instances"]:
                    return False
                states = {l.holder: l.state for l in cat.locations(uid, include_instances=False)}
                if states.get("center") != "verified":
                    return False
        return True


@pytest.fixture(scope="module")
def region(tmp_path_factory, prefect_api):
    for program in ("storescu", "findscu", "movescu", "storescp"):
        require_program(program, "dcmtk")
    require_program("Orthanc", "orthanc")
    e2e = E2E(tmp_path_factory.mktemp("e2e"), prefect_api)
    e2e.runner.deploy()
    e2e.runner.start_pacs()
    e2e.runner.start_workers()
    e2e.runner.start_edges()
    try:
        yield e2e
    finally:
        e2e.runner.stop()


def test_studies_sent_to_every_edge_end_up_verified_and_granted(region: E2E) -> None:
    from prefect import get_client

    sent: dict[str, list] = {}
    for site_id, n in (("hub", 2), ("clinic-a", 2), ("clinic-b", 1), ("clinic-c", 2)):
        site = region.config.site(site_id)
        sent[site_id] = region.write(site_id, synth.site_patients(region.config, site_id, n, 21))
        storescu(site, [f for s in sent[site_id] for f in s.files])
    uids = [s.info.study_uid for studies in sent.values() for s in studies]
    region.runner.wait_until(lambda: region.verified(uids), 240, "every study verified in the center")
    # applying the rules commits right after registration: wait for it too, not only for the registration
    region.runner.wait_until(lambda: region.granted(uids), 120, "every study granted where the rules say")

    with region.catalog() as cat:
        for uid in uids:
            facts = region.studies[uid]
            row = cat.study(uid)
            assert row.origin_site == facts["site"] and row.instance_count == facts["instances"]
            grants = {g.site for g in cat.grants(uid) if g.active}
            assert grants == region.expected_grants(uid), (facts["site"], grants)
    # the hub finds the clinics' studies at its own edge; the clinics do not find each other's
    hub = region.config.site("hub")
    at_hub = set(findscu(hub, hub.workstations[0].ae_title))
    assert {u for u in uids if region.studies[u]["site"] != "hub"} <= at_hub
    for clinic_id in ("clinic-a", "clinic-b", "clinic-c"):
        clinic = region.config.site(clinic_id)
        found = set(findscu(clinic, clinic.workstations[0].ae_title))
        others = {u for u in uids if region.studies[u]["site"] not in ("hub", clinic_id)}
        assert not (found & others), f"{clinic_id} finds other clinics' studies"
        assert {u for u in uids if region.studies[u]["site"] == clinic_id} <= found

    # the runs and their artifacts, through the Prefect API
    async def runs_and_artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sync_site"])))
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="sync-")))
            return runs, arts

    def every_site_has_a_completed_run() -> bool:
        # the catalog shows a study verified at 'register'; the run goes on (apply the rules, deliver, artifact)
        runs, _ = asyncio.run(runs_and_artifacts())
        done = {
            r.parameters.get("site") for r in runs if r.state and r.state.is_completed() and r.deployment_id is not None
        }
        return done >= {"hub", "clinic-a", "clinic-b", "clinic-c"}

    region.runner.wait_until(every_site_has_a_completed_run, 120, "a completed sync_site run per site", every=1)
    runs, arts = asyncio.run(runs_and_artifacts())
    done = [r for r in runs if r.state and r.state.is_completed() and r.deployment_id is not None]
    # started by each site's edge (SyncTrigger tags its runs), not by a person or only by the schedule
    assert {t for r in done for t in r.tags if t.startswith("site:")} >= {
        "site:hub",
        "site:clinic-a",
        "site:clinic-b",
        "site:clinic-c",
    }
    keys = {a.key for a in arts}
    assert {"sync-hub", "sync-clinic-a", "sync-clinic-b", "sync-clinic-c"} <= keys
    assert any("studies" in str(a.data) and "MB/s" in str(a.data) for a in arts if a.key == "sync-clinic-a")


def test_remote_reading_of_a_goto_study_from_the_hub(region: E2E, tmp_path) -> None:
    """A hub workstation retrieves a clinic-c study that only the center holds; bytes as sent."""
    hub = region.config.site("hub")
    goto = [u for u, f in region.studies.items() if f["site"] == "clinic-c"]
    assert goto, "the first test sent clinic-c studies"
    study_uid = max(goto, key=lambda u: region.studies[u]["instances"])
    ws = hub.workstations[0]
    scp = peers.start_storescp(tmp_path / "ws1", ae_title=ws.ae_title, port=ws.port, extra_args=["+B"])
    try:
        started = time.monotonic()
        peers.run_dcmtk(
            [
                "movescu",
                "-S",
                "-aet",
                ws.ae_title,
                "-aec",
                hub.edge.ae_title,
                "-aem",
                ws.ae_title,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study_uid}",
                hub.edge.host,
                str(hub.edge.port),
            ]
        )
        elapsed = time.monotonic() - started
    finally:
        scp.stop()
    files = sorted(scp.workdir.glob("*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == region.studies[study_uid]["instances"]
    for f in files:
        data, _, _, sop = split_part10(f.read_bytes())
        assert data == region.sent[sop]
    print(f"remote reading: {len(files)} instances in {elapsed:.2f} s")


def test_instant_publish_of_a_hub_exam_to_its_referring_clinic(region: E2E) -> None:
    """A new hub exam ordered by the Goto clinic becomes retrievable at the Goto clinic's edge."""
    hub = region.config.site("hub")
    clinic = region.config.site("clinic-c")
    patient = synth.site_patients(region.config, "hub", 3, 22)[2]
    plan = synth.plan_study(
        hub,
        patient,
        study_uid=derive_uid("instant", 22),
        modality="CT",
        study_date=datetime.date(2026, 11, 29),
        study_time="101500",
        accession_number="ACC-INSTANT",
        study_id="9001",
        referring_physician="Goto^Doctor",
        requesting_service=clinic.institution_name,
        ct_slices=4,
        size=64,
    )
    study = synth.write_study(plan, region.tmp / "instant")
    region.studies[plan.info.study_uid] = {
        "site": "hub",
        "info": plan.info,
        "instances": study.instance_count,
        "files": study.files,
    }
    storescu(hub, study.files)
    sent_at = time.monotonic()
    ws = clinic.workstations[0]
    visible = region.runner.wait_until(
        lambda: plan.info.study_uid in findscu(clinic, ws.ae_title),
        180,
        "the hub exam to appear at the Goto clinic's edge",
    )

    def cached() -> bool:
        from renkei.edge.journal import Journal

        root = region.layout.edge_store("clinic-c") / "cache"
        if not (root / "journal.sqlite").exists():
            return False
        with Journal.open(root, readonly=True) as journal:
            return len(journal.instances(plan.info.study_uid)) == study.instance_count

    region.runner.wait_until(cached, 180, "the hub exam to be delivered into the Goto clinic's edge")
    pushed = time.monotonic() - sent_at
    print(
        f"instant publish: visible at clinic-c after {visible:.1f} s, in its edge after {pushed:.1f} s "
        f"(stable_age {hub.edge.stable_age:g} s)"
    )


def test_hl7_admission_starts_fetch_priors_into_the_hub_pacs(region: E2E) -> None:
    """ADT^A01 over MLLP, sent by the hl7 library's client: acknowledged, and the flow imports the priors."""
    from prefect import get_client

    port = peers.free_port()
    listener = region.runner.spawn(
        "hl7-hub", region.runner.renkei("hl7", "listen", "--site", "hub", "--port", str(port), "--lookback-years", "30")
    )
    peers.wait_for_port("127.0.0.1", port, 60, listener.process, "renkei hl7 listen")
    hub_patient = synth.site_patients(region.config, "hub", 2, 21)[0]  # shared with every clinic
    message = "\r".join(
        [
            "MSH|^~\\&|HIS|NAGASAKI|RENKEI|HUB|20261129120000||ADT^A01|ADM0001|P|2.5",
            "EVN|A01|20261129120000",
            f"PID|1||{hub_patient.patient_id}^^^{hub_patient.issuer_of_patient_id}||Yamada^Taro||19500101|M",
            "PV1|1|I|W3^301^1",
        ]
    )

    async def send() -> hl7.Message:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
        writer.writemessage(hl7.parse(message))
        await writer.drain()
        ack = await asyncio.wait_for(reader.readmessage(), 30)
        writer.close()
        return ack

    ack = asyncio.run(send())
    assert str(ack.segment("MSA")(1)) == "AA", str(ack)
    assert str(ack.segment("MSA")(2)) == "ADM0001"

    async def fetch_runs():
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["fetch_priors"])))

    def finished() -> bool:
        runs = asyncio.run(fetch_runs())
        return bool(runs) and all(r.state and r.state.is_final() for r in runs)

    region.runner.wait_until(finished, 240, "the fetch_priors run started by the admission to finish", every=1)
    runs = asyncio.run(fetch_runs())
    assert any(r.state.is_completed() and r.parameters["patient_id"] == hub_patient.patient_id for r in runs)
    orthanc = region.runner.pacs["hub"]
    with region.catalog() as cat:
        clinic_studies = [
            u
            for u, f in region.studies.items()
            if f["site"] != "hub" and f["info"].patient_name == hub_patient.person.patient_name
        ]
        assert clinic_studies
        expected = sum(cat.study(u).instance_count for u in clinic_studies)
    patient_ids = set()
    for oid in orthanc.instances():
        tags = orthanc.rest("GET", f"/instances/{oid}/simplified-tags")
        if tags["StudyInstanceUID"] in clinic_studies:
            patient_ids.add(tags["PatientID"])
    assert patient_ids == {hub_patient.patient_id}
    assert len([1 for oid in orthanc.instances()]) >= expected
