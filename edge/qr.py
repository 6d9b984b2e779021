"""Query/retrieve over data sources, behind small interfaces.

A `QRSource` answers C-FIND queries with records (keyword -> decoded text) and
resolves C-MOVE/C-GET requests to instances (`RetrieveItem`: a file, or bytes).
The edge has one source now, `LocalSource` over its journal; the next issue
adds one for studies granted to the site but held only in the center. An
`Access` decides what a calling AE may see and retrieve and hears every
decision (`audit`), so policy is enforced at this exit too.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from renkei.edge.journal import Journal
from renkei.edge.matching import QueryTooComplex, check_query_value, match_attribute
from renkei.edge.parsing import text_of
from renkei.errors import RenkeiError

LOGGER = logging.getLogger(__name__)

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS: tuple[str, ...] = (PATIENT, STUDY, SERIES, IMAGE)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_MODELS = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})
STUDY_ROOT_MODELS = frozenset({STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET})

# The unique key of each level, and the levels' own attributes (for the answers).
UNIQUE_KEYS = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", IMAGE: "SOPInstanceUID"}
_IGNORED_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}


class QueryError(RenkeiError):
    """A C-FIND/C-MOVE/C-GET identifier that cannot be answered (wrong level or keys)."""


@dataclass(frozen=True)
class RetrieveItem:
    """One instance to send: a local file (Part 10) or, from remote sources, its bytes."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path | None = None
    data: bytes | None = None  # a whole Part 10 file, when there is no local path
    source: str = "local"
    fetch: Callable[[], Path] | None = None  # fetches the file when needed (remote sources)

    def materialised(self) -> RetrieveItem:
        """This item with a local path or bytes (fetching it when it has neither yet)."""
        if self.path is None and self.data is None and self.fetch is not None:
            return replace(self, path=self.fetch(), fetch=None)
        return self


@dataclass(frozen=True)
class AccessEvent:
    """One access decision, for the audit trail."""

    action: str  # "find" | "retrieve"
    calling_ae: str
    study_uid: str
    source: str
    allowed: bool
    detail: str = ""
    destination: str = ""  # a C-MOVE's destination AE title


class QRSource(Protocol):
    """Where query/retrieve data comes from (the edge's store; later, the center)."""

    name: str

    def find(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterable[dict[str, Any]]:
        """Records at `level` matching `query` (keyword -> (VR, decoded query text))."""
        ...

    def retrieve(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterable[RetrieveItem]:
        """The instances a C-MOVE/C-GET identifier at `level` designates."""
        ...

    def instance_paths(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] | None = None
    ) -> Iterable[RetrieveItem]: ...


class Access(Protocol):
    """What a calling AE may see and retrieve; hears every decision."""

    def may_see(self, calling_ae: str, study_uid: str, source: str) -> bool: ...

    def may_retrieve(self, calling_ae: str, study_uid: str, source: str) -> bool: ...

    def audit(self, event: AccessEvent) -> None: ...


class AllowLocal:
    """The default: a site's own edge store is visible to every AE allowed to associate."""

    def __init__(self, audit_hook: Callable[[AccessEvent], None] | None = None) -> None:
        self.audit_hook = audit_hook

    def may_see(self, calling_ae: str, study_uid: str, source: str) -> bool:
        return source == "local"

    def may_retrieve(self, calling_ae: str, study_uid: str, source: str) -> bool:
        return source == "local"

    def audit(self, event: AccessEvent) -> None:
        LOGGER.debug("access %s", event)
        if self.audit_hook is not None:
            self.audit_hook(event)


def single_values(query: Mapping[str, tuple[str, str]], keyword: str) -> list[str] | None:
    """The exact values a key asks for (a UID list, or one value without wildcards), else None."""
    if keyword not in query:
        return None
    vr, text = query[keyword]
    text = text.strip()
    if not text or "*" in text or "?" in text or (vr in ("DA", "TM", "DT") and "-" in text):
        return None
    return [v.strip() for v in text.split("\\") if v.strip()]


def retrieve_values(level: str, query: Mapping[str, tuple[str, str]]) -> list[str]:
    """The unique-key values a C-MOVE/C-GET identifier at `level` names; QueryError when there are none."""
    key = UNIQUE_KEYS.get(level)
    if key is None:
        raise QueryError(f"unknown Query/Retrieve Level {level!r}")
    values = single_values(query, key)
    if not values:
        raise QueryError(f"a {level} level retrieve needs {key} (one value or a list)")
    return values


class LocalSource:
    """The edge's own store, through its journal."""

    name = "local"

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def find(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterator[dict[str, Any]]:
        if level == PATIENT:
            ids = single_values(query, "PatientID")
            rows = self.journal.patient_rows(ids[0]) if ids and len(ids) == 1 else self.journal.patient_rows()
        elif level == STUDY:
            study_uids = single_values(query, "StudyInstanceUID")
            ids = single_values(query, "PatientID")
            rows = self.journal.study_rows(study_uids=study_uids, patient_id=ids[0] if ids and len(ids) == 1 else None)
        elif level == SERIES:
            rows = self.journal.series_rows(
                study_uids=single_values(query, "StudyInstanceUID"),
                series_uids=single_values(query, "SeriesInstanceUID"),
            )
        elif level == IMAGE:
            rows = self.journal.instance_rows(
                study_uids=single_values(query, "StudyInstanceUID"),
                series_uids=single_values(query, "SeriesInstanceUID"),
                sop_instance_uids=single_values(query, "SOPInstanceUID"),
            )
        else:
            raise QueryError(f"unknown Query/Retrieve Level {level!r}")
        for row in rows:
            if all(match_attribute(vr, text, _as_text(row.get(kw))) for kw, (vr, text) in query.items() if kw in row):
                yield row

    def retrieve(self, level: str, query: Mapping[str, tuple[str, str]]) -> Iterator[RetrieveItem]:
        values = retrieve_values(level, query)
        if level == PATIENT:
            study_uids = [
                uid
                for pid in values
                for row in self.journal.study_rows(patient_id=pid)
                for uid in [row["StudyInstanceUID"]]
            ]
            rows = self.journal.instance_rows(study_uids=study_uids) if study_uids else []
        elif level == STUDY:
            rows = self.journal.instance_rows(study_uids=values)
        elif level == SERIES:
            rows = self.journal.instance_rows(study_uids=single_values(query, "StudyInstanceUID"), series_uids=values)
        else:
            rows = self.journal.instance_rows(
                study_uids=single_values(query, "StudyInstanceUID"),
                series_uids=single_values(query, "SeriesInstanceUID"),
                sop_instance_uids=values,
            )
        for row in rows:
            yield self._item(row)

    def instance_paths(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] | None = None
    ) -> Iterator[RetrieveItem]:
        rows = self.journal.instance_rows(
            study_uids=[study_uid],
            series_uids=[series_uid] if series_uid else None,
            sop_instance_uids=list(sop_uids) if sop_uids else None,
        )
        for row in rows:
            yield self._item(row)

    def _item(self, row: Mapping[str, Any]) -> RetrieveItem:
        return RetrieveItem(
            study_uid=row["StudyInstanceUID"],
            series_uid=row["SeriesInstanceUID"],
            sop_instance_uid=row["SOPInstanceUID"],
            sop_class_uid=row["SOPClassUID"],
            transfer_syntax_uid=row["_transfer_syntax_uid"],
            path=self.journal.store_dir / row["_path"],
            source=self.name,
        )


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def query_of(identifier: Dataset) -> tuple[str, dict[str, tuple[str, str]], list[str]]:
    """(level, keyword -> (VR, decoded text), requested keywords) of a request identifier.

    Text is decoded with the identifier's own Specific Character Set (pydicom does that).
    """
    try:
        level = str(identifier.QueryRetrieveLevel).strip().upper()
    except AttributeError:
        raise QueryError("the identifier has no Query/Retrieve Level (0008,0052)") from None
    if level not in LEVELS:
        raise QueryError(f"unknown Query/Retrieve Level {level!r}")
    query: dict[str, tuple[str, str]] = {}
    requested: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for element in identifier:
            keyword = element.keyword or keyword_for_tag(element.tag)
            if not keyword or keyword in _IGNORED_KEYS or element.tag.is_private:
                continue
            requested.append(keyword)
            if element.VR == "SQ":
                continue
            try:
                text = text_of(element.value)
            except Exception as exc:
                raise QueryError(f"query key {keyword} cannot be decoded: {exc}") from None
            try:
                check_query_value(keyword, element.VR, text)
            except QueryTooComplex as exc:
                raise QueryError(str(exc)) from None
            query[keyword] = (element.VR, text)
    return level, query, requested


def check_level(model: str, level: str) -> None:
    """Study Root has no PATIENT level (PS3.4 C.6.2)."""
    if model in STUDY_ROOT_MODELS and level == PATIENT:
        raise QueryError("the Study Root model has no PATIENT level; use Patient Root")


def response_identifier(
    record: Mapping[str, Any],
    level: str,
    requested: Sequence[str],
    model: str,
    retrieve_ae: str | None = None,
) -> Dataset:
    """A C-FIND answer: the requested keys with the record's values, in its character set."""
    ds = Dataset()
    charset = _as_text(record.get("SpecificCharacterSet"))
    if charset:
        values = charset.split("\\")
        ds.SpecificCharacterSet = values if len(values) > 1 else values[0]
    ds.QueryRetrieveLevel = level
    keys = list(requested)
    # unique keys of this and the levels above (hierarchical model)
    levels = LEVELS if model in PATIENT_ROOT_MODELS else LEVELS[1:]
    for upper in levels[: levels.index(level) + 1] if level in levels else ():
        if UNIQUE_KEYS[upper] not in keys:
            keys.append(UNIQUE_KEYS[upper])
    for keyword in keys:
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if keyword == "RetrieveAETitle":
            ds.add_new(tag, vr, retrieve_ae or "")
            continue
        if vr == "SQ":
            ds.add_new(tag, vr, DicomSequence([]))
            continue
        text = _as_text(record.get(keyword))
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "US or SS"):
            if not text:
                ds.add_new(tag, vr.split(" ")[0], None)
                continue
            try:
                number: Any = float(text) if vr in ("FL", "FD") else int(text)
            except ValueError:
                continue
            ds.add_new(tag, vr.split(" ")[0], number)
            continue
        if "\\" in text and vr != "PN":
            ds.add_new(tag, vr, text.split("\\"))
        else:
            ds.add_new(tag, vr.split(" ")[0], text)
    return ds


class QueryTimeout(QueryError):
    """A C-FIND ran past the edge's time budget for one query."""


class QRService:
    """C-FIND and retrieve planning over several sources, with access decisions."""

    def __init__(self, sources: Sequence[QRSource], access: Access, ae_title: str, time_budget: float = 10.0) -> None:
        self.sources = list(sources)
        self.access = access
        self.ae_title = ae_title
        self.time_budget = time_budget

    def find(
        self, calling_ae: str, model: str, identifier: Dataset, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[Dataset]:
        """Yield one answer identifier per matching record the caller may see.

        Stops when the caller cancels; raises QueryTimeout past `time_budget`.
        PATIENT-level counts and attributes come from the studies the caller may
        see only.
        """
        level, query, requested = query_of(identifier)
        check_level(model, level)
        deadline = time.monotonic() + self.time_budget
        seen: set[str] = set()
        for source in self.sources:
            for record in source.find(level, query):
                if cancelled():
                    return
                if time.monotonic() > deadline:
                    raise QueryTimeout(
                        f"the query ran over the edge's budget of {self.time_budget:g} s; "
                        "narrow it (a Patient ID, a date range, fewer wildcards)"
                    )
                key = _as_text(record.get(UNIQUE_KEYS[level]))
                if level != PATIENT and key in seen:
                    continue
                studies = record.get("_study_uids") or [record.get("StudyInstanceUID", "")]
                visible = [s for s in studies if self.access.may_see(calling_ae, s, source.name)]
                if not visible:
                    continue
                if level == PATIENT and len(visible) < len(studies):
                    narrowed = _patient_record_of(source, record, visible)
                    if narrowed is None or not _matches(query, narrowed):
                        continue
                    record = narrowed
                seen.add(key)
                for study_uid in visible:
                    self.access.audit(AccessEvent("find", calling_ae, study_uid, source.name, True, level))
                yield response_identifier(record, level, requested, model, self.ae_title)

    def plan_retrieve(self, calling_ae: str, model: str, identifier: Dataset) -> tuple[list[RetrieveItem], int]:
        """The instances to send for a C-MOVE/C-GET, and how many were refused by access."""
        level, query, _requested = query_of(identifier)
        check_level(model, level)
        items: list[RetrieveItem] = []
        refused = 0
        seen: set[str] = set()
        decisions: dict[tuple[str, str], bool] = {}
        for source in self.sources:
            for item in source.retrieve(level, query):
                if item.sop_instance_uid in seen:
                    continue
                key = (item.study_uid, source.name)
                if key not in decisions:
                    allowed = self.access.may_retrieve(calling_ae, item.study_uid, source.name)
                    decisions[key] = allowed
                    self.access.audit(AccessEvent("retrieve", calling_ae, item.study_uid, source.name, allowed, level))
                if not decisions[key]:
                    refused += 1
                    continue
                seen.add(item.sop_instance_uid)
                items.append(item)
        return items, refused

    def for_destination(
        self, calling_ae: str, destination_ae: str, items: Sequence[RetrieveItem]
    ) -> tuple[list[RetrieveItem], int]:
        """The items the C-MOVE destination may hold (decided for the destination's site).

        The party that ends up holding the data is the destination, not the
        caller: each study is decided for it, and every refusal is audited.
        """
        kept: list[RetrieveItem] = []
        refused = 0
        decisions: dict[tuple[str, str], bool] = {}
        for item in items:
            key = (item.study_uid, item.source)
            if key not in decisions:
                allowed = self.access.may_retrieve(destination_ae, item.study_uid, item.source)
                decisions[key] = allowed
                if not allowed:
                    self.access.audit(
                        AccessEvent(
                            "retrieve",
                            calling_ae,
                            item.study_uid,
                            item.source,
                            False,
                            "destination may not see the study",
                            destination_ae,
                        )
                    )
            if decisions[key]:
                kept.append(item)
            else:
                refused += 1
        return kept, refused

    def refuse_destination(self, calling_ae: str, destination_ae: str, items: Sequence[RetrieveItem]) -> None:
        """Audit a C-MOVE refused because its destination is not a node of this site."""
        for study_uid, source in dict.fromkeys((i.study_uid, i.source) for i in items):
            self.access.audit(
                AccessEvent(
                    "retrieve",
                    calling_ae,
                    study_uid,
                    source,
                    False,
                    "destination is not a node of this site",
                    destination_ae,
                )
            )


def _matches(query: Mapping[str, tuple[str, str]], record: Mapping[str, Any]) -> bool:
    return all(match_attribute(vr, text, _as_text(record.get(kw))) for kw, (vr, text) in query.items() if kw in record)


def _patient_record_of(source: QRSource, record: Mapping[str, Any], visible: Sequence[str]) -> dict[str, Any] | None:
    """A PATIENT-level record rebuilt from the visible studies only (counts, latest attributes)."""
    rows = [
        r
        for r in source.find(STUDY, {"StudyInstanceUID": ("UI", "\\".join(visible))})
        if r.get("StudyInstanceUID") in set(visible)
    ]
    if not rows:
        return None
    latest = max(rows, key=lambda r: (_as_text(r.get("StudyDate")), _as_text(r.get("StudyTime"))))
    out = dict(record)
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "SpecificCharacterSet",
    ):
        if keyword in latest:
            out[keyword] = latest[keyword]
    out["NumberOfPatientRelatedStudies"] = str(len(rows))
    out["NumberOfPatientRelatedSeries"] = str(
        sum(int(_as_text(r.get("NumberOfStudyRelatedSeries")) or 0) for r in rows)
    )
    out["NumberOfPatientRelatedInstances"] = str(
        sum(int(_as_text(r.get("NumberOfStudyRelatedInstances")) or 0) for r in rows)
    )
    out["_study_uids"] = [r["StudyInstanceUID"] for r in rows]
    return out


@dataclass
class RetrieveTally:
    """Sub-operation counts of one C-MOVE/C-GET."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
