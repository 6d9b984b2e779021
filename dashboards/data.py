"""What the operator's dashboard shows, gathered from the catalog and the edges' journals.

Pure data: functions take a Layout and an open Catalog and return frozen
records, so every number can be tested against the catalog without a browser.
The web app (dashboards.app) only renders them.

Patient names: the dashboard is the region operator's. Without a viewer site it
shows Patient IDs and never names. With a viewer site (`?site=hub`) the study
browser shows only what that site may see (every study is asked of
`Sharing.decide`), with names, and each name shown of another site's study is
recorded as a cross-site access ('view') in the audit log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from renkei.catalog.audit import AuditEvent
from renkei.catalog.catalog import Catalog, InstanceRow, LocationRecord, StudyRow
from renkei.catalog.search import Search
from renkei.config import Layout, RegionConfig
from renkei.display import local_time as in_zone
from renkei.edge.journal import JOURNAL_NAME, Journal
from renkei.errors import RenkeiError, UsageError
from renkei.sharing import Sharing

# Audit actions that are one site's access to another site's study.
ACCESS_ACTIONS = ("find", "retrieve", "view", "import")
DASHBOARD_ACTOR = "dashboard"
VERIFY_ACTION = "verify-backups"
VERIFY_WRITER = "verify_backups"  # who the nightly verification writes locations as
FLOW_RUN_PREFIX = "flow-run:"
DEFAULT_WINDOW_S = 24 * 3600
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
_ALL = 10.0**12  # a 'now' far enough ahead that every journaled study counts as complete


class BadRequest(UsageError):
    """A dashboard request named an unknown site or an invalid date, modality or limit (HTTP 400)."""


class NotFound(RenkeiError):
    """A dashboard request named a study or series the catalog does not hold (HTTP 404)."""


class Forbidden(RenkeiError):
    """The viewer site may not see this study (HTTP 403)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------ per site
@dataclass(frozen=True)
class SiteStatus:
    """One site at a glance: what its edge received and moved, and what the center holds of it.

    Edge numbers come from the site's journal (instances 'pending' are not yet
    in the center, 'uploaded' are stored there and read back, 'verified' are
    registered in the catalog too). A study is waiting while any of its
    instances is not verified; its age counts from its last instance's arrival.
    A quarantined study (its data refused; no sync sends it until an operator
    releases it, see `renkei edge status`) is counted apart, not as waiting.
    Center numbers are the catalog's (`Catalog.totals`).
    """

    site: str
    name: str
    role: str
    edge_journal: bool
    received_studies: int = 0
    received_instances: int = 0
    received_bytes: int = 0
    uploaded_studies: int = 0
    uploaded_instances: int = 0
    verified_studies: int = 0
    verified_instances: int = 0
    waiting_studies: int = 0
    oldest_waiting_study: str | None = None
    oldest_waiting_age_s: float | None = None
    quarantined_studies: int = 0
    center_studies: int = 0
    center_instances: int = 0
    center_bytes: int = 0
    center_backlog_studies: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _journal_exists(layout: Layout, site_id: str) -> bool:
    return (layout.edge_store(site_id) / JOURNAL_NAME).exists()


def site_statuses(layout: Layout, catalog: Catalog, now: float | None = None) -> list[SiteStatus]:
    """Every site of the region: its edge journal's counts beside the catalog's totals."""
    now = time.time() if now is None else now
    totals = {t.site: t for t in catalog.totals()}
    out = []
    for site in layout.config.sites:
        t = totals.get(site.id)
        center: dict[str, Any] = (
            dict(
                center_studies=t.studies,
                center_instances=t.instances,
                center_bytes=t.bytes,
                center_backlog_studies=t.backlog_studies,
            )
            if t
            else {}
        )
        if not _journal_exists(layout, site.id):
            out.append(SiteStatus(site.id, site.name, site.role, False, **center))
            continue
        with Journal.open(layout.edge_store(site.id), readonly=True) as journal:
            summary = journal.summary()
            held = journal.quarantined_study_uids()
            all_pending = journal.completed_studies(0, now=_ALL, state="pending")
            all_uploaded = journal.completed_studies(0, now=_ALL, state="uploaded")
            not_verified = set(all_pending) | set(all_uploaded)
            pending = [u for u in all_pending if u not in held]
            uploaded = [u for u in all_uploaded if u not in held]
            waiting = list(dict.fromkeys(pending + uploaded))
            oldest_uid, oldest_age = None, None
            if waiting:
                # completed_studies lists oldest last-received first: the oldest is first of one list
                heads = [uids[0] for uids in (pending, uploaded) if uids]
                rows = journal.study_rows(heads)
                oldest = min(rows, key=lambda r: r["_last_received"])
                oldest_uid = oldest["StudyInstanceUID"]
                oldest_age = max(0.0, now - float(oldest["_last_received"]))
        states = summary.upload_states
        out.append(
            SiteStatus(
                site.id,
                site.name,
                site.role,
                True,
                received_studies=summary.studies,
                received_instances=summary.instances,
                received_bytes=summary.bytes,
                uploaded_studies=summary.studies - len(set(all_pending)),
                uploaded_instances=states.get("uploaded", 0) + states.get("verified", 0),
                verified_studies=summary.studies - len(not_verified),
                verified_instances=states.get("verified", 0),
                waiting_studies=len(waiting),
                oldest_waiting_study=oldest_uid,
                oldest_waiting_age_s=oldest_age,
                quarantined_studies=len(held),
                **center,
            )
        )
    return out


# ------------------------------------------------------------------ charts
@dataclass(frozen=True)
class Throughput:
    """MB/s registered in the center per origin site, averaged over equal time buckets."""

    bucket_seconds: int
    starts: tuple[dt.datetime, ...]
    mb_s: dict[str, tuple[float, ...]]
    bytes: dict[str, int]  # per site, over the whole window

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_seconds": self.bucket_seconds,
            "starts": [s.isoformat() for s in self.starts],
            "mb_s": {k: list(v) for k, v in self.mb_s.items()},
            "bytes": dict(self.bytes),
        }


def bucket_seconds(span_s: float, max_buckets: int = 60) -> int:
    """The smallest round bucket width that cuts `span_s` into at most `max_buckets` buckets."""
    for width in _BUCKETS:
        if span_s / width <= max_buckets:
            return width
    return int(math.ceil(span_s / max_buckets / 86400.0)) * 86400


def throughput(
    catalog: Catalog,
    config: RegionConfig,
    now: dt.datetime | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    max_buckets: int = 60,
) -> Throughput:
    """Bytes registered per site per bucket, as MB/s, over the window (from its first registration on)."""
    now = now or utcnow()
    since = now - dt.timedelta(seconds=window_s)
    batches = catalog.registrations(since=since)
    sites = list(config.site_ids) + sorted({b.origin_site for b in batches} - set(config.site_ids))
    if not batches:
        return Throughput(0, (), {s: () for s in sites}, {s: 0 for s in sites})
    start = min(b.at for b in batches)
    width = bucket_seconds(max((now - start).total_seconds(), 1.0), max_buckets)
    epoch = int(start.timestamp()) // width * width
    count = int((now.timestamp() - epoch) // width) + 1
    sums = {s: [0] * count for s in sites}
    for b in batches:
        index = min(count - 1, int((b.at.timestamp() - epoch) // width))
        sums[b.origin_site][index] += b.bytes
    starts = tuple(dt.datetime.fromtimestamp(epoch + i * width, dt.UTC) for i in range(count))
    mb_s = {s: tuple(v / 1e6 / width for v in values) for s, values in sums.items()}
    return Throughput(width, starts, mb_s, {s: sum(v) for s, v in sums.items()})


@dataclass(frozen=True)
class Availability:
    """One study: its last instance reached the edge at `edge_last_received`, and was registered
    (stored, read back by SHA-256, verified) in the center at `available_at`."""

    study_uid: str
    origin_site: str
    edge_last_received: dt.datetime
    available_at: dt.datetime
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "origin_site": self.origin_site,
            "edge_last_received": self.edge_last_received.isoformat(),
            "available_at": self.available_at.isoformat(),
            "seconds": self.seconds,
        }


def availability(
    layout: Layout,
    catalog: Catalog,
    now: dt.datetime | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    limit: int = MAX_LIMIT,
) -> list[Availability]:
    """Time to availability of the studies that became available in the window (newest first).

    The start is the edge journal's last-received time of the study at its
    origin site; the end is the catalog's registration of its last instance
    (sync registers only after the upload is read back and verified).
    """
    now = now or utcnow()
    recent = catalog.study_registrations(since=now - dt.timedelta(seconds=window_s), limit=limit)
    by_site: dict[str, list[Any]] = {}
    for r in recent:
        by_site.setdefault(r.origin_site, []).append(r)
    received: dict[str, float] = {}
    for site_id, rows in by_site.items():
        if site_id not in layout.config.site_ids or not _journal_exists(layout, site_id):
            continue
        with Journal.open(layout.edge_store(site_id), readonly=True) as journal:
            uids = [r.study_uid for r in rows]
            for i in range(0, len(uids), 400):
                for row in journal.study_rows(uids[i : i + 400]):
                    received[row["StudyInstanceUID"]] = float(row["_last_received"])
    out = []
    for r in recent:
        last = received.get(r.study_uid)
        if last is None:
            continue
        edge_time = dt.datetime.fromtimestamp(last, dt.UTC)
        out.append(
            Availability(
                r.study_uid,
                r.origin_site,
                edge_time,
                r.last_registered_at,
                round((r.last_registered_at - edge_time).total_seconds(), 3),
            )
        )
    return out


# ------------------------------------------------------------------ visibility
@dataclass(frozen=True)
class VisibilityMatrix:
    """For each (viewer, origin) pair of sites: how many studies of the origin the viewer may see."""

    sites: tuple[str, ...]
    counts: dict[tuple[str, str], int]

    def count(self, viewer: str, origin: str) -> int:
        return self.counts.get((viewer, origin), 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": list(self.sites),
            "counts": {viewer: {origin: self.count(viewer, origin) for origin in self.sites} for viewer in self.sites},
        }


def visibility_matrix(catalog: Catalog, config: RegionConfig) -> VisibilityMatrix:
    """The visibility matrix of the region's sites (the same rule as every sharing decision)."""
    return VisibilityMatrix(config.site_ids, catalog.visibility_counts())


# ------------------------------------------------------------------ verification
@dataclass(frozen=True)
class VerificationSummary:
    """The last nightly verification: when, what it read, what it found and repaired."""

    at: dt.datetime
    outcome: str
    instances: int
    findings: int
    repaired: int
    part: int
    parts: int
    actor: str
    items: tuple[LocationRecord, ...] = ()  # the instance-level states it recorded (findings)

    @property
    def unrecoverable(self) -> int:
        return sum(1 for i in self.items if i.state != "verified")

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "outcome": self.outcome,
            "instances": self.instances,
            "findings": self.findings,
            "repaired": self.repaired,
            "part": self.part,
            "parts": self.parts,
            "actor": self.actor,
            "unrecoverable": self.unrecoverable,
            "items": [
                {
                    "study_uid": i.study_uid,
                    "sop_instance_uid": i.sop_instance_uid,
                    "state": i.state,
                    "detail": i.detail,
                    "at": i.at.isoformat(),
                }
                for i in self.items
            ],
        }


def last_verification(catalog: Catalog) -> VerificationSummary | None:
    """The latest 'verify-backups' audit event, with the findings recorded since the one before it."""
    events = catalog.recent_audit([VERIFY_ACTION], limit=2)
    if not events:
        return None
    last = events[0]
    since = events[1].at if len(events) > 1 else None
    d = last.detail
    items = tuple(
        i
        for i in catalog.instance_locations(by=VERIFY_WRITER, since=since, limit=MAX_LIMIT)
        if i.holder == "center" and i.at <= last.at
    )
    part = int(d.get("part", 0) or 0)
    return VerificationSummary(
        last.at,
        last.outcome,
        int(d.get("instances", 0) or 0),
        int(d.get("findings", 0) or 0),
        int(d.get("repaired", 0) or 0),
        part + 1,
        int(d.get("parts", 1) or 1),
        last.actor,
        items,
    )


# ------------------------------------------------------------------ accesses
@dataclass(frozen=True)
class AccessEvent:
    """A site's access to another site's study, from the audit log."""

    event_no: int
    at: dt.datetime
    viewer_site: str
    actor: str
    action: str
    study_uid: str
    origin_site: str
    outcome: str

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["at"] = self.at.isoformat()
        return data


def recent_accesses(catalog: Catalog, limit: int = DEFAULT_LIMIT) -> list[AccessEvent]:
    """The latest cross-site accesses (newest first): access actions whose actor site is not the study's origin."""
    out: list[AccessEvent] = []
    origins: dict[str, str] = {}
    for event in catalog.recent_audit(list(ACCESS_ACTIONS), limit=max(limit, 1) * 4):
        if not event.study_uid:
            continue
        origin = event.target_site or origins.get(event.study_uid)
        if origin is None:
            row = catalog.study(event.study_uid)
            origin = row.origin_site if row else ""
            origins[event.study_uid] = origin
        if origin and origin != event.actor_site:
            out.append(
                AccessEvent(
                    event.event_no,
                    event.at,
                    event.actor_site,
                    event.actor,
                    event.action,
                    event.study_uid,
                    origin,
                    event.outcome,
                )
            )
            if len(out) >= limit:
                break
    return out


# ------------------------------------------------------------------ study browser
@dataclass(frozen=True)
class StudyQuery:
    """The study browser's filters, validated."""

    viewer: str | None = None
    origin: str | None = None
    date_from: str | None = None  # YYYYMMDD
    date_to: str | None = None
    modality: str | None = None
    patient_id: str | None = None
    limit: int = DEFAULT_LIMIT
    search: str | None = None  # catalog.search: Patient ID, accession, and a name where names are shown

    def params(self) -> dict[str, str]:
        """The query as URL parameters (dates as YYYY-MM-DD)."""
        out = {
            "site": self.viewer,
            "origin": self.origin,
            "date_from": _iso_date(self.date_from),
            "date_to": _iso_date(self.date_to),
            "modality": self.modality,
            "patient_id": self.patient_id,
            "q": self.search,
        }
        return {k: v for k, v in out.items() if v}


_DATE_RE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_MODALITY_RE = re.compile(r"^[A-Z0-9]{1,16}$")


def _iso_date(value: str | None) -> str | None:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if value else None


def parse_date(value: str, what: str) -> str:
    """YYYY-MM-DD or YYYYMMDD as YYYYMMDD; BadRequest otherwise."""
    m = _DATE_RE.fullmatch(value.strip())
    if m:
        try:
            return dt.date(int(m[1]), int(m[2]), int(m[3])).strftime("%Y%m%d")
        except ValueError:
            pass
    raise BadRequest(f"{what} {value!r} is not a date: write it as YYYY-MM-DD (e.g. 2026-01-31)")


def check_site(config: RegionConfig, value: str, what: str = "site") -> str:
    if value not in config.site_ids:
        raise BadRequest(f"unknown {what} {value!r}; this region has: {', '.join(config.site_ids)}")
    return value


def parse_query(config: RegionConfig, params: Mapping[str, str]) -> StudyQuery:
    """The browser's filters from URL parameters; BadRequest names a parameter that cannot work."""

    def get(name: str) -> str | None:
        value = params.get(name)
        return value.strip() if value and value.strip() else None

    viewer, origin = get("site"), get("origin")
    date_from, date_to = get("date_from"), get("date_to")
    modality, patient_id, limit = get("modality"), get("patient_id"), get("limit")
    search = get("q")
    if search:
        try:
            Search.parse(search)
        except RenkeiError as exc:
            raise BadRequest(f"q: {exc}") from None
    q = StudyQuery(
        viewer=check_site(config, viewer, "site") if viewer else None,
        origin=check_site(config, origin, "origin site") if origin else None,
        date_from=parse_date(date_from, "date_from") if date_from else None,
        date_to=parse_date(date_to, "date_to") if date_to else None,
        modality=modality.upper() if modality else None,
        patient_id=patient_id,
        search=search,
    )
    if q.modality and not _MODALITY_RE.fullmatch(q.modality):
        raise BadRequest(f"modality {modality!r} is not a DICOM modality code (letters and digits, e.g. CT)")
    if q.date_from and q.date_to and q.date_from > q.date_to:
        raise BadRequest(f"date_from {_iso_date(q.date_from)} is after date_to {_iso_date(q.date_to)}")
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise BadRequest(f"limit {limit!r} must be a whole number from 1 to {MAX_LIMIT}")
        q = dataclasses.replace(q, limit=int(limit))
    return q


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int


@dataclass(frozen=True)
class StudyView:
    """One study as the browser shows it. `patient_name` is None where names are not to be shown."""

    study_uid: str
    origin_site: str
    patient_id: str
    patient_name: str | None
    study_date: str
    study_time: str
    description: str
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    bytes: int
    center_state: str
    flow_runs: tuple[str, ...]
    series: tuple[SeriesView, ...]

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["modalities"] = list(self.modalities)
        data["flow_runs"] = list(self.flow_runs)
        data["series"] = [s.__dict__ for s in self.series]
        return data


@dataclass(frozen=True)
class StudyPage:
    """A page of the browser: the query, how many studies match, and the first `query.limit` of them."""

    query: StudyQuery
    total: int
    studies: tuple[StudyView, ...]
    names_shown: bool
    recorded_accesses: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query.params(),
            "total": self.total,
            "names_shown": self.names_shown,
            "recorded_accesses": self.recorded_accesses,
            "studies": [s.to_dict() for s in self.studies],
        }


def display_name(patient_name: str) -> str:
    """A DICOM PN for display: component groups (alphabetic, ideographic, phonetic) with spaces for '^'."""
    groups = [" ".join(p for p in g.split("^") if p) for g in patient_name.split("=")]
    return " / ".join(g for g in groups if g)


def flow_runs(catalog: Catalog, study_uid: str, locations: Sequence[LocationRecord] | None = None) -> tuple[str, ...]:
    """Ids of the Prefect flow runs that moved the study (from its locations and registrations)."""
    locs = locations if locations is not None else catalog.locations(study_uid, include_instances=False)
    return _runs_in([l.by for l in locs] + [e.actor for e in catalog.audit(study_uid=study_uid, action="register")])


def _runs_in(markers: Any) -> tuple[str, ...]:
    found: list[str] = []
    for marker in markers:
        if marker and marker.startswith(FLOW_RUN_PREFIX):
            run = marker[len(FLOW_RUN_PREFIX) :]
            if run and run not in found:
                found.append(run)
    return tuple(found)


def run_url(prefect_ui: str, run_id: str) -> str:
    """The Prefect UI page of a flow run."""
    return f"{prefect_ui.rstrip('/')}/runs/flow-run/{run_id}"


def study_views(catalog: Catalog, rows: Sequence[StudyRow], show_name: bool) -> list[StudyView]:
    """The browser's view of studies: counts, center state, flow runs and series (a few queries in all)."""
    uids = [r.study_uid for r in rows]
    series_of = catalog.series_summaries(uids)
    locations_of = catalog.study_locations(uids)
    out = []
    for row in rows:
        locations = locations_of.get(row.study_uid, [])
        center = next((l.state for l in locations if l.holder == "center"), "not in center")
        runs = _runs_in(l.by for l in locations)
        if not runs:  # the locations were rewritten since (e.g. the edge copy removed): the registrations say
            runs = flow_runs(catalog, row.study_uid, locations)
        series = tuple(
            SeriesView(
                s["series_uid"],
                s["modality"] or "",
                s["series_number"],
                s["series_description"] or "",
                int(s["instances"]),
            )
            for s in series_of.get(row.study_uid, [])
        )
        out.append(
            StudyView(
                row.study_uid,
                row.origin_site,
                row.patient_id,
                display_name(row.patient_name) if show_name else None,
                row.study_date,
                row.study_time,
                row.study_description,
                row.modalities,
                row.series_count,
                row.instance_count,
                row.bytes,
                center,
                runs,
                series,
            )
        )
    return out


def browse_studies(layout: Layout, catalog: Catalog, q: StudyQuery, record: bool = True) -> StudyPage:
    """The studies matching the filters, newest first; with a viewer site, only what it may see.

    With a viewer, the catalog's one visibility rule selects the page (the
    same rule as Sharing.decide, in SQL: tests check they agree); names are
    shown, and (with `record`) the names shown of other sites' studies are
    audited as cross-site 'view' accesses by the dashboard.
    """
    total, rows = catalog.studies_page(
        visible_to=q.viewer,
        origin_sites=[q.origin] if q.origin else None,
        patient_id=q.patient_id,
        date_from=q.date_from,
        date_to=q.date_to,
        modalities=[q.modality] if q.modality else None,
        limit=q.limit,
        search=q.search,
        search_names=q.viewer is not None,
    )
    recorded = 0
    shown = rows
    views = tuple(study_views(catalog, shown, show_name=q.viewer is not None))
    if q.viewer and record:
        others = [r.study_uid for r in shown if r.origin_site != q.viewer]
        if others:
            Sharing(layout.config, catalog).record_access(
                q.viewer,
                DASHBOARD_ACTOR,
                "view",
                others,
                detail={"via": "dashboard", "shown": "patient name and images"},
            )
            recorded = len(others)
    return StudyPage(q, total, views, q.viewer is not None, recorded)


@dataclass(frozen=True)
class StudyDetail:
    """One study in full: the browser's view, its copies, grants, and audit trail."""

    view: StudyView
    locations: tuple[LocationRecord, ...]
    grants: tuple[Any, ...]
    trail: tuple[AuditEvent, ...]
    decision: str = ""


def study_detail(
    layout: Layout, catalog: Catalog, study_uid: str, viewer: str | None = None, record: bool = True
) -> StudyDetail:
    """A study's detail page; NotFound for an unknown study, Forbidden when the viewer may not see it."""
    row = catalog.study(study_uid)
    if row is None:
        raise NotFound(f"study {study_uid} is not in the catalog")
    decision = ""
    if viewer:
        check_site(layout.config, viewer)
        sharing = Sharing(layout.config, catalog)
        verdict = sharing.decide(viewer, study_uid)
        if not verdict.allowed:
            raise Forbidden(f"{viewer} may not see study {study_uid}: {verdict.explanation}")
        decision = verdict.explanation
        if record and row.origin_site != viewer:
            sharing.record_access(
                viewer,
                DASHBOARD_ACTOR,
                "view",
                [study_uid],
                detail={"via": "dashboard", "shown": "patient name and images"},
            )
    view = study_views(catalog, [row], show_name=viewer is not None)[0]
    trail = tuple(catalog.audit(study_uid=study_uid))
    return StudyDetail(view, tuple(catalog.locations(study_uid)), tuple(catalog.grants(study_uid)), trail, decision)


def series_instances(catalog: Catalog, study_uid: str, series_uid: str) -> list[InstanceRow]:
    """The registered instances of one series; NotFound when the study or series is unknown."""
    if catalog.study(study_uid) is None:
        raise NotFound(f"study {study_uid} is not in the catalog")
    rows = [i for i in catalog.instances(study_uid) if i["series_uid"] == series_uid]
    if not rows:
        raise NotFound(f"series {series_uid} is not in study {study_uid}")
    return rows


# ------------------------------------------------------------------ the whole page
@dataclass(frozen=True)
class Overview:
    """Everything the dashboard's first screen shows, gathered at `at`."""

    at: dt.datetime
    sites: tuple[SiteStatus, ...]
    throughput: Throughput
    availability: tuple[Availability, ...]
    matrix: VisibilityMatrix
    verification: VerificationSummary | None
    accesses: tuple[AccessEvent, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "sites": [s.to_dict() for s in self.sites],
            "throughput": self.throughput.to_dict(),
            "availability": [a.to_dict() for a in self.availability],
            "matrix": self.matrix.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
            "accesses": [a.to_dict() for a in self.accesses],
        }


def overview(
    layout: Layout, catalog: Catalog, window_s: float = DEFAULT_WINDOW_S, accesses_limit: int = DEFAULT_LIMIT
) -> Overview:
    """The dashboard's sections, all read at one moment."""
    now = utcnow()
    return Overview(
        at=now,
        sites=tuple(site_statuses(layout, catalog, now.timestamp())),
        throughput=throughput(catalog, layout.config, now, window_s),
        availability=tuple(availability(layout, catalog, now, window_s)),
        matrix=visibility_matrix(catalog, layout.config),
        verification=last_verification(catalog),
        accesses=tuple(recent_accesses(catalog, accesses_limit)),
    )


def local_time(value: dt.datetime | None, config: RegionConfig, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A UTC time in the region's time zone, for display (as the command line shows it)."""
    return in_zone(value, config.timezone, fmt)


def age_text(seconds: float | None) -> str:
    """A duration for people: '42 s', '7 min', '3.5 h', '2.0 d'."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
