"""`renkei center`: the center's DICOMweb service and the sites' credentials for it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from renkei.cli.common import layout_of
from renkei.config import Layout
from renkei.errors import UsageError

if TYPE_CHECKING:
    from renkei.center.identity import Credentials

ORDER = 55
DEFAULT_PORT = 8042


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "center",
        parents=[common],
        help="the center's DICOMweb service (QIDO-RS, WADO-RS, STOW-RS) and site credentials",
        description="The center as a service: DICOMweb under /dicomweb, every request identified by a "
        "site's credential and answered with what that site may see.",
    )
    csub = parser.add_subparsers(title="center commands", metavar="SUBCOMMAND")

    serve = csub.add_parser("serve", parents=[common], help="serve DICOMweb (several replicas may share a center)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    serve.add_argument("--tls-cert", metavar="PEM", help="the service's certificate (HTTPS); with --tls-key")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.set_defaults(func=_serve)

    cred = csub.add_parser("credential", parents=[common], help="issue, list and revoke the sites' credentials")
    ccsub = cred.add_subparsers(title="credential commands", metavar="ACTION")
    issue = ccsub.add_parser("issue", parents=[common], help="a new credential for a site (the token is shown once)")
    issue.add_argument("--site", required=True, help="the site the credential acts for")
    issue.add_argument("--name", default="edge", help="what holds it, e.g. edge or worker (default edge)")
    issue.add_argument("--json", action="store_true", help="print {id, site, name, token} as JSON")
    issue.set_defaults(func=_issue)
    lst = ccsub.add_parser("list", parents=[common], help="the credentials (never their tokens)")
    lst.set_defaults(func=_list)
    revoke = ccsub.add_parser("revoke", parents=[common], help="revoke one credential (--id) or all of a site's")
    revoke.add_argument("--id", dest="credential_id", help="the credential's id (renkei center credential list)")
    revoke.add_argument("--site", help="revoke every credential of this site")
    revoke.set_defaults(func=_revoke)
    cred.set_defaults(func=lambda args: (cred.print_help(), 2)[1])
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _credentials(args: argparse.Namespace) -> tuple[Layout, Credentials]:
    # lazy: keeps `renkei --help` fast (s3fs for a center on S3)
    from renkei.center.identity import Credentials

    layout = layout_of(args)
    return layout, Credentials(layout.center_url, layout.config.center.s3)


def _issue(args: argparse.Namespace) -> int:
    layout, creds = _credentials(args)
    layout.config.site(args.site)  # a site of the region, or a UsageError naming the sites
    cred, token = creds.issue(args.site, args.name)
    if args.json:
        print(json.dumps({"id": cred.id, "site": cred.site, "name": cred.name, "token": token}))
    else:
        print(f"credential {cred.id} for {cred.site} ({cred.name}); its token, shown only now:\n{token}")
        print(
            "give it to the site's machine as RENKEI_CENTER_TOKEN; revoke with: renkei center credential revoke --id "
            + cred.id
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    _layout, creds = _credentials(args)
    rows = creds.all()
    if not rows:
        print("(no credentials: renkei center credential issue --site SITE)")
    for c in rows:
        state = f"revoked {c.revoked_at}" if c.revoked_at else "active"
        print(f"{c.id}  {c.site:<12} {c.name:<10} issued {c.created_at}  {state}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _layout, creds = _credentials(args)
    revoked = creds.revoke(site=args.site, credential_id=args.credential_id)
    if not revoked:
        raise UsageError("no active credential matches (renkei center credential list shows them)")
    for c in revoked:
        print(f"revoked {c.id} ({c.site}, {c.name}); every replica refuses it within a few seconds")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (uvicorn, fastapi and the catalog)
    import uvicorn

    # lazy: the service imports fastapi, pydicom and the catalog (~0.5 s)
    from renkei.center.app import create_app

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be between 1 and 65535")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key (or neither)")
    layout = layout_of(args)
    app = create_app(layout)
    scheme = "https" if args.tls_cert else "http"
    print(f"renkei center: DICOMweb on {scheme}://{args.host}:{args.port}/dicomweb", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        timeout_keep_alive=30,
        limit_concurrency=256,
    )
    return 0
