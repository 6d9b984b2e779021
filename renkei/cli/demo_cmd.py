"""`renkei demo`: the example region at work on this machine, on embedded defaults."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from renkei.cli.common import default_config_path, print_table
from renkei.config import resolve_data_dir

ORDER = 5


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "demo",
        parents=[common],
        help="run the example region (hub + 3 clinics) on this machine, end to end",
        description="Start a local Prefect server, the deployments, a worker per site, the four edges of the "
        "region and Orthanc as the hub's PACS; send synthetic studies by C-STORE from each site; let the "
        "pipeline move them; then run the clinical scenarios (remote reading of a Goto study, priors for an "
        "admitted clinic patient, instant publish of a hub exam to its referring clinic) and one backup "
        "verification. Prints progress, a summary read back from the catalog, and the URLs of the Prefect UI "
        "and the dashboard; stays up until Ctrl-C (--once exits when done). A previous demo's data folder is "
        "started afresh; a folder holding anything else is refused.",
    )
    parser.add_argument("--once", action="store_true", help="exit when done (for scripts)")
    parser.add_argument("--patients", type=int, default=4, metavar="N", help="patients per site (default 4)")
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    parser.add_argument("--ct-slices", type=int, default=100, metavar="N", help="slices per CT series (default 100)")
    parser.add_argument("--size", type=int, default=512, metavar="N", help="CT matrix size (default 512)")
    parser.add_argument(
        "--stable-age",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds without a new instance before a study is complete (default 5 for the demo)",
    )
    parser.add_argument("--prefect-port", type=int, default=4200, metavar="PORT")
    parser.add_argument("--dashboard-port", type=int, default=8080, metavar="PORT")
    parser.add_argument("--hl7-port", type=int, default=2575, metavar="PORT")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from renkei.demo import Demo, DemoOptions

    options = DemoOptions(
        data_dir=resolve_data_dir(getattr(args, "data_dir", None)),
        config_path=Path(getattr(args, "config", None) or default_config_path()).resolve(),
        patients=args.patients,
        seed=args.seed,
        ct_slices=args.ct_slices,
        size=args.size,
        stable_age=args.stable_age,
        prefect_port=args.prefect_port,
        dashboard_port=args.dashboard_port,
        hl7_port=args.hl7_port,
    )
    demo = Demo(options, say=lambda text: print(text, flush=True))
    stop = threading.Event()
    staying = threading.Event()  # the scenarios are done, the region stays up

    def on_term(signum: int, _frame: object) -> None:
        stop.set()
        if not staying.is_set():  # during the scenarios: leave them at once; `finally` stops the region
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = demo.run()
        print("\nSites (read back from the catalog; seconds: first C-STORE to every study verified in the center)")
        print_table(result.sites, ["site", "studies", "instances", "MB", "seconds"])
        print("\nScenarios")
        print_table(result.scenarios, ["scenario", "seconds", "what", "detail"])
        print(f"\nDone in {result.seconds:.0f} s.")
        print(f"Prefect UI:  {result.prefect_ui}")
        print(f"Dashboard:   {result.dashboard}")
        print(f"Logs:        {options.data_dir / 'logs'}")
        if not args.once:
            print(
                "\nThe region keeps running (edges, workers, Prefect, Orthanc, dashboard). Ctrl-C stops it.", flush=True
            )
            staying.set()
            try:
                while not stop.wait(1) and demo.runner is not None:
                    demo.runner.supervise(lambda text: print(text, flush=True))
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        print("stopping the region ...", flush=True)
        demo.stop()
        signal.signal(signal.SIGTERM, previous)
