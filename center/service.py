"""What the center service does for a caller, whatever the protocol: search, retrieve, store.

`CenterService(layout)` holds the catalog, the object store and the sharing
decision of the region. Every method takes the caller's `Identity` and asks
`Sharing.decide` for the caller's site: a study the site may not see is
answered exactly as one that does not exist (no listing, 404), and every
answer about another site's study is audited with the caller as actor, as
the edge audits its cross-site answers. A site's credential stores only
studies of that site (the origin is the caller's site; an instance of a
study held as another site's is refused).

Stateless: everything it knows is in the catalog and the object store, which
it reads again on each request (the catalog catches up with other writers),
so replicas behind a load balancer answer alike.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from renkei.catalog import keys
from renkei.catalog.catalog import Catalog, StudyRow
from renkei.catalog.records import InstanceRow
from renkei.catalog.store import SPOOL_IN_MEMORY, ObjectConflict, ObjectStore
from renkei.center.dicomweb import Query, matches
from renkei.center.identity import Identity
from renkei.config import Layout
from renkei.edge.center import AuditBuffer, catalog_recorder
from renkei.edge.parsing import InvalidInstance, ParsedInstance, parse_dataset, split_file_meta
from renkei.edge.qr import AccessEvent
from renkei.errors import RenkeiError
from renkei.records import InstanceInfo, StudyBatch, StudyInfo, names
from renkei.sharing import Sharing
from renkei.transfer import DATA_ERRORS

log = logging.getLogger(__name__)

_STUDY_FIELDS = names("PATIENT", "STUDY")  # keyword -> StudyRow / StudyInfo field
STORE_THREADS = 4
SCAN_LIMIT = 20_000  # studies read for one search that the catalog cannot narrow (a Warning says so)
MAX_INSTANCE_BYTES = 1 << 30  # one instance, parsed whole (its framing is checked to the end)

STUDY_MATCHABLE = frozenset([*_STUDY_FIELDS, "ModalitiesInStudy"])
SERIES_MATCHABLE = frozenset(["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "StudyInstanceUID"])
INSTANCE_MATCHABLE = frozenset(
    ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "SeriesInstanceUID", "StudyInstanceUID"]
)

STUDY_RESULT = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "InstitutionName",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "RetrieveURL",
)
SERIES_RESULT = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
)
INSTANCE_RESULT = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "AvailableTransferSyntaxUID",
    "RetrieveURL",
)


class NotFound(RenkeiError):
    """Nothing the caller may see is there (the same answer whether it exists elsewhere or not at all)."""


@dataclass
class Found:
    """A search's answer: records (keyword -> text), and whether more exist or the scan was cut."""

    records: list[dict[str, Any]]
    more: bool = False
    cut: bool = False


@dataclass
class StoreOutcome:
    """One STOW-RS instance: stored (with its URL) or refused (with a DICOM failure reason)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str = ""
    series_uid: str = ""
    failure: int = 0  # 0: stored; else a PS3.4 status, e.g. 0xA900, 0x0124, 0x0110
    reason: str = ""
    warning: str = ""


@dataclass
class _Pending:
    outcome: StoreOutcome
    path: Path
    info: InstanceInfo
    parsed: ParsedInstance


@dataclass
class StoreSession:
    """The instances of one STOW-RS request, stored as their parts arrive and registered at the end."""

    service: CenterService
    identity: Identity
    study_uid: str | None  # the request's URL named this study: other instances are refused
    spool: Path
    outcomes: list[StoreOutcome] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    futures: list[Future[StoreOutcome]] = field(default_factory=list)

    def add_file(self, path: Path, sha256: str, size: int, claimed_sha256: str | None = None) -> None:
        """Check and store one received instance, in the background (the next part is read meanwhile).

        `claimed_sha256`: what the sender says the bytes hash to (the part's Content-Digest); when the
        received bytes hash otherwise, they were damaged on the way and the instance is refused, so a
        sender that names the digest never needs to read back what it stored."""
        if claimed_sha256 is not None and claimed_sha256 != sha256:
            outcome = StoreOutcome("", "", failure=0x0110, reason="the bytes received are not those sent (digest)")
            done: Future[StoreOutcome] = Future()
            done.set_result(outcome)
            self.futures.append(done)
            return
        self.futures.append(self.service.pool.submit(self.service._check_and_put, self, path, sha256, size))

    def finish(self) -> list[StoreOutcome]:
        """Wait for every instance to be stored, then register them; the outcomes in the request's order."""
        self.outcomes = [f.result() for f in self.futures]  # a storage failure is raised: HTTP 503
        self.service._register(self)
        return self.outcomes

    def abandon(self) -> None:
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                f.exception()


def _study_record(row: StudyRow, base: str) -> dict[str, Any]:
    record: dict[str, Any] = {keyword: getattr(row, name) for keyword, name in _STUDY_FIELDS.items()}
    record.update(
        {
            "ModalitiesInStudy": "\\".join(sorted(set(row.modalities))),
            "NumberOfStudyRelatedSeries": str(row.series_count),
            "NumberOfStudyRelatedInstances": str(row.instance_count),
            "RetrieveURL": f"{base}/studies/{row.study_uid}",
        }
    )
    return record


class CenterService:
    """Search, retrieve and store for an identified caller, under the one sharing decision."""

    def __init__(self, layout: Layout, catalog: Catalog | None = None, store: ObjectStore | None = None) -> None:
        self.layout = layout
        self.config = layout.config
        self.catalog = catalog or Catalog.from_layout(layout)
        self.store = store or ObjectStore(layout.center_url, layout.config.center.s3)
        self.sharing = Sharing(layout.config, self.catalog)
        # received parts are written where the object store can take them without a copy (local stores)
        self.spool_root = Path(
            os.environ.get("RENKEI_CENTER_SPOOL")
            or self.store.spool_folder()
            or Path(tempfile.gettempdir()) / "renkei-stow"
        )
        self._register_lock = threading.Lock()
        self.audit = AuditBuffer(catalog_recorder(self.catalog))
        # instances being checked and stored (parse, copy, fsync) while the request's next parts arrive
        self.pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="stow")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.audit.close()
        self.catalog.close()

    # ------------------------------------------------------------------ decisions
    def _site_of(self, identity: Identity) -> str:
        self.config.site(identity.site)  # a site the configuration no longer has: refused (UsageError)
        return identity.site

    def visible_study(self, identity: Identity, study_uid: str, action: str) -> StudyRow:
        """The study, if the caller's site may see it (audited when it is another site's); else NotFound."""
        site = self._site_of(identity)
        row = self.catalog.study(study_uid)
        if row is None or not self.sharing.decide(site, study_uid).allowed:
            if row is not None and row.origin_site != site:
                self._audit(identity, action, [study_uid], allowed=False)
            raise NotFound(f"study {study_uid} is not known")
        if row.origin_site != site:
            self._audit(identity, action, [study_uid])
        return row

    def _audit(self, identity: Identity, action: str, study_uids: Sequence[str], allowed: bool = True) -> None:
        """Audit answers about other sites' studies (batched: one catalog commit per AuditBuffer interval)."""
        events = [AccessEvent(action, identity.actor, uid, "dicomweb", allowed) for uid in study_uids]
        if events:
            self.audit(events, identity.site)

    def _audit_answer(self, identity: Identity, action: str, rows: Sequence[StudyRow]) -> None:
        self._audit(identity, action, [r.study_uid for r in rows if r.origin_site != identity.site])

    # ------------------------------------------------------------------ QIDO-RS
    def search_studies(self, identity: Identity, query: Query, base: str) -> Found:
        site = self._site_of(identity)
        date_from, date_to = query.date_range()
        modalities = query.values("ModalitiesInStudy")
        uids = query.values("StudyInstanceUID")
        pid = query.single("PatientID")
        rows: list[StudyRow]
        cut = False
        if uids is not None or pid is not None:
            patients = [(pid, query.single("IssuerOfPatientID"))] if pid is not None else None
            rows = self.catalog.visible_studies(site, patients, date_from, date_to, modalities, study_uids=uids)
            rows.sort(key=lambda r: (r.study_date, r.study_time, r.study_uid), reverse=True)
        else:
            total, rows = self.catalog.studies_page(
                visible_to=site, date_from=date_from, date_to=date_to, modalities=modalities, limit=SCAN_LIMIT
            )
            cut = total > SCAN_LIMIT
        records = [_study_record(r, base) for r in rows]
        picked = [(row, rec) for row, rec in zip(rows, records, strict=True) if matches(query, rec)]
        page = picked[query.offset : query.offset + query.limit]
        self._audit_answer(identity, "qido-studies", [row for row, _ in page])
        return Found([rec for _, rec in page], more=len(picked) > query.offset + query.limit, cut=cut)

    def search_series(self, identity: Identity, study_uid: str, query: Query, base: str) -> Found:
        study = self.visible_study(identity, study_uid, "qido-series")
        counts = {s.get("series_uid"): s for s in self.catalog.series_summaries([study_uid]).get(study_uid, [])}
        records = []
        for s in self.catalog.series(study_uid):
            summary: Mapping[str, Any] = counts.get(s["series_uid"], {})
            records.append(
                {
                    "StudyInstanceUID": study.study_uid,
                    "SeriesInstanceUID": s["series_uid"],
                    "Modality": s["modality"],
                    "SeriesNumber": "" if s["series_number"] is None else str(s["series_number"]),
                    "SeriesDescription": s["series_description"],
                    "NumberOfSeriesRelatedInstances": str(summary.get("instances", 0)),
                    "RetrieveURL": f"{base}/studies/{study_uid}/series/{s['series_uid']}",
                }
            )
        records.sort(
            key=lambda r: (int(r["SeriesNumber"]) if r["SeriesNumber"].isdigit() else 0, r["SeriesInstanceUID"])
        )
        picked = [r for r in records if matches(query, r)]
        return Found(picked[query.offset : query.offset + query.limit], more=len(picked) > query.offset + query.limit)

    def search_instances(
        self, identity: Identity, study_uid: str, series_uid: str | None, query: Query, base: str
    ) -> Found:
        self.visible_study(identity, study_uid, "qido-instances")
        records = []
        for inst in self.instances(study_uid, series_uid):
            records.append(
                {
                    "StudyInstanceUID": study_uid,
                    "SeriesInstanceUID": inst["series_uid"],
                    "SOPInstanceUID": inst["sop_instance_uid"],
                    "SOPClassUID": inst["sop_class_uid"],
                    "InstanceNumber": "" if inst.get("instance_number") is None else str(inst["instance_number"]),
                    "AvailableTransferSyntaxUID": inst["transfer_syntax_uid"],
                    "RetrieveURL": (
                        f"{base}/studies/{study_uid}/series/{inst['series_uid']}/instances/{inst['sop_instance_uid']}"
                    ),
                }
            )
        picked = [r for r in records if matches(query, r)]
        return Found(picked[query.offset : query.offset + query.limit], more=len(picked) > query.offset + query.limit)

    # ------------------------------------------------------------------ WADO-RS
    def instances(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[InstanceRow]:
        """The study's current instances (of one series, or one instance), by series and number."""
        rows = [
            r
            for r in self.catalog.instances(study_uid)
            if (series_uid is None or r["series_uid"] == series_uid)
            and (sop_uid is None or r["sop_instance_uid"] == sop_uid)
        ]
        rows.sort(key=lambda r: (r["series_uid"], r.get("instance_number") or 0, r["sop_instance_uid"]))
        return rows

    def retrievable(
        self, identity: Identity, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[InstanceRow]:
        """The instances a WADO-RS request names, once the caller may see the study; NotFound if none."""
        self.visible_study(identity, study_uid, "wado")
        rows = self.instances(study_uid, series_uid, sop_uid)
        if not rows:
            raise NotFound("no such series or instance in the study")
        return rows

    def read_instance(self, row: Mapping[str, Any]) -> bytes:
        """The stored bytes of an instance (whole), verified against the catalog's SHA-256."""
        if int(row.get("size") or 0) > SPOOL_IN_MEMORY:
            with self.store.open_verified(row["object_key"], row["sha256"]) as handle:
                return handle.read()
        return self.store.read_verified(row["object_key"], row["sha256"])

    def open_instance(self, row: Mapping[str, Any]) -> IO[bytes]:
        """The stored bytes of an instance, verified against the catalog's SHA-256 before any is served."""
        return self.store.open_verified(row["object_key"], row["sha256"])

    # ------------------------------------------------------------------ STOW-RS
    def store_session(self, identity: Identity, study_uid: str | None) -> StoreSession:
        self._site_of(identity)
        self.spool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = Path(tempfile.mkdtemp(prefix=".tmp-req-", dir=self.spool_root))
        return StoreSession(self, identity, study_uid, spool)

    def _check_instance(self, session: StoreSession, path: Path, sha256: str, size: int) -> StoreOutcome | _Pending:
        """Parse one received instance and decide whether the caller may store it: its refusal, or the
        instance to store (added to the session's pending ones)."""
        site = session.identity.site
        try:
            with open(path, "rb") as handle:
                head = handle.read(min(size, 64 * 1024 * 1024))
            meta, offset = split_file_meta(head)
            ts = meta.get("TransferSyntaxUID", "")
            if not ts:
                raise InvalidInstance("the part is not a DICOM file with a file meta header (PS3.10)")
            with open(path, "rb") as handle:
                handle.seek(offset)
                parsed = parse_dataset(handle.read(), ts)
        except (InvalidInstance, ValueError, OSError) as exc:
            return StoreOutcome("", "", failure=0xC000, reason=f"cannot be read as DICOM: {exc}")
        outcome = StoreOutcome(parsed.sop_class_uid, parsed.sop_instance_uid, parsed.study_uid, parsed.series_uid)
        if session.study_uid and parsed.study_uid != session.study_uid:
            outcome.failure, outcome.reason = 0xA900, "the instance is not of the study the request names"
            return outcome
        existing = self.catalog.study(parsed.study_uid)
        if existing is not None and existing.origin_site != site:
            # the same answer as for a study this site may not see: nothing about it is told
            outcome.failure, outcome.reason = 0x0124, "not authorized to store into this study"
            return outcome
        attrs = parsed.attributes

        def number(keyword: str) -> int | None:
            text = attrs.get(keyword, "").strip()
            return int(text) if text.lstrip("-").isdigit() else None

        info = InstanceInfo(
            study_uid=parsed.study_uid,
            series_uid=parsed.series_uid,
            sop_instance_uid=parsed.sop_instance_uid,
            sop_class_uid=parsed.sop_class_uid,
            transfer_syntax_uid=ts,
            size=size,
            sha256=sha256,
            modality=attrs.get("Modality", ""),
            series_number=number("SeriesNumber"),
            instance_number=number("InstanceNumber"),
            series_description=attrs.get("SeriesDescription", ""),
        )
        pending = _Pending(outcome, path, info, parsed)
        session.pending.append(pending)
        return pending

    def _check_and_put(self, session: StoreSession, path: Path, sha256: str, size: int) -> StoreOutcome:
        checked = self._check_instance(session, path, sha256, size)
        if isinstance(checked, StoreOutcome):
            return checked
        outcome, info, site = checked.outcome, checked.info, session.identity.site
        try:
            key = keys.object_key(site, info.study_uid, info.series_uid, info.sop_instance_uid)
            try:
                self.store.adopt_file(path, key, sha256)
            except ObjectConflict:
                key = keys.object_key(
                    site, info.study_uid, info.series_uid, info.sop_instance_uid, conflict_sha256=sha256
                )
                self.store.adopt_file(path, key, sha256)
                outcome.warning = "other bytes are stored under this SOP Instance UID: both are kept"
        except DATA_ERRORS as exc:
            outcome.failure, outcome.reason = 0xA900, str(exc)
        return outcome

    def _register(self, session: StoreSession) -> None:
        """Register the stored instances (one commit per study), then apply the rules to their studies."""
        site = session.identity.site
        by_study: dict[str, list[_Pending]] = {}
        for p in session.pending:
            if not p.outcome.failure:
                by_study.setdefault(p.info.study_uid, []).append(p)
        issuer = self.config.site(site).issuer
        for study_uid, items in by_study.items():
            first = items[0].parsed
            fields: dict[str, Any] = {
                name: first.attributes.get(kw, "") for kw, name in _STUDY_FIELDS.items() if name != "study_uid"
            }
            info = StudyInfo(
                study_uid=study_uid,
                origin_site=site,
                specific_character_set=first.specific_character_set,
                **fields,
            )
            if not info.issuer_of_patient_id and issuer:
                info = replace(info, issuer_of_patient_id=issuer)
            batch = StudyBatch(info, tuple(p.info for p in items))
            try:
                with self._register_lock:
                    self.catalog.register_many([batch], actor=session.identity.actor)
                    self.catalog.set_locations(
                        [
                            {
                                "study_uid": study_uid,
                                "holder": "center",
                                "state": "verified",
                                "by": session.identity.actor,
                            }
                        ]
                    )
            except DATA_ERRORS as exc:
                for p in items:
                    p.outcome.failure, p.outcome.reason = 0xA900, f"the catalog refused the study: {exc}"
                continue
            self.sharing.apply_rules([study_uid])
        log.info("stow: %d instances stored for %s", sum(len(v) for v in by_study.values()), site)
