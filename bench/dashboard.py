"""The dashboard's data gathering at scale: N studies in the catalog (rows generated, no DICOM).

Times, best of --repeat runs, each against `Catalog.totals()` measured in the
same run (the reference: one aggregate over the studies and locations):
  overview          every section but the browser (sites, charts, matrix, verification, accesses)
  browse operator   the newest 50 studies of every site, with series and flow runs
  browse viewer     the newest 50 studies the hub may see (the one visibility rule, in SQL)
Ends with one JSON line.

    python bench/dashboard.py --studies 20000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renkei.catalog import Catalog  # noqa: E402
from renkei.config import Layout, load_config  # noqa: E402
from renkei.dashboards import data as d  # noqa: E402

ROOT = "1.2.826.0.1.3680043.10.543.77"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nagasaki.yaml"


def fill(cat: Catalog, sites: tuple[str, ...], n_studies: int, per_study: int, chunk: int = 5000) -> None:
    """Register n_studies (per_study instances each, one series) in chunks; clinic studies granted to the hub."""
    for first in range(0, n_studies, chunk):
        ids = range(first, min(n_studies, first + chunk))
        studies = pa.Table.from_pylist(
            [
                {
                    "study_uid": f"{ROOT}.{i}",
                    "origin_site": sites[i % len(sites)],
                    "patient_id": f"P{i % 997}",
                    "issuer_of_patient_id": sites[i % len(sites)].upper(),
                    "patient_name": f"Test^Patient{i % 997}",
                    "study_date": f"20{10 + i % 15:02d}{1 + i % 12:02d}{1 + i % 28:02d}",
                    "study_time": "101500",
                    "study_description": "bench",
                    "modalities": ["CT"],
                }
                for i in ids
            ]
        )
        instances = pa.Table.from_pylist(
            [
                {
                    "study_uid": f"{ROOT}.{i}",
                    "series_uid": f"{ROOT}.{i}.1",
                    "sop_instance_uid": f"{ROOT}.{i}.1.{k}",
                    "size": 500_000,
                    "sha256": f"{i:032x}{k:032x}",
                    "instance_number": k,
                    "modality": "CT",
                    "series_number": 1,
                }
                for i in ids
                for k in range(1, per_study + 1)
            ]
        )
        cat.register_tables(studies, instances, actor="flow-run:00000000-0000-0000-0000-000000000000")
        grants = [
            {"study_uid": f"{ROOT}.{i}", "site": "hub", "by_kind": "rule", "by": "clinic-studies-to-hub"}
            for i in ids
            if sites[i % len(sites)] != "hub"
        ]
        if grants:
            cat.grant_table(pa.Table.from_pylist(grants))
    cat.compact(force=True)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--instances", type=int, default=10, help="instances per study")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="renkei-bench-dashboard-"))
    try:
        config = load_config(EXAMPLE)
        lay = Layout(config, tmp)
        cat = Catalog.from_layout(lay, writer="bench")
        started = time.perf_counter()
        fill(cat, config.site_ids, args.studies, args.instances)
        print(
            f"registered {args.studies} studies x {args.instances} instances in {time.perf_counter() - started:.1f} s"
        )
        reference = best(cat.totals, args.repeat)
        operator = d.parse_query(config, {})
        viewer = d.parse_query(config, {"site": "hub"})
        results = {
            "overview": best(lambda: d.overview(lay, cat), args.repeat),
            "browse_operator": best(lambda: d.browse_studies(lay, cat, operator, record=False), args.repeat),
            "browse_viewer": best(lambda: d.browse_studies(lay, cat, viewer, record=False), args.repeat),
        }
        print(f"reference Catalog.totals(): {reference * 1000:.0f} ms")
        for name, seconds in results.items():
            print(f"{name:16s} {seconds * 1000:7.0f} ms  = {seconds / reference:5.1f} x totals()")
        cat.close()
        print(
            json.dumps(
                {
                    "bench": "dashboard",
                    "studies": args.studies,
                    "instances": args.studies * args.instances,
                    "reference_totals_s": round(reference, 4),
                    **{f"{k}_s": round(v, 4) for k, v in results.items()},
                    **{f"{k}_ratio": round(v / reference, 2) for k, v in results.items()},
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
