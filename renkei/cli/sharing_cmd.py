"""`renkei publish`, `unpublish`, `consent`, `explain`: who may see which study."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from renkei.cli.common import layout_of, print_json
from renkei.errors import UsageError

if TYPE_CHECKING:
    from renkei.sharing import Sharing

ORDER = 40


def _operator_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--operator", default=None, metavar="NAME", help="who does this, for the audit log (default: your login name)"
    )
    parser.add_argument("--reason", default="", metavar="TEXT", help="why, for the audit log")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "publish",
        parents=[common],
        help="publish a study to chosen sites (hub operator)",
        description="Make a study visible to the named sites. Audited.",
    )
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--to", action="append", required=True, metavar="SITE", help="site id; repeat for several")
    p.add_argument(
        "--despite-withdrawn-consent",
        action="store_true",
        help="publish although the patient withdrew consent (give --reason)",
    )
    _operator_arg(p)
    p.set_defaults(func=_publish)

    p = sub.add_parser(
        "unpublish",
        parents=[common],
        help="take a publication back",
        description="Stop a site from seeing a study; effective on its next request. Audited.",
    )
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument(
        "--from", dest="sites", action="append", required=True, metavar="SITE", help="site id; repeat for several"
    )
    _operator_arg(p)
    p.set_defaults(func=_unpublish)

    p = sub.add_parser("consent", parents=[common], help="record a patient's withdrawal or renewal of consent")
    actions = p.add_subparsers(title="consent actions", metavar="ACTION")
    for name, help_text in (
        ("withdraw", "the patient no longer agrees to sharing: rules stop granting, existing rule grants are revoked"),
        ("give", "the patient agrees again: rules grant again"),
    ):
        a = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        a.add_argument("--site", required=True, metavar="SITE", help="the site that numbers the patient")
        a.add_argument("--patient-id", required=True, metavar="ID", help="the patient's ID at that site")
        a.add_argument("--issuer", default="", metavar="ISSUER", help="Issuer of Patient ID (default: the site's own)")
        _operator_arg(a)
        a.set_defaults(func=_consent, action=name)

    p = sub.add_parser("explain", parents=[common], help="why a site may or may not see a study")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--site", required=True, metavar="SITE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_explain)


@contextmanager
def _sharing(args: argparse.Namespace) -> Iterator[Sharing]:
    # lazy: keeps `renkei --help` fast (the catalog imports duckdb and pyarrow, ~0.3 s)
    from renkei.catalog.catalog import Catalog
    from renkei.sharing import Sharing

    layout = layout_of(args)
    catalog = Catalog.from_layout(layout)
    try:
        yield Sharing(layout.config, catalog)
    finally:
        catalog.close()


def _who(args: argparse.Namespace) -> str:
    return args.operator or getpass.getuser()


def _publish(args: argparse.Namespace) -> int:
    if args.despite_withdrawn_consent and not args.reason.strip():
        raise UsageError("--despite-withdrawn-consent needs a --reason (it goes into the audit log)")
    with _sharing(args) as sharing:
        new = sharing.publish(args.study_uid, args.to, _who(args), args.reason, args.despite_withdrawn_consent)
    rest = [s for s in args.to if s not in new]
    print(
        f"published {args.study_uid} to {', '.join(new) or '(no new site)'}"
        + (f"; already visible to {', '.join(rest)}" if rest else "")
    )
    return 0


def _unpublish(args: argparse.Namespace) -> int:
    with _sharing(args) as sharing:
        done = sharing.unpublish(args.study_uid, args.sites, _who(args), args.reason)
    rest = [s for s in args.sites if s not in done]
    print(
        f"unpublished {args.study_uid} from {', '.join(done) or '(no site)'}"
        + (f"; it was not published to {', '.join(rest)}" if rest else "")
    )
    return 0


def _consent(args: argparse.Namespace) -> int:
    with _sharing(args) as sharing:
        if args.action == "withdraw":
            n = sharing.withdraw_consent(args.site, args.patient_id, args.issuer, _who(args), args.reason)
            print(f"consent withdrawn at {args.site}; {n} rule grant(s) revoked")
        else:
            n = sharing.give_consent(args.site, args.patient_id, args.issuer, _who(args), args.reason)
            print(f"consent given at {args.site}; {n} rule grant(s) made again")
    return 0


def _explain(args: argparse.Namespace) -> int:
    with _sharing(args) as sharing:
        if args.json:
            d = sharing.decide(args.site, args.study_uid)
            print_json(
                {
                    "site": d.site,
                    "study_uid": d.study_uid,
                    "allowed": d.allowed,
                    "basis": d.basis,
                    "explanation": d.explanation,
                }
            )
        else:
            print("\n".join(sharing.explain(args.site, args.study_uid)))
    return 0
