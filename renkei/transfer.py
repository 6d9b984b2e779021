"""Moving a study from a site's edge to the center: upload, verify, register. Pure code, no Prefect.

The edge journal's upload state is the outbox: 'pending' (received), then
'uploaded' (the object is in the center and its SHA-256 read back matches),
then 'verified' (registered in the catalog with a verified center location).
Every step is idempotent, so a rerun after any crash finishes the work and
duplicates nothing: an object already stored with the same bytes is not
written again, and the catalog ignores instances it already has.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Sequence

from catalog import keys
from catalog.catalog import Catalog
from catalog.store import ObjectConflict, ObjectStore
from edge.journal import Journal, JournalEntry
from renkei.errors import IntegrityError, RenkeiError
from renkei.records import InstanceInfo, StudyBatch

log = logging.getLogger("renkei.transfer")


@dataclass(frozen=True)
class UploadResult:
    """One study's upload: counts, bytes, time, and what failed (with what to do)."""

    study_uid: str
    instances: int = 0
    uploaded: int = 0  # objects newly written
    already_present: int = 0
    conflicts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class RegisterResult:
    studies: tuple[str, ...]
    new_instances: int
    already_present: int
    conflicts: int
    failures: tuple[str, ...] = field(default_factory=tuple)


def studies_to_sync(journal: Journal, stable_age: float, now: float | None = None) -> list[str]:
    """Completed studies with instances not yet verified in the center (oldest first)."""
    pending = journal.completed_studies(stable_age, now=now, state="pending")
    uploaded = journal.completed_studies(stable_age, now=now, state="uploaded")
    return list(dict.fromkeys(pending + uploaded))


def mark_verified(journal: Journal, study_uids: Sequence[str]) -> int:
    """The end of a study's sync: its uploaded instances are 'verified' (the edge may drop them later)."""
    n = 0
    for study_uid in study_uids:
        n += journal.set_upload_state([e.instance.sop_instance_uid for e in journal.instances(study_uid, "uploaded")],
                                      "verified")
    return n


def _key(site_id: str, info: InstanceInfo) -> str:
    return keys.object_key(site_id, info.study_uid, info.series_uid, info.sop_instance_uid)


def _upload_one(store: ObjectStore, site_id: str, entry: JournalEntry) -> tuple[str, str, bool, bool]:
    """Put one instance and read it back; returns (sop uid, key, created, conflict)."""
    info = entry.instance
    key = _key(site_id, info)
    conflict = False
    try:
        result = store.put_file(entry.path, key, info.sha256)
    except ObjectConflict:
        # other bytes already hold this SOP Instance UID in the center: keep both, never replace
        key = keys.object_key(site_id, info.study_uid, info.series_uid, info.sop_instance_uid,
                              conflict_sha256=info.sha256)
        result = store.put_file(entry.path, key, info.sha256)
        conflict = True
    stored = store.sha256_of(key)
    if stored != info.sha256:
        raise IntegrityError(f"{key}: the center's copy hashes to {stored[:12]}..., not {info.sha256[:12]}...")
    return info.sop_instance_uid, key, result.created, conflict


def upload_study(journal: Journal, store: ObjectStore, site_id: str, study_uid: str,
                 parallel: int = 4) -> UploadResult:
    """Upload every instance of the study not yet in the center, verifying each by SHA-256.

    Instances already 'uploaded' are verified again (cheap) so a crash between
    the put and the journal update is harmless. Returns counts and failures;
    never raises for one bad instance.
    """
    started = time.monotonic()
    entries = journal.instances(study_uid, "pending") + journal.instances(study_uid, "uploaded")
    entries = [e for e in entries if e.local]
    failures: list[str] = []
    done: list[tuple[str, str]] = []
    created = conflicts = 0
    size = 0

    def work(entry: JournalEntry) -> tuple[str, str, bool, bool] | str:
        try:
            return _upload_one(store, site_id, entry)
        except FileNotFoundError:
            return (f"{entry.instance.sop_instance_uid}: the edge's file {entry.path} is missing; "
                    "run the nightly verification to see whether the center holds it")
        except (RenkeiError, OSError) as exc:
            return f"{entry.instance.sop_instance_uid}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for entry, outcome in zip(entries, pool.map(work, entries)):
            if isinstance(outcome, str):
                failures.append(outcome)
                continue
            uid, key, was_created, was_conflict = outcome
            done.append((uid, key))
            created += was_created
            conflicts += was_conflict
            size += entry.instance.size
    for uid, key in done:
        journal.set_upload_state([uid], "uploaded", object_key=key)
    result = UploadResult(study_uid, len(entries), created, len(done) - created, conflicts, size,
                          time.monotonic() - started, tuple(failures))
    log.info("upload %s from %s: %d instances, %d new objects, %d failures",
             study_uid, site_id, result.instances, result.uploaded, len(failures))
    return result


def register_studies(journal: Journal, catalog: Catalog, site_id: str, study_uids: Sequence[str],
                     by: str = "", default_issuer: str = "", mark_verified: bool = True) -> RegisterResult:
    """Register the uploaded instances of these studies in the catalog (then mark them verified).

    `by` names who moved them in the locations (the flow run, e.g. 'flow-run:<id>').
    An empty Issuer of Patient ID is registered as `default_issuer` (the site's
    own), so that consent and patient matching can name the patient.
    With mark_verified=False the journal keeps them 'uploaded' until
    `mark_verified` (the flow does that after the flag step, so that a crash
    in between is finished by the next run).
    """
    by = by or f"sync:{site_id}"
    batches: list[StudyBatch] = []
    uids_by_study: dict[str, list[str]] = {}
    for study_uid in study_uids:
        entries = journal.instances(study_uid, "uploaded")
        if not entries:
            continue
        info = journal.study_info(study_uid, site_id)
        if not info.issuer_of_patient_id and default_issuer:
            info = replace(info, issuer_of_patient_id=default_issuer)
        batches.append(StudyBatch(info, tuple(e.instance for e in entries)))
        uids_by_study[study_uid] = [e.instance.sop_instance_uid for e in entries]
    if not batches:
        return RegisterResult((), 0, 0, 0)
    registered = catalog.register_many(batches, actor=by)
    catalog.set_locations(
        [{"study_uid": uid, "holder": "center", "state": "verified", "by": by} for uid in uids_by_study]
        + [{"study_uid": uid, "holder": f"edge:{site_id}", "state": "present", "by": by}
           for uid in uids_by_study])
    if mark_verified:
        for uids in uids_by_study.values():
            journal.set_upload_state(uids, "verified")
    return RegisterResult(tuple(uids_by_study), registered.new_instances, registered.already_present,
                          len(registered.conflicts))
