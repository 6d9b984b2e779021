"""Orchestration overhead of `sync_site`: one flow run over N studies against the same pure functions.

Two identical data folders get the same N synthetic studies in clinic-a's edge.
One is synced by calling the pure functions directly (ready studies, upload,
register, apply the rules); the other by one real `sync_site` flow run against a Prefect API
(prefect_test_harness; its start-up is not timed). Prints both times and the
overhead per study, and ends with one JSON line.

    .venv/bin/python bench/pipeline.py [--studies 20] [--slices 20] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

SITE = "clinic-a"


def prepare(root: Path, files: list[Path], slots: int | None = None) -> tuple[Path, Path]:
    from renkei.testing import layout_of, put_into_edge, region_config

    def edit(raw: dict) -> None:
        if slots:
            for site in raw["sites"]:
                if site["id"] == SITE:
                    site["link"]["max_concurrent_uploads"] = slots

    root.mkdir(parents=True)
    config_path = region_config(root, stable_age=0.05, edit=edit)
    data_dir = root / "data"
    put_into_edge(layout_of(config_path, data_dir), SITE, files)
    return config_path, data_dir


def direct(config_path: Path, data_dir: Path) -> tuple[float, int]:
    """The same work as sync_site, without Prefect: returns (seconds, studies)."""
    from renkei import runtime, transfer
    from renkei.policy import deliveries
    from renkei.sharing import Sharing

    started = time.monotonic()
    lay = runtime.layout(str(config_path), str(data_dir))
    with runtime.open_journal(lay, SITE) as journal:
        uids = transfer.studies_to_sync(journal, lay.config.site(SITE).edge.stable_age)
    store = runtime.open_store(lay)
    slots = lay.config.site(SITE).link.upload_slots
    from concurrent.futures import ThreadPoolExecutor

    def upload(uid: str) -> None:
        with runtime.open_journal(lay, SITE) as journal:
            result = transfer.upload_study(journal, store, SITE, uid, parallel=max(2, 8 // slots))
        assert result.ok, result.failures

    with ThreadPoolExecutor(max_workers=slots) as pool:
        list(pool.map(upload, uids))
    with runtime.open_journal(lay, SITE) as journal, runtime.open_catalog(lay) as catalog:
        reg = transfer.register_studies(journal, catalog, SITE, uids)
    with runtime.open_catalog(lay) as catalog:
        applied = Sharing(lay.config, catalog).apply_rules(list(reg.studies))
        for uid, site, _ in applied.granted:
            row = catalog.study(uid)
            deliveries(lay.config, row.study_info(), [site])
    return time.monotonic() - started, len(uids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=20, help="CT slices per study (default 20)")
    parser.add_argument("--size", type=int, default=256, help="matrix size (default 256)")
    parser.add_argument(
        "--slots", type=int, default=None, help="upload slots of the site (default: from the example's link, 4)"
    )
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from renkei import synth

    with tempfile.TemporaryDirectory(prefix="renkei-bench-pipeline-") as tmp:
        root = Path(tmp)
        files: list[Path] = []
        for i in range(args.studies):
            files += synth.write_single_study(
                root / "synth", "CT", slices=args.slices, size=args.size, seed=1000 + i
            ).files
        a = prepare(root / "direct", files, args.slots)
        b = prepare(root / "flow", files, args.slots)
        time.sleep(0.1)  # both edges' studies are past stable_age
        direct_s, n_direct = direct(*a)
        with prefect_test_harness(server_startup_timeout=120):
            from renkei.flows.sync_site import sync_site

            started = time.monotonic()
            result = sync_site(SITE, str(b[0]), str(b[1]))
            flow_s = time.monotonic() - started
        assert n_direct == result["studies"] == args.studies, (n_direct, result["studies"])
    overhead = (flow_s - direct_s) / args.studies
    print(
        f"{args.studies} studies ({len(files)} instances): direct {direct_s:.2f} s, one sync_site flow run "
        f"{flow_s:.2f} s; orchestration overhead {overhead:.3f} s per study (target <= 0.5)"
    )
    print(
        json.dumps(
            {
                "flow_s": round(flow_s, 3),
                "direct_s": round(direct_s, 3),
                "studies": args.studies,
                "instances": len(files),
                "overhead_s_per_study": round(overhead, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
