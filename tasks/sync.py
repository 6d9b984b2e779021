"""Tasks of `sync_site`: ingest, upload, register, flag, distribute."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

from prefect import task

from renkei import runtime, transfer
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only, run_marker


class UploadFailed(Exception):
    """Some instances of a study could not be uploaded; the task retries."""


@task(name="ingest", retries=2, retry_delay_seconds=[1, 4])
def ingest(site: str, config: str | None = None, data_dir: str | None = None) -> list[str]:
    """The completed studies in the site's edge journal not yet verified in the center."""
    lay = runtime.layout(config, data_dir)
    with runtime.open_journal(lay, site) as journal:
        studies = transfer.studies_to_sync(journal, lay.config.site(site).edge.stable_age)
    logger().info("ingest %s: %d completed studies to sync", site, len(studies))
    return studies


@task(name="check-center", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def check_center(site: str, config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Does the center still hold what the edge's journal calls verified? (a sample; see renkei.center_check)

    Instances found missing are set back in the journal (to 'pending', or to
    'uploaded' when only the catalog lost them), so that this run's ingest,
    upload, register and flag steps repair them. Returns counts only.
    """
    from renkei import center_check

    lay = runtime.layout(config, data_dir)
    with ExitStack() as stack:
        journal = stack.enter_context(runtime.open_journal(lay, site))
        # the catalog is opened only when the journal holds something verified to compare
        result = center_check.check_site(
            journal, runtime.open_store(lay), lambda: stack.enter_context(runtime.open_catalog(lay)), site
        )
    logger().info(
        "check-center %s: %d verified instances sampled, %d missing, %d not registered; "
        "full check of %d: %d set back for upload, %d for registration, %d lost",
        site,
        result.sampled,
        result.sample_missing,
        result.sample_unregistered,
        result.checked,
        result.reupload,
        result.reregister,
        result.lost,
    )
    return result.to_dict()


@task(
    name="upload-study",
    task_run_name="upload {study_uid}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_io_only,
)
def upload_study(site: str, study_uid: str, config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Upload one study's pending instances to the center, each verified by SHA-256.

    The flow runs at most the site's upload slots of these at once. Raises when
    an instance failed for a transient reason, so that Prefect retries with
    backoff; a study quarantined for its data returns (its `quarantined` says
    why): retrying could not help.
    """
    lay = runtime.layout(config, data_dir)
    slots = lay.config.site(site).link.upload_slots
    with runtime.open_journal(lay, site) as journal:
        result = transfer.upload_study(journal, runtime.open_store(lay), site, study_uid, parallel=max(2, 8 // slots))
    if result.quarantined:
        logger().warning("upload %s: quarantined: %s", study_uid, result.quarantined)
    elif result.failures:
        raise UploadFailed(f"{len(result.failures)} instance(s) of {study_uid} failed: {result.failures[0]}")
    return asdict(result)


@task(name="register", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def register(
    site: str, study_uids: list[str], config: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Register the uploaded studies in the catalog (one commit); the edge marks them verified after flag."""
    lay = runtime.layout(config, data_dir)
    with runtime.open_journal(lay, site) as journal, runtime.open_catalog(lay) as catalog:
        result = transfer.register_studies(
            journal,
            catalog,
            site,
            study_uids,
            by=run_marker(),
            default_issuer=lay.config.site(site).issuer,
            mark_verified=False,
        )
    logger().info(
        "register %s: %d studies, %d new instances, %d quarantined",
        site,
        len(result.studies),
        result.new_instances,
        len(result.quarantined),
    )
    return asdict(result)


@task(
    name="audit-quarantines", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only
)
def audit_quarantines(site: str, config: str | None = None, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Audit the site's new quarantines and releases in the catalog; returns the studies held now.

    The catalog is opened only when there is something to audit.
    """
    lay = runtime.layout(config, data_dir)
    with runtime.open_journal(lay, site) as journal:
        if journal.quarantines_to_audit():
            with runtime.open_catalog(lay) as catalog:
                audited = transfer.audit_quarantines(journal, catalog, site, by=run_marker())
            logger().info("audit-quarantines %s: %d quarantine event(s) recorded", site, len(audited))
        return [q.to_dict() for q in journal.quarantined()]


@task(name="mark-verified", retries=2, retry_delay_seconds=[1, 4])
def mark_verified(site: str, study_uids: list[str], config: str | None = None, data_dir: str | None = None) -> int:
    """The studies are registered and flagged: their instances become 'verified' at the edge."""
    lay = runtime.layout(config, data_dir)
    with runtime.open_journal(lay, site) as journal:
        return transfer.mark_verified(journal, study_uids)


@task(name="versions", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def upload_versions(site: str, config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Instances the edge received again with other bytes go to the center as new versions (counts only)."""
    from renkei.versions import upload_versions as upload

    lay = runtime.layout(config, data_dir)
    with runtime.open_journal(lay, site) as journal, runtime.open_catalog(lay) as catalog:
        result = upload(journal, runtime.open_store(lay), catalog, site)
    return result.to_dict()


@task(name="flag", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def flag(study_uids: list[str], config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Apply the sharing policy's rules to the registered studies; returns the grants written."""
    from renkei.sharing import Sharing

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        result = Sharing(lay.config, catalog).flag(study_uids)
    logger().info("flag: %d grants written", len(result.granted))
    return {
        "granted": [list(g) for g in result.granted],
        "skipped_consent": list(result.skipped_consent),
        "skipped_history": [list(x) for x in result.skipped_history],
    }


@task(name="plan-deliveries")
def plan_deliveries(
    granted: list[list[str]], config: str | None = None, data_dir: str | None = None
) -> dict[str, dict[str, Any]]:
    """Which of the new grants the policy pushes ahead of time: {site: {study_uids, to_pacs}}."""
    from renkei.policy import deliveries

    lay = runtime.layout(config, data_dir)
    plan: dict[str, dict[str, Any]] = {}
    if not granted:
        return plan
    with runtime.open_catalog(lay) as catalog:
        by_study: dict[str, set[str]] = {}
        for study_uid, site, _rule in granted:
            by_study.setdefault(study_uid, set()).add(site)
        for study_uid, sites in by_study.items():
            row = catalog.study(study_uid)
            if row is None:
                continue
            for site, how in deliveries(lay.config, row.study_info(), sites).items():
                entry = plan.setdefault(site, {"study_uids": [], "to_pacs": False})
                entry["study_uids"].append(study_uid)
                entry["to_pacs"] = entry["to_pacs"] or how == "pacs"
    return plan


@task(name="retention", retries=1, retry_delay_seconds=[10])
def retain(site: str, config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Drop the oldest local copies the center holds verified while the edge's disk is too full."""
    from renkei.retention import apply_retention

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        result = apply_retention(lay, catalog, site)
    return asdict(result)
