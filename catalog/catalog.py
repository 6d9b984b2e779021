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

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import duckdb
import fsspec

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
    SiteTotals,
    StudyRegistration,
    StudyRow,
)
from renkei.catalog.reports import Reports
from renkei.catalog.studies import Studies

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


_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R")


def _forward(part: str, method: Callable[Concatenate[_R, _P], _T]) -> Callable[Concatenate[Any, _P], _T]:
    """A method of Catalog that is `method` of its part `part` (a repository or the engine): the same
    signature, docstring and types, written once, where the part defines it."""

    def call(catalog: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return method(getattr(catalog, part), *args, **kwargs)

    functools.update_wrapper(call, method)
    return call


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

    refresh = _forward("_engine", TableEngine.refresh)
    abs_path = _forward("_engine", TableEngine.abs_path)
    read_path = _forward("_engine", TableEngine.read_path)
    file_counts = _forward("_engine", TableEngine.file_counts)

    def compact(self, force: bool = False) -> CompactionResult:
        """Merge small files (see catalog.compaction.compact)."""
        return compact(self._engine, force=force)

    def wait_for_compaction(self, timeout: float | None = None) -> None:
        """Wait until a background compaction started by this process has finished."""
        self._engine.wait_for_compaction(timeout)

    compaction_connection = _forward("_engine", TableEngine.compaction_connection)

    # ---------------------------------------------------------- registration, studies and instances (catalog.studies)
    register = _forward("_studies", Studies.register)
    register_many = _forward("_studies", Studies.register_many)
    register_tables = _forward("_studies", Studies.register_tables)
    instances = _forward("_studies", Studies.instances)
    iter_instances = _forward("_studies", Studies.iter_instances)
    referenced_keys = _forward("_studies", Studies.referenced_keys)
    instance_count = _forward("_studies", Studies.instance_count)
    series = _forward("_studies", Studies.series)
    conflicts = _forward("_studies", Studies.conflicts)
    study = _forward("_studies", Studies.study)

    # ---------------------------------------------------------- grants, consents, visibility (catalog.grants)
    visible_studies = _forward("_grants", Grants.visible_studies)
    may_see = _forward("_grants", Grants.may_see)
    grant = _forward("_grants", Grants.grant)
    revoke = _forward("_grants", Grants.revoke)
    grant_many = _forward("_grants", Grants.grant_many)
    grant_table = _forward("_grants", Grants.grant_table)
    grants = _forward("_grants", Grants.grants)
    active_grants_for_site = _forward("_grants", Grants.active_grants_for_site)
    set_consent = _forward("_grants", Grants.set_consent)
    consent_of = _forward("_grants", Grants.consent_of)
    withdrawn_consents = _forward("_grants", Grants.withdrawn_consents)
    visibility_counts = _forward("_grants", Grants.visibility_counts)

    # ---------------------------------------------------------- locations (catalog.locations)
    locations = _forward("_locations", Locations.locations)
    set_location = _forward("_locations", Locations.set_location)
    set_locations = _forward("_locations", Locations.set_locations)
    study_locations = _forward("_locations", Locations.study_locations)
    instance_locations = _forward("_locations", Locations.instance_locations)

    # ---------------------------------------------------------- patient links (catalog.patients)
    link_patients = _forward("_patients", Patients.link_patients)
    unlink_patient = _forward("_patients", Patients.unlink_patient)
    person_of = _forward("_patients", Patients.person_of)
    patient_ids_of = _forward("_patients", Patients.patient_ids_of)
    find_patients = _forward("_patients", Patients.find_patients)

    # ---------------------------------------------------------- reports (catalog.reports)
    totals = _forward("_reports", Reports.totals)
    registrations = _forward("_reports", Reports.registrations)
    study_registrations = _forward("_reports", Reports.study_registrations)
    studies_page = _forward("_reports", Reports.studies_page)
    series_summaries = _forward("_reports", Reports.series_summaries)

    # ---------------------------------------------------------- audit (catalog.audit_log)
    recent_audit = _forward("_audit", AuditLog.recent_audit)
    append_audit = _forward("_audit", AuditLog.append_audit)
    append_audits = _forward("_audit", AuditLog.append_audits)
    audit = _forward("_audit", AuditLog.audit)
    audit_trail = _forward("_audit", AuditLog.audit_trail)
    verify_audit = _forward("_audit", AuditLog.verify_audit)
