"""`renkei link`, `renkei fetch-priors`, `renkei hl7 listen`: the admitted patient's priors."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os

from renkei.cli.common import layout_of, print_json
from renkei.errors import UsageError
from renkei.runtime import open_catalog

ORDER = 45


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "link",
        parents=[common],
        help="confirm that patient IDs of several sites are one person",
        description="Record that a site-local patient is the same person as patients of other "
        "sites (after fetch_priors listed candidates). Audited.",
    )
    p.add_argument("--site", required=True, metavar="SITE")
    p.add_argument("--patient-id", required=True, metavar="ID")
    p.add_argument("--issuer", default="", metavar="ISSUER", help="default: the site's own")
    p.add_argument(
        "--with",
        dest="others",
        action="append",
        required=True,
        metavar="SITE:ID[:ISSUER]",
        help="the same person at another site; repeat for several",
    )
    p.add_argument("--operator", default=None, metavar="NAME", help="who confirms (default: your login name)")
    p.add_argument("--reason", default="", metavar="TEXT")
    p.set_defaults(func=_link)

    p = sub.add_parser(
        "fetch-priors",
        parents=[common],
        help="bring an admitted patient's prior studies from other sites into this site's PACS",
    )
    p.add_argument("--site", required=True, metavar="SITE", help="the admitting site")
    p.add_argument("--patient-id", required=True, metavar="ID", help="the patient's ID at that site")
    p.add_argument("--issuer", default="", metavar="ISSUER")
    p.add_argument("--lookback-years", type=float, default=5.0, metavar="N")
    p.add_argument("--modality", action="append", dest="modalities", metavar="M", help="repeat for several")
    p.add_argument("--here", action="store_true", help="run the flow in this process instead of on the site's worker")
    p.set_defaults(func=_fetch_priors)

    p = sub.add_parser("hl7", parents=[common], help="HL7 v2 admissions (ADT) that start fetch_priors")
    actions = p.add_subparsers(title="hl7 actions", metavar="ACTION")
    listen = actions.add_parser(
        "listen",
        parents=[common],
        help="accept ADT^A01/A04/A08 over MLLP",
        description="Listen for HL7 v2 admission messages over MLLP, acknowledge each "
        "(AA, or AR/AE with the reason) and start fetch_priors on the site's worker. "
        "Who may send, the size and idle limits, the connection limit and TLS come from "
        "the site's hl7 section of the configuration.",
    )
    listen.add_argument("--site", required=True, metavar="SITE", help="the site whose HIS sends the messages")
    listen.add_argument("--host", default="127.0.0.1")
    listen.add_argument("--port", type=int, default=2575)
    listen.add_argument("--lookback-years", type=float, default=5.0, metavar="N")
    listen.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of messages whose MSH-18 is empty (default utf-8); "
        "a message's MSH-18 (SJIS, ISO IR87, UNICODE UTF-8...) takes precedence",
    )
    listen.set_defaults(func=_hl7_listen)


def _parse_other(text: str, layout) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise UsageError(f"--with {text!r}: write SITE:PATIENT_ID or SITE:PATIENT_ID:ISSUER")
    site = layout.config.site(parts[0])
    return site.id, parts[1], parts[2] if len(parts) == 3 else site.issuer


def _link(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    site = layout.config.site(args.site)
    entries = [(site.id, args.patient_id, args.issuer or site.issuer)]
    entries += [_parse_other(o, layout) for o in args.others]
    with open_catalog(layout) as catalog:
        person = catalog.link_patients(
            entries,
            "operator",
            args.operator or getpass.getuser(),
            {"reason": args.reason} if args.reason else "confirmed by an operator",
        )
        members = catalog.patient_ids_of(person)
    print(f"linked as one person ({person}): " + ", ".join(f"{s}:{p}" for s, p, _ in members))
    return 0


def _fetch_priors(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    layout.config.site(args.site)
    params = {
        "site": args.site,
        "patient_id": args.patient_id,
        "issuer": args.issuer,
        "lookback_years": args.lookback_years,
        "modalities": args.modalities,
    }
    if args.here or not os.environ.get("PREFECT_API_URL"):
        # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
        from renkei.flows.fetch_priors import fetch_priors

        result = fetch_priors(**params, config=str(getattr(args, "config", None) or ""), data_dir=str(layout.data_dir))
        print_json(
            {
                "method": result["resolution"]["method"],
                "detail": result["resolution"]["detail"],
                "studies": result["studies"],
            }
        )
        return 0
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from renkei.tasks.trigger import start_run

    run_id = start_run("fetch_priors", args.site, params, tag=f"site:{args.site}")
    print(f"fetch_priors started on the worker of {args.site}: flow run {run_id}")
    return 0


def _hl7_listen(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from renkei.admissions import Admission, AdmissionListener
    from renkei.tasks.trigger import start_run

    layout = layout_of(args)
    layout.config.site(args.site)
    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError("set PREFECT_API_URL to the Prefect server's API: admissions start fetch_priors there")

    def on_admission(admission: Admission) -> str:
        run_id = start_run(
            "fetch_priors",
            admission.site,
            {
                "site": admission.site,
                "patient_id": admission.patient_id,
                "issuer": admission.issuer,
                "lookback_years": args.lookback_years,
                "patient_name": admission.patient_name,
                "birth_date": admission.birth_date,
                "sex": admission.sex,
            },
            tag=f"site:{admission.site}",
            idempotency_key=f"hl7:{admission.site}:{admission.message_control_id}"
            if admission.message_control_id
            else None,
        )
        return f"fetch_priors flow run {run_id}"

    listener = AdmissionListener(layout.config, args.site, on_admission, args.host, args.port, args.encoding)
    settings = listener.settings
    print(
        f"HL7 listener for {args.site} on {args.host}:{args.port}"
        f"{' over TLS' + (' (client certificates required)' if settings.tls.ca else '') if settings.tls else ''}; "
        f"senders allowed: {', '.join(settings.allowed_senders)} (Ctrl-C stops it)",
        flush=True,
    )
    try:
        asyncio.run(listener.serve())
    except KeyboardInterrupt:
        pass
    return 0
