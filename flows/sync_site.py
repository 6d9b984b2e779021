"""`sync_site`: a site's completed studies to the center — ready studies, upload, register, apply the rules, deliver."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from renkei.center_check import CenterCheck, summary_lines
from renkei.edge.journal import Quarantine
from renkei.flows.deliver import distribute
from renkei.runtime import Region
from renkei.sharing import RuleGrants
from renkei.tasks.common import logger, publish_artifacts
from renkei.tasks.sync import (
    apply_rules,
    audit_quarantines,
    check_center,
    mark_verified,
    plan_deliveries,
    ready_studies,
    register,
    retain,
    upload_study,
    upload_versions,
)
from renkei.transfer import RegisterResult, UploadResult


@flow(
    name="sync_site",
    flow_run_name="sync-{site}",
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]  # prefect's generic is too narrow
    log_prints=False,
)
def sync_site(site: str, config: str | None = None, data_dir: str | None = None) -> Any:
    """Move the site's completed studies to the center, verified, registered and granted by the rules.

    Runs on the site's own work pool. Safe to rerun at any time: it finishes
    what a crashed run left and duplicates nothing. Fails (red in the UI) when a
    study could not be uploaded after its retries; the others still go through.
    A study whose data the center refuses is quarantined instead (skipped by
    later runs until `renkei edge release`): the run still ends Completed, in a
    state named "Completed with quarantine" whose message and artifact say how
    many and where to look. Returns the run's summary (a dict).

    Every run first checks a sample of what the edge's journal calls verified
    against the center (renkei.center_check): what a wiped bucket or a lost
    catalog took is uploaded, registered again, its rules applied again in the same run
    (state message and artifact give the counts); instances lost with no edge
    copy left fail the run.
    """
    started = time.monotonic()
    region = Region(config, data_dir)
    lay = region.layout
    lay.config.site(site)
    # the center still holds what the journal calls verified (a sample); what it lost is set back in the
    # journal, so that the steps below upload, register and apply the rules to it again in this run
    center = _check_center(region, site)
    studies = ready_studies(region, site)
    uploads: dict[str, UploadResult] = {}
    failures: dict[str, str] = {}
    quarantined: dict[str, str] = {}  # by this run: study_uid -> reason
    slots = lay.config.site(site).link.upload_slots
    pending = list(studies)
    running: dict[str, Any] = {}
    while pending or running:
        # at most `slots` uploads of this site in flight (its link's setting); the deployment's
        # concurrency limit of 1 keeps two runs of a site from overlapping
        while pending and len(running) < slots:
            uid = pending.pop(0)
            running[uid] = upload_study.submit(region, site, uid)
        done = next(as_completed(list(running.values())))
        uid = next(u for u, f in running.items() if f is done)
        del running[uid]
        done.wait()
        if not done.state.is_completed():
            failures[uid] = _message(done.state)
        else:
            upload: UploadResult = done.result()
            if upload.quarantined:
                quarantined[uid] = upload.quarantined
            else:
                uploads[uid] = upload
    registered = RegisterResult((), 0, 0, 0)
    rule_grants = RuleGrants(0, ())
    deliveries: dict[str, Any] = {}
    if uploads:
        registered = register(region, site, list(uploads))
        quarantined.update(dict(registered.quarantined))
        rule_grants = apply_rules(region, list(registered.studies))
        mark_verified(region, site, list(registered.studies))
        plan = plan_deliveries(region, rule_grants.granted)
        if plan:
            deliveries = distribute(plan, config, data_dir)
    # every run: instances received again with other bytes (corrected images) become new versions
    versions = upload_versions(region, site)
    if versions.registered:
        deliveries["corrected"] = f"{versions.registered} corrected instance(s) registered as new versions"
    if versions.failed:
        failures["corrected instances"] = "; ".join(versions.failed[:3])
    # every run: what this or an earlier run quarantined (or an operator released) goes into the audit chain
    held = audit_quarantines(region, site)
    retained = retain(region, site)
    if retained.removed:
        deliveries["retention"] = (
            f"{len(retained.removed)} verified studies dropped from the edge (disk {retained.disk_usage:.0%} full)"
        )
    elapsed = time.monotonic() - started
    summary = _report(
        site, studies, uploads, failures, registered, rule_grants, deliveries, elapsed, quarantined, held, center
    )
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(studies)} studies of {site} could not be uploaded; "
            "see the run's artifact; the next run retries them"
        )
    if center.lost:
        raise LostFromCenter(
            f"{center.lost} instance(s) the edge of {site} journaled as verified are missing "
            "from the center and the edge no longer holds them; see the run's artifact"
        )
    if center.error:
        raise RuntimeError(
            f"the check of the center failed ({center.error}); the rest of the run went through; see the run's artifact"
        )
    repaired = center_line(center)
    if quarantined:
        message = quarantine_line(site, len(quarantined)) + (f"; {repaired}" if repaired else "")
        return Completed(name=QUARANTINE_STATE, message=message, data=summary)
    if repaired:
        return Completed(message=repaired, data=summary)
    return summary


QUARANTINE_STATE = "Completed with quarantine"


def center_line(center: CenterCheck) -> str:
    """The run state's message when the center check found something ('' when it found nothing)."""
    if not center.needs_attention or center.error:
        return ""
    if not center.escalated:
        return (
            f"center check: {center.sample_damaged} of {center.sampled} sampled objects have another "
            "size (the nightly verification repairs them)"
        )
    return (
        f"center check: {center.missing} of {center.checked} verified instances were missing from the "
        f"center ({center.reupload} uploaded again), {center.unregistered} not registered (registered again)"
    )


class LostFromCenter(Exception):
    """Instances journaled as verified are gone from the center, and the edge has no copy left."""


def _check_center(region: Region, site: str) -> CenterCheck:
    """The center check's counts; a check that failed (after its retries) does not stop the rest of the run."""
    state = check_center(region, site, return_state=True)
    if state.is_completed():
        result: CenterCheck = state.result()
        return result
    return CenterCheck(site, error=_message(state)[:300])


def quarantine_line(site: str, n: int) -> str:
    return f"{n} {'study' if n == 1 else 'studies'} quarantined — see `renkei edge status --site {site}`"


def _message(state: Any) -> str:
    try:
        state.result()
    except Exception as exc:
        return str(exc)
    return state.message or state.name


def _report(
    site: str,
    studies: list[str],
    uploads: dict[str, UploadResult],
    failures: dict[str, str],
    registered: RegisterResult,
    rule_grants: RuleGrants,
    deliveries: dict[str, Any],
    elapsed: float,
    quarantined: dict[str, str],
    held: list[Quarantine],
    center: CenterCheck,
) -> dict[str, Any]:
    moved = [uid for uid in uploads if uid not in quarantined]
    instances = sum(uploads[uid].instances for uid in moved)
    size = sum(uploads[uid].bytes for uid in moved)
    mb_s = size / 1e6 / elapsed if elapsed > 0 else 0.0
    rows = [
        {
            "study_uid": uid,
            "instances": u.instances,
            "new_objects": u.uploaded,
            "already_in_center": u.already_present,
            "conflicts": u.conflicts,
            "MB": round(u.bytes / 1e6, 2),
            "seconds": round(u.seconds, 2),
            "result": "verified",
        }
        for uid, u in uploads.items()
    ]
    for row in rows:  # uploaded, then refused by the catalog
        if row["study_uid"] in quarantined:
            row["result"] = f"QUARANTINED: {quarantined[row['study_uid']]}"
    rows += [
        {
            "study_uid": _line_safe(uid),
            "instances": 0,
            "new_objects": 0,
            "already_in_center": 0,
            "conflicts": 0,
            "MB": 0,
            "seconds": 0,
            "result": f"QUARANTINED: {why}",
        }
        for uid, why in quarantined.items()
        if uid not in uploads
    ]
    rows += [
        {
            "study_uid": uid,
            "instances": 0,
            "new_objects": 0,
            "already_in_center": 0,
            "conflicts": 0,
            "MB": 0,
            "seconds": 0,
            "result": f"FAILED: {msg}",
        }
        for uid, msg in failures.items()
    ]
    lines = [
        "| studies | instances | MB | seconds | MB/s | grants | failures | quarantined |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(moved)} of {len(studies)} | {instances} | {size / 1e6:.1f} | {elapsed:.1f} | {mb_s:.1f} "
        f"| {len(rule_grants.granted)} | {len(failures)} | {len(quarantined)} |",
        "",
    ]
    if quarantined:
        lines += [f"**{quarantine_line(site, len(quarantined))}**", ""]
    if not studies and not center.needs_attention:
        lines.append("Nothing to do: no completed study is waiting at this site's edge.")
    lines += summary_lines(center)
    if center.error:
        lines += ["## Center check", f"The check of the center failed: {center.error}. The next run checks again."]
    for uid, study_grants in _grants_by_study(rule_grants).items():
        lines.append(f"- {uid}: granted to {', '.join(study_grants)}")
    for site_id, info in deliveries.items():
        lines.append(f"- delivery to {site_id}: {info}")
    if failures:
        lines += [
            "",
            "## Failures and what to do",
            "The instances stay 'pending' at the edge (nothing is lost); the next run retries them.",
            "If it fails again: check the center's storage (S3 endpoint, credentials, disk) and the "
            "edge's files, then start this deployment again from the Prefect UI.",
        ]
        lines += [f"- {uid}: {msg}" for uid, msg in failures.items()]
    if held:
        earlier = [q for q in held if q.study_uid not in quarantined]
        lines += [
            "",
            "## Quarantine",
            "A quarantined study's data was refused (by the center or at the edge); retrying cannot help, so "
            "no run sends it until an operator fixes the cause and runs "
            f"`renkei edge release --site {site} STUDY_UID`. The other studies are not held up by it.",
        ]
        lines += [
            f"- {_line_safe(q.study_uid)} "
            f"({'this run' if q.study_uid in quarantined else 'held since an earlier run'}"
            f", {q.step or 'sync'}): {q.reason}"
            for q in held
        ]
        if earlier and not quarantined:
            lines[4:4] = [
                f"{len(earlier)} {'study' if len(earlier) == 1 else 'studies'} held in quarantine "
                f"since earlier runs — see `renkei edge status --site {site}`",
                "",
            ]
    publish_artifacts(
        f"sync-{site}", f"sync_site {site}", lines, rows, f"Studies moved from {site}'s edge to the center"
    )
    logger().info(
        "sync %s: %d studies, %d instances, %.1f MB in %.1f s, %d failures, %d quarantined",
        site,
        len(moved),
        instances,
        size / 1e6,
        elapsed,
        len(failures),
        len(quarantined),
    )
    return {
        "site": site,
        "studies": len(moved),
        "instances": instances,
        "bytes": size,
        "seconds": round(elapsed, 3),
        "failures": failures,
        "registered": list(registered.studies),
        "granted": [list(g) for g in rule_grants.granted],
        "deliveries": deliveries,
        "quarantined": quarantined,
        "held_in_quarantine": [q.study_uid for q in held],
        "center_check": asdict(center),
    }


def _line_safe(text: str) -> str:
    """A value as it can stand on one line of markdown (an odd one shown quoted, escapes visible)."""
    return text if text.isprintable() and text.strip() == text else repr(text)


def _grants_by_study(rule_grants: RuleGrants) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for study_uid, site, rule in rule_grants.granted:
        out.setdefault(study_uid, []).append(f"{site} ({rule})")
    return out
