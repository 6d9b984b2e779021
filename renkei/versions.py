"""Corrected images reach the center: an instance sent again with other bytes is a new version.

A modality or PACS that sends an instance again under the same SOP Instance
UID with other bytes (a corrected image, new burned-in text, a fixed
header) is answered 0x0000 by the edge, which keeps the new bytes in
`conflicts/` beside the first ones and journals it. `upload_versions` takes
each such version to the center under its own key
(`...<sop>.<sha256>.dcm`, never over the first), verified by SHA-256, and
registers it: the catalog keeps both, records the version in `conflicts`
(who sent it, when), and serves the latest received as current
(`Catalog.instances`, what every retrieval reads); the nightly verification
checks both (`Catalog.iter_instances`).

A version waits until its first version is registered (the journal calls it
verified), so the catalog always knows what it corrects. Idempotent: a
version already registered is skipped, a repeated put is a no-op.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace

import pydicom

from renkei.catalog import keys
from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectStore
from renkei.edge.journal import Journal
from renkei.errors import IntegrityError, RenkeiError
from renkei.records import StudyBatch

log = logging.getLogger(__name__)


@dataclass
class VersionResult:
    """Counts only (no UIDs): what one pass did with the edge's corrected instances."""

    found: int = 0
    uploaded: int = 0
    registered: int = 0
    already: int = 0
    waiting: int = 0  # their first version is not registered yet
    failed: list[str] = field(default_factory=list)  # reasons, for the operator's report

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _transfer_syntax(path: str, default: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.get("TransferSyntaxUID", "") or default)
    except Exception:
        return default


def upload_versions(journal: Journal, store: ObjectStore, catalog: Catalog, site_id: str) -> VersionResult:
    result = VersionResult()
    conflicts = journal.conflicts()
    result.found = len(conflicts)
    if not conflicts:
        return result
    registered: dict[str, set[tuple[str, str]]] = {}
    for conflict in conflicts:
        study = conflict.study_uid
        if study not in registered:
            registered[study] = {(c.sop_instance_uid, c.new_sha256) for c in catalog.conflicts(study)}
        if (conflict.sop_instance_uid, conflict.received_sha256) in registered[study]:
            result.already += 1
            continue
        first = journal.entry(conflict.sop_instance_uid)
        if first is None or first.upload_state != "verified":
            result.waiting += 1
            continue
        try:
            key = keys.object_key(
                site_id, study, conflict.series_uid, conflict.sop_instance_uid, conflict_sha256=conflict.received_sha256
            )
            put = store.put_file(str(conflict.path), key, conflict.received_sha256)
            result.uploaded += int(put.created)
            instance = replace(
                first.instance,
                sha256=conflict.received_sha256,
                size=conflict.size,
                transfer_syntax_uid=_transfer_syntax(str(conflict.path), first.instance.transfer_syntax_uid),
            )
            info = journal.study_info(study, site_id)
            outcome = catalog.register(StudyBatch(info, (instance,)), holder="center", actor=f"edge:{site_id}")
        except IntegrityError as exc:
            result.failed.append(f"a corrected instance's file at the edge is damaged: {exc}")
            continue
        except (RenkeiError, OSError) as exc:
            result.failed.append(f"a corrected instance could not be uploaded: {type(exc).__name__}: {exc}")
            continue
        result.registered += len(outcome.conflicts)
        result.already += outcome.already_present
        registered[study].add((conflict.sop_instance_uid, conflict.received_sha256))
    if result.registered or result.failed:
        log.info(
            "corrected instances of %s: %d registered as new versions, %d failed, %d waiting",
            site_id,
            result.registered,
            len(result.failed),
            result.waiting,
        )
    return result
