"""`renkei units`: systemd units for a machine of the region (the center, or one site)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from renkei import units
from renkei.cli.common import default_config_path, layout_of

ORDER = 40


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "units",
        parents=[common],
        help="write the systemd units of the center or of a site",
        description="Write the systemd units that run renkei on one machine: --center (Prefect "
        "server, center worker, dashboard, alert watcher) or --site ID (edge, worker, and with "
        "--hl7-port the HL7 listener). Then: cp the files to /etc/systemd/system, "
        "systemctl daemon-reload, systemctl enable --now renkei-....",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--center", action="store_true", help="the center's machine")
    who.add_argument("--site", metavar="ID", help="a site's machine")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the .service files into")
    p.add_argument("--user", default="renkei", help="the unprivileged user the services run as (default renkei)")
    p.add_argument("--env-file", default=None, metavar="FILE", help="secrets file (default /etc/renkei/renkei.env)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--dashboard-port", type=int, default=8080)
    p.add_argument("--hl7-port", type=int, default=None, help="also an HL7 admissions listener on this port")
    p.set_defaults(func=_units)


def _units(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from renkei.regionrun import REPO

    layout = layout_of(args)
    config_path = Path(getattr(args, "config", None) or default_config_path())
    install = units.default_install(config_path, layout.data_dir, REPO)
    install = replace(install, user=args.user, env_file=args.env_file or units.ENV_FILE)
    if args.center:
        made = units.center_units(layout.config, install, args.prefect_port, args.dashboard_port)
    else:
        made = units.site_units(layout.config, args.site, install, args.hl7_port)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for unit in made:
        (out / unit.name).write_text(unit.text, encoding="utf-8")
    (out / "renkei.env.example").write_text(units.env_file_example(install), encoding="utf-8")
    print(f"wrote {len(made)} units to {out}: {', '.join(u.name for u in made)} (and renkei.env.example)")
    print(
        f"install: useradd --system {install.user}; chown -R {install.user} {install.data_dir}; "
        f"cp {out}/*.service /etc/systemd/system/; systemctl daemon-reload; "
        f"systemctl enable --now {' '.join(u.name for u in made)}"
    )
    return 0
