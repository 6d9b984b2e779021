"""Moving a study from a site's edge to the center: upload, verify, register. Pure code, no Prefect.

The edge journal's upload state is the outbox: 'pending' (received), then
'uploaded' (the object is in the center and its SHA-256 read back matches),
then 'verified' (registered in the catalog with a verified center location).
Every step is idempotent, so a rerun after any crash finishes the work and
duplicates nothing: an object already stored with the same bytes is not
written again, and the catalog ignores instances it already has.

One bad instance or study never blocks the others. A failure of the data
itself (a UID the center refuses, an edge file missing, unreadable or not the
bytes journaled) cannot be cured by retrying: the study is quarantined in the
journal (`Journal.quarantine`, with the reason), skipped by every later run
until an operator releases it, and the quarantine is audited in the catalog
(`audit_quarantines`). A failure of the center's storage or catalog (down,
unreachable, contended) is transient: it is raised or reported so that the
run fails and Prefect retries.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from renkei.catalog import keys
from renkei.catalog.audit import AuditDraft
from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectConflict, ObjectStore
from renkei.edge.journal import Journal, JournalEntry, Quarantine
from renkei.errors import IntegrityError, InvalidUID, RejectedData, RenkeiError, UsageError
from renkei.records import InstanceInfo, StudyBatch, StudyInfo
from renkei.uids import is_valid_uid

log = logging.getLogger(__name__)

# What the catalog raises for rows it refuses (a bad UID, SHA-256 or column; RejectedData, e.g. a study
# held as another site's): the data's fault, so retrying changes nothing. Any other CatalogError (storage
# unreachable, commit contention) is transient.
DATA_ERRORS: tuple[type[Exception], ...] = (InvalidUID, UsageError, RejectedData)
QUARANTINE_ACTION = "quarantine"
RELEASE_ACTION = "quarantine-release"
_AUDITED_UIDS_MAX = 20  # instances named in one audit event (the count is always there)


class _Refused(Exception):
    """An instance that can never be uploaded as it is (its data is at fault, not the center)."""


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
    failures: tuple[str, ...] = ()  # transient: the next attempt may succeed
    refused: tuple[str, ...] = ()  # permanent, per instance: why the study was quarantined
    quarantined: str = ""  # the study's quarantine reason ('' when not quarantined)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.quarantined


@dataclass(frozen=True)
class RegisterResult:
    studies: tuple[str, ...]
    new_instances: int
    already_present: int
    conflicts: int
    failures: tuple[str, ...] = field(default_factory=tuple)
    quarantined: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (study_uid, reason)


def studies_to_sync(journal: Journal, stable_age: float, now: float | None = None) -> list[str]:
    """Completed studies with instances not yet verified in the center (oldest first), quarantined ones left out."""
    pending = journal.completed_studies(stable_age, now=now, state="pending")
    uploaded = journal.completed_studies(stable_age, now=now, state="uploaded")
    held = journal.quarantined_study_uids()
    return [uid for uid in dict.fromkeys(pending + uploaded) if uid not in held]


def mark_verified(journal: Journal, study_uids: Sequence[str]) -> int:
    """The end of a study's sync: its uploaded instances are 'verified' (the edge may drop them later)."""
    n = 0
    for study_uid in study_uids:
        n += journal.set_upload_state(
            [e.instance.sop_instance_uid for e in journal.instances(study_uid, "uploaded")], "verified"
        )
    return n


def _key(site_id: str, info: InstanceInfo) -> str:
    return keys.object_key(site_id, info.study_uid, info.series_uid, info.sop_instance_uid)


def _shown(uid: str) -> str:
    """A UID as it can be printed on one line (a refused one quoted, escapes visible)."""
    return uid if is_valid_uid(uid) else repr(uid)[:80]


def _upload_one(store: ObjectStore, site_id: str, entry: JournalEntry) -> tuple[str, str, bool, bool]:
    """Put one instance and read it back; returns (sop uid, key, created, conflict).

    Raises _Refused when the instance's own data is at fault (retrying cannot help).
    """
    info = entry.instance
    try:
        key = _key(site_id, info)
    except DATA_ERRORS as exc:
        raise _Refused(f"instance {_shown(info.sop_instance_uid)}: {exc}") from None
    conflict = False
    try:
        try:
            result = store.put_file(entry.path, key, info.sha256)
        except ObjectConflict:
            # other bytes already hold this SOP Instance UID in the center: keep both, never replace
            key = keys.object_key(
                site_id, info.study_uid, info.series_uid, info.sop_instance_uid, conflict_sha256=info.sha256
            )
            result = store.put_file(entry.path, key, info.sha256)
            conflict = True
    except IntegrityError as exc:
        # put_file hashes the bytes it reads from the edge's file: they are not those journaled
        raise _Refused(
            f"instance {_shown(info.sop_instance_uid)}: the edge's file {entry.path.name} is not the "
            f"instance journaled ({exc}); it is damaged: have the sender send it again"
        ) from None
    stored = store.sha256_of(key)
    if stored != info.sha256:
        raise IntegrityError(f"{key}: the center's copy hashes to {stored[:12]}..., not {info.sha256[:12]}...")
    return info.sop_instance_uid, key, result.created, conflict


def local_problem(entry: JournalEntry) -> str:
    """Why the edge's file is at fault ('' when it reads back whole with the journaled SHA-256).

    Asked only after an upload failed with an OSError, which may come from the
    network as well as from the local disk (put_file opens the edge's file
    first, so a missing one arrives here too): read the file once more to tell.
    """
    uid = _shown(entry.instance.sop_instance_uid)
    digest = hashlib.sha256()
    try:
        with open(entry.path, "rb", buffering=0) as handle:
            while chunk := handle.read(4 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return (
            f"instance {uid}: the edge's file {entry.path} is missing; run the nightly verification "
            "to see whether the center holds it"
        )
    except OSError as exc:
        return f"instance {uid}: the edge's file {entry.path} cannot be read ({exc.strerror or exc})"
    if digest.hexdigest() != entry.instance.sha256:
        return (
            f"instance {uid}: the edge's file {entry.path.name} hashes to {digest.hexdigest()[:12]}..., "
            f"not the journaled {entry.instance.sha256[:12]}...; it is damaged"
        )
    return ""


def scrub(reason: str, info: StudyInfo | None) -> str:
    """The reason without the study's patient name or ID (reasons are shown and audited)."""
    if info is None:
        return reason
    words = {info.patient_id, info.patient_name}
    for group in info.patient_name.split("="):
        words.add(group)
        words.update(group.split("^"))
    # short ASCII words would cut common ones out of the text; ideographic names are often 1-2 characters
    kept = (w.strip() for w in words if w and w.strip())
    for word in sorted((w for w in kept if len(w) >= 3 or not w.isascii()), key=len, reverse=True):
        # whole words only: a numeric ID must not be cut out of the middle of a UID
        reason = re.sub(rf"(?<![\w.]){re.escape(word)}(?![\w.])", "<patient>", reason)
    return reason


def _study_info_or_none(journal: Journal, study_uid: str, site_id: str) -> StudyInfo | None:
    try:
        return journal.study_info(study_uid, site_id)
    except RenkeiError:
        return None


def upload_study(journal: Journal, store: ObjectStore, site_id: str, study_uid: str, parallel: int = 4) -> UploadResult:
    """Upload every instance of the study not yet in the center, verifying each by SHA-256.

    Instances already 'uploaded' are verified again (cheap) so a crash between
    the put and the journal update is harmless. Returns counts and failures;
    never raises for one bad instance. An instance refused for its data (see
    the module's docstring) quarantines the study: the result's `quarantined`
    names why, and a quarantined study is not uploaded again until released.
    """
    started = time.monotonic()
    if journal.is_quarantined(study_uid):
        held = next(q for q in journal.quarantined() if q.study_uid == study_uid)
        log.info(
            "upload %s from %s: skipped, in quarantine since %s",
            study_uid,
            site_id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.quarantined_at)),
        )
        return UploadResult(study_uid, quarantined=held.reason)
    entries = journal.instances(study_uid, "pending") + journal.instances(study_uid, "uploaded")
    entries = [e for e in entries if e.local]
    failures: list[str] = []
    refused: list[tuple[str, str]] = []  # (sop uid, why)
    done: list[tuple[str, str]] = []
    created = conflicts = 0
    size = 0

    def work(entry: JournalEntry) -> tuple[str, str, bool, bool] | _Refused | str:
        try:
            return _upload_one(store, site_id, entry)
        except _Refused as exc:
            return exc
        except RenkeiError as exc:
            return f"{_shown(entry.instance.sop_instance_uid)}: {exc}"
        except OSError as exc:
            problem = local_problem(entry)
            return _Refused(problem) if problem else f"{_shown(entry.instance.sop_instance_uid)}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for entry, outcome in zip(entries, pool.map(work, entries)):
            if isinstance(outcome, _Refused):
                refused.append((entry.instance.sop_instance_uid, str(outcome)))
                continue
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
    reason = ""
    if refused:
        info = _study_info_or_none(journal, study_uid, site_id)
        refused = [(uid, scrub(why, info)) for uid, why in refused]
        reason = f"upload: {len(refused)} of {len(entries)} instance(s) refused; first: {refused[0][1]}"
        reason = journal.quarantine(study_uid, reason, [uid for uid, _ in refused], step="upload").reason
        log.warning("upload %s from %s: quarantined (%s)", study_uid, site_id, reason)
    result = UploadResult(
        study_uid,
        len(entries),
        created,
        len(done) - created,
        conflicts,
        size,
        time.monotonic() - started,
        tuple(failures),
        tuple(why for _, why in refused),
        reason,
    )
    log.info(
        "upload %s from %s: %d instances, %d new objects, %d failures, %d refused",
        study_uid,
        site_id,
        result.instances,
        result.uploaded,
        len(failures),
        len(refused),
    )
    return result


def register_studies(
    journal: Journal,
    catalog: Catalog,
    site_id: str,
    study_uids: Sequence[str],
    by: str = "",
    default_issuer: str = "",
    mark_verified: bool = True,
) -> RegisterResult:
    """Register the uploaded instances of these studies in the catalog (then mark them verified).

    `by` names who moved them in the locations (the flow run, e.g. 'flow-run:<id>').
    An empty Issuer of Patient ID is registered as `default_issuer` (the site's
    own), so that consent and patient matching can name the patient.
    With mark_verified=False the journal keeps them 'uploaded' until
    `mark_verified` (the flow does that after applying the rules, so that a crash
    in between is finished by the next run).

    All studies go in one commit. When the catalog refuses that batch for its
    data (DATA_ERRORS), they are registered study by study, so the good ones
    go in and each refused one is quarantined (listed in the result's
    `quarantined`, audited by `audit_quarantines` at the end). A CatalogError
    (the catalog unreachable) is raised: the caller retries.
    """
    by = by or f"sync:{site_id}"
    held = journal.quarantined_study_uids()
    batches: list[StudyBatch] = []
    uids_by_study: dict[str, list[str]] = {}
    for study_uid in study_uids:
        if study_uid in held:
            continue
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
    new = already = n_conflicts = 0
    quarantined: dict[str, str] = {}
    try:
        registered = catalog.register_many(batches, actor=by)
        new, already, n_conflicts = registered.new_instances, registered.already_present, len(registered.conflicts)
    except DATA_ERRORS as exc:
        if len(batches) == 1:
            quarantined[batches[0].study.study_uid] = _quarantine_refused(journal, batches[0], exc)
        else:
            log.warning(
                "register %d studies from %s: the catalog refused the batch (%s); registering them one by one",
                len(batches),
                site_id,
                exc,
            )
            for batch in batches:
                try:
                    one = catalog.register_many([batch], actor=by)
                except DATA_ERRORS as one_exc:
                    quarantined[batch.study.study_uid] = _quarantine_refused(journal, batch, one_exc)
                    continue
                new, already = new + one.new_instances, already + one.already_present
                n_conflicts += len(one.conflicts)
    for uid in quarantined:
        del uids_by_study[uid]
    if uids_by_study:
        catalog.set_locations(
            [{"study_uid": uid, "holder": "center", "state": "verified", "by": by} for uid in uids_by_study]
            + [{"study_uid": uid, "holder": f"edge:{site_id}", "state": "present", "by": by} for uid in uids_by_study]
        )
    if mark_verified:
        for uids in uids_by_study.values():
            journal.set_upload_state(uids, "verified")
    if quarantined:
        audit_quarantines(journal, catalog, site_id, by=by)
    return RegisterResult(tuple(uids_by_study), new, already, n_conflicts, quarantined=tuple(quarantined.items()))


def _quarantine_refused(journal: Journal, batch: StudyBatch, exc: Exception) -> str:
    """Quarantine a study the catalog refused; returns the reason recorded."""
    study_uid = batch.study.study_uid
    bad = [
        i.sop_instance_uid
        for i in batch.instances
        if not all(is_valid_uid(u) for u in (i.study_uid, i.series_uid, i.sop_instance_uid))
    ]
    reason = scrub(f"register: the catalog refused the study ({type(exc).__name__}: {exc})", batch.study)
    reason = journal.quarantine(study_uid, reason, bad, step="register").reason
    log.warning("register %s from %s: quarantined (%s)", study_uid, batch.study.origin_site, reason)
    return reason


def audit_quarantines(journal: Journal, catalog: Catalog, site_id: str, by: str = "") -> list[Quarantine]:
    """Record the journal's quarantines and releases not yet audited as catalog audit events; returns them.

    Each is an event of action 'quarantine' (or 'quarantine-release') naming
    the study and the reason (never a patient). The journal marks them audited
    after the commit; an event already in the chain (a crash between the two)
    is not appended twice. Raises CatalogError when the catalog cannot be
    written: they stay to audit, and the next call records them.
    """
    todo = journal.quarantines_to_audit()
    if not todo:
        return []
    by = by or f"sync:{site_id}"
    drafts: list[AuditDraft] = []
    for q in todo:
        recorded = {
            e.action
            for e in catalog.audit(study_uid=q.study_uid)
            if e.actor_site == site_id
            and e.detail.get("quarantine_id") == q.id
            and e.detail.get("quarantined_at") == q.quarantined_at
        }
        detail = {
            "quarantine_id": q.id,
            "quarantined_at": q.quarantined_at,
            "step": q.step,
            "reason": q.reason,
            "instances": len(q.sop_instance_uids),
            "sop_instance_uids": list(q.sop_instance_uids[:_AUDITED_UIDS_MAX]),
        }
        if q.audited_at is None and QUARANTINE_ACTION not in recorded:
            drafts.append(AuditDraft(site_id, by, QUARANTINE_ACTION, q.study_uid, None, "quarantined", detail))
        if q.released_at is not None and q.release_audited_at is None and RELEASE_ACTION not in recorded:
            drafts.append(
                AuditDraft(
                    site_id,
                    q.released_by or by,
                    RELEASE_ACTION,
                    q.study_uid,
                    None,
                    "ok",
                    {**detail, "released_at": q.released_at},
                )
            )
    catalog.append_audits(drafts)
    journal.mark_quarantine_audited([q.id for q in todo])
    return todo
