"""`renkei config check FILE`: validate a region's configuration and summarise it."""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import yaml

from renkei.cli.common import default_config_path, print_json, print_table
from renkei.config import RegionConfig, load_config
from renkei.deployments import expected, render
from renkei.errors import UsageError

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
    check.add_argument(
        "--prefect-file",
        metavar="FILE",
        default=None,
        help="a prefect.yaml to check against the sites (default: the deployments generated from the "
        "configuration, which `renkei deploy` applies)",
    )
    check.add_argument(
        "--no-deployments", action="store_true", help="check the configuration alone, not the deployments"
    )
    check.set_defaults(func=_check)


def deployment_problems(config: RegionConfig, prefect_file: str) -> list[str]:
    """What prefect.yaml lacks or gets wrong for this region's sites (one line each, saying what to fix)."""
    try:
        with open(prefect_file, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
    except OSError as exc:
        return [f"{prefect_file}: cannot be read ({exc.strerror})"]
    except yaml.YAMLError as exc:
        return [f"{prefect_file}: not valid YAML ({str(exc).splitlines()[0]})"]
    deployments = {d.get("name"): d for d in doc.get("deployments") or [] if isinstance(d, dict)}
    problems = []

    def expect(name: str, entrypoint: str, pool: str, site: str | None, scheduled: bool) -> None:
        dep = deployments.get(name)
        if dep is None:
            problems.append(
                f"deployment {name} is missing: copy the entries of another site"
                + (f" and set site: {site} and work_pool renkei-{site}" if site else "")
            )
            return
        if dep.get("entrypoint") != entrypoint:
            problems.append(f"deployment {name}: entrypoint {dep.get('entrypoint')!r}, expected {entrypoint!r}")
        got_pool = (dep.get("work_pool") or {}).get("name")
        if got_pool != pool:
            problems.append(
                f"deployment {name}: work pool {got_pool!r}, expected {pool!r} "
                "(its steps must run on that site's own worker)"
            )
        if site and (dep.get("parameters") or {}).get("site") != site:
            problems.append(
                f"deployment {name}: parameters.site is {(dep.get('parameters') or {}).get('site')!r}, "
                f"expected {site!r}"
            )
        if scheduled and not dep.get("schedules"):
            problems.append(f"deployment {name} has no schedule: nothing would start it when nobody does")

    wanted = expected(config)
    for e in wanted:
        expect(e.name, e.kind.entrypoint, e.pool, e.site, e.kind.schedule is not None)
    known = {e.name for e in wanted}
    for dep_name, dep in deployments.items():
        dep_site: str | None = (dep.get("parameters") or {}).get("site")
        if dep_name not in known and (dep_site is None or dep_site not in config.site_ids):
            problems.append(
                f"deployment {dep_name} is not for this region"
                + (f" (site {dep_site!r} is not in the configuration)" if dep_site else "")
                + ": remove it or add the site"
            )
    return problems


def _check(args: argparse.Namespace) -> int:
    path = args.file or getattr(args, "config", None) or default_config_path()
    config = load_config(path)
    if config.alerts.notify:
        # lazy: apprise takes ~40 ms to import; only a command that sends an alert needs it
        from renkei.alerts import Sender

        Sender(list(config.alerts.notify))  # a URL Apprise cannot send to is a mistake to say now
    if not args.no_deployments:
        with tempfile.TemporaryDirectory() as tmp:
            prefect_file = args.prefect_file
            if prefect_file is None:  # what `renkei deploy` would apply, checked like a hand-made file
                prefect_file = str(Path(tmp) / "prefect.yaml")
                Path(prefect_file).write_text(render(config, str(path)), encoding="utf-8")
            problems = deployment_problems(config, prefect_file)
            if args.prefect_file is None:
                prefect_file = "the deployments generated from it"
        if problems:
            raise UsageError(
                f"{path} is valid, but the deployments in {prefect_file} do not match its sites:\n  "
                + "\n  ".join(problems)
                + "\n(or check the configuration alone: --no-deployments)"
            )
    if args.json:
        print_json(config.model_dump(mode="json"))
        return 0
    print(f"{path}: valid" + ("" if args.no_deployments else "; the deployments match its sites"))
    print(summary(config))
    return 0


def summary(config: RegionConfig) -> str:
    """A readable description of the region, as `renkei config check` prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(f"\nRegion {config.region!r}: {config.name or '(no name)'}  (timezone {config.timezone})")
        print(
            f"Center: objects at {config.center.storage_url}, catalog at "
            f"{config.center.catalog_url or config.center.storage_url + '/catalog'}\n"
        )
        rows = []
        for site in config.sites:
            rows.append(
                {
                    "site": site.id,
                    "role": site.role,
                    "name": site.name,
                    "edge": f"{site.edge.ae_title}@{site.edge.host}:{site.edge.port}",
                    "pacs": f"{site.pacs.ae_title}@{site.pacs.host}:{site.pacs.port}" if site.pacs else "-",
                    "workstations": ", ".join(f"{w.ae_title}:{w.port}" for w in site.workstations) or "-",
                    "link": f"{site.link.bandwidth_mbps:g} Mbit/s, {site.link.rtt_ms:g} ms, "
                    f"{site.link.upload_slots} uploads",
                }
            )
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
            print(f"  - {rule.name}: studies {' and '.join(when) or 'of every site'} are visible to {', '.join(to)}")
        print("  Anything else is visible only to its own site, or where a person publishes it.")
    return out.getvalue().rstrip()
