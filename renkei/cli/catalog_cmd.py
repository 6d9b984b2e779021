"""`renkei catalog ...`: ask the center's catalog where studies are and who may see them."""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from renkei.cli.common import layout_of, print_json, print_table
from renkei.errors import UsageError

ORDER = 50


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "catalog",
        parents=[common],
        help="query the center's catalog (studies, copies, grants)",
        description="Query the catalog of every study's copies and visibility.",
    )
    cmds = parser.add_subparsers(title="catalog commands", metavar="ACTION")

    p = cmds.add_parser(
        "studies",
        parents=[common],
        help="studies a site may see",
        description="Studies a site may see: its own, and those granted to it.",
    )
    p.add_argument("--site", required=True, metavar="SITE")
    p.add_argument("--patient-id", metavar="ID", help="only this patient's studies")
    p.add_argument("--issuer", metavar="ISSUER", help="Issuer of Patient ID of --patient-id (default: any)")
    p.add_argument("--date-from", metavar="YYYYMMDD")
    p.add_argument("--date-to", metavar="YYYYMMDD")
    p.add_argument("--modality", action="append", metavar="M", help="repeat for several (any of them)")
    p.add_argument("--json", action="store_true", help="print JSON (every field)")
    p.set_defaults(func=_studies)

    for name, help_text, func in (
        ("where", "where the copies of a study are, and their state", _where),
        ("grants", "a study's grants and revocations, current and past", _grants),
        ("audit", "a study's audit trail", _audit),
    ):
        p = cmds.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.add_argument("study_uid", metavar="STUDY_UID")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = cmds.add_parser("totals", parents=[common], help="studies, instances, bytes and backlog per site")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_totals)

    p = cmds.add_parser(
        "compact",
        parents=[common],
        help="merge the catalog's small files (safe while in use)",
        description="Merge small Parquet files so queries stay fast; safe while others write.",
    )
    p.add_argument("--force", action="store_true", help="merge every table into one file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_compact)

    p = cmds.add_parser(
        "versions",
        parents=[common],
        help="instances sent again with other bytes: every version",
        description="Instances an edge received again under the same SOP Instance UID with other "
        "bytes (corrected images). Both versions are kept; the latest received is "
        "current and is what every retrieval serves.",
    )
    p.add_argument("study_uid", nargs="?", metavar="STUDY_UID", help="only this study")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_versions)

    for name, help_text, func in (
        ("check", "read the whole catalog: log continuity, every data file's checksum, the witness", _check),
        ("backup", "copy what is new in the catalog to its second location (incremental)", _backup),
        ("restore", "repair a damaged or lost catalog from its backup (keeps intact later commits)", _restore),
        (
            "rebuild",
            "restore from the backup if needed, then register every object the catalog lacks "
            "and apply the sharing rules again",
            _rebuild,
        ),
    ):
        p = cmds.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper()
            + help_text[1:]
            + ". The second location is center.catalog_backup_url (see docs/catalog.md).",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)


@contextmanager
def open_catalog(args: argparse.Namespace, create: bool = False) -> Iterator[Any]:
    """The region's catalog; unless `create`, a local catalog that does not exist is an error, not made."""
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.catalog.catalog import Catalog

    layout = layout_of(args)
    url = layout.catalog_url
    backup = layout.catalog_backup_url
    lost = "://" in backup or os.path.exists(os.path.join(backup, "witness.json"))  # it existed: report the loss
    if not create and "://" not in url and not os.path.isdir(url) and not (layout.data_dir.is_dir() and lost):
        where = "" if layout.data_dir.is_dir() else f" (the data folder {layout.data_dir} does not exist either)"
        raise UsageError(
            f"there is no catalog at {url}{where}: check --data-dir or RENKEI_DATA_DIR "
            "(or `renkei catalog rebuild` to make one from the center's objects)"
        )
    catalog = Catalog.from_layout(layout, writer=f"cli:{_user()}")
    try:
        yield catalog
    finally:
        catalog.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "operator"


def _studies(args: argparse.Namespace) -> int:
    patients = [(args.patient_id, args.issuer)] if args.patient_id else None
    layout_of(args).config.site(args.site)  # an unknown site is an error, never "(none)"
    with open_catalog(args) as cat:
        rows = cat.visible_studies(args.site, patients, args.date_from, args.date_to, args.modality)
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    print_table(
        [
            {
                "study_uid": r.study_uid,
                "origin": r.origin_site,
                "patient_id": r.patient_id,
                "date": r.study_date,
                "modalities": r.modalities,
                "series": r.series_count,
                "instances": r.instance_count,
                "MB": round(r.bytes / 1e6, 1),
                "description": r.study_description,
            }
            for r in rows
        ]
    )
    return 0


def _where(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        study = cat.study(args.study_uid)
        locations = cat.locations(args.study_uid)
    if args.json:
        print_json(
            {
                "study_uid": args.study_uid,
                "known": study is not None,
                "instances": study.instance_count if study else 0,
                "bytes": study.bytes if study else 0,
                "locations": [l.to_dict() for l in locations],
            }
        )
        return 0
    if study is None and not locations:
        print(f"{args.study_uid}: not in the catalog")
        return 1
    if study:
        print(
            f"{args.study_uid}: from {study.origin_site}, {study.instance_count} instances, {study.bytes / 1e6:.1f} MB"
        )
    print_table(
        [
            {
                "holder": l.holder,
                "instance": l.sop_instance_uid or "(whole study)",
                "state": l.state,
                "verified_at": l.verified_at,
                "since": l.at,
                "detail": l.detail,
            }
            for l in locations
        ]
    )
    return 0


def _grants(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        grants = cat.grants(args.study_uid)
    if args.json:
        print_json([g.to_dict() for g in grants])
        return 0
    print_table(
        [
            {
                "site": g.site,
                "action": g.action,
                "current": "yes" if g.current else "",
                "by": f"{g.by_kind}:{g.by}",
                "rule": g.rule or "",
                "policy": g.policy_version or "",
                "at": g.at,
                "reason": g.reason,
            }
            for g in grants
        ]
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        events = cat.audit_trail(args.study_uid)
    print_events(events, args.json)
    return 0


def print_events(events: list[Any], as_json: bool) -> None:
    if as_json:
        print_json([e.to_dict() for e in events])
        return
    print_table(
        [
            {
                "no": e.event_no,
                "at": e.at,
                "site": e.actor_site,
                "actor": e.actor,
                "action": e.action,
                "study_uid": e.study_uid or "",
                "target": e.target_site or "",
                "outcome": e.outcome,
            }
            for e in events
        ]
    )


def _totals(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        totals = cat.totals()
    if args.json:
        print_json([t.to_dict() for t in totals])
        return 0
    print_table(
        [{**t.to_dict(), "bytes": t.bytes, "GB": round(t.bytes / 1e9, 2)} for t in totals],
        ["site", "studies", "instances", "GB", "backlog_studies"],
    )
    return 0


def _compact(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        result = cat.compact(force=args.force)
        counts = cat.file_counts()
    if args.json:
        print_json(
            {
                "merged": {t: {"files": f, "rows": r} for t, (f, r) in result.merged.items()},
                "vacuumed": result.vacuumed,
                "files": counts,
                "seq": result.seq,
            }
        )
        return 0
    if not result.merged:
        print("nothing to merge")
    for table, (files, rows) in sorted(result.merged.items()):
        print(f"{table}: {files} files merged ({rows} rows)")
    print("files per table now: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


def _backup_location(args: argparse.Namespace) -> Any:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.catalog.backup import BackupLocation

    layout = layout_of(args)
    return BackupLocation(layout.catalog_backup_url, layout.config.center.s3)


def _check(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.catalog.backup import check

    with open_catalog(args) as cat:
        result = check(cat, cat.backup)
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"{result.entries} log entries, {result.files} data files ({result.bytes / 1e6:.1f} MB) "
            f"checked in {result.seconds:.1f} s"
        )
        for problem in result.problems:
            print(f"DAMAGED: {problem}")
        print(
            "catalog intact"
            if result.ok
            else "the catalog is damaged: `renkei catalog restore` repairs it from the backup; "
            "`renkei catalog rebuild` also registers the objects the backup lacks"
        )
    return 0 if result.ok else 1


def _backup(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.catalog.backup import backup

    with open_catalog(args) as cat:
        assert cat.backup is not None
        result = backup(cat, cat.backup)
        where = cat.backup.url
    if args.json:
        print_json({**result.to_dict(), "location": where})
    else:
        print(
            f"catalog backed up to {where} as of commit {result.seq}: {result.entries_copied} log entries and "
            f"{result.files_copied} data files ({result.bytes_copied / 1e6:.1f} MB) copied, "
            f"{result.files_pruned} no longer needed removed ({result.seconds:.1f} s)"
        )
    return 0


def _restore(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.rebuild import restore

    result = restore(layout_of(args))
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"restored from the backup of commit {result.backup_seq}: {result.entries_restored} log entries and "
            f"{result.files_restored} data files repaired; the catalog is at commit {result.seq}"
        )
        if result.entries_set_aside:
            print(
                f"{len(result.entries_set_aside)} later commits could not be kept (set aside under _damaged/): "
                "run `renkei catalog rebuild` to register their objects again"
            )
        if result.events_lost:
            print(f"WARNING: {result.events_lost} audit events committed after the backup are lost")
        for problem in result.problems:
            print(f"  {problem}")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.rebuild import rebuild

    if not layout_of(args).data_dir.is_dir():
        raise UsageError(f"the data folder {layout_of(args).data_dir} does not exist: check --data-dir")
    result = rebuild(layout_of(args))
    if args.json:
        print_json(result.to_dict())
    else:
        source = (
            f"restored from the backup of commit {result.backup_seq}, then "
            if result.restored_from_backup
            else "no backup: started empty, then "
            if result.set_aside
            else ""
        )
        print(
            f"catalog rebuilt: {source}{result.objects_seen} objects read, {result.instances_registered} instances "
            f"of {result.studies_registered} studies registered, {result.rule_grants} rule grants written "
            f"({result.seconds:.1f} s)"
        )
        if result.unreadable:
            print(f"{len(result.unreadable)} objects could not be read:")
            for key in result.unreadable[:20]:
                print(f"  {key}")
    return 0 if not result.unreadable else 1


def _versions(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        records = cat.conflicts(args.study_uid)
    if args.json:
        print_json([{**r.__dict__, "at": r.at.isoformat() if r.at else None, "why": r.why} for r in records])
        return 0
    if not records:
        print("no instance was sent again with other bytes")
        return 0
    print_table(
        [
            {
                "study_uid": r.study_uid,
                "instance": r.sop_instance_uid,
                "first": r.existing_sha256[:12],
                "version": r.new_sha256[:12],
                "from": r.holder,
                "at": r.at,
            }
            for r in records
        ]
    )
    print("the latest version of each instance is current (what retrievals serve); every version is kept")
    return 0
