"""`renkei demo`: the source deployment at work on one machine, on embedded defaults.

A local Prefect server, the deployments of prefect.yaml, a worker per site and
the center's, the four edges, Orthanc as each site's PACS; synthetic studies
sent by C-STORE from each site; the pipeline; then the three clinical
scenarios (remote reading of a Goto study, priors for an admitted clinic
patient, instant publish of a hub exam to its referring clinic) and one
verification run; a summary that is read back from the catalog.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from renkei import peers, synth
from renkei.catalog.catalog import Catalog
from renkei.config import Layout, load_config
from renkei.edge.journal import JOURNAL_NAME, Journal
from renkei.errors import PeerError, RenkeiError, UsageError
from renkei.regionrun import RegionRunner
from renkei.uids import derive_uid

MARKER = ".renkei-demo"


@dataclass
class DemoOptions:
    data_dir: Path
    config_path: Path
    patients: int = 4
    seed: int = 1
    ct_slices: int = 100
    size: int = 512
    stable_age: float = 5.0
    prefect_port: int = 4200
    dashboard_port: int = 8080
    hl7_port: int = 2575
    fresh: bool = True


@dataclass
class DemoResult:
    sites: list[dict[str, Any]] = field(default_factory=list)
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    prefect_ui: str = ""
    dashboard: str = ""
    seconds: float = 0.0


class Demo:
    def __init__(self, options: DemoOptions, say: Callable[[str], None] = print) -> None:
        self.o = options
        self.started = time.monotonic()
        self._say = say
        self.result = DemoResult()
        self.runner: RegionRunner | None = None
        self.postgres: peers.PostgresPeer | None = None

    def say(self, text: str) -> None:
        self._say(f"[{time.monotonic() - self.started:6.1f} s] {text}")

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> Layout:
        data = self.o.data_dir
        if data.exists() and any(data.iterdir()):
            if not (data / MARKER).exists():
                raise UsageError(f"{data} holds data that is not a demo's; give the demo another --data-dir")
            if self.o.fresh:
                shutil.rmtree(data)
        data.mkdir(parents=True, exist_ok=True)
        (data / MARKER).write_text("made by renkei demo; removed by the next demo\n")
        raw = yaml.safe_load(Path(self.o.config_path).read_text(encoding="utf-8"))
        for site in raw["sites"]:
            site["edge"]["stable_age"] = self.o.stable_age
        config_path = data / "demo-region.yaml"
        config_path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
        layout = Layout(load_config(config_path), data.resolve())
        self.say(
            f"region {layout.config.region!r} from {self.o.config_path} (stable_age {self.o.stable_age:g} s "
            f"for the demo), state in {data}"
        )
        return layout

    def start(self, layout: Layout) -> RegionRunner:
        api = f"http://127.0.0.1:{self.o.prefect_port}/api"
        runner = RegionRunner(layout.data_dir / "demo-region.yaml", layout, api)
        self.runner = runner
        if peers.port_open("127.0.0.1", self.o.prefect_port):
            raise UsageError(f"port {self.o.prefect_port} is in use: stop what listens there, or pass --prefect-port")
        # PostgreSQL, as docs/operations.md runs the region's server: on SQLite, Prefect 3.9's services wait
        # on its one write lock for 60 s at a time on a busy machine (a sync requested, its run created
        # three minutes later); a throwaway cluster, gone when the demo stops
        db_env: dict[str, str] = {}
        try:
            self.postgres = peers.start_postgres()
            db_env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.postgres.url
            database = f"PostgreSQL on 127.0.0.1:{self.postgres.port}"
        except PeerError as exc:
            database = f"SQLite ({exc}; it is slow when the machine is busy)"
        self.say(f"starting the Prefect server on 127.0.0.1:{self.o.prefect_port}, its database {database} ...")
        server = runner.spawn(
            "prefect-server", runner.renkei("server", "--port", str(self.o.prefect_port)), extra_env=db_env
        )
        runner.wait_until(lambda: _healthy(api), 180, "the Prefect server's API", every=1)
        self.say("Prefect server up; creating work pools and deployments (prefect.yaml) ...")
        runner.deploy()
        # every site's PACS: a hub exam is delivered into the referring clinic's PACS too (deliver: pacs)
        self.say("starting Orthanc as each site's PACS, a worker per site and the center's, the four edges ...")
        runner.start_pacs()
        runner.start_workers()
        runner.start_edges()
        hl7 = runner.spawn(
            "hl7-hub",
            runner.renkei("hl7", "listen", "--site", "hub", "--port", str(self.o.hl7_port), "--lookback-years", "30"),
        )
        peers.wait_for_port("127.0.0.1", self.o.hl7_port, 60, hl7.process, "renkei hl7 listen")
        dash = runner.spawn(
            "dashboard",
            runner.renkei(
                "dashboard",
                "--port",
                str(self.o.dashboard_port),
                "--prefect-ui",
                f"http://127.0.0.1:{self.o.prefect_port}",
            ),
        )
        peers.wait_for_port("127.0.0.1", self.o.dashboard_port, 60, dash.process, "renkei dashboard")
        del server
        self.result.prefect_ui = f"http://127.0.0.1:{self.o.prefect_port}"
        self.result.dashboard = f"http://127.0.0.1:{self.o.dashboard_port}"
        return runner

    # ------------------------------------------------------------------ the pipeline
    def send_all(self, layout: Layout, runner: RegionRunner) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        synth_dir = layout.data_dir / "synthetic"
        for site in layout.config.sites:
            t0 = time.monotonic()
            result = synth.generate_site(
                layout.config,
                site.id,
                self.o.patients,
                self.o.seed,
                synth_dir / site.id,
                ct_slices=self.o.ct_slices,
                size=self.o.size,
            )
            sender = site.pacs.ae_title if site.pacs else site.workstations[0].ae_title
            sent_at = time.monotonic()
            proc = peers.run_dcmtk(
                [
                    "storescu",
                    "-aet",
                    sender,
                    "-aec",
                    site.edge.ae_title,
                    site.edge.host,
                    str(site.edge.port),
                    "+sd",
                    "+r",
                    str(synth_dir / site.id),
                ],
                timeout=900,
            )
            # what was asked is what arrived: an exit code 0 alone has meant "sent nothing" before
            got = _received(layout, site.id, [(st.info.study_uid, len(st.files)) for st in result.studies])
            if got != result.instance_count:
                raise RenkeiError(
                    f"{site.id}: storescu exited 0 but the edge received {got} of {result.instance_count} "
                    f"instances (storescu's last words: "
                    f"{proc.stderr.decode(errors='replace').strip().splitlines()[-1:] or ['none']}); "
                    "see the edge's log in the logs folder"
                )
            self.say(
                f"{site.id}: {len(result.studies)} synthetic studies, {result.instance_count} instances "
                f"({result.bytes_written / 1e6:.0f} MB) written in {sent_at - t0:.1f} s and sent by "
                f"C-STORE ({sender} -> {site.edge.ae_title}) in {time.monotonic() - sent_at:.1f} s"
            )
            out[site.id] = [s.info.study_uid for s in result.studies]
            self._sent_at = getattr(self, "_sent_at", {})
            self._sent_at[site.id] = (sent_at, time.monotonic())
        return out

    def wait_pipeline(self, layout: Layout, runner: RegionRunner, studies: dict[str, list[str]]) -> None:
        self.say("waiting: edges complete the studies, start sync_site on their workers; upload, register, rules ...")
        done: dict[str, float] = {}

        def all_verified() -> bool:
            with Catalog.from_layout(layout) as catalog:
                for site_id, uids in studies.items():
                    if site_id in done:
                        continue
                    if all(_verified(catalog, u) for u in uids):
                        done[site_id] = time.monotonic()
                        self.say(f"{site_id}: all {len(uids)} studies verified in the center")
            return len(done) == len(studies)

        runner.wait_until(all_verified, 600, "every study verified in the center", every=2)
        with Catalog.from_layout(layout) as catalog:
            totals = {t.site: t for t in catalog.totals()}
        for site_id in studies:
            t = totals.get(site_id)
            first_sent = self._sent_at[site_id][0]
            self.result.sites.append(
                {
                    "site": site_id,
                    "studies": t.studies if t else 0,
                    "instances": t.instances if t else 0,
                    "MB": round((t.bytes if t else 0) / 1e6, 1),
                    "seconds": round(done[site_id] - first_sent, 1),
                }
            )

    # ------------------------------------------------------------------ scenarios
    def remote_reading(self, layout: Layout, runner: RegionRunner) -> None:
        hub = layout.config.site("hub")
        with Catalog.from_layout(layout) as catalog:
            goto = max(
                (r for r in catalog.visible_studies("clinic-c") if r.origin_site == "clinic-c"),
                key=lambda r: r.instance_count,
            )
        ws = hub.workstations[0]
        out = layout.data_dir / "demo" / "hub-ws1"
        scp = peers.start_storescp(out, ae_title=ws.ae_title, port=ws.port, extra_args=["+B"])
        try:
            t0 = time.time()
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
                    f"StudyInstanceUID={goto.study_uid}",
                    hub.edge.host,
                    str(hub.edge.port),
                ],
                timeout=600,
            )
            t1 = time.time()
        finally:
            scp.stop()
        times = sorted(p.stat().st_mtime for p in out.glob("*") if p.is_file() and not p.name.endswith(".log"))
        first = times[0] - t0 if times else float("nan")
        self.result.scenarios.append(
            {
                "scenario": "remote reading",
                "what": f"HUB_WS1 retrieved a Goto clinic study ({goto.instance_count} instances, only in the center) "
                f"from the hub's edge: {len(times)} received",
                "seconds": round(t1 - t0, 2),
                "detail": f"first instance after {first:.2f} s, last after {t1 - t0:.2f} s",
            }
        )
        self.say(
            f"remote reading: {len(times)} instances of a Goto study at HUB_WS1; first after {first:.2f} s, "
            f"last after {t1 - t0:.2f} s"
        )

    def admission(self, layout: Layout, runner: RegionRunner) -> None:
        hub = layout.config.site("hub")
        patient = synth.site_patients(layout.config, "hub", self.o.patients, self.o.seed)[0]  # also at every clinic
        message = "\r".join(
            [
                f"MSH|^~\\&|HIS|{hub.institution_name}|RENKEI|HUB|{dt.datetime.now():%Y%m%d%H%M%S}||ADT^A01|DEMO0001|P|2.5",
                f"PID|1||{patient.patient_id}^^^{patient.issuer_of_patient_id}||{patient.person.family_romaji}^"
                f"{patient.person.given_romaji}||{patient.birth_date}|{patient.sex}",
                "PV1|1|I|W5^501^1",
            ]
        )

        async def send() -> str:
            reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", self.o.hl7_port)
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 180)  # the ACK follows the run's creation
            writer.close()
            return str(ack.segment("MSA")(1))

        t0 = time.monotonic()
        code = asyncio.run(send())
        state = runner.wait_until(lambda: _flow_done("fetch_priors"), 600, "fetch_priors to finish", every=1)
        orthanc = runner.pacs["hub"]
        imported = len(orthanc.instances())
        self.result.scenarios.append(
            {
                "scenario": "priors for an admitted patient",
                "what": f"ADT^A01 over MLLP acknowledged {code}; fetch_priors imported {imported} instances of the "
                "patient's clinic studies into the hub's PACS (Orthanc) under the hub's patient ID",
                "seconds": round(time.monotonic() - t0, 1),
                "detail": f"flow run finished {state:.1f} s after the ACK",
            }
        )
        self.say(
            f"admission: ACK {code}; fetch_priors put {imported} instances into HUB_PACS "
            f"in {time.monotonic() - t0:.1f} s"
        )

    def instant_publish(self, layout: Layout, runner: RegionRunner) -> None:
        hub, clinic = layout.config.site("hub"), layout.config.site("clinic-c")
        patient = synth.site_patients(layout.config, "hub", self.o.patients, self.o.seed)[0]
        plan = synth.plan_study(
            hub,
            patient,
            study_uid=derive_uid("demo-instant", self.o.seed),
            modality="CT",
            study_date=dt.date.today(),
            study_time=dt.datetime.now().strftime("%H%M%S"),
            accession_number="DEMO-INSTANT",
            study_id="9001",
            referring_physician=synth.site_doctors(layout.config, "clinic-c", self.o.seed)[0],
            requesting_service=clinic.institution_name,
            ct_slices=min(self.o.ct_slices, 50),
            size=self.o.size,
        )
        study = synth.write_study(plan, layout.data_dir / "demo" / "instant")
        peers.run_dcmtk(
            [
                "storescu",
                "-aet",
                hub.pacs.ae_title if hub.pacs else hub.workstations[0].ae_title,
                "-aec",
                hub.edge.ae_title,
                hub.edge.host,
                str(hub.edge.port),
                *map(str, study.files),
            ]
        )
        ws = clinic.workstations[0]
        visible = runner.wait_until(
            lambda: plan.info.study_uid in _findscu(clinic, ws.ae_title),
            600,
            "the hub exam to be visible at the Goto clinic",
            every=0.5,
        )
        cached = runner.wait_until(
            lambda: _cached(layout, "clinic-c", plan.info.study_uid, study.instance_count),
            600,
            "the hub exam to be delivered into the Goto clinic's edge",
            every=0.5,
        )
        self.result.scenarios.append(
            {
                "scenario": "instant publish",
                "what": f"a hub CT ordered by the Goto clinic ({study.instance_count} instances) became retrievable at "
                "the Goto clinic's edge, then was pushed into it",
                "seconds": round(visible, 1),
                "detail": f"visible {visible:.1f} s after the last instance (stable_age {self.o.stable_age:g} s), "
                f"held at the clinic's edge after {visible + cached:.1f} s",
            }
        )
        self.say(
            f"instant publish: visible at clinic-c after {visible:.1f} s, delivered to its edge after "
            f"{visible + cached:.1f} s"
        )

    def verification(self, layout: Layout, runner: RegionRunner) -> None:
        t0 = time.monotonic()
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here, whatever the stubs say
            "verify_backups/verify-backups", parameters={"full": True}, timeout=600, as_subflow=False
        )
        ok = run.state is not None and run.state.is_completed()

        with Catalog.from_layout(layout) as catalog:  # the run's result, as it audited it
            events = catalog.audit(action="verify-backups")
        detail = events[-1].detail if events else {}
        text = (
            f"{detail.get('instances', '?')} objects read back, {detail.get('findings', '?')} findings, "
            f"{detail.get('repaired', 0)} repaired"
        )
        self.result.scenarios.append(
            {
                "scenario": "nightly verification",
                "what": f"verify_backups: {text}",
                "seconds": round(time.monotonic() - t0, 1),
                "detail": "completed" if ok else f"state {run.state.name if run.state else '?'}",
            }
        )
        self.say(f"verification: {text} ({'completed' if ok else 'FAILED'}) in {time.monotonic() - t0:.1f} s")

    # ------------------------------------------------------------------ all of it
    def run(self) -> DemoResult:
        layout = self.prepare()
        runner = self.start(layout)

        # this process's Prefect calls go to the region's server: Prefect reads PREFECT_API_URL from the
        # environment when it is imported, so setting it now would leave them on a temporary server of its own
        # (a run_deployment there: ObjectNotFound; fetch_priors "done" there before the real one ran)
        with temporary_settings(updates={PREFECT_API_URL: runner.api_url}):
            studies = self.send_all(layout, runner)
            self.wait_pipeline(layout, runner, studies)
            self.remote_reading(layout, runner)
            self.admission(layout, runner)
            self.instant_publish(layout, runner)
            self.verification(layout, runner)
        # the summary is read back from the catalog (after the scenarios added their studies)
        with Catalog.from_layout(layout) as catalog:
            totals = {t.site: t for t in catalog.totals()}
        for row in self.result.sites:
            t = totals[row["site"]]
            row.update(studies=t.studies, instances=t.instances, MB=round(t.bytes / 1e6, 1))
        self.result.seconds = time.monotonic() - self.started
        return self.result

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


def _received(layout: Layout, site_id: str, studies: list[tuple[str, int]]) -> int:
    """Instances of these studies the site's edge holds (journaled before each C-STORE is answered)."""
    root = layout.edge_store(site_id)
    if not (root / JOURNAL_NAME).exists():
        return 0
    with Journal.open(root, readonly=True) as journal:
        return sum(min(len(journal.instances(uid)), n) for uid, n in studies)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"true") is True
    except Exception:
        return False


def _verified(catalog: Any, study_uid: str) -> bool:
    states = {l.holder: l.state for l in catalog.locations(study_uid, include_instances=False)}
    return states.get("center") == "verified"


def _flow_done(flow_name: str) -> bool:
    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))

    found = asyncio.run(runs())
    if any(r.state and r.state.is_final() and not r.state.is_completed() for r in found):
        raise RenkeiError(f"a {flow_name} run ended {[(r.name, r.state.name) for r in found]}")
    return bool(found) and all(r.state and r.state.is_completed() for r in found)


def _findscu(site: Any, ws_ae: str) -> list[str]:
    return peers.findscu_study_uids(site.edge.host, site.edge.port, ws_ae, site.edge.ae_title)


def _cached(layout: Layout, site_id: str, study_uid: str, instances: int) -> bool:
    root = layout.edge_store(site_id) / "cache"
    if not (root / JOURNAL_NAME).exists():
        return False
    with Journal.open(root, readonly=True) as journal:
        return len(journal.instances(study_uid)) >= instances
