"""Nightly verification throughput against reading the same objects raw (`cat` to /dev/null).

Builds a demo-like center (synthetic studies of the four sites, uploaded and
registered) unless --data-dir points at an existing one (e.g. the demo's), then
alternates, `--rounds` times: evict the objects from the page cache
(posix_fadvise DONTNEED, so both read from the disk), `cat` them all to
/dev/null; evict again, run `verify_center` (full, no repair). Prints MB/s of
each (medians) and the ratio, and ends with one JSON line.

    .venv/bin/python bench/verify.py [--patients 3] [--rounds 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_center(data_dir: Path, patients: int, seed: int) -> None:
    from renkei import synth, transfer
    from renkei.config import Layout, load_config
    from renkei.runtime import open_catalog, open_journal, open_store
    from renkei.testing import put_into_edge

    lay = Layout(load_config(REPO / "examples" / "nagasaki.yaml"), data_dir)
    store = open_store(lay)
    for site in lay.config.site_ids:
        result = synth.generate_site(lay.config, site, patients, seed, data_dir / "synthetic" / site)
        put_into_edge(lay, site, result.files)
        with open_journal(lay, site) as journal, open_catalog(lay) as catalog:
            uids = transfer.studies_to_sync(journal, 0, now=time.time() + 1)
            for uid in uids:
                transfer.upload_study(journal, store, site, uid)
            transfer.register_studies(journal, catalog, site, uids)
        print(f"  {site}: {len(result.studies)} studies, {result.instance_count} instances", file=sys.stderr)


def evict(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_all(paths: list[str]) -> float:
    started = time.monotonic()
    for i in range(0, len(paths), 500):
        subprocess.run(["cat", *paths[i : i + 500]], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="an existing region (default: build one)")
    parser.add_argument("--patients", type=int, default=3, help="patients per site when building (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="verification reader threads")
    args = parser.parse_args()

    from renkei import verification
    from renkei.config import Layout, load_config
    from renkei.runtime import open_catalog, open_store

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="renkei-bench-verify-")
        data_dir = Path(tmp.name)
        print("building a demo-like center ...", file=sys.stderr)
        build_center(data_dir, args.patients, args.seed)
    lay = Layout(load_config(REPO / "examples" / "nagasaki.yaml"), data_dir.resolve())
    store = open_store(lay)
    with open_catalog(lay) as catalog:
        rows = [r for batch in catalog.iter_instances() for r in batch]
        paths = [store.path(r["object_key"]) for r in rows]
        total_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"{len(paths)} objects, {total_mb:.1f} MB", file=sys.stderr)
        raw, ver = [], []
        for _ in range(args.rounds):
            evict(paths)
            raw.append(total_mb / cat_all(paths))
            evict(paths)
            report = verification.verify_center(catalog, store, lay, threads=args.threads, repair=False)
            assert not report.findings, report.findings[:3]
            ver.append(report.bytes_checked / 1e6 / report.seconds)
    raw_mb_s, verify_mb_s = statistics.median(raw), statistics.median(ver)
    ratio = verify_mb_s / raw_mb_s
    print(
        f"raw read (cat, cold cache): {raw_mb_s:.0f} MB/s   verification (size + SHA-256, "
        f"{args.threads} threads): {verify_mb_s:.0f} MB/s   ratio {ratio:.2f} (target >= 0.8)"
    )
    print(
        json.dumps(
            {
                "verify_mb_s": round(verify_mb_s, 1),
                "raw_mb_s": round(raw_mb_s, 1),
                "ratio": round(ratio, 3),
                "objects": len(paths),
                "megabytes": round(total_mb, 1),
                "rounds": args.rounds,
                "raw_rounds": [round(x, 1) for x in raw],
                "verify_rounds": [round(x, 1) for x in ver],
            }
        )
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
