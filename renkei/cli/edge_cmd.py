"""`renkei edge ...`: run a site's edge (DICOM node) and talk to its PACS.

renkei edge serve --site hub                      run the edge in the foreground
renkei edge status --site hub                     journal summary, studies in quarantine
renkei edge release --site hub STUDY_UID          end a study's quarantine (the next sync takes it)
renkei edge echo --site hub HUB_PACS              C-ECHO a peer
renkei edge send-to-pacs --site hub STUDY_UID     send a stored study to the site PACS
renkei edge pull --site hub --study-uid UID       have the PACS send studies to the edge
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from renkei.cli.common import layout_of, print_json, print_table, when
from renkei.display import size
from renkei.errors import RenkeiError, UsageError
from renkei.runtime import open_catalog, open_journal

if TYPE_CHECKING:
    from renkei.edge.server import EdgeServer
    from renkei.regional_edge import RegionalEdge

ORDER = 20
LOGGER = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("edge", help="run a site's edge node (DICOM) and talk to its PACS", parents=[common])
    cmds = parser.add_subparsers(title="edge commands", metavar="ACTION")

    def site_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text, parents=[common])
        p.add_argument("--site", required=True, metavar="ID", help="site id from the configuration")
        return p

    p = site_parser("serve", "run the edge in the foreground (Ctrl-C or SIGTERM stops it cleanly)")
    p.add_argument("--port", type=int, default=None, help="listen on this port instead of the configured one")
    p.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (for benchmarks of the network path only: NOT durable)"
    )
    p.add_argument(
        "--trigger",
        choices=("auto", "on", "off"),
        default="auto",
        help="start the site's sync_site deployment when a study is complete (auto: when PREFECT_API_URL is set)",
    )
    p.add_argument(
        "--local-only",
        action="store_true",
        help="serve only this site's own store (no center-held studies, no sharing decision)",
    )
    p.set_defaults(func=cmd_serve)

    p = site_parser(
        "push",
        "send the site's completed studies to the center's DICOMweb service (center.service_url) with this "
        "site's credential ($RENKEI_CENTER_TOKEN); no S3 keys or catalog needed",
    )
    p.set_defaults(func=cmd_push)

    p = site_parser("status", "journal summary: studies, instances, bytes, upload states, quarantine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--stable-age",
        type=float,
        default=None,
        help="also list studies complete for this many seconds (default: the site's)",
    )
    p.set_defaults(func=cmd_status)

    p = site_parser("release", "end a study's quarantine after fixing its cause; the next sync run sends it again")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument(
        "--operator", default=None, metavar="NAME", help="who releases it, for the audit log (default: the login name)"
    )
    p.set_defaults(func=cmd_release)

    p = site_parser("echo", "C-ECHO a DICOM peer from the edge's AE title")
    p.add_argument(
        "peer_ae", nargs="?", default=None, metavar="PEER_AE", help="AE title of the peer (default: the site's PACS)"
    )
    p.set_defaults(func=cmd_echo)

    p = site_parser("send-to-pacs", "send a study stored at the edge to the site's PACS")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--peer", default=None, metavar="AE", help="another configured peer instead of the PACS")
    p.set_defaults(func=cmd_send)

    p = site_parser("pull", "C-FIND the site PACS and C-MOVE what matches to the edge (edge must be serving)")
    p.add_argument("--study-uid", default=None, metavar="UID")
    p.add_argument("--patient-id", default=None, metavar="ID")
    p.add_argument("--date-from", default=None, metavar="YYYYMMDD")
    p.add_argument("--date-to", default=None, metavar="YYYYMMDD")
    p.set_defaults(func=cmd_pull)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def cmd_serve(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the edge imports pydicom and pynetdicom, ~0.3 s)
    from renkei.edge.server import EdgeServer

    layout = layout_of(args)
    store_dir = layout.edge_store(args.site)
    layout.config.site(args.site)

    # EdgeServer logs "study complete: <uid>" itself; the trigger starts the site's sync_site run.
    trigger = None
    if args.trigger == "on" or (args.trigger == "auto" and os.environ.get("PREFECT_API_URL")):
        # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
        from renkei.tasks.trigger import SyncTrigger

        trigger = SyncTrigger(args.site).start()
        LOGGER.info("completed studies start the sync_site deployment of %s", args.site)
    on_complete = trigger.notify if trigger else None
    server: EdgeServer | RegionalEdge
    if args.local_only:
        server = EdgeServer(
            layout.config, args.site, store_dir, fsync=not args.no_fsync, port=args.port, on_study_complete=on_complete
        )
        stop_all = server.stop
    else:
        # lazy: keeps `renkei --help` fast (the edge and the catalog: pydicom, pynetdicom, duckdb, ~0.5 s)
        from renkei.regional_edge import RegionalEdge

        regional = RegionalEdge(
            layout, args.site, on_study_complete=on_complete, fsync=not args.no_fsync, port=args.port
        )
        server, stop_all = regional, regional.stop
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop_requested.is_set():
            LOGGER.info("signal %s: finishing associations in progress, then stopping", signal.Signals(signum).name)
            stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        while not stop_requested.wait(0.5):
            pass
    finally:
        stop_all()
        if trigger is not None:
            trigger.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the journal imports pydicom, ~0.3 s)
    from renkei.edge.journal import Journal

    layout = layout_of(args)
    site = layout.config.site(args.site)
    store_dir = layout.edge_store(args.site)
    if not (store_dir / "journal.sqlite").exists():
        print(f"edge {site.edge.ae_title} (site {args.site}): no journal yet at {store_dir}")
        return 0
    with Journal.open(store_dir, readonly=True) as journal:
        summary = journal.summary()
        stable_age = args.stable_age if args.stable_age is not None else site.edge.stable_age
        held = journal.quarantined()
        held_uids = {q.study_uid for q in held}
        complete = [uid for uid in journal.completed_studies(stable_age, state="pending") if uid not in held_uids]
        heartbeat = journal.last_heartbeat()
        stopped_cleanly = journal.get_meta("clean_shutdown") == "1"
    disk = _disk(store_dir, site)
    data = {
        "site": args.site,
        "ae_title": site.edge.ae_title,
        "store": str(store_dir),
        "studies": summary.studies,
        "instances": summary.instances,
        "bytes": summary.bytes,
        "upload_states": summary.upload_states,
        "conflicts": summary.conflicts,
        "complete_pending_studies": complete,
        "quarantined": [
            {
                "study_uid": q.study_uid,
                "since": when(q.quarantined_at),
                "step": q.step,
                "reason": q.reason,
                "sop_instance_uids": list(q.sop_instance_uids),
            }
            for q in held
        ],
        # the edge's last heartbeat, on the edge's own clock; completion is judged by its quiet clock
        "last_heartbeat": heartbeat,
        "stopped_cleanly": stopped_cleanly,
        "disk": disk,
    }
    if args.json:
        print_json(data)
        return 0
    print(f"edge {site.edge.ae_title} (site {args.site}), store {store_dir}")
    print_table(
        [
            {
                "studies": summary.studies,
                "instances": summary.instances,
                "MB": round(summary.bytes / 1e6, 1),
                **summary.upload_states,
                "conflicts": summary.conflicts,
                "quarantined": len(held),
            }
        ]
    )
    print(f"\n{len(complete)} complete study(ies) with instances pending upload")
    if heartbeat is not None:
        print(
            f"last heartbeat of the edge: {when(heartbeat)} (its own clock)"
            f"{'; stopped cleanly' if stopped_cleanly else ''}"
        )
    reserve = (
        "none"
        if not disk["reserve_bytes"]
        else (size(disk["reserve_bytes"]) + " " + ("held" if disk["reserve_held"] else "RELEASED: the disk is full"))
    )
    print(
        f"disk: {size(disk['free_bytes'])} free, C-STORE refused below "
        f"{size(disk['min_free_bytes'])}; journal reserve {reserve}"
    )
    if held:
        print(
            f"\n{len(held)} study(ies) in quarantine: no sync sends them until released "
            f"(fix the cause, then `renkei edge release --site {args.site} STUDY_UID`)"
        )
        print_table(
            [
                {
                    "study_uid": _one_line(q.study_uid),
                    "since": when(q.quarantined_at),
                    "step": q.step,
                    "bad_instances": len(q.sop_instance_uids),
                    "reason": q.reason,
                }
                for q in held
            ]
        )
    return 0


def _disk(store_dir: Any, site: Any) -> dict[str, Any]:
    """Free bytes on the store's filesystem, and the journal reserve: configured size and whether it is held."""
    # lazy: keeps `renkei --help` fast (~5 ms for one constant, and every command would pay it)
    from renkei.edge.store import RESERVE_NAME

    stat = os.statvfs(store_dir)
    total = stat.f_blocks * stat.f_frsize
    reserve, min_free = site.edge.disk.sizes_for(total)
    return {
        "free_bytes": stat.f_bavail * stat.f_frsize,
        "total_bytes": total,
        "min_free_bytes": min_free,
        "reserve_bytes": reserve,
        "reserve_held": (store_dir / RESERVE_NAME).exists(),
    }


def cmd_release(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the journal imports pydicom, ~0.3 s)
    from renkei.edge.journal import JOURNAL_NAME, Journal

    layout = layout_of(args)
    layout.config.site(args.site)
    store_dir = layout.edge_store(args.site)
    if not (store_dir / JOURNAL_NAME).exists():
        raise UsageError(f"site {args.site} has no edge journal at {store_dir}")
    who = f"operator:{args.operator or _user()}"
    with Journal.open(store_dir) as journal:
        released = journal.release_quarantine(args.study_uid, by=who)
        if released is None:
            held = ", ".join(_one_line(q.study_uid) for q in journal.quarantined()) or "none"
            raise UsageError(
                f"study {_one_line(args.study_uid)} is not in quarantine at {args.site} (in quarantine: {held})"
            )
        print(
            f"released study {_one_line(released.study_uid)} from quarantine at {args.site} "
            f"(held since {when(released.quarantined_at)}: {released.reason}); the next sync run sends it"
        )
        try:
            # lazy: keeps `renkei --help` fast (transfer imports the catalog and the edge, ~0.4 s)
            from renkei import transfer

            with open_catalog(layout) as catalog:
                transfer.audit_quarantines(journal, catalog, args.site, by=who)
        except RenkeiError as exc:
            print(f"the release is not audited yet (the catalog: {exc}); the next sync run records it")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "operator"


def _one_line(text: str) -> str:
    return text if text.isprintable() and text.strip() == text else repr(text)


def cmd_echo(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the edge imports pydicom and pynetdicom, ~0.3 s)
    from renkei.edge import scu

    layout = layout_of(args)
    seconds = scu.echo(layout.config, args.site, args.peer_ae)
    peer = scu.resolve_peer(layout.config, args.site, args.peer_ae)
    print(f"C-ECHO {peer.ae_title} at {peer.host}:{peer.port}: success ({seconds * 1000:.1f} ms)")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the edge imports pydicom and pynetdicom, ~0.3 s)
    from renkei.edge import scu

    layout = layout_of(args)
    report = scu.send_study(layout.config, args.site, layout.edge_store(args.site), args.study_uid, args.peer)
    print(
        f"sent study {report.study_uid} to {report.peer}: {report.sent} instance(s), "
        f"{report.failed} failed, {report.seconds:.2f} s"
    )
    return 0 if report.failed == 0 else 1


def cmd_pull(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (the edge imports pydicom and pynetdicom, ~0.3 s)
    from renkei.edge import scu

    layout = layout_of(args)
    report = scu.pull(
        layout.config,
        args.site,
        study_uid=args.study_uid,
        patient_id=args.patient_id,
        date_from=args.date_from,
        date_to=args.date_to,
    )
    print(
        f"pulled {len(report.studies)} study(ies) from {report.peer}: {report.completed} instance(s), "
        f"{report.failed} failed, {report.seconds:.2f} s"
    )
    for failure in report.failures:
        print(f"  {failure}")
    return 0 if not report.failures and report.failed == 0 else 1


def cmd_push(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (httpx, the journal)
    from renkei.center_client import CenterClient, token_from_env

    layout = layout_of(args)
    site = layout.config.site(args.site)
    url = layout.config.center.service_url
    if not url:
        raise UsageError("the configuration names no center.service_url (the center's DICOMweb service)")
    with open_journal(layout, args.site) as journal, CenterClient(url, token_from_env()) as client:
        results = client.push_site(journal, args.site, site.edge.stable_age)
    stored = sum(r.uploaded for r in results)
    print(f"{args.site}: {len(results)} studies, {stored} instances stored in the center")
    for r in results:
        if r.quarantined:
            print(f"  {r.study_uid}: quarantined: {r.quarantined}")
        elif r.failures:
            print(f"  {r.study_uid}: {len(r.failures)} to send again: {r.failures[0]}")
    return 1 if any(r.failures for r in results) else 0
