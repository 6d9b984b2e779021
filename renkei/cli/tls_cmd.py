"""`renkei tls ...`: the region CA and the certificates of its DICOM nodes (mutual TLS).

renkei tls init-ca                          create the region CA in <data>/pki
renkei tls issue --site hub                 the hub's edge certificate (its host in the SAN)
renkei tls issue --site hub --ae HUB_PACS   a certificate for one AE title of the site
renkei tls issue-all                        every edge, PACS and workstation of the region
renkei tls show FILE                        who a certificate speaks for, issuer, expiry
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from renkei.cli.common import config_of, print_json
from renkei.config import RegionConfig, SiteConfig, resolve_data_dir
from renkei.errors import UsageError

ORDER = 25
EDGE_NAME = "edge"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "tls",
        help="region CA and certificates for DICOM TLS",
        parents=[common],
        description="Create the region's certificate authority and the certificates "
        "of its edges, PACS and workstations, for mutual TLS.",
    )
    cmds = parser.add_subparsers(title="tls commands", metavar="ACTION")

    def ca_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--ca-dir", default=None, metavar="DIR", help="folder of ca.pem and ca.key (default: <data-dir>/pki)"
        )

    p = cmds.add_parser(
        "init-ca",
        parents=[common],
        help="create the region CA (once per region)",
        description="Create the region CA: ca.pem (install it everywhere) and ca.key "
        "(keep it on the operator's machine only).",
    )
    p.add_argument("--dir", default=None, metavar="DIR", help="where to write it (default: <data-dir>/pki)")
    p.add_argument("--days", type=int, default=3650, help="validity in days (default: 3650)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (every certificate it issued must then be re-issued)",
    )
    p.set_defaults(func=cmd_init_ca)

    p = cmds.add_parser(
        "issue",
        parents=[common],
        help="issue the certificate of a site's edge or of one AE title",
        description="Without --ae: a site certificate (CN site:<id>) for the site's edge, "
        "with the edge's host in its subjectAltName. With --ae: a certificate for "
        "that AE title only (the site's edge, PACS or a workstation).",
    )
    p.add_argument("--site", required=True, metavar="SITE", help="site id from the configuration")
    p.add_argument("--ae", default=None, metavar="AE_TITLE", help="an AE title of that site")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <ca-dir>/<site>)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help="another DNS name or IP address for the subjectAltName; repeat for several",
    )
    p.add_argument(
        "--name", default=None, metavar="NAME", help="file name without extension (default: 'edge', or the AE title)"
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    ca_dir_arg(p)
    p.set_defaults(func=cmd_issue)

    p = cmds.add_parser(
        "issue-all",
        parents=[common],
        help="issue every edge, PACS and workstation certificate",
        description="For every site: <dir>/<site>/edge.pem|.key (its site certificate) and "
        "<dir>/<site>/<AE>.pem|.key for its PACS and each workstation. "
        "Existing files are replaced (renewal).",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <ca-dir>)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    ca_dir_arg(p)
    p.set_defaults(func=cmd_issue_all)

    p = cmds.add_parser("show", parents=[common], help="print who a certificate speaks for, its issuer and expiry")
    p.add_argument("file", metavar="FILE", help="a PEM or DER certificate")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _pki_dir(args: argparse.Namespace) -> Path:
    return resolve_data_dir(getattr(args, "data_dir", None)) / "pki"


def _ca_dir(args: argparse.Namespace) -> Path:
    return Path(args.ca_dir).expanduser().resolve() if args.ca_dir else _pki_dir(args)


def cmd_init_ca(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (cryptography takes ~30 ms to import)
    from renkei import pki

    config = config_of(args)
    directory = Path(args.dir).expanduser().resolve() if args.dir else _pki_dir(args)
    cert, key = pki.create_ca(directory, config.region, days=args.days, force=args.force)
    print(f"region CA for {config.region!r}:")
    print(f"  {cert}   install at every site and on every TLS peer")
    print(f"  {key}   keep here only (mode 0600); whoever has it can make certificates")
    print("\nNext: renkei tls issue-all   (or: renkei tls issue --site SITE [--ae AE_TITLE])")
    return 0


def _check_ae(config: RegionConfig, site: SiteConfig, ae_title: str) -> None:
    owner = config.site_of_ae(ae_title)
    if owner is None:
        raise UsageError(
            f"unknown AE title {ae_title!r}: not the edge, PACS or a workstation of any site "
            f"in the configuration (site {site.id} has: {', '.join(_site_aes(site))})"
        )
    if owner.id != site.id:
        raise UsageError(f"AE title {ae_title!r} belongs to site {owner.id!r}, not {site.id!r}")


def _site_aes(site: SiteConfig) -> list[str]:
    return [site.edge.ae_title] + ([site.pacs.ae_title] if site.pacs else []) + [w.ae_title for w in site.workstations]


def cmd_issue(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (cryptography takes ~30 ms to import)
    from renkei import pki

    config = config_of(args)
    site = config.site(args.site)
    ca_dir = _ca_dir(args)
    out = Path(args.out).expanduser().resolve() if args.out else ca_dir / site.id
    if args.ae is not None:
        _check_ae(config, site, args.ae)
        peer = config.peer(args.ae)
        hosts = [peer.host] if peer else []
        cert, key = pki.issue(
            ca_dir, out, site_id=site.id, ae_title=args.ae, hosts=[*hosts, *args.host], days=args.days, name=args.name
        )
    else:
        cert, key = pki.issue(
            ca_dir,
            out,
            site_id=site.id,
            hosts=[site.edge.host, *args.host],
            days=args.days,
            name=args.name or EDGE_NAME,
        )
    _print_issued(cert, key)
    _next_steps(ca_dir, [(site, cert, key)] if args.ae is None else [], [(args.ae, cert, key)] if args.ae else [])
    return 0


def cmd_issue_all(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (cryptography takes ~30 ms to import)
    from renkei import pki

    config = config_of(args)
    ca_dir = _ca_dir(args)
    root = Path(args.out).expanduser().resolve() if args.out else ca_dir
    edges, aes = [], []
    for site in config.sites:
        out = root / site.id
        cert, key = pki.issue(ca_dir, out, site_id=site.id, hosts=[site.edge.host], days=args.days, name=EDGE_NAME)
        _print_issued(cert, key)
        edges.append((site, cert, key))
        for peer in ([site.pacs] if site.pacs else []) + list(site.workstations):
            cert, key = pki.issue(
                ca_dir, out, site_id=site.id, ae_title=peer.ae_title, hosts=[peer.host], days=args.days
            )
            _print_issued(cert, key)
            aes.append((peer.ae_title, cert, key))
    _next_steps(ca_dir, edges, aes[:1])
    return 0


def _print_issued(cert: Path, key: Path) -> None:
    # lazy: keeps `renkei --help` fast (cryptography takes ~30 ms to import)
    from renkei import pki

    identity = pki.identities_of(pki.load_certificate(cert))
    who = (
        f"AE {', '.join(sorted(identity.ae_titles))} of site {', '.join(sorted(identity.ae_sites))}"
        if identity.ae_titles
        else f"site {', '.join(sorted(identity.sites))}"
    )
    print(f"{who}: {cert}  {key}")


def _next_steps(ca_dir: Path, edges: list[tuple[SiteConfig, Path, Path]], aes: list[tuple[str, Path, Path]]) -> None:
    ca = ca_dir / "ca.pem"
    print("\nNext steps:")
    print(f"  Copy {ca} and the site's folder to each site (never ca.key).")
    if edges:
        print("  In the configuration, each edge's section (paths as they are at that site):")
        print("    sites:")
        for site, cert, key in edges:
            print(f"      - id: {site.id}")
            print("        edge:")
            print(f"          tls: {{cert: {cert}, key: {key}, ca: {ca}}}")
        print("  and `tls: true` on a PACS or workstation the edge must call over TLS.")
    if aes:
        _ae, cert, key = aes[0]
        print("  On a dcmtk peer (storescu, echoscu, storescp, movescu...):")
        print(f"    --enable-tls {key} {cert} --add-cert-file {ca}")
        print("  Other PACS and workstations: import the .pem/.key pair as their TLS identity and trust ca.pem.")


def cmd_show(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (cryptography takes ~30 ms to import)
    from cryptography import x509

    # lazy: keeps `renkei --help` fast (pki imports cryptography too)
    from renkei import pki

    cert = pki.load_certificate(Path(args.file))
    identity = pki.identities_of(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        hosts = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    now = dt.datetime.now(dt.UTC)
    data: dict[str, Any] = {
        "file": str(args.file),
        "kind": "CA"
        if is_ca
        else ("AE certificate" if identity.ae_titles else "site certificate" if identity.sites else "unknown"),
        "ae_titles": sorted(identity.ae_titles),
        "sites": sorted(identity.sites),
        "ae_sites": sorted(identity.ae_sites),
        "hosts": hosts,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expired": cert.not_valid_after_utc <= now,
        "days_left": (cert.not_valid_after_utc - now).days,
        "serial": format(cert.serial_number, "x"),
    }
    if args.json:
        print_json(data)
        return 0
    print(f"{data['file']}: {data['kind']}")
    if not is_ca:
        if identity.ae_titles:
            home = f"  (of site {', '.join(data['ae_sites'])})" if data["ae_sites"] else ""
            print(f"  AE titles: {', '.join(data['ae_titles'])}{home}")
        else:
            print(f"  site:      {', '.join(data['sites']) or '-'}  (any AE title of the site)")
        print(f"  hosts:     {', '.join(hosts) or '-'}")
    print(f"  subject:   {data['subject']}")
    print(f"  issuer:    {data['issuer']}")
    state = "EXPIRED" if data["expired"] else f"{data['days_left']} days left"
    print(f"  valid:     {data['not_before']} to {data['not_after']} ({state})")
    return 0
