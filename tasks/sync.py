"""Tasks of `sync_site`: ready studies, upload, register, apply the rules, deliver.

Each takes the `Region` it works on and returns a typed result (the dataclasses of the
modules that do the work); the flow reads fields, not dictionary keys.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

from prefect import task

from renkei import center_check, runtime, transfer
from renkei.center_check import CenterCheck
from renkei.edge.journal import Quarantine
from renkei.policy import deliveries
from renkei.retention import RetentionResult, apply_retention
from renkei.runtime import Region
from renkei.sharing import RuleGrants, Sharing
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only, run_marker
from renkei.transfer import RegisterResult, UploadResult
from renkei.versions import VersionResult
from renkei.versions import upload_versions as upload_new_versions


@dataclass
class Delivery:
    """Studies the policy pushes ahead of time to one site: into its edge's cache, and its PACS with `to_pacs`."""

    study_uids: list[str] = field(default_factory=list)
    to_pacs: bool = False


class UploadFailed(Exception):
    """Some instances of a study could not be uploaded; the task retries."""


@task(name="ready-studies", retries=2, retry_delay_seconds=[1, 4])
def ready_studies(region: Region, site: str) -> list[str]:
    """The completed studies in the site's edge journal not yet verified in the center."""
    lay = region.layout
    with runtime.open_journal(lay, site) as journal:
        studies = transfer.studies_to_sync(journal, lay.config.site(site).edge.stable_age)
    logger().info("ready-studies %s: %d completed studies to sync", site, len(studies))
    return studies


@task(name="check-center", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def check_center(region: Region, site: str) -> CenterCheck:
    """Does the center still hold what the edge's journal calls verified? (a sample; see renkei.center_check)

    Instances found missing are set back in the journal (to 'pending', or to
    'uploaded' when only the catalog lost them), so that this run's ingest,
    upload, register and apply-rules steps repair them. Counts only.
    """
    lay = region.layout
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
    return result


@task(
    name="upload-study",
    task_run_name="upload {study_uid}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_io_only,
)
def upload_study(region: Region, site: str, study_uid: str) -> UploadResult:
    """Upload one study's pending instances to the center, each verified by SHA-256.

    The flow runs at most the site's upload slots of these at once. Raises when
    an instance failed for a transient reason, so that Prefect retries with
    backoff; a study quarantined for its data returns (its `quarantined` says
    why): retrying could not help.
    """
    lay = region.layout
    slots = lay.config.site(site).link.upload_slots
    with runtime.open_journal(lay, site) as journal:
        result = transfer.upload_study(journal, runtime.open_store(lay), site, study_uid, parallel=max(2, 8 // slots))
    if result.quarantined:
        logger().warning("upload %s: quarantined: %s", study_uid, result.quarantined)
    elif result.failures:
        raise UploadFailed(f"{len(result.failures)} instance(s) of {study_uid} failed: {result.failures[0]}")
    return result


@task(name="register", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def register(region: Region, site: str, study_uids: list[str]) -> RegisterResult:
    """Register the uploaded studies in the catalog (one commit); verified after apply-rules."""
    lay = region.layout
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
    return result


@task(
    name="audit-quarantines", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only
)
def audit_quarantines(region: Region, site: str) -> list[Quarantine]:
    """Audit the site's new quarantines and releases in the catalog; returns the studies held now.

    The catalog is opened only when there is something to audit.
    """
    lay = region.layout
    with runtime.open_journal(lay, site) as journal:
        if journal.quarantines_to_audit():
            with runtime.open_catalog(lay) as catalog:
                audited = transfer.audit_quarantines(journal, catalog, site, by=run_marker())
            logger().info("audit-quarantines %s: %d quarantine event(s) recorded", site, len(audited))
        return journal.quarantined()


@task(name="mark-verified", retries=2, retry_delay_seconds=[1, 4])
def mark_verified(region: Region, site: str, study_uids: list[str]) -> int:
    """The studies are registered and their rules applied: their instances become 'verified' at the edge."""
    lay = region.layout
    with runtime.open_journal(lay, site) as journal:
        return transfer.mark_verified(journal, study_uids)


@task(name="versions", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def upload_versions(region: Region, site: str) -> VersionResult:
    """Instances the edge received again with other bytes go to the center as new versions (counts only)."""
    lay = region.layout
    with runtime.open_journal(lay, site) as journal, runtime.open_catalog(lay) as catalog:
        return upload_new_versions(journal, runtime.open_store(lay), catalog, site)


@task(name="apply-rules", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def apply_rules(region: Region, study_uids: list[str]) -> RuleGrants:
    """Apply the sharing policy's rules to the registered studies; returns the grants written."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        result = Sharing(lay.config, catalog).apply_rules(study_uids)
    logger().info("apply-rules: %d rule grants written", len(result.granted))
    return result


@task(name="plan-deliveries")
def plan_deliveries(region: Region, granted: tuple[tuple[str, str, str], ...]) -> dict[str, Delivery]:
    """Which of the new grants (study_uid, site, rule) the policy pushes ahead of time, by site."""
    lay = region.layout
    plan: dict[str, Delivery] = {}
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
                entry = plan.setdefault(site, Delivery())
                entry.study_uids.append(study_uid)
                entry.to_pacs = entry.to_pacs or how == "pacs"
    return plan


@task(name="retention", retries=1, retry_delay_seconds=[10])
def retain(region: Region, site: str) -> RetentionResult:
    """Drop the oldest local copies the center holds verified while the edge's disk is too full."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        return apply_retention(lay, catalog, site)
