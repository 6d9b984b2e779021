"""Does the center still hold what an edge's journal calls verified? A cheap check on every sync run.

Pure code (no Prefect). 'verified' in the journal means the center held the
instance, whole and registered, at some time; a wiped bucket, a lost catalog
or a restore from an old backup makes that untrue without the edge knowing,
and a sync run that only looks at 'pending' work would say "nothing to do".

`check_site` asks the center about a bounded sample of the journal's verified
instances (some at random, plus the most recent), by existence and size of
each object (a stat or a HEAD, never reading the bytes) and by one catalog
query per sampled study. When the sample finds an object missing or an
instance not registered, it escalates to the whole site: every verified
instance is compared with a listing of its study's objects and with the
catalog, and the journal is set back so that the normal sync path repairs it
in the same run:

- object missing, edge copy present: 'pending' (uploaded again, registered,
  and the sharing rules applied again);
- object present, not registered: 'uploaded' (registered again, its rules applied again);
- object missing and the edge's copy already dropped: *lost* here; counted,
  and the run fails so that an operator restores the object store (or the
  origin site sends the study again).

A full check that found only lost instances is not repeated for an hour
(`FULL_RECHECK_S`) while the samples keep finding only those: its counts are
reported again instead. What is found is counted, never named (no UIDs or
patient data in logs or artifacts).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from renkei.catalog import keys
from renkei.catalog.store import ObjectMissing, ObjectStore
from renkei.edge.journal import Journal, JournalEntry
from renkei.errors import CatalogError, RenkeiError

log = logging.getLogger(__name__)

SAMPLE_RANDOM = 24  # verified instances drawn at random from the whole journal
SAMPLE_RECENT = 8  # plus the most recently received verified ones
FULL_RECHECK_S = 3600.0  # a full check that found only lost instances is repeated at most this often
META_KEY = "center_check"  # journal meta: the last full check's counts (JSON)


@dataclass
class CenterCheck:
    """What one run's check found (counts only)."""

    site: str
    sampled: int = 0
    sample_missing: int = 0  # object gone from the center
    sample_damaged: int = 0  # object there with another size (the nightly verification repairs it)
    sample_unregistered: int = 0  # object there, no catalog row
    escalated: bool = False  # the whole site's verified set was checked
    repeated: bool = False  # escalation skipped: the last full check (under FULL_RECHECK_S ago) is reported
    checked: int = 0  # verified instances compared in the full check
    missing: int = 0
    unregistered: int = 0
    reupload: int = 0  # set back to 'pending': uploaded again by this run
    reregister: int = 0  # set back to 'uploaded': registered again, its rules applied again by this run
    lost: int = 0  # missing from the center and no edge copy: nothing here can repair them
    studies: int = 0  # studies set back for repair
    catalog_unreadable: str = ""  # the catalog could not be asked (only objects were compared)
    seconds: float = 0.0
    error: str = ""  # the check itself failed (after its retries): nothing was compared

    @property
    def needs_attention(self) -> bool:
        """Something the run's report and state must show: a sampled loss or damage, a loss, or a failed check."""
        return bool(self.error or self.sample_missing or self.sample_unregistered or self.sample_damaged or self.lost)

    @property
    def found_problems(self) -> bool:
        return bool(
            self.sample_missing
            or self.sample_unregistered
            or self.sample_damaged
            or self.lost
            or self.missing
            or self.unregistered
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key_of(site_id: str, entry: JournalEntry) -> str | None:
    if entry.object_key:
        return entry.object_key
    info = entry.instance
    try:
        return keys.object_key(site_id, info.study_uid, info.series_uid, info.sop_instance_uid)
    except RenkeiError:
        return None


def sample_verified(
    journal: Journal, n_random: int = SAMPLE_RANDOM, n_recent: int = SAMPLE_RECENT, rng: random.Random | None = None
) -> list[JournalEntry]:
    """Up to n_random + n_recent verified instances; each lookup is one index probe (any journal size)."""
    uids = journal.sample_uids("verified", n_random, n_recent, rng or random.Random())
    entries = [journal.entry(uid) for uid in uids]
    return [e for e in entries if e is not None and e.upload_state == "verified"]


def _object_state(store: ObjectStore, key: str | None, size: int) -> str:
    """'ok', 'missing' or 'damaged' (another size), by a stat or a HEAD."""
    if key is None:
        return "missing"
    try:
        return "ok" if store.size(key) == size else "damaged"
    except (ObjectMissing, FileNotFoundError):
        return "missing"


def _registered(catalog: Any, study_uids: Iterable[str]) -> dict[str, set[str]]:
    """SOP Instance UIDs the catalog holds, per study (one query per study)."""
    return {uid: {r["sop_instance_uid"] for r in catalog.instances(uid)} for uid in dict.fromkeys(study_uids)}


def _last_full(journal: Journal) -> dict[str, Any]:
    try:
        return json.loads(journal.get_meta(META_KEY) or "{}")
    except (ValueError, TypeError):
        return {}


def check_site(
    journal: Journal,
    store: ObjectStore,
    open_catalog: Callable[[], Any] | Any,
    site_id: str,
    n_random: int = SAMPLE_RANDOM,
    n_recent: int = SAMPLE_RECENT,
    rng: random.Random | None = None,
    threads: int = 8,
    now: float | None = None,
) -> CenterCheck:
    """Check a sample of the site's verified instances against the center; escalate and set back on loss.

    `open_catalog` is the catalog or a callable returning one (opened only
    when there is something verified to compare). See the module docstring.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    result = CenterCheck(site_id)
    sample = sample_verified(journal, n_random, n_recent, rng)
    result.sampled = len(sample)
    if not sample:
        return result
    catalog = None
    try:
        catalog = open_catalog() if callable(open_catalog) else open_catalog
        registered = _registered(catalog, (e.instance.study_uid for e in sample))
    except CatalogError as exc:
        result.catalog_unreadable = str(exc)[:300]
        registered = None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        states = list(pool.map(lambda e: _object_state(store, _key_of(site_id, e), e.instance.size), sample))
    actionable = False
    for entry, state in zip(sample, states):
        if state == "missing":
            result.sample_missing += 1
            actionable = actionable or entry.local
        elif state == "damaged":
            result.sample_damaged += 1
        elif registered is not None and entry.instance.sop_instance_uid not in registered[entry.instance.study_uid]:
            result.sample_unregistered += 1
            actionable = True
    if result.sample_missing or result.sample_unregistered:
        last = _last_full(journal)
        if not actionable and last.get("lost") and now - float(last.get("at", 0)) < FULL_RECHECK_S:
            result.repeated = True
            result.checked, result.missing, result.lost = last.get("checked", 0), last.get("missing", 0), last["lost"]
        else:
            _full_check(journal, store, catalog if registered is not None else None, site_id, result, threads)
            journal.set_meta(
                META_KEY,
                json.dumps(
                    {
                        "at": now,
                        "checked": result.checked,
                        "missing": result.missing,
                        "lost": result.lost,
                        "unregistered": result.unregistered,
                    }
                ),
            )
    result.seconds = time.monotonic() - started
    if result.found_problems:
        log.warning(
            "center check %s: %d of %d sampled instances missing from the center, %d not registered, "
            "%d of another size; full check of %d: %d missing (%d to upload again, %d lost: no edge copy), "
            "%d to register again",
            site_id,
            result.sample_missing,
            result.sampled,
            result.sample_unregistered,
            result.sample_damaged,
            result.checked,
            result.missing,
            result.reupload,
            result.lost,
            result.reregister,
        )
    return result


def _full_check(
    journal: Journal, store: ObjectStore, catalog: Any | None, site_id: str, result: CenterCheck, threads: int
) -> None:
    """Every verified instance of the site against its study's object listing and the catalog."""
    result.escalated = True
    studies = list(journal.iter_study_uids())

    def one(study_uid: str) -> tuple[list[JournalEntry], list[JournalEntry], list[JournalEntry], int]:
        # all the study's instances, filtered here: with the state in the query SQLite picks the
        # upload_state index and scans every verified instance of the journal for each study
        entries = [e for e in journal.instances(study_uid) if e.upload_state == "verified"]
        if not entries:
            return [], [], [], 0
        try:
            present = set(store.list(keys.study_prefix(site_id, study_uid)))
        except RenkeiError:
            present = set()
        held = {r["sop_instance_uid"] for r in catalog.instances(study_uid)} if catalog is not None else None
        gone = [e for e in entries if _key_of(site_id, e) not in present]
        unregistered = [
            e
            for e in entries
            if held is not None and e.instance.sop_instance_uid not in held and _key_of(site_id, e) in present
        ]
        return entries, gone, unregistered, len(entries)

    # the catalog's connection is shared: one study at a time for it, the listings in parallel
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        outcomes = list(pool.map(one, studies))
    for _entries, gone, unregistered, n in outcomes:
        result.checked += n
        result.missing += len(gone)
        result.unregistered += len(unregistered)
        again = [e.instance.sop_instance_uid for e in gone if e.local]
        result.lost += len(gone) - len(again)
        if again:
            result.reupload += journal.set_upload_state(again, "pending")
        if unregistered:
            result.reregister += journal.set_upload_state(
                [e.instance.sop_instance_uid for e in unregistered], "uploaded"
            )
        result.studies += bool(again or unregistered)


def summary_lines(result: CenterCheck) -> list[str]:
    """What the check found, for the run's artifact (counts only)."""
    if not result.sampled:
        return []
    sampled = result.sampled
    if not (result.sample_missing or result.sample_unregistered or result.sample_damaged or result.lost):
        return [f"Center check: {sampled} verified instances sampled; the center holds each one, registered."]
    lines = [
        "## Center check",
        f"Of {sampled} verified instances sampled, {result.sample_missing} are missing from the center's "
        f"object store, {result.sample_unregistered} are not in the catalog and {result.sample_damaged} "
        "have another size.",
    ]
    if result.repeated:
        lines.append(
            f"The full check of this site (less than {FULL_RECHECK_S / 3600:.0f} h ago) found "
            f"{result.lost} of {result.checked} verified instances lost; it is not repeated until then."
        )
    elif result.escalated:
        lines.append(
            f"Full check of the site's {result.checked} verified instances: {result.missing} missing "
            f"from the center ({result.reupload} uploaded again by this run from the edge's copy, "
            f"{result.lost} lost: the edge no longer holds them), {result.unregistered} not registered "
            f"(registered again by this run); the sharing rules were applied again to the "
            f"{result.studies} studies repaired."
        )
    if result.catalog_unreadable:
        lines.append(
            f"The catalog could not be read ({result.catalog_unreadable}); only the objects were "
            "compared. See `renkei catalog check`."
        )
    if result.sample_damaged:
        lines.append(
            "Objects of another size are repaired from the edge by the nightly verification "
            "(`verify_backups`); run it now from the Prefect UI to repair them at once."
        )
    if result.lost:
        lines.append(
            "**Lost instances**: the edge has dropped its copy (retention) and the center no longer holds "
            "them. Restore the center's object store from its backup, or have the origin site send the "
            "studies again from its PACS; then run `verify_backups` (full) to confirm."
        )
    return lines
