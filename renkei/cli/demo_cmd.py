"""`renkei demo`: the example region at work on this machine, on embedded defaults."""

from __future__ import annotations

import argparse
import time

from renkei.cli.common import default_config_path, layout_of, print_table
from renkei.cli.config_cmd import summary

ORDER = 5


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "demo",
        parents=[common],
        help="run the example region (hub + 3 clinics) on this machine",
        description="Validate the region's configuration and write each site's synthetic "
        "studies under the data folder, printing what was done.",
    )
    parser.add_argument("--patients", type=int, default=5, metavar="N", help="patients per site (default 5)")
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    parser.add_argument("--ct-slices", type=int, default=100, metavar="N", help="slices per CT series (default 100)")
    parser.add_argument("--once", action="store_true", help="exit when done (for scripts)")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from renkei import synth

    layout = layout_of(args)
    config = layout.config
    print(f"renkei demo: region {config.region!r} from {getattr(args, 'config', None) or default_config_path()}")
    print(summary(config))
    print(f"\nData folder: {layout.data_dir}")
    rows = []
    for site in config.sites:
        started = time.monotonic()
        out = layout.data_dir / "synthetic" / site.id
        result = synth.generate_site(config, site.id, args.patients, args.seed, out, ct_slices=args.ct_slices)
        rows.append({
            "site": site.id,
            "patients": len(result.patients),
            "studies": len(result.studies),
            "instances": result.instance_count,
            "MB": round(result.bytes_written / 1e6, 1),
            "seconds": round(time.monotonic() - started, 1),
            "folder": str(out),
        })
        print(f"  {site.id}: wrote {len(result.studies)} synthetic studies ({result.instance_count} instances)")
    print("\nSynthetic studies written:")
    print_table(rows)
    return 0
