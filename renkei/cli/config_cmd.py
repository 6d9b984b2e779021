"""`renkei config check FILE`: validate a region's configuration and summarise it."""

from __future__ import annotations

import argparse

from renkei.cli.common import default_config_path, print_json, print_table
from renkei.config import RegionConfig, load_config

ORDER = 10


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("config", help="check the network configuration", parents=[common])
    cmds = parser.add_subparsers(title="config commands", metavar="ACTION")
    check = cmds.add_parser(
        "check",
        parents=[common],
        help="validate a configuration file and print a summary of the region",
        description="Validate a configuration file. Exit code 0 when valid, 2 when not "
        "(the message names the field to fix).",
    )
    check.add_argument("file", nargs="?", help="the YAML file (default: --config)")
    check.add_argument("--json", action="store_true", help="print the validated config as JSON")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    path = args.file or getattr(args, "config", None) or default_config_path()
    config = load_config(path)
    if args.json:
        print_json(config.model_dump(mode="json"))
        return 0
    print(f"{path}: valid")
    print(summary(config))
    return 0


def summary(config: RegionConfig) -> str:
    """A readable description of the region, as `renkei config check` prints it."""
    import io
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(f"\nRegion {config.region!r}: {config.name or '(no name)'}  (timezone {config.timezone})")
        print(f"Center: objects at {config.center.storage_url}, catalog at "
              f"{config.center.catalog_url or config.center.storage_url + '/catalog'}\n")
        rows = []
        for site in config.sites:
            rows.append({
                "site": site.id,
                "role": site.role,
                "name": site.name,
                "edge": f"{site.edge.ae_title}@{site.edge.host}:{site.edge.port}",
                "pacs": f"{site.pacs.ae_title}@{site.pacs.host}:{site.pacs.port}" if site.pacs else "-",
                "workstations": ", ".join(f"{w.ae_title}:{w.port}" for w in site.workstations) or "-",
                "link": f"{site.link.bandwidth_mbps:g} Mbit/s, {site.link.rtt_ms:g} ms, "
                        f"{site.link.upload_slots} uploads",
            })
        print_table(rows)
        print(f"\nSharing policy version {config.policy.version}:")
        for rule in config.policy.rules:
            when = []
            if rule.when.origin_sites:
                when.append("from " + ", ".join(rule.when.origin_sites))
            if rule.when.origin_roles:
                when.append("from any " + " or ".join(rule.when.origin_roles))
            if rule.when.modalities:
                when.append("modality " + "/".join(rule.when.modalities))
            to = list(rule.grant_to.sites) + [f"every {r}" for r in rule.grant_to.roles]
            if rule.grant_to.referring_site:
                to.append("the referring site")
            print(f"  - {rule.name}: studies {' and '.join(when) or 'of every site'} "
                  f"are visible to {', '.join(to)}")
        print("  Anything else is visible only to its own site, or where a person publishes it.")
    return out.getvalue().rstrip()
