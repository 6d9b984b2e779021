"""Tasks of the nightly backup verification."""

from __future__ import annotations

import math

from prefect import task

from renkei import runtime, verification
from renkei.runtime import Region
from renkei.tasks.common import logger
from renkei.verification import VerificationReport


@task(name="verify-center", retries=1, retry_delay_seconds=[30])
def verify_center(region: Region, full: bool = False, repair: bool = True) -> VerificationReport:
    """Read back tonight's share of the center's objects (all with `full`) and repair from edges.

    Also: the sharing rules again for what was uploaded or registered again,
    the objects no catalog row points to (counted, the first few named in the
    report), and the temporary files killed writers left (removed after an hour).
    """
    lay = region.layout
    parts = 1 if full else max(1, math.ceil(1 / lay.config.center.verify_fraction))
    part = verification.night_part(parts)
    store = runtime.open_store(lay)
    with runtime.open_catalog(lay) as catalog:
        report = verification.verify_center(catalog, store, lay, part, parts, repair=repair)
        verification.check_edges(catalog, store, lay, report, repair=repair)
        verification.reapply_rules_to_repaired(catalog, lay, report)
        verification.check_grants(catalog, lay, report)
        verification.check_unreferenced(catalog, store, report)
        verification.sweep_temp(lay.center_url, lay.config.center.s3, report)
        catalog.append_audit(
            "center",
            "verify_backups",
            "verify-backups",
            outcome="ok" if not report.unrecoverable else "unrecoverable",
            detail={
                "instances": report.instances_checked,
                "findings": len(report.findings),
                "repaired": len(report.repaired),
                "part": part,
                "parts": parts,
                "rule_grants_reapplied": report.rule_grants_reapplied,
                "unreferenced": report.unreferenced,
                "temp_removed": report.temp_removed,
            },
        )
    logger().info(
        "verified %d instances (%.1f MB/s): %d findings, %d repaired, %d unrecoverable; "
        "%d objects listed, %d unreferenced; %d temporary files removed; %d rule grants applied again",
        report.instances_checked,
        report.mb_s,
        len(report.findings),
        len(report.repaired),
        len(report.unrecoverable),
        report.objects_listed,
        report.unreferenced,
        report.temp_removed,
        report.rule_grants_reapplied,
    )
    return report
