"""The center: object storage (ObjectStore) and the catalog of every study's copies and visibility.

Pure code, no Prefect. `Catalog` (catalog.catalog) answers where a study is and
who may see it; `ObjectStore` (catalog.store) holds the bytes; `open_filesystem`
(catalog.fs) is the one way both reach a local folder or S3.
"""

from catalog.audit import AuditDraft, AuditEvent, AuditVerification
from catalog.catalog import (
    Catalog,
    ConflictRecord,
    ConsentRecord,
    GrantRecord,
    GrantRequest,
    LocationRecord,
    PatientCandidate,
    RegisterResult,
    SiteTotals,
    StudyRow,
)
from catalog.compaction import CompactionResult, compact
from catalog.fs import open_filesystem
from catalog.keys import object_key
from catalog.store import ObjectConflict, ObjectInfo, ObjectStore

__all__ = [
    "AuditDraft",
    "AuditEvent",
    "AuditVerification",
    "Catalog",
    "CompactionResult",
    "ConflictRecord",
    "ConsentRecord",
    "GrantRecord",
    "GrantRequest",
    "LocationRecord",
    "ObjectConflict",
    "ObjectInfo",
    "ObjectStore",
    "PatientCandidate",
    "RegisterResult",
    "SiteTotals",
    "StudyRow",
    "compact",
    "object_key",
    "open_filesystem",
]
