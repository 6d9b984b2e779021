"""Entry point of the `renkei` command."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Sequence

import renkei
import renkei.cli
from renkei.cli.common import common_options
from renkei.errors import RenkeiError
from renkei.logs import setup_logging

DESCRIPTION = """\
renkei (連携) shares DICOM images between a core hospital and its clinics
through an off-site center. Each site runs an edge (its DICOM node); the center
keeps the backup copy and the catalog of who may see which study.

Common tasks:
  renkei config check examples/nagasaki.yaml   validate a region's configuration
  renkei edge serve --site hub                 run a site's edge (DICOM node)
  renkei demo                                  the whole region on this machine
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="renkei",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options()],
    )
    parser.add_argument("--version", action="version", version=f"renkei {renkei.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    modules = []
    for info in pkgutil.iter_modules(renkei.cli.__path__):
        if info.name.endswith("_cmd"):
            modules.append(importlib.import_module(f"renkei.cli.{info.name}"))
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 50), m.__name__)):
        module.register(sub, common_options())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "verbose", 0) or 0)
    # every file renkei writes may hold patient data (stores, journals, catalog, logs): owner only
    os.umask(0o077)
    try:
        return int(args.func(args) or 0)
    except RenkeiError as exc:
        print(f"renkei: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("renkei: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unreachable part, or a bug: one line (the traceback with -v)
        if getattr(args, "verbose", 0):
            traceback.print_exc()
        print(f"renkei: error: {describe_failure(exc)}", file=sys.stderr)
        return 1


def describe_failure(exc: BaseException) -> str:
    """One line for an exception that is not a RenkeiError: what failed, and what to do."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = " ".join(type(e).__name__ for e in chain)
    text = " ".join(str(e) for e in chain)
    if (
        "ConnectError" in names
        or "ConnectionRefused" in names
        or "Connection refused" in text
        or "All connection attempts failed" in text
    ):
        api = os.environ.get("PREFECT_API_URL", "")
        what = (
            f"the Prefect API at {api}"
            if api and "prefect" in repr(type(exc)).lower() + text.lower()
            else "a server this command needs"
        )
        return (
            f"cannot reach {what}: connection refused; start it (e.g. `renkei server`) or check "
            "PREFECT_API_URL and the addresses in the config (run with -v for details)"
        )
    if "Timeout" in names:
        return f"a server did not answer in time ({type(exc).__name__}); check the network and retry (-v: details)"
    message = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {message} (unexpected; run with -v for the traceback and report it)"


if __name__ == "__main__":
    sys.exit(main())
