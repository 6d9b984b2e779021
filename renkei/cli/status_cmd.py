"""`renkei status`: what needs action in the region, with causes and what to do (exit 1 if anything)."""

from __future__ import annotations

import argparse

from renkei.cli.common import layout_of, print_json

ORDER = 15


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="what needs action: stopped edges, failed or late runs, "
                       "an old backup verification... (exit 1 when anything does)",
                       description="Check the region and list what needs action, each with its cause and what "
                       "to do. Exits 1 when something needs action (for monitoring), 0 when all is well.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from renkei.status import region_status

    layout = layout_of(args)
    if not layout.data_dir.is_dir():
        from renkei.errors import UsageError

        raise UsageError(f"the data folder {layout.data_dir} does not exist: check --data-dir or RENKEI_DATA_DIR")
    status = region_status(layout)
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
