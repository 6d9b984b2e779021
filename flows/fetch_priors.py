"""`fetch_priors`: when a patient is admitted, their prior studies from other sites land in this site's PACS."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow

from renkei.imports import ImportResult
from renkei.runtime import Region
from renkei.tasks.clinical import (
    cache_study,
    find_prior_studies,
    import_study,
    resolve_patient,
)
from renkei.tasks.common import publish_artifacts


@flow(name="fetch_priors", flow_run_name="priors-into-{site}")
def fetch_priors(
    site: str,
    patient_id: str,
    issuer: str = "",
    lookback_years: float = 5.0,
    modalities: list[str] | None = None,
    patient_name: str = "",
    birth_date: str = "",
    sex: str = "",
    config: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Resolve the patient across sites, then bring their visible prior studies from other sites to
    this site's edge and import them into its PACS under this site's Patient ID.

    An ambiguous identity fetches nothing: the candidates are listed in the artifact for an
    operator to confirm with `renkei link`.
    """
    started = time.monotonic()
    region = Region(config, data_dir)
    res = resolve_patient(region, site, patient_id, issuer, patient_name, birth_date, sex)
    lines = [f"Patient of **{site}** resolved by **{res.method}**: {res.detail}", ""]
    imported: list[dict[str, Any]] = []
    if not res.resolved:
        if res.candidates:
            lines += [
                "Nothing was fetched. Candidates (confirm with "
                "`renkei link --site SITE --patient-id ID --with SITE2:ID2`):",
                "",
                "| site | patient ID | issuer | name | birth date | sex | studies |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {c.site} | {c.patient_id} | {c.issuer} | {c.patient_name} | "
                f"{c.patient_birth_date} | {c.patient_sex} | {c.studies} |"
                for c in res.candidates
            ]
    else:
        studies = find_prior_studies(region, res, lookback_years, modalities)
        caches = [cache_study.submit(region, site, s.study_uid) for s in studies]
        imports = [
            import_study.submit(  # type: ignore[call-overload]  # prefect's overloads miss wait_for with these args
                region, site, s.study_uid, res.patient_id, res.issuer, wait_for=[c]
            )
            for s, c in zip(studies, caches)
        ]
        for study, cache, future in zip(studies, caches, imports):
            future.wait()
            cache.wait()
            if future.state.is_completed():
                outcome: ImportResult = future.result()
                result = "already in the PACS" if outcome.skipped else f"imported {outcome.sent}"
            elif not cache.state.is_completed():
                result = f"FAILED: not brought to the edge: {_error(cache.state)}"
            else:
                result = f"FAILED: {_error(future.state)}"
            imported.append(
                {
                    "study_uid": study.study_uid,
                    "from": study.origin_site,
                    "date": study.study_date,
                    "modalities": ",".join(study.modalities),
                    "instances": study.instances,
                    "result": result,
                }
            )
        lines.append(f"{len(studies)} prior studies found at other sites within {lookback_years:g} years.")
    elapsed = time.monotonic() - started
    lines.append(f"Done in {elapsed:.1f} s.")
    publish_artifacts(
        f"fetch-priors-{site}",
        f"fetch_priors at {site}",
        lines,
        imported,
        "Prior studies fetched for an admitted patient",
    )
    failed = [i for i in imported if i["result"].startswith("FAILED")]
    if failed:
        raise RuntimeError(f"{len(failed)} prior studies could not be imported; see the artifact")
    resolution = asdict(res) | {"resolved": res.resolved}
    return {"resolution": resolution, "studies": imported, "seconds": elapsed}


def _error(state: Any) -> str:
    """The error a final state holds, as text (an unfinished state says so)."""
    if not state.is_final():
        return f"not run ({state.name})"
    try:
        state.result()
    except Exception as exc:
        return str(exc)[:300]
    return state.message or state.name
