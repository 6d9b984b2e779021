"""The catalog's records: what its queries return and what a commit adds, and the row -> record converters.

Frozen dataclasses (CommitPlan excepted: a commit's builder fills it in). The
converters turn a DuckDB row (a dict) into its record.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pyarrow as pa

from renkei.catalog import tables
from renkei.catalog.audit import AuditDraft
from renkei.records import StudyInfo


class InstanceRow(TypedDict, total=False):
    """One instance as `Catalog.instances` returns it (a row of the instances table; `corrected` only
    for version='current': True when a later version's key, SHA-256 and size replace the first)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    instance_number: int | None
    object_key: str
    origin_site: str
    registered_at: dt.datetime
    corrected: bool


class InstanceRef(TypedDict):
    """Where one instance's current bytes are, as `Catalog.iter_instances` yields it (the verification)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    object_key: str
    sha256: str
    size: int
    origin_site: str


class SeriesRow(TypedDict):
    """One series as `Catalog.series` returns it."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    origin_site: str
    registered_at: dt.datetime


class SeriesSummary(TypedDict):
    """One series of a study with its instance count (`Catalog.series_summaries`, the study browser)."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instances: int


@dataclass(frozen=True)
class StudyRow:
    """A study as the catalog knows it: its StudyInfo plus counts derived from its instances."""

    study_uid: str
    origin_site: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    referring_physician: str
    requesting_service: str
    institution_name: str
    study_id: str
    specific_character_set: str
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    bytes: int
    registered_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["modalities"] = list(self.modalities)
        return data

    def study_info(self) -> StudyInfo:
        return StudyInfo.from_dict(self.to_dict())


@dataclass(frozen=True)
class ConflictRecord:
    """Different bytes registered under an instance's key; the new bytes belong under conflict_key."""

    study_uid: str
    sop_instance_uid: str
    object_key: str
    existing_sha256: str
    new_sha256: str
    conflict_key: str
    origin_site: str
    holder: str
    at: dt.datetime | None = None
    new_size: int | None = None

    @property
    def why(self) -> str:
        by = self.holder.replace("edge:", "the edge of ") if self.holder.startswith("edge:") else self.holder
        when = self.at.strftime("%Y-%m-%d %H:%M:%S UTC") if self.at else "an unknown time"
        return (
            f"sent again by {by} with other bytes at {when}; kept beside the first version, and current "
            "as the latest received"
        )


@dataclass(frozen=True)
class RegisterResult:
    """What a registration changed: new instances, those already present, and conflicts."""

    new_instances: int
    already_present: int
    conflicts: tuple[ConflictRecord, ...] = ()
    new_series: int = 0
    studies: tuple[str, ...] = ()
    seq: int | None = None  # the commit, None when nothing changed


@dataclass(frozen=True)
class LocationRecord:
    """One copy of a study (sop_instance_uid None) or of one instance, at a holder."""

    study_uid: str
    sop_instance_uid: str | None
    holder: str  # 'center', 'edge:<site>', 'pacs:<site>'
    state: str
    verified_at: dt.datetime | None
    detail: str
    by: str
    at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class GrantRecord:
    """A grant or revocation event; `current` marks the latest event for its study and site."""

    study_uid: str
    site: str
    action: str
    by_kind: str
    by: str
    reason: str
    rule: str | None
    policy_version: str | None
    at: dt.datetime
    current: bool = False

    @property
    def active(self) -> bool:
        return self.current and self.action == tables.GRANT

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["active"] = self.active
        return data


@dataclass(frozen=True)
class GrantRequest:
    """One grant or revocation to write (see Catalog.grant_many)."""

    study_uid: str
    site: str
    by_kind: str
    by: str
    reason: str = ""
    rule: str | None = None
    policy_version: str | None = None
    action: str = tables.GRANT


@dataclass(frozen=True)
class ConsentRecord:
    site: str
    patient_id: str
    issuer: str
    state: str
    by: str
    reason: str
    at: dt.datetime


@dataclass(frozen=True)
class PatientCandidate:
    """A site-local patient seen in the studies table, for demographic matching."""

    site: str
    patient_id: str
    issuer: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    studies: int


@dataclass(frozen=True)
class SiteTotals:
    """Per origin site: studies, instances and bytes held, and the backlog not yet verified."""

    site: str
    studies: int
    instances: int
    bytes: int
    backlog_studies: int
    pending: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class RegistrationBatch:
    """The instances of one origin site that one commit registered: when, how many, how many bytes."""

    origin_site: str
    at: dt.datetime
    studies: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class StudyRegistration:
    """When a study's instances reached the catalog: its first and last registration, and counts."""

    study_uid: str
    origin_site: str
    first_registered_at: dt.datetime
    last_registered_at: dt.datetime
    instances: int
    bytes: int


@dataclass
class CommitPlan:
    """What one commit adds: new rows per table, audit events, files to remove, a result."""

    rows: dict[str, pa.Table] = field(default_factory=dict)
    audit: list[AuditDraft] = field(default_factory=list)
    prewritten: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    remove: dict[str, list[str]] = field(default_factory=dict)
    vacuumed: list[str] = field(default_factory=list)
    result: Any = None


# ------------------------------------------------------------------ row -> record
def study_row(r: dict[str, Any]) -> StudyRow:
    data: dict[str, Any] = {f: r.get(f) for f in StudyRow.__dataclass_fields__}
    for f in tables.STUDY_INFO_FIELDS:
        data[f] = data[f] or ""
    data["modalities"] = tuple(m for m in (r.get("modalities") or []) if m)
    for f in ("series_count", "instance_count", "bytes"):
        data[f] = int(data[f] or 0)
    return StudyRow(**data)


def location_record(r: dict[str, Any]) -> LocationRecord:
    """A locations row as a record (a study-level row has no SOP Instance UID)."""
    return LocationRecord(
        r["study_uid"],
        r.get("sop_instance_uid") or None,
        r["holder"],
        r["state"],
        r["verified_at"],
        r["detail"] or "",
        r["by"] or "",
        r["at"],
    )


def grant_record(r: dict[str, Any]) -> GrantRecord:
    return GrantRecord(
        r["study_uid"],
        r["site"],
        r["action"],
        r["by_kind"],
        r["by"],
        r["reason"] or "",
        r["rule"],
        r["policy_version"],
        r["at"],
        bool(r.get("current")),
    )


def conflict_record(r: dict[str, Any]) -> ConflictRecord:
    return ConflictRecord(**{k: v for k, v in r.items() if k != "_seq"})


def consent_record(r: dict[str, Any]) -> ConsentRecord:
    return ConsentRecord(**{k: v for k, v in r.items() if k not in ("_seq", "rn")})
