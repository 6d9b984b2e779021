"""Tasks of the clinical flows: resolve a patient across sites, find priors, import reconciled copies."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.client.schemas.objects import FlowRun

from renkei import runtime
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only


@task(name="resolve-patient", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=retry_io_only)
def resolve_patient(
    site: str,
    patient_id: str,
    issuer: str,
    patient_name: str = "",
    birth_date: str = "",
    sex: str = "",
    config: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """The person's IDs at every site (links, else an unambiguous exact demographic match)."""
    from renkei.priors import Demographics, resolve_person

    lay = runtime.layout(config, data_dir)
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
    return {
        "site": res.site,
        "patient_id": res.patient_id,
        "issuer": res.issuer,
        "method": res.method,
        "resolved": res.resolved,
        "person_id": res.person_id,
        "detail": res.detail,
        "ids": [list(x) for x in res.ids],
        "candidates": [asdict(c) for c in res.candidates],
    }


@task(name="find-priors", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=retry_io_only)
def find_prior_studies(
    resolution: dict[str, Any],
    lookback_years: float,
    modalities: list[str] | None,
    config: str | None = None,
    data_dir: str | None = None,
) -> list[dict[str, Any]]:
    """The person's studies at other sites visible to the requesting site (newest first)."""
    from renkei.priors import Resolution, find_priors

    lay = runtime.layout(config, data_dir)
    res = Resolution(
        resolution["site"],
        resolution["patient_id"],
        resolution["issuer"],
        tuple(tuple(x) for x in resolution["ids"]),
        resolution["method"],
    )
    with runtime.open_catalog(lay) as catalog:
        rows = find_priors(catalog, res, lookback_years, modalities)
    return [
        {
            "study_uid": r.study_uid,
            "origin_site": r.origin_site,
            "study_date": r.study_date,
            "modalities": list(r.modalities),
            "instances": r.instance_count,
            "bytes": r.bytes,
            "description": r.study_description,
        }
        for r in rows
    ]


@task(
    name="cache-at-edge",
    task_run_name="cache {study_uid} at {site}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_io_only,
)
def cache_study(site: str, study_uid: str, config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Keep a verified copy of a center study in the site edge's cache (its workstations read it there)."""
    from renkei.imports import cache_at_edge

    lay = runtime.layout(config, data_dir)
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
    return asdict(result)


@task(
    name="import-to-pacs",
    task_run_name="import {study_uid} into the PACS of {site}",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=retry_io_only,
)
def import_study(
    site: str, study_uid: str, patient_id: str, issuer: str, config: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Import a reconciled copy (the site's Patient ID) of a center study into the site's PACS."""
    from renkei.imports import import_to_pacs

    lay = runtime.layout(config, data_dir)
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
    return asdict(result)


@task(
    name="record-deliveries", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only
)
def record_deliveries(
    site: str, outcomes: list[tuple[str, str]], config: str | None = None, data_dir: str | None = None
) -> int:
    """One `deliver` audit event per study and its outcome (ok, edge-failed, pacs-failed, patient-unknown,
    no-pacs), in one commit; `renkei status` reports the studies whose latest delivery failed."""
    from renkei.catalog.audit import AuditDraft

    lay = runtime.layout(config, data_dir)
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
def patient_id_at_site(
    site: str, study_uid: str, config: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """The destination's own (patient_id, issuer) for the patient of a study from another site."""
    from renkei.priors import resolve_person

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        row = catalog.study(study_uid)
        if row is None:
            return {"found": False, "detail": f"study {study_uid} is not in the catalog"}
        res = resolve_person(
            lay.config, catalog, row.origin_site, row.patient_id, row.issuer_of_patient_id, operator="deliver"
        )
    mine = [x for x in res.ids if x[0] == site]
    if not res.resolved or len(mine) != 1:
        return {"found": False, "detail": f"the patient's ID at {site} is not known ({res.method}: {res.detail})"}
    return {"found": True, "patient_id": mine[0][1], "issuer": mine[0][2], "method": res.method}


@task(name="start-deliveries")
def start_deliveries(
    plan: dict[str, dict[str, Any]], config: str | None = None, data_dir: str | None = None
) -> dict[str, str]:
    """Start a `deliver` run on each destination site's own work pool; {site: flow run id or reason}."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from renkei.deployments import flow_deployment

    started: dict[str, str] = {}
    for site, entry in plan.items():
        params = {
            "site": site,
            "study_uids": entry["study_uids"],
            "to_pacs": entry["to_pacs"],
            "config": config,
            "data_dir": data_dir,
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
