"""The edge's view of what the region shares with its site.

- `CacheSource`: copies of other sites' studies kept at this edge (delivered
  ahead of time, or fetched for a retrieval). A second journal and file store
  under `<store>/cache`, never uploaded (they are already in the center).
- `CenterSource`: studies the catalog says this site may see, held only in
  the center. They answer C-FIND like local ones; a C-MOVE or C-GET fetches
  each instance from the center on the fly (SHA-256 checked), keeps it in the
  cache, and sends it on, transparently to the workstation.
- `SharingAccess`: the sharing decision at this exit, with every cross-site
  answer and retrieval audited.

No Prefect here; the catalog and object store are passed in.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom.filereader

from renkei.catalog.audit import AuditDraft
from renkei.catalog.catalog import Catalog, InstanceRow, StudyRow
from renkei.catalog.store import ObjectStore
from renkei.config import RegionConfig
from renkei.edge.ingest import Ingestor
from renkei.edge.journal import Journal
from renkei.edge.matching import match_attribute
from renkei.edge.qr import (
    IMAGE,
    PATIENT,
    SERIES,
    STUDY,
    AccessEvent,
    LocalSource,
    QueryError,
    RetrieveItem,
    retrieve_values,
    single_values,
)
from renkei.edge.store import FileStore
from renkei.errors import RenkeiError
from renkei.records import names

LOGGER = logging.getLogger(__name__)
CACHE_DIR = "cache"
CACHE_AE = "RENKEI_CENTER"  # the calling AE recorded for copies that came from the center


def cache_root(store_dir: Path) -> Path:
    return Path(store_dir) / CACHE_DIR


def split_part10(data: bytes) -> tuple[bytes, str, str, str]:
    """(dataset bytes, transfer syntax, SOP class, SOP instance) of a Part 10 file's bytes."""
    handle = io.BytesIO(data)
    pydicom.filereader.read_preamble(handle, False)
    meta = pydicom.filereader._read_file_meta_info(handle)
    return (
        data[handle.tell() :],
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
    )


class EdgeCache:
    """Copies of other sites' studies at this edge: a journal and a file store of their own."""

    def __init__(self, store_dir: Path, space: FileStore | None = None) -> None:
        """`space`: the edge's own store, whose space rules (min_free, journal reserve) the cache obeys too."""
        self.root = cache_root(store_dir)
        self.journal = Journal(self.root, on_full=space.release_reserve if space is not None else None)
        self.ingestor = Ingestor(FileStore(self.root, space=space), self.journal)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.journal.close()

    def put(self, part10: bytes) -> Path:
        """Keep one instance (Part 10 bytes from the center); returns its file. Idempotent."""
        data, ts, sop_class, sop_uid = split_part10(part10)
        outcome = self.ingestor.store_instance(data, ts, sop_class, sop_uid, CACHE_AE)
        if outcome.status != 0:
            raise RenkeiError(f"cannot keep {sop_uid} in the edge cache: {outcome.message}")
        entry = self.journal.entry(sop_uid)
        if entry is None:
            raise RenkeiError(f"{sop_uid} stored in the edge cache but not journaled")
        if entry.upload_state != "verified":
            # already in the center: the cache must never be uploaded as this site's own
            self.journal.set_upload_state([sop_uid], "verified")
        return entry.path

    def has_study(self, study_uid: str, instances: int) -> bool:
        return len(self.journal.instances(study_uid)) >= instances

    def source(self) -> CacheSource:
        return CacheSource(self.journal)


class CacheSource(LocalSource):
    """Q/R over the edge cache (other sites' studies); access is decided per study."""

    name = "cache"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


_STUDY_NAMES = names("PATIENT", "STUDY")


def _study_record(row: StudyRow) -> dict[str, Any]:
    return {
        **{keyword: getattr(row, name) for keyword, name in _STUDY_NAMES.items()},
        "SpecificCharacterSet": row.specific_character_set,
        "ModalitiesInStudy": "\\".join(sorted(set(row.modalities))),
        "NumberOfStudyRelatedSeries": str(row.series_count),
        "NumberOfStudyRelatedInstances": str(row.instance_count),
    }


class CenterSource:
    """Studies this site may see that are held in the center (fetched on retrieval)."""

    name = "center"

    def __init__(
        self,
        site_id: str,
        catalog: Catalog,
        store: ObjectStore,
        cache: EdgeCache,
        prefetch: int = 4,
        site_issuer: str = "",
        issuer_sites: Mapping[str, str] | None = None,
    ) -> None:
        self.site_id = site_id
        self.site_issuer = site_issuer
        self.issuer_sites = dict(issuer_sites or {})
        self.catalog = catalog
        self.store = store
        self.cache = cache
        self.prefetch = prefetch

    # -- C-FIND ------------------------------------------------------------
    def _patients_of(self, query: Mapping[str, tuple[str, str]]) -> list[tuple[str, str | None]] | None:
        """The (patient_id, issuer) pairs a PatientID key means at this site: the ID under the query's
        issuer (default: this site's), and the same person's IDs at other sites (patient links)."""
        ids = single_values(query, "PatientID")
        if not ids:
            return None
        issuers = single_values(query, "IssuerOfPatientID")
        issuer = issuers[0] if issuers else self.site_issuer
        pairs: list[tuple[str, str | None]] = []
        for pid in ids:
            pairs.append((pid, issuer))
            site = self.issuer_sites.get(issuer, self.site_id)
            person = self.catalog.person_of(site, pid, issuer)
            if person:
                pairs.extend((p, i) for _s, p, i in self.catalog.patient_ids_of(person))
        return list(dict.fromkeys(pairs))

    def _studies(self, query: Mapping[str, tuple[str, str]]) -> list[StudyRow]:
        uids = single_values(query, "StudyInstanceUID")
        rows = self.catalog.visible_studies(self.site_id, self._patients_of(query))
        if uids:
            wanted = set(uids)
            rows = [r for r in rows if r.study_uid in wanted]
        return rows

    def find(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterator[dict[str, Any]]:
        try:
            if level == PATIENT:
                records = self._patients(query)
            elif level == STUDY:
                records = [_study_record(r) for r in self._studies(query)]
            elif level == SERIES:
                records = self._series(query)
            elif level == IMAGE:
                records = self._images(query)
            else:
                raise QueryError(f"unknown Query/Retrieve Level {level!r}")
        except QueryError:
            raise
        except (RenkeiError, OSError) as exc:
            # the center unreachable must not stop the site's own studies from being answered
            LOGGER.warning("C-FIND: the center's studies are left out (catalog unreachable: %s)", exc)
            return
        for record in records:
            if all(
                match_attribute(vr, text, _text(record.get(kw))) for kw, (vr, text) in query.items() if kw in record
            ):
                yield record

    def _patients(self, query: Mapping[str, tuple[str, str]]) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], list[StudyRow]] = {}
        for row in self._studies(query):
            groups.setdefault((row.patient_id, row.issuer_of_patient_id), []).append(row)
        out = []
        for rows in groups.values():
            latest = max(rows, key=lambda r: (r.study_date, r.study_time))
            rec = {
                k: v
                for k, v in _study_record(latest).items()
                if k
                in (
                    "PatientName",
                    "PatientID",
                    "IssuerOfPatientID",
                    "PatientBirthDate",
                    "PatientSex",
                    "SpecificCharacterSet",
                )
            }
            rec["NumberOfPatientRelatedStudies"] = str(len(rows))
            rec["NumberOfPatientRelatedSeries"] = str(sum(r.series_count for r in rows))
            rec["NumberOfPatientRelatedInstances"] = str(sum(r.instance_count for r in rows))
            rec["_study_uids"] = [r.study_uid for r in rows]
            out.append(rec)
        return out

    def _study_uids_of(self, query: Mapping[str, tuple[str, str]]) -> list[StudyRow]:
        uids = single_values(query, "StudyInstanceUID")
        if not uids:
            raise QueryError("a SERIES or IMAGE level query needs the Study Instance UID")
        return self._studies(query)

    def _series(self, query: Mapping[str, tuple[str, str]]) -> list[dict[str, Any]]:
        studies = {r.study_uid: r for r in self._study_uids_of(query)}
        out = []
        for study_uid, series in self.catalog.series_summaries(list(studies)).items():
            for s in series:
                out.append(
                    {
                        "StudyInstanceUID": study_uid,
                        "SeriesInstanceUID": s.get("series_uid", ""),
                        "Modality": s.get("modality", ""),
                        "SeriesNumber": _text(s.get("series_number")),
                        "SeriesDescription": s.get("series_description", ""),
                        "SpecificCharacterSet": studies[study_uid].specific_character_set,
                        "NumberOfSeriesRelatedInstances": str(s.get("instances", 0)),
                    }
                )
        return out

    def _images(self, query: Mapping[str, tuple[str, str]]) -> list[dict[str, Any]]:
        series = set(single_values(query, "SeriesInstanceUID") or [])
        out = []
        for study in self._study_uids_of(query):
            for inst in self.catalog.instances(study.study_uid):
                if series and inst["series_uid"] not in series:
                    continue
                out.append(
                    {
                        "StudyInstanceUID": study.study_uid,
                        "SeriesInstanceUID": inst["series_uid"],
                        "SOPInstanceUID": inst["sop_instance_uid"],
                        "SOPClassUID": inst["sop_class_uid"],
                        "InstanceNumber": _text(inst.get("instance_number")),
                        "SpecificCharacterSet": study.specific_character_set,
                    }
                )
        return out

    # -- C-MOVE / C-GET ------------------------------------------------------
    def retrieve(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterator[RetrieveItem]:
        try:
            rows = self._retrieve_rows(level, query)
        except QueryError:
            raise
        except (RenkeiError, OSError) as exc:  # the center unreachable: the local sources still serve
            LOGGER.warning("retrieve: the center's copies are left out (catalog unreachable: %s)", exc)
            return
        yield from self._items(rows)

    def _retrieve_rows(self, level: str, query: Mapping[str, tuple[str, str]]) -> list[InstanceRow]:
        values = retrieve_values(level, query)
        if level == PATIENT:
            studies = self.catalog.visible_studies(self.site_id, self._patients_of(query))
        elif level == STUDY:
            wanted = set(values)
            studies = [r for r in (self.catalog.study(uid) for uid in wanted) if r is not None]
        else:
            studies = self._study_uids_of(query)
        series = set(values) if level == SERIES else None
        sops = set(values) if level == IMAGE else None
        rows = []
        for study in studies:
            for inst in self.catalog.instances(study.study_uid):
                if series is not None and inst["series_uid"] not in series:
                    continue
                if sops is not None and inst["sop_instance_uid"] not in sops:
                    continue
                rows.append(inst)
        return rows

    def instance_paths(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] | None = None
    ) -> Iterator[RetrieveItem]:
        rows = [
            r
            for r in self.catalog.instances(study_uid)
            if (series_uid is None or r["series_uid"] == series_uid)
            and (not sop_uids or r["sop_instance_uid"] in set(sop_uids))
        ]
        yield from self._items(rows)

    def _items(self, rows: list[InstanceRow]) -> Iterator[RetrieveItem]:
        fetcher = _Prefetcher(self, rows, self.prefetch)
        for row in rows:
            yield RetrieveItem(
                row["study_uid"],
                row["series_uid"],
                row["sop_instance_uid"],
                row["sop_class_uid"],
                row["transfer_syntax_uid"],
                source=self.name,
                fetch=fetcher.getter(row["sop_instance_uid"]),
            )

    def fetch(self, row: Mapping[str, Any]) -> Path:
        """The instance's file in the edge cache, fetched from the center (verified) when needed."""
        entry = self.cache.journal.entry(row["sop_instance_uid"])
        if entry is not None and entry.local and entry.instance.sha256 == row["sha256"] and entry.path.exists():
            return entry.path
        return self.cache.put(self.store.read_verified(row["object_key"], row["sha256"]))


class _Prefetcher:
    """Fetches the instances of one retrieval in order, a few ahead of the sender."""

    def __init__(self, source: CenterSource, rows: list[InstanceRow], ahead: int) -> None:
        self.source = source
        self.rows = {r["sop_instance_uid"]: r for r in rows}
        self.order = [r["sop_instance_uid"] for r in rows]
        self.ahead = max(1, ahead)
        self.futures: OrderedDict[str, Future[Path]] = OrderedDict()
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def getter(self, sop_uid: str) -> Callable[[], Path]:
        return lambda: self.get(sop_uid)

    def _submit(self, sop_uid: str) -> None:
        if sop_uid not in self.futures:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=self.ahead, thread_name_prefix="center-fetch")
            self.futures[sop_uid] = self.pool.submit(self.source.fetch, self.rows[sop_uid])

    def get(self, sop_uid: str) -> Path:
        with self.lock:
            index = self.order.index(sop_uid)
            study = self.rows[sop_uid]["study_uid"]
            # ahead only within the same study: access is decided per study, and a refused study's
            # instances are never asked for, so they are never fetched either
            for uid in self.order[index : index + self.ahead + 1]:
                if self.rows[uid]["study_uid"] == study:
                    self._submit(uid)
            future = self.futures[sop_uid]
        try:
            return future.result()
        finally:
            with self.lock:
                self.futures.pop(sop_uid, None)
                if index == len(self.order) - 1 and self.pool is not None:
                    self.pool.shutdown(wait=False)


class StudyOrigins:
    """Which studies in this edge's own store are the site's own, from the catalog's origin.

    A study whose UID the catalog knows under another site's origin (a granted
    study that one of the site's nodes C-STOREd back into its edge) is not the
    site's own: it is visible here only while it is granted to the site. While
    the catalog cannot be read, the last answer is kept, and a study never
    looked up counts as the site's own (the site keeps serving its studies
    through a center outage).
    """

    def __init__(
        self, site_id: str, origin_of: Callable[[str], str | None], ttl: float = 30.0, size: int = 100_000
    ) -> None:
        self.site_id = site_id
        self._origin_of = origin_of
        self.ttl = ttl
        self.size = size
        self._known: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def is_own(self, study_uid: str) -> bool:
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(study_uid)
        if cached is not None and now - cached[0] < self.ttl:
            origin = cached[1]
        else:
            try:
                origin = self._origin_of(study_uid)
            except (RenkeiError, OSError) as exc:
                LOGGER.warning("origin of %s unknown (catalog unreachable: %s)", study_uid, exc)
                origin = cached[1] if cached is not None else None
            else:
                with self._lock:
                    self._known[study_uid] = (now, origin)
                    self._known.move_to_end(study_uid)
                    while len(self._known) > self.size:
                        self._known.popitem(last=False)
        return origin is None or origin == self.site_id


def catalog_origin(catalog: Catalog) -> Callable[[str], str | None]:
    """The origin site of a study in the catalog (None when it is not registered)."""

    def origin_of(study_uid: str) -> str | None:
        row = catalog.study(study_uid)
        return row.origin_site if row else None

    return origin_of


class SharingAccess:
    """The sharing decision at this edge's exits, and the audit of every cross-site access.

    A caller's site is the site its AE title belongs to (this site's PACS and
    workstations, or another site's edge). Local studies taken at this site are
    always visible to its own nodes; anything else asks `decide(site, study)`.
    """

    def __init__(
        self,
        config: RegionConfig,
        site_id: str,
        decide: Callable[[str, str], bool],
        record: Callable[[Sequence[AccessEvent], str], None] | None = None,
        own_studies: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.site_id = site_id
        self._decide = decide
        self._record = record
        self._own = own_studies or (lambda uid: True)
        self._pending: list[AccessEvent] = []
        self._lock = threading.Lock()

    def caller_site(self, calling_ae: str) -> str | None:
        site = self.config.site_of_ae(calling_ae)
        return site.id if site else None

    def _allowed(self, calling_ae: str, study_uid: str, source: str) -> bool:
        site = self.caller_site(calling_ae)
        if site is None:
            return False
        if source == "local" and site == self.site_id and self._own(study_uid):
            return True
        try:
            return bool(self._decide(site, study_uid))
        except (RenkeiError, OSError) as exc:  # the catalog unreachable: deny, never guess
            LOGGER.warning("no sharing decision for %s (catalog unreachable: %s): refused", study_uid, exc)
            return False

    def may_see(self, calling_ae: str, study_uid: str, source: str) -> bool:
        return self._allowed(calling_ae, study_uid, source)

    def may_retrieve(self, calling_ae: str, study_uid: str, source: str) -> bool:
        return self._allowed(calling_ae, study_uid, source)

    def audit(self, event: AccessEvent) -> None:
        """Cross-site events (another site's study, or a refusal) go to the catalog's audit chain."""
        if event.source == "local" and event.allowed and self.caller_site(event.calling_ae) == self.site_id:
            return
        if self._record is None:
            return
        caller = self.caller_site(event.calling_ae) or self.site_id
        try:
            self._record([event], caller)
        except Exception as exc:  # auditing must never break the association (AuditBuffer keeps and retries)
            LOGGER.error("could not audit a %s of %s by %s: %s", event.action, event.study_uid, event.calling_ae, exc)


def catalog_recorder(catalog: Catalog) -> Callable[[Sequence[AccessEvent], str], None]:
    """Writes access events to the catalog's audit chain (who: caller's site and AE; what; outcome)."""

    def record(events: Sequence[AccessEvent], caller_site: str) -> None:
        drafts = []
        for e in events:
            row = catalog.study(e.study_uid)
            details = {"source": e.source, "level": e.detail}
            if e.destination:
                details["destination"] = e.destination
            drafts.append(
                AuditDraft(
                    caller_site,
                    e.calling_ae,
                    e.action,
                    e.study_uid,
                    row.origin_site if row else None,
                    "ok" if e.allowed else "denied",
                    details,
                )
            )
        catalog.append_audits(drafts)

    return record


class AuditBuffer:
    """Batches access events into one audit commit every `interval` seconds (and on flush/close)."""

    def __init__(self, record: Callable[[Sequence[AccessEvent], str], None], interval: float = 0.5) -> None:
        self._record = record
        self.interval = interval
        self._events: list[tuple[AccessEvent, str]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-buffer", daemon=True)
        self._thread.start()

    def __call__(self, events: Sequence[AccessEvent], caller_site: str) -> None:
        with self._lock:
            self._events.extend((e, caller_site) for e in events)
        self._wake.set()

    MAX_KEPT = 100_000  # events kept for a later attempt while the catalog cannot be written

    def flush(self) -> bool:
        """Write what is buffered; failed batches stay for the next flush. True when all was written."""
        with self._lock:
            events, self._events = self._events, []
        by_site: dict[str, list[AccessEvent]] = {}
        for event, site in events:
            by_site.setdefault(site, []).append(event)
        failed: list[tuple[AccessEvent, str]] = []
        for site, batch in by_site.items():
            try:
                self._record(batch, site)
            except Exception as exc:
                LOGGER.error("could not write %d access audit events yet (kept, retried): %s", len(batch), exc)
                failed.extend((e, site) for e in batch)
        if failed:
            with self._lock:
                self._events[:0] = failed
                if len(self._events) > self.MAX_KEPT:
                    LOGGER.critical(
                        "%d access audit events dropped: the catalog has been unwritable too long",
                        len(self._events) - self.MAX_KEPT,
                    )
                    del self._events[: len(self._events) - self.MAX_KEPT]
        return not failed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._stop.wait(self.interval)
            self._wake.clear()
            if not self.flush():
                self._stop.wait(5)  # the catalog is unwritable: try again a little later
                self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.flush()
