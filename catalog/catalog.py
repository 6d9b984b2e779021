"""The catalog: where every study is and who may see it, as Parquet beside the objects.

`Catalog` is the face every caller uses. Behind it, in parts:
catalog.engine (TableEngine: storage, the file cache, DuckDB's views, the one
query path and the commit), and one repository per concern, each holding the
engine: catalog.studies (registration, studies, series, instances),
catalog.grants (grants, consents, the visibility rule), catalog.locations,
catalog.patients, catalog.reports and catalog.audit_log. Their records are in
catalog.records, the input normalisers in catalog.normalise. See
docs/catalog.md for the design.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import duckdb
import fsspec
import pyarrow as pa

from renkei.catalog import tables
from renkei.catalog.audit import AuditDraft, AuditEvent, AuditVerification
from renkei.catalog.audit_log import AuditLog
from renkei.catalog.backup import BackupLocation
from renkei.catalog.compaction import CompactionResult, compact
from renkei.catalog.engine import DEFAULT_AUTO_COMPACT, TableEngine, check_data_file
from renkei.catalog.grants import Grants
from renkei.catalog.locations import Locations
from renkei.catalog.log import CommitLog, State
from renkei.catalog.normalise import origin_sites_text, validate_grant
from renkei.catalog.patients import Patients
from renkei.catalog.records import (
    CommitPlan,
    ConflictRecord,
    ConsentRecord,
    GrantRecord,
    GrantRequest,
    InstanceRef,
    InstanceRow,
    LocationRecord,
    PatientCandidate,
    RegisterResult,
    RegistrationBatch,
    SeriesRow,
    SeriesSummary,
    SiteTotals,
    StudyRegistration,
    StudyRow,
)
from renkei.catalog.reports import Reports
from renkei.catalog.studies import Studies
from renkei.records import StudyBatch

__all__ = [
    "Catalog",
    "CommitPlan",
    "ConflictRecord",
    "ConsentRecord",
    "GrantRecord",
    "GrantRequest",
    "InstanceRef",
    "InstanceRow",
    "LocationRecord",
    "PatientCandidate",
    "RegisterResult",
    "RegistrationBatch",
    "SiteTotals",
    "StudyRegistration",
    "StudyRow",
    "check_data_file",
    "origin_sites_text",
    "validate_grant",
]


class Catalog:
    """The catalog at `url` (a folder or s3://bucket/prefix).

    One instance per process (or thread-safe behind its lock); any number of
    processes may open the same url and write at once. Every query first
    catches up with the commits other writers made. Each method is one of a
    repository's (catalog.studies, .grants, .locations, .patients, .reports,
    .audit_log); `engine` is the TableEngine they share.
    """

    def __init__(
        self,
        url: str,
        s3_options: Any = None,
        *,
        writer: str | None = None,
        auto_compact: int | None = DEFAULT_AUTO_COMPACT,
        memory_limit: str = "768MB",
        threads: int | None = None,
        vacuum_grace_s: float = 600.0,
        background_compaction: bool = True,
        cache: bool = True,
        backup_url: str | None = None,
        backup_s3_options: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._engine = TableEngine(
            url,
            s3_options,
            writer=writer,
            auto_compact=auto_compact,
            memory_limit=memory_limit,
            threads=threads,
            vacuum_grace_s=vacuum_grace_s,
            background_compaction=background_compaction,
            cache=cache,
            backup_url=backup_url,
            backup_s3_options=backup_s3_options,
            cache_dir=cache_dir,
            compactor=compact,
        )
        self._studies = Studies(self._engine)
        self._grants = Grants(self._engine)
        self._locations = Locations(self._engine)
        self._patients = Patients(self._engine)
        self._reports = Reports(self._engine)
        self._audit = AuditLog(self._engine)

    @classmethod
    def from_layout(cls, layout: Any, **kwargs: Any) -> Catalog:
        """The catalog of a region: Layout(config, data_dir).catalog_url with the config's S3 options.

        On S3 its data files are cached under the data folder (cache/catalog/<url hash>), shared by
        every catalog the machine's processes open.
        """
        kwargs.setdefault("backup_url", layout.catalog_backup_url)
        url = layout.catalog_url
        if "://" in url and not url.startswith("file://") and kwargs.get("cache", True):
            key = hashlib.sha256(url.encode()).hexdigest()[:16]
            kwargs.setdefault("cache_dir", os.path.join(os.fspath(layout.data_dir), "cache", "catalog", key))
        return cls(url, layout.config.center.s3, **kwargs)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- the engine's (catalog.engine)
    @property
    def engine(self) -> TableEngine:
        """The table engine every repository of this catalog shares (what compaction drives)."""
        return self._engine

    @property
    def url(self) -> str:
        return self._engine.url

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._engine.fs

    @property
    def root(self) -> str:
        return self._engine.root

    @property
    def local(self) -> bool:
        return self._engine.local

    @property
    def log(self) -> CommitLog:
        return self._engine.log

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        return self._engine.con

    @property
    def writer(self) -> str:
        return self._engine.writer

    @property
    def backup(self) -> BackupLocation | None:
        return self._engine.backup

    @property
    def auto_compact(self) -> int | None:
        return self._engine.auto_compact

    @auto_compact.setter
    def auto_compact(self, value: int | None) -> None:
        self._engine.auto_compact = value

    @property
    def background_compaction(self) -> bool:
        return self._engine.background_compaction

    @background_compaction.setter
    def background_compaction(self, value: bool) -> None:
        self._engine.background_compaction = value

    @property
    def vacuum_grace_s(self) -> float:
        return self._engine.vacuum_grace_s

    @vacuum_grace_s.setter
    def vacuum_grace_s(self, value: float) -> None:
        self._engine.vacuum_grace_s = value

    @property
    def state(self) -> State:
        return self._engine.refresh()

    def refresh(self) -> State:
        """Catch up with every commit made so far (by any process); returns the state."""
        return self._engine.refresh()

    def abs_path(self, rel: str) -> str:
        """The path DuckDB and fsspec use for a file named relative to the catalog root."""
        return self._engine.abs_path(rel)

    def read_path(self, rel: str) -> str:
        """Where to read a data file: its own path, or (S3 with a cache) the local copy of it."""
        return self._engine.read_path(rel)

    def file_counts(self) -> dict[str, int]:
        """How many live Parquet files each table has (what compaction keeps small)."""
        return self._engine.file_counts()

    def compact(self, force: bool = False) -> CompactionResult:
        """Merge small files (see catalog.compaction.compact)."""
        return compact(self._engine, force=force)

    def wait_for_compaction(self, timeout: float | None = None) -> None:
        """Wait until a background compaction started by this process has finished."""
        self._engine.wait_for_compaction(timeout)

    def compaction_connection(self) -> duckdb.DuckDBPyConnection:
        """A second DuckDB connection for compaction, so merging never blocks queries."""
        return self._engine.compaction_connection()

    # ---------------------------------------------------------- registration, studies and instances (catalog.studies)
    def register(
        self, batch: StudyBatch, origin_site: str | None = None, holder: str = tables.CENTER, actor: str | None = None
    ) -> RegisterResult:
        """Record a study and its instances as held by `holder`; idempotent."""
        return self._studies.register(batch, origin_site, holder, actor)

    def register_many(
        self, batches: Sequence[StudyBatch], holder: str = tables.CENTER, actor: str | None = None
    ) -> RegisterResult:
        """Register several studies in one commit (each batch's study.origin_site is its origin)."""
        return self._studies.register_many(batches, holder, actor)

    def register_tables(
        self,
        studies: pa.Table,
        instances: pa.Table | None,
        holder: str = tables.CENTER,
        actor: str | None = None,
        audit_each_study: bool | None = None,
    ) -> RegisterResult:
        """The bulk path: studies (StudyInfo columns, with origin_site) and instances (InstanceInfo columns)."""
        return self._studies.register_tables(studies, instances, holder, actor, audit_each_study)

    def instances(self, study_uid: str, version: str = "current") -> list[InstanceRow]:
        """The study's registered instances (object key, SHA-256, size, SOP class, transfer syntax)."""
        return self._studies.instances(study_uid, version)

    def iter_instances(self, part: int = 0, parts: int = 1, batch_size: int = 10_000) -> Iterator[list[InstanceRef]]:
        """Every registered instance (study, origin, key, SHA-256, size), in batches."""
        return self._studies.iter_instances(part, parts, batch_size)

    def referenced_keys(self) -> set[str]:
        """Every object key a catalog row points to: instances, and the conflicting copies beside them."""
        return self._studies.referenced_keys()

    def instance_count(self) -> int:
        return self._studies.instance_count()

    def series(self, study_uid: str) -> list[SeriesRow]:
        return self._studies.series(study_uid)

    def conflicts(self, study_uid: str | None = None) -> list[ConflictRecord]:
        return self._studies.conflicts(study_uid)

    def study(self, study_uid: str) -> StudyRow | None:
        return self._studies.study(study_uid)

    # ---------------------------------------------------------- grants, consents, visibility (catalog.grants)
    def visible_studies(
        self,
        site: str,
        patient_ids: Sequence[tuple[str, str | None]] | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modalities: Sequence[str] | None = None,
    ) -> list[StudyRow]:
        """Studies `site` may see by the one visibility rule (_visible_sql): its own, or granted (and consented)."""
        return self._grants.visible_studies(site, patient_ids, date_from, date_to, modalities)

    def may_see(self, site: str, study_uid: str) -> bool:
        """Whether `site` may see the study, by the one visibility rule (renkei.policy.decide explains it)."""
        return self._grants.may_see(site, study_uid)

    def grant(
        self,
        study_uid: str,
        site: str,
        by_kind: str,
        by: str,
        reason: str = "",
        rule: str | None = None,
        policy_version: str | None = None,
        actor_site: str = tables.CENTER,
    ) -> GrantRecord:
        """Make the study visible to `site` (no change if already active); returns the current grant."""
        return self._grants.grant(study_uid, site, by_kind, by, reason, rule, policy_version, actor_site)

    def revoke(
        self,
        study_uid: str,
        site: str,
        by_kind: str,
        by: str,
        reason: str = "",
        rule: str | None = None,
        policy_version: str | None = None,
        actor_site: str = tables.CENTER,
    ) -> GrantRecord | None:
        """Withdraw the site's grant (no change if none is active); returns the current record."""
        return self._grants.revoke(study_uid, site, by_kind, by, reason, rule, policy_version, actor_site)

    def grant_many(
        self, requests: Sequence[GrantRequest], actor_site: str = tables.CENTER, skip_unchanged: bool = True
    ) -> int:
        """Write grants and revocations in one commit, each with its audit event."""
        return self._grants.grant_many(requests, actor_site, skip_unchanged)

    def grant_table(self, table: pa.Table, actor_site: str = tables.CENTER, skip_unchanged: bool = True) -> int:
        """The bulk path of grant_many (columns study_uid, site, by_kind, by; optionally action, reason, rule,
        policy_version); returns how many events were written."""
        return self._grants.grant_table(table, actor_site, skip_unchanged)

    def grants(self, study_uid: str) -> list[GrantRecord]:
        """Every grant and revocation of the study, oldest first; `current` marks the latest per site."""
        return self._grants.grants(study_uid)

    def active_grants_for_site(self, site: str) -> list[GrantRecord]:
        """The grants currently active for `site` (one per study)."""
        return self._grants.active_grants_for_site(site)

    def set_consent(
        self,
        site: str,
        patient_id: str,
        issuer: str,
        state: str,
        by: str,
        reason: str = "",
        actor_site: str | None = None,
    ) -> int:
        """Record a patient's consent ('given') or its withdrawal ('withdrawn'); returns the commit."""
        return self._grants.set_consent(site, patient_id, issuer, state, by, reason, actor_site)

    def consent_of(self, site: str, patient_id: str, issuer: str) -> ConsentRecord | None:
        return self._grants.consent_of(site, patient_id, issuer)

    def withdrawn_consents(self) -> list[ConsentRecord]:
        return self._grants.withdrawn_consents()

    def visibility_counts(self) -> dict[tuple[str, str], int]:
        """{(viewer site, origin site): how many studies of the origin the viewer may see} (_visible_sql)."""
        return self._grants.visibility_counts()

    # ---------------------------------------------------------- locations (catalog.locations)
    def locations(self, study_uid: str, include_instances: bool = True) -> list[LocationRecord]:
        """Every copy of the study: its latest state per holder (and per instance where recorded)."""
        return self._locations.locations(study_uid, include_instances)

    def set_location(
        self,
        study_uid: str,
        holder: str,
        state: str,
        sop_instance_uid: str | None = None,
        verified_at: dt.datetime | None = None,
        detail: str = "",
        by: str = "",
    ) -> int:
        """Record the state of a copy ('present', 'verified', 'missing', 'corrupt', 'removed'); returns the commit."""
        return self._locations.set_location(study_uid, holder, state, sop_instance_uid, verified_at, detail, by)

    def set_locations(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Several location states in one commit (e.g. a night's verification); returns the commit."""
        return self._locations.set_locations(entries)

    def study_locations(self, study_uids: Sequence[str]) -> dict[str, list[LocationRecord]]:
        """The study-level copies (latest state per holder) of several studies, in one query."""
        return self._locations.study_locations(study_uids)

    def instance_locations(
        self, by: str | None = None, since: dt.datetime | str | None = None, limit: int | None = 500
    ) -> list[LocationRecord]:
        """Instance-level copies (latest state per instance and holder), newest first."""
        return self._locations.instance_locations(by, since, limit)

    # ---------------------------------------------------------- patient links (catalog.patients)
    def link_patients(
        self, entries: Sequence[tuple[str, str, str]], method: str, by: str, evidence: str | Mapping[str, Any] = ""
    ) -> str:
        """Record that the (site, patient_id, issuer) entries are one person; returns the person id."""
        return self._patients.link_patients(entries, method, by, evidence)

    def unlink_patient(self, site: str, patient_id: str, issuer: str, by: str, reason: str = "") -> bool:
        """Detach one site-local patient ID from its person; False when it was not linked."""
        return self._patients.unlink_patient(site, patient_id, issuer, by, reason)

    def person_of(self, site: str, patient_id: str, issuer: str) -> str | None:
        return self._patients.person_of(site, patient_id, issuer)

    def patient_ids_of(self, person_id: str) -> list[tuple[str, str, str]]:
        return self._patients.patient_ids_of(person_id)

    def find_patients(
        self, name: str | None = None, birth_date: str | None = None, sex: str | None = None, site: str | None = None
    ) -> list[PatientCandidate]:
        """Site-local patients whose demographics match (a name matches on any '='-group, case-insensitive)."""
        return self._patients.find_patients(name, birth_date, sex, site)

    # ---------------------------------------------------------- reports (catalog.reports)
    def totals(self, pending: Mapping[str, int] | None = None) -> list[SiteTotals]:
        """Per origin site: studies, instances, bytes, and the backlog."""
        return self._reports.totals(pending)

    def registrations(
        self, since: dt.datetime | str | None = None, until: dt.datetime | str | None = None
    ) -> list[RegistrationBatch]:
        """Per origin site and registration commit: studies, instances and bytes registered, oldest first."""
        return self._reports.registrations(since, until)

    def study_registrations(
        self, since: dt.datetime | str | None = None, limit: int | None = None
    ) -> list[StudyRegistration]:
        """Studies by the time their last instance was registered (newest first), with first/last times."""
        return self._reports.study_registrations(since, limit)

    def studies_page(
        self,
        visible_to: str | None = None,
        origin_sites: Sequence[str] | None = None,
        patient_id: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modalities: Sequence[str] | None = None,
        limit: int = 50,
        offset: int = 0,
        search: str | None = None,
        search_names: bool = False,
    ) -> tuple[int, list[StudyRow]]:
        """(how many studies match, one page of them newest first) for a study browser."""
        return self._reports.studies_page(
            visible_to, origin_sites, patient_id, date_from, date_to, modalities, limit, offset, search, search_names
        )

    def series_summaries(self, study_uids: Sequence[str]) -> dict[str, list[SeriesSummary]]:
        """The series of several studies with their registered instance counts, by study, in one query."""
        return self._reports.series_summaries(study_uids)

    # ---------------------------------------------------------- audit (catalog.audit_log)
    def recent_audit(
        self, actions: Sequence[str] | None = None, limit: int = 50, since: dt.datetime | str | None = None
    ) -> list[AuditEvent]:
        """The latest audit events (newest first), optionally only of the given actions."""
        return self._audit.recent_audit(actions, limit, since)

    def append_audit(
        self,
        actor_site: str,
        actor: str,
        action: str,
        study_uid: str | None = None,
        target_site: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """Append one audit event to the chain; returns it with its number and hash."""
        return self._audit.append_audit(actor_site, actor, action, study_uid, target_site, outcome, detail)

    def append_audits(self, drafts: Sequence[AuditDraft]) -> list[AuditEvent]:
        """Append several events in one commit (one place in the total order); returns them."""
        return self._audit.append_audits(drafts)

    def audit(
        self,
        study_uid: str | None = None,
        site: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        limit: int | None = None,
        event_from: int | None = None,
        event_to: int | None = None,
    ) -> list[AuditEvent]:
        """Audit events matching every given filter, in chain order (site matches actor or target)."""
        return self._audit.audit(study_uid, site, actor, action, since, until, limit, event_from, event_to)

    def audit_trail(self, study_uid: str) -> list[AuditEvent]:
        return self._audit.audit_trail(study_uid)

    def verify_audit(self, deep: bool = True) -> AuditVerification:
        """Recompute the whole hash chain; reports edited, deleted and reordered events."""
        return self._audit.verify_audit(deep)
