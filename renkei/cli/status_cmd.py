"""`renkei status`: what needs action in the region, with causes and what to do (exit 1 if anything)."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING

from renkei.cli.common import layout_of, print_json, when
from renkei.errors import UsageError

if TYPE_CHECKING:
    from renkei.alerts import Round
    from renkei.config import Layout

ORDER = 15


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="what needs action: stopped edges, failed or late runs, "
        "an old backup verification... (exit 1 when anything does)",
        description="Check the region and list what needs action, each with its cause and what "
        "to do. Exits 1 when something needs action (for monitoring), 0 when all is well.",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--notify",
        action="store_true",
        help="also notify the receivers of alerts.notify of each new problem (once per problem; see renkei watch)",
    )
    p.set_defaults(func=_status)
    w = sub.add_parser(
        "watch",
        parents=[common],
        help="check the region every few minutes and notify (webhook, e-mail...) when something needs action",
        description="Run `renkei status` every alerts.every_s seconds and notify the receivers "
        "of alerts.notify (Apprise URLs) once per new problem, and when it is resolved. Run it "
        "as a service at the center, apart from Prefect, so that a stopped Prefect is reported.",
    )
    w.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between checks (default: alerts.every_s of the configuration)",
    )
    w.add_argument("--once", action="store_true", help="one check, then exit (1 if something needs action)")
    w.set_defaults(func=_watch)


def _check_folder(layout: Layout) -> None:
    if not layout.data_dir.is_dir():
        raise UsageError(f"the data folder {layout.data_dir} does not exist: check --data-dir or RENKEI_DATA_DIR")


def _watch(args: argparse.Namespace) -> int:
    # lazy: apprise takes ~40 ms to import; only a command that sends an alert needs it
    from renkei.alerts import watch

    layout = layout_of(args)
    _check_folder(layout)
    last = {"needs": False}

    def report(result: Round) -> None:
        last["needs"] = result.status.needs_action
        print(
            f"{when(dt.datetime.fromisoformat(result.status.checked_at))}: "
            f"{len(result.status.problems)} need action; notified "
            f"{len(result.notified)} new, {len(result.resolved)} resolved"
            + (f", {len(result.failed)} could not be sent" if result.failed else ""),
            flush=True,
        )

    try:
        watch(layout, args.every, rounds=1 if args.once else None, report=report)
    except KeyboardInterrupt:
        return 0
    return 1 if last["needs"] else 0


def _status(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (status and its urllib.request take ~7 ms, every command would pay it)
    from renkei.status import region_status

    layout = layout_of(args)
    _check_folder(layout)
    status = region_status(layout)
    if args.notify:
        # lazy: apprise takes ~40 ms to import; only a command that sends an alert needs it
        from renkei.alerts import Sender, alert_urls, check_and_notify

        urls = alert_urls(layout)
        if not urls:
            raise UsageError(
                "--notify: nobody to notify: add Apprise URLs under alerts.notify in the region's "
                f"configuration, or in {layout.config.alerts.notify_env}"
            )
        check_and_notify(layout, Sender(urls), status=status)
    if args.json:
        print_json(status.to_dict())
        return 1 if status.needs_action else 0
    if not status.problems:
        print("nothing needs action: " + "; ".join(status.ok))
        return 0
    print(f"NEEDS ACTION ({len(status.problems)}):")
    for p in status.problems:
        where = f"[{p.site}] " if p.site else ""
        print(f"- {where}{p.cause}\n    what to do: {p.action}" + (f"\n    {p.link}" if p.link else ""))
    if status.ok:
        print("fine: " + "; ".join(status.ok))
    return 1
