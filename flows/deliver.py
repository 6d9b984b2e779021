"""`deliver`: studies published to a site, pushed ahead of time to its edge (and its PACS).

Runs on the destination site's work pool (next to its edge and PACS). The
hub's `sync_site` starts it for a hub exam ordered by a clinic (the source's
"published to the clinic instantly after the exam"); `publish` starts it too.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from renkei.flows import run_names
from renkei.runtime import Region
from renkei.tasks.clinical import (
    cache_study,
    import_study,
    patient_id_at_site,
    record_deliveries,
    start_deliveries,
)
from renkei.tasks.common import publish_artifacts
from renkei.tasks.sync import Delivery


@flow(name="deliver", flow_run_name=run_names.deliver)
def deliver(
    site: str, study_uids: list[str], to_pacs: bool = False, config: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Copy the studies from the center into the site's edge cache; with `to_pacs`, also import them
    into its PACS under the site's own Patient ID (when the patient is known there)."""
    started = time.monotonic()
    region = Region(config, data_dir)
    has_pacs = region.layout.config.site(site).pacs is not None
    rows = []
    for study_uid in study_uids:
        cached = cache_study(region, site, study_uid, return_state=True)
        row = {
            "study_uid": study_uid,
            "edge": "cached" if cached.is_completed() else f"FAILED: {cached.result(raise_on_failure=False)}",
            "pacs": "not asked",
            "outcome": "ok" if cached.is_completed() else "edge-failed",
        }
        if to_pacs and not has_pacs:
            row["pacs"] = f"not imported: {site} has no PACS in the configuration"
            row["outcome"] = "no-pacs"
        elif to_pacs and cached.is_completed():
            ident = patient_id_at_site(region, site, study_uid)
            if not ident.found:
                row["pacs"] = f"not imported: {ident.detail}"
                row["outcome"] = "patient-unknown"
            else:
                state = import_study(region, site, study_uid, ident.patient_id, ident.issuer, return_state=True)
                row["pacs"] = "imported" if state.is_completed() else f"FAILED: {state.result(raise_on_failure=False)}"
                row["outcome"] = "ok" if state.is_completed() else "pacs-failed"
        rows.append(row)
    elapsed = time.monotonic() - started
    failed = [r for r in rows if r["edge"].startswith("FAILED") or r["pacs"].startswith("FAILED")]
    # asked for the PACS and not imported there (patient unknown at the site, no PACS): not a success
    partial = [r for r in rows if to_pacs and r not in failed and r["pacs"] != "imported"]
    done = len(rows) - len(failed) - len(partial)
    lines = [
        f"{done} of {len(study_uids)} studies delivered to {site}"
        + (" and imported into its PACS" if to_pacs else " (edge cache)")
        + f" in {elapsed:.1f} s."
    ]
    if failed:
        lines += [
            "",
            f"**FAILED: {len(failed)}** (see the rows). The center still holds every study: start this "
            "flow again once the cause is fixed (the edge's disk, the PACS, the network).",
        ]
    if partial:
        lines += [
            "",
            f"**NOT IMPORTED: {len(partial)}** — cached at the edge but not in the PACS (see the rows): "
            "register the patient at the site (or link the patient's IDs: `renkei link`), then start this "
            "flow again.",
        ]
    # each study's outcome in the audit chain: `renkei status` lists what was not delivered until it is
    record_deliveries(region, site, [(r["study_uid"], r["outcome"]) for r in rows])
    publish_artifacts(f"deliver-{site}", f"deliver to {site}", lines, rows, "Studies pushed ahead of time")
    if failed or partial:
        what = ([f"{len(failed)} of {len(rows)} studies could not be delivered to {site}"] if failed else []) + (
            [f"{len(partial)} of {len(rows)} studies not imported into the PACS of {site}"] if partial else []
        )
        raise RuntimeError("; ".join(what) + ": see the run's artifact")
    return {"site": site, "studies": rows, "seconds": elapsed}


def distribute(plan: dict[str, Delivery], config: str | None = None, data_dir: str | None = None) -> dict[str, str]:
    """Start `deliver` at each destination site (its own pool); inline when no deployment exists."""
    started = start_deliveries(Region(config, data_dir), plan)
    for site, how in list(started.items()):
        if how == "no deployment":
            entry = plan[site]
            state = deliver(site, entry.study_uids, entry.to_pacs, config, data_dir, return_state=True)
            started[site] = (
                f"delivered here (no deployment deliver-{site}): "
                f"{'ok' if state.is_completed() else state.message or 'failed'}"
            )
    return started
