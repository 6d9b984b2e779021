"""`verify_backups`: nightly, the center's copies are whole and nothing was lost in transit."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from renkei.flows import run_names
from renkei.runtime import Region
from renkei.tasks.center import backup_catalog, check_catalog
from renkei.tasks.common import publish_artifacts
from renkei.tasks.verify import verify_center


def _recent(report: dict[str, Any]) -> str:
    n = report.get("unreferenced_recent", 0)
    return f" (and {n} younger than an hour: uploads not registered yet)" if n else ""


class UnrecoverableBackup(Exception):
    """Some objects are missing or corrupt and no edge holds a copy."""


class CatalogDamagedRun(Exception):
    """The catalog itself is damaged: restore it from its backup or rebuild it."""


@flow(name="verify_backups", flow_run_name=run_names.verify)
def verify_backups(
    full: bool = False, repair: bool = True, config: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Check size and SHA-256 of the center's objects (a rotating share each night unless `full`),
    that every instance the edges journaled reached the center, and that every grant names a study.
    Repairs from an edge's copy (and applies the sharing rules again to what it uploaded or registered
    again); reports the objects no catalog row points to; removes temporary files of killed writers.
    Fails (red in the Prefect UI) when something cannot be repaired.
    """
    region = Region(config, data_dir)
    catalog = check_catalog(region)
    if not catalog.ok:
        lines = [
            "## The catalog is damaged",
            "The objects were not verified: the catalog that lists them is damaged. "
            "Run `renkei catalog restore` (repairs it from its backup, keeping later commits that are "
            "intact), then `renkei catalog check`; if the backup is gone too, `renkei catalog rebuild` "
            "registers every object again. Then start this flow again.",
            "",
        ]
        lines += [f"- {p}" for p in catalog.problems[:50]]
        publish_artifacts("verify-backups", "verify_backups", lines, [], "Nightly backup verification")
        raise CatalogDamagedRun(f"the catalog is damaged ({len(catalog.problems)} problems); see the run's artifact")
    verified = verify_center(region, full, repair)
    # the run's summary (its result, and what the report below reads): plain values
    report: dict[str, Any] = asdict(verified) | {
        "mb_s": verified.mb_s,
        "repaired": len(verified.repaired),
        "unrecoverable": len(verified.unrecoverable),
        "catalog_check": {k: getattr(catalog, k) for k in ("entries", "files", "bytes", "seconds")},
        "catalog_backup": backup_catalog(region).to_dict(),
    }
    findings = report["findings"]
    lines = [
        "| part | instances | MB | seconds | MB/s | edge instances | grants | findings | repaired | unrecoverable |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {report['part'] + 1} of {report['parts']} | {report['instances_checked']} | "
        f"{report['bytes_checked'] / 1e6:.1f} | {report['seconds']:.1f} | {report['mb_s']:.1f} | "
        f"{report['edge_instances_checked']} | {report['grants_checked']} | {len(findings)} | "
        f"{report['repaired']} | {report['unrecoverable']} |",
        "",
    ]
    if not findings:
        lines.append("Every object read back whole; nothing is missing.")
    cc, cb = report["catalog_check"], report["catalog_backup"]
    lines.append(
        f"Catalog: {cc['entries']} log entries and {cc['files']} data files ({cc['bytes'] / 1e6:.1f} MB) "
        f"read whole in {cc['seconds']:.1f} s; backed up as of commit {cb['seq']} "
        f"({cb['files_copied']} new files)."
    )
    if report.get("rule_grants_reapplied"):
        lines.append(
            f"The sharing rules were applied again to the studies uploaded or registered again: "
            f"{report['rule_grants_reapplied']} grants written."
        )
    lines.append(
        f"Object store: {report['objects_listed']} objects, {report['unreferenced']} that no catalog row "
        f"points to{_recent(report)}; {report['temp_removed']} temporary files of interrupted writers "
        "removed (older than an hour)."
    )
    if report["unreferenced"]:
        lines += [
            "## Unreferenced objects",
            "These objects are in the center's store but no catalog row points to them (nothing is deleted). "
            "After a catalog loss or restore, `renkei catalog rebuild` registers them again. Otherwise an "
            "upload whose registration was lost left them: while the origin site's edge still journals "
            "the instances, this flow's edge check (or the site's next sync) registers them again. "
            f"The first {len(report['unreferenced_keys'])} of {report['unreferenced']}:",
            "",
        ]
        lines += [f"- `{key}`" for key in report["unreferenced_keys"]]
        lines.append("")
    if report.get("edges_not_checked"):
        lines.append(
            f"Edge journals not reachable from this worker (not checked, and not available for "
            f"repairs): {', '.join(report['edges_not_checked'])}. Their journals are on their own "
            "machines; this run checked the center's objects and grants only for them."
        )
    if report["unrecoverable"]:
        lines += [
            "## Unrecoverable",
            "These objects are missing or damaged in the center and no edge "
            "holds a copy. Ask the origin site to send the study again from its PACS "
            "(`renkei edge pull --site SITE --study-uid UID`), then rerun this flow.",
        ]
    rows = [
        {
            k: f[k]
            for k in ("kind", "study_uid", "sop_instance_uid", "object_key", "repaired", "repaired_from", "detail")
        }
        for f in findings
    ]
    publish_artifacts("verify-backups", "verify_backups", lines, rows, "Nightly backup verification")
    if report["unrecoverable"]:
        raise UnrecoverableBackup(
            f"{report['unrecoverable']} object(s) missing or corrupt with no copy left; see the run's artifact"
        )
    return report
