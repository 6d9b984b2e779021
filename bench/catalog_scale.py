"""Catalog at scale: register N studies x M instances (rows generated, no DICOM), then query.

Prints registration throughput, p50/p99 of "studies site S may see for patient P"
and of "where are the copies of study X", compaction time and peak memory, and
ends with one JSON line. Targets on a 2-core machine (1,000,000 studies,
10,000,000 instances): >= 200,000 instances/s, both queries p50 <= 20 ms and
p99 <= 100 ms, peak RSS <= 2 GB.

    python bench/catalog_scale.py                 # the full 1M / 10M run
    python bench/catalog_scale.py --studies 100000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renkei.catalog import (
    Catalog,  # noqa: E402
    tables,  # noqa: E402
)
from renkei.catalog import backup as cbackup  # noqa: E402
from renkei.catalog.engine import forget_verified  # noqa: E402

ROOT = "1.2.826.0.1.3680043.10.543"
SITES = ("hub", "clinic-a", "clinic-b", "clinic-c")
ISSUERS = {"hub": "HUB", "clinic-a": "CLA", "clinic-b": "CLB", "clinic-c": "CLC"}
MODALITIES = ("CT", "MR", "CR", "DX", "US")
HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def study_uids(ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(
        pa.array([ROOT] * len(ids)), pc.cast(pa.array(ids + 1_000_000_000), pa.string()), "."
    )


def random_sha(n: int, rng: np.random.Generator) -> pa.Array:
    raw = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    hexed = HEX[raw].view("S64").reshape(n)
    return pa.array(hexed, type=pa.binary()).cast(pa.string())


def patient_of(ids: np.ndarray, n_patients: int) -> np.ndarray:
    return (ids * 2654435761) % n_patients  # spreads a patient's studies over the whole run


def make_chunk(
    start: int, count: int, per_study: int, n_patients: int, rng: np.random.Generator
) -> tuple[pa.Table, pa.Table]:
    ids = np.arange(start, start + count, dtype=np.int64)
    patients = patient_of(ids, n_patients)
    site_idx = patients % len(SITES)
    sites = np.array(SITES, dtype=object)[site_idx]
    uids = study_uids(ids)
    pid_str = pc.cast(pa.array(patients), pa.string())
    dates = pc.cast(pa.array(20100101 + (ids % 3000)), pa.string())
    mods = np.array(MODALITIES, dtype=object)[ids % len(MODALITIES)]
    studies = pa.table(
        {
            "study_uid": uids,
            "origin_site": pa.array(sites, pa.string()),
            "patient_id": pc.binary_join_element_wise(pa.array(["P"] * count), pid_str, ""),
            "issuer_of_patient_id": pa.array([ISSUERS[s] for s in SITES], pa.string()).take(pa.array(site_idx)),
            "patient_name": pc.binary_join_element_wise(pa.array(["Name^"] * count), pid_str, ""),
            "patient_birth_date": pc.cast(pa.array(19300101 + (patients % 700) * 100), pa.string()),
            "patient_sex": pa.array(np.where(patients % 2 == 0, "F", "M"), pa.string()),
            "study_date": dates,
            "study_time": pa.array(["101500"] * count),
            "study_description": pa.array(["synthetic"] * count),
            "accession_number": pc.cast(pa.array(ids), pa.string()),
            "modalities": pa.array([[m] for m in mods], pa.list_(pa.string())),
        }
    )
    n = count * per_study
    rep = np.repeat(np.arange(count), per_study)
    within = np.tile(np.arange(per_study), count)
    series_no = within % 2 + 1
    inst_uid = pc.take(uids, pa.array(rep))
    series_uid = pc.binary_join_element_wise(inst_uid, pc.cast(pa.array(series_no), pa.string()), ".")
    sop = pc.binary_join_element_wise(series_uid, pc.cast(pa.array(within + 1), pa.string()), ".")
    instances = pa.table(
        {
            "study_uid": inst_uid,
            "series_uid": series_uid,
            "sop_instance_uid": sop,
            "sop_class_uid": pa.array(["1.2.840.10008.5.1.4.1.1.2"] * n),
            "transfer_syntax_uid": pa.array(["1.2.840.10008.1.2.1"] * n),
            "size": pa.array(rng.integers(100_000, 600_000, size=n)),
            "sha256": random_sha(n, rng),
            "instance_number": pa.array(within + 1),
            "modality": pa.array(np.asarray(mods, dtype=object)[rep], pa.string()),
            "series_number": pa.array(series_no),
        }
    )
    return studies, instances


def register_all(
    cat: Catalog, n_studies: int, per_study: int, chunk: int, n_patients: int, rng: np.random.Generator
) -> tuple[int, float, float]:
    """Register `n_studies` generated studies in chunks; returns (instances, seconds registering, seconds
    generating rows)."""
    total_instances = 0
    register_s = gen_s = 0.0
    start = 0
    while start < n_studies:
        count = min(chunk, n_studies - start)
        t0 = time.perf_counter()
        studies, instances = make_chunk(start, count, per_study, n_patients, rng)
        t1 = time.perf_counter()
        gen_s += t1 - t0
        result = cat.register_tables(studies, instances)
        register_s += time.perf_counter() - t1
        assert result.new_instances == instances.num_rows, result
        total_instances += instances.num_rows
        start += count
    t1 = time.perf_counter()
    cat.wait_for_compaction()  # the writer's own background compaction counts as registration work
    register_s += time.perf_counter() - t1
    return total_instances, register_s, gen_s


def write_rule_grants(cat: Catalog, n_studies: int, chunk: int, n_patients: int) -> int:
    """The source system's rules as grants: clinic studies to the hub; a fifth of hub studies to a clinic."""
    grants_written = 0
    start = 0
    while start < n_studies:
        count = min(chunk * 5, n_studies - start)
        ids = np.arange(start, start + count, dtype=np.int64)
        site_idx = patient_of(ids, n_patients) % len(SITES)
        clinic = site_idx != 0
        hub_to_clinic = (site_idx == 0) & (ids % 5 == 0)
        pick = clinic | hub_to_clinic
        target = np.where(clinic, "hub", np.array(SITES, dtype=object)[1 + ids % 3])[pick]
        table = pa.table(
            {
                "study_uid": study_uids(ids[pick]),
                "site": pa.array(target, pa.string()),
                "by_kind": pa.array(["rule"] * int(pick.sum())),
                "by": pa.array(
                    np.where(clinic, "clinic-studies-to-hub", "hub-exam-to-referring-clinic")[pick], pa.string()
                ),
                "reason": pa.array(["policy"] * int(pick.sum())),
                "policy_version": pa.array(["1"] * int(pick.sum())),
            }
        )
        grants_written += cat.grant_table(table, skip_unchanged=False)
        start += count
    return grants_written


def run_queries(
    cat: Catalog, args: argparse.Namespace, n_patients: int, count: int, seed: int
) -> tuple[list[float], list[float], int]:
    """Time `count` of each query on random patients and studies; returns (visible ms, locate ms, rows)."""
    qrng = random.Random(seed)
    visible_ms, locate_ms, found = [], [], 0
    for _ in range(count):
        sid = qrng.randrange(args.studies)
        patient = int(patient_of(np.array([sid]), n_patients)[0])
        origin = SITES[patient % len(SITES)]
        site = qrng.choice(SITES)
        t0 = time.perf_counter()
        rows = cat.visible_studies(site, [(f"P{patient}", ISSUERS[origin])])
        visible_ms.append((time.perf_counter() - t0) * 1000)
        found += len(rows)
        uid = f"{ROOT}.{sid + 1_000_000_000}"
        t0 = time.perf_counter()
        locs = cat.locations(uid)
        locate_ms.append((time.perf_counter() - t0) * 1000)
        assert locs and locs[0].holder == tables.CENTER, (uid, locs)
    return visible_ms, locate_ms, found


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1_000_000)
    ap.add_argument("--instances-per-study", type=int, default=10)
    ap.add_argument("--chunk-studies", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dir", help="where to build the catalog (default: a temporary folder, removed)")
    ap.add_argument(
        "--auto-compact",
        type=int,
        default=16,
        help="level-0 files per table before the writer compacts (0: only at the end)",
    )
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="renkei-bench-"))
    url = str(work / "catalog")
    rng = np.random.default_rng(42)
    n_patients = max(1, args.studies // 3)
    # as the flows open it: with its second location, so every commit also writes the witness
    cat = Catalog(url, auto_compact=args.auto_compact or None, writer="bench", backup_url=str(work / "witness"))
    try:
        # -------------------------------------------------------- registration
        total_instances, register_s, gen_s = register_all(
            cat, args.studies, args.instances_per_study, args.chunk_studies, n_patients, rng
        )
        register_ips = total_instances / register_s

        t0 = time.perf_counter()
        grants_written = write_rule_grants(cat, args.studies, args.chunk_studies, n_patients)
        grants_s = time.perf_counter() - t0

        # queries on the catalog as the writers left it (only automatic compaction so far)
        cat.wait_for_compaction()
        files_before = sum(cat.file_counts().values())
        before = run_queries(cat, args, n_patients, max(100, args.queries // 5), seed=5)

        t0 = time.perf_counter()
        cat.compact(force=True)
        compact_s = time.perf_counter() - t0
        files = cat.file_counts()

        # -------------------------------------------------------- queries
        visible_ms, locate_ms, found = run_queries(cat, args, n_patients, args.queries, seed=7)
        # a check that the answers are right, not only fast
        sample = cat.study(f"{ROOT}.{1_000_000_000}")
        assert sample is not None and sample.instance_count == args.instances_per_study, sample
        total = sum(t.instances for t in cat.totals())
        assert total == total_instances, (total, total_instances)

        # ------------------------------------------- the cost of the integrity checks
        catalog_mb_live = sum(f.size for files in cat.state.files.values() for f in files.values()) / 2**20
        forget_verified()  # as a new process: every live file is hashed before the first query
        cold = Catalog(url, auto_compact=None, writer="bench-cold")
        t0 = time.perf_counter()
        cold.totals()
        cold_first_s = time.perf_counter() - t0
        cold.close()
        forget_verified()
        cold = Catalog(url, auto_compact=None, writer="bench-cold")
        t0 = time.perf_counter()
        cold.con.execute("SELECT 1")  # a connection of its own, without the checks: the reference
        cold.engine._check_live_files = lambda state: None  # type: ignore[method-assign]
        cold.totals()
        cold_unchecked_s = time.perf_counter() - t0
        cold.close()
        t0 = time.perf_counter()
        checked = cbackup.check(cat)
        check_s = time.perf_counter() - t0
        assert checked.ok, checked.problems
        location = cbackup.BackupLocation(str(Path(url).parent / "catalog-backup"))
        t0 = time.perf_counter()
        cbackup.backup(cat, location)
        backup_full_s = time.perf_counter() - t0
        cat.append_audit("center", "bench", "bench-marker")
        t0 = time.perf_counter()
        cbackup.backup(cat, location)
        backup_incr_s = time.perf_counter() - t0

        out = {
            "studies": args.studies,
            "instances": total_instances,
            "register_s": round(register_s, 2),
            "register_ips": round(register_ips),
            "generate_s": round(gen_s, 2),
            "grants": grants_written,
            "grants_s": round(grants_s, 2),
            "compact_s": round(compact_s, 2),
            "files_after_compaction": files,
            "visible_p50_ms": round(statistics.median(visible_ms), 2),
            "visible_p99_ms": round(pct(visible_ms, 0.99), 2),
            "locate_p50_ms": round(statistics.median(locate_ms), 2),
            "locate_p99_ms": round(pct(locate_ms, 0.99), 2),
            "visible_rows_per_query": round(found / args.queries, 2),
            "files_before_final_compaction": files_before,
            "visible_p50_ms_before_final_compaction": round(statistics.median(before[0]), 2),
            "visible_p99_ms_before_final_compaction": round(pct(before[0], 0.99), 2),
            "locate_p50_ms_before_final_compaction": round(statistics.median(before[1]), 2),
            "locate_p99_ms_before_final_compaction": round(pct(before[1], 0.99), 2),
            "live_catalog_mb": round(catalog_mb_live),
            "cold_first_query_s": round(cold_first_s, 2),
            "cold_first_query_unchecked_s": round(cold_unchecked_s, 2),
            "check_s": round(check_s, 2),
            "backup_full_s": round(backup_full_s, 2),
            "backup_incremental_s": round(backup_incr_s, 3),
            "peak_rss_mb": round(rss_mb()),
            "catalog_mb": round(sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file()) / 2**20),
        }
        print(
            f"registered {total_instances:,} instances of {args.studies:,} studies in {register_s:.1f} s: "
            f"{register_ips:,.0f} instances/s (target >= 200,000; row generation {gen_s:.1f} s not counted)"
        )
        print(f"{grants_written:,} grants in {grants_s:.1f} s; final compaction {compact_s:.1f} s -> {files}")
        print(
            f"studies site S may see for patient P: p50 {out['visible_p50_ms']} ms, "
            f"p99 {out['visible_p99_ms']} ms (target 20 / 100)"
        )
        print(
            f"where are the copies of study X:      p50 {out['locate_p50_ms']} ms, "
            f"p99 {out['locate_p99_ms']} ms (target 20 / 100)"
        )
        print(
            f"before the final compaction ({files_before} files, automatic compaction only): "
            f"visible p50 {out['visible_p50_ms_before_final_compaction']} ms / "
            f"p99 {out['visible_p99_ms_before_final_compaction']} ms, "
            f"locate p50 {out['locate_p50_ms_before_final_compaction']} ms / "
            f"p99 {out['locate_p99_ms_before_final_compaction']} ms"
        )
        print(
            f"checks: first query of a new process {out['cold_first_query_s']} s with every live file hashed "
            f"({out['live_catalog_mb']} MB) vs {out['cold_first_query_unchecked_s']} s without "
            f"({(cold_first_s / cold_unchecked_s if cold_unchecked_s else 0):.1f}x); full catalog check "
            f"{out['check_s']} s; backup {out['backup_full_s']} s first, {out['backup_incremental_s']} s after "
            "one more commit"
        )
        print(f"peak memory {out['peak_rss_mb']} MB (target <= 2048); catalog on disk {out['catalog_mb']} MB")
        print(json.dumps(out))
        return 0
    finally:
        cat.close()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
