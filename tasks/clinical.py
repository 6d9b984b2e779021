"""Tasks of the clinical flows: resolve a patient across sites, find priors, import reconciled copies.

Each takes the `Region` it works on and returns a typed result.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from renkei import runtime
from renkei.catalog.audit import AuditDraft
from renkei.deployments import flow_deployment
from renkei.imports import CacheResult, ImportResult, cache_at_edge, import_to_pacs
from renkei.priors import Demographics, Resolution, find_priors, resolve_person
from renkei.runtime import Region
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only
from renkei.tasks.sync import Delivery


@dataclass(frozen=True)
class PriorStudy:
    """A prior study at another site, as the flow reports it (no patient name)."""

    study_uid: str
    origin_site: str
    study_date: str
    modalities: tuple[str, ...]
    instances: int
    bytes: int
    description: str


@dataclass(frozen=True)
class SiteIdentity:
    """The destination site's own Patient ID for the patient of a study, or why it is not known."""

    found: bool
    patient_id: str = ""
    issuer: str = ""
    method: str = ""
    detail: str = ""


@task(name="resolve-patient", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=retry_io_only)
def resolve_patient(
    region: Region,
    site: str,
    patient_id: str,
    issuer: str,
    patient_name: str = "",
    birth_date: str = "",
    sex: str = "",
) -> Resolution:
    """The person's IDs at every site (links, else an unambiguous exact demographic match)."""
    lay = region.layout
    given = Demographics(patient_name, birth_date, sex) if (patient_name or birth_date) else None
    with runtime.open_catalog(lay) as catalog:
        res = resolve_person(lay.config, catalog, site, patient_id, issuer, given)
    logger().info(
        "patient at %s resolved by %s: %d site-local IDs, %d candidates",
        site,
        res.method,
        len(res.ids),
        len(res.candidates),
    )
    return res


@task(name="find-priors", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=retry_io_only)
def find_prior_studies(
    region: Region, resolution: Resolution, lookback_years: float, modalities: list[str] | None
) -> list[PriorStudy]:
    """The person's studies at other sites visible to the requesting site (newest first)."""
    with runtime.open_catalog(region.layout) as catalog:
        rows = find_priors(catalog, resolution, lookback_years, modalities)
    return [
        PriorStudy(
            r.study_uid,
            r.origin_site,
            r.study_date,
            tuple(r.modalities),
            r.instance_count,
            r.bytes,
            r.study_description,
        )
        for r in rows
    ]


@task(
    name="cache-at-edge",
    task_run_name="cache {study_uid} at {site}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_io_only,
)
def cache_study(region: Region, site: str, study_uid: str) -> CacheResult:
    """Keep a verified copy of a center study in the site edge's cache (its workstations read it there)."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        result = cache_at_edge(lay, catalog, runtime.open_store(lay), site, study_uid)
        row = catalog.study(study_uid)
        catalog.append_audit(
            site,
            "renkei",
            "cache",
            study_uid,
            target_site=row.origin_site if row else None,
            detail={"instances": result.instances, "fetched": result.fetched},
        )
    return result


@task(
    name="import-to-pacs",
    task_run_name="import {study_uid} into the PACS of {site}",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=retry_io_only,
)
def import_study(region: Region, site: str, study_uid: str, patient_id: str, issuer: str) -> ImportResult:
    """Import a reconciled copy (the site's Patient ID) of a center study into the site's PACS."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        result = import_to_pacs(lay, catalog, runtime.open_store(lay), site, study_uid, patient_id, issuer)
        row = catalog.study(study_uid)
        catalog.append_audit(
            site,
            "renkei",
            "import",
            study_uid,
            target_site=row.origin_site if row else None,
            outcome="ok" if result.ok else "failed",
            detail={"sent": result.sent, "skipped": result.skipped},
        )
    if result.failures:
        raise RuntimeError(
            f"{len(result.failures)} instance(s) of {study_uid} not imported into the PACS of "
            f"{site}: {result.failures[0]}"
        )
    return result


@task(
    name="record-deliveries", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only
)
def record_deliveries(region: Region, site: str, outcomes: list[tuple[str, str]]) -> int:
    """One `deliver` audit event per study and its outcome (ok, edge-failed, pacs-failed, patient-unknown,
    no-pacs), in one commit; `renkei status` reports the studies whose latest delivery failed."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        drafts = []
        for study_uid, outcome in outcomes:
            row = catalog.study(study_uid)
            drafts.append(
                AuditDraft(site, "renkei", "deliver", study_uid, row.origin_site if row else None, outcome, None)
            )
        catalog.append_audits(drafts)
    return len(outcomes)


@task(name="patient-id-at-site", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=retry_io_only)
def patient_id_at_site(region: Region, site: str, study_uid: str) -> SiteIdentity:
    """The destination's own (patient_id, issuer) for the patient of a study from another site."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        row = catalog.study(study_uid)
        if row is None:
            return SiteIdentity(False, detail=f"study {study_uid} is not in the catalog")
        res = resolve_person(
            lay.config, catalog, row.origin_site, row.patient_id, row.issuer_of_patient_id, operator="deliver"
        )
    mine = [x for x in res.ids if x[0] == site]
    if not res.resolved or len(mine) != 1:
        return SiteIdentity(False, detail=f"the patient's ID at {site} is not known ({res.method}: {res.detail})")
    return SiteIdentity(True, mine[0][1], mine[0][2], res.method)


@task(name="start-deliveries")
def start_deliveries(region: Region, plan: dict[str, Delivery]) -> dict[str, str]:
    """Start a `deliver` run on each destination site's own work pool; {site: flow run id or reason}."""
    started: dict[str, str] = {}
    for site, entry in plan.items():
        params = {
            "site": site,
            "study_uids": entry.study_uids,
            "to_pacs": entry.to_pacs,
            "config": region.config,
            "data_dir": region.data_dir,
        }
        try:
            run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here, whatever the stubs say
                flow_deployment("deliver", site),
                parameters=params,
                timeout=0,
                as_subflow=False,
                tags=["renkei", f"site:{site}"],
            )
            started[site] = f"flow run {run.id}"
        except ObjectNotFound:
            started[site] = "no deployment"
    return started
