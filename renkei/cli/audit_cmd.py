"""`renkei audit verify|show`: check the audit chain, and read who did what to which study."""

from __future__ import annotations

import argparse
import datetime as dt

from renkei.cli.catalog_cmd import open_catalog, print_events
from renkei.cli.common import config_of, print_json
from renkei.display import zone
from renkei.errors import UsageError

ORDER = 55


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "audit",
        parents=[common],
        help="verify and read the audit log",
        description="The audit log: every publication change and cross-site access.",
    )
    cmds = parser.add_subparsers(title="audit commands", metavar="ACTION")

    p = cmds.add_parser(
        "verify",
        parents=[common],
        help="check that no audit event was edited, deleted or moved",
        description="Recompute the hash chain of every audit event. Exit code 0 when intact, "
        "1 when not (the problems are listed).",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_verify)

    p = cmds.add_parser("show", parents=[common], help="list audit events (filters combine)")
    p.add_argument("--site", metavar="SITE", help="events by or about this site")
    p.add_argument("--study-uid", metavar="UID")
    p.add_argument("--actor", metavar="NAME")
    p.add_argument("--action", metavar="ACTION", help="e.g. register, grant, revoke, view, retrieve")
    p.add_argument("--since", metavar="TIME", help="ISO date or time (the region's time zone unless it says otherwise)")
    p.add_argument("--until", metavar="TIME", help="ISO date or time, exclusive")
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)


def _verify(args: argparse.Namespace) -> int:
    with open_catalog(args) as cat:
        report = cat.verify_audit()
    if args.json:
        print_json({"ok": report.ok, "events_checked": report.events_checked, "problems": list(report.problems)})
    elif report.ok:
        print(f"audit log intact: {report.events_checked} events, hash chain verified")
    else:
        print(f"audit log NOT intact ({report.events_checked} events checked):")
        for problem in report.problems:
            print(f"  - {problem}")
    return 0 if report.ok else 1


def _when(value: str | None, option: str, zone_name: str | None) -> str | None:
    """An ISO date or time as UTC; one without an offset is the region's local time."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {value!r} is not a date or time: write e.g. 2026-12-01 or "
            f"2026-12-01T08:30 (in {zone_name or 'UTC'}) or 2026-12-01T08:30+09:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(zone_name))
    return parsed.astimezone(dt.UTC).isoformat()


def _show(args: argparse.Namespace) -> int:
    zone_name = config_of(args).timezone
    args.since, args.until = _when(args.since, "--since", zone_name), _when(args.until, "--until", zone_name)
    with open_catalog(args) as cat:
        events = cat.audit(
            study_uid=args.study_uid,
            site=args.site,
            actor=args.actor,
            action=args.action,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    print_events(events, args.json)
    return 0
