"""The center: object storage (ObjectStore) and the catalog of every study's copies and visibility.

Pure code, no Prefect. `Catalog` (catalog.catalog) answers where a study is and
who may see it; `ObjectStore` (catalog.store) holds the bytes; `open_filesystem`
(catalog.fs) is the one way both reach a local folder or S3.
"""

from renkei.catalog.audit import AuditDraft, AuditEvent, AuditVerification
from renkei.catalog.catalog import (
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
from renkei.catalog.compaction import CompactionResult, compact
from renkei.catalog.fs import open_filesystem
from renkei.catalog.keys import object_key
from renkei.catalog.store import ObjectConflict, ObjectInfo, ObjectStore

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
