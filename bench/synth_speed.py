"""How fast `renkei synth` makes studies, and how their pixels compress.

Reference, measured in the same run: writing the same number of bytes as plain
files (one per instance) with no DICOM and no pixel generation. Prints a ratio
against it and ends with one JSON line.

    .venv/bin/python bench/synth_speed.py [--slices 300] [--size 512] [--site-patients 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import pydicom

from renkei import synth
from renkei.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _plain_write(folder: Path, sizes: list[int]) -> float:
    folder.mkdir(parents=True)
    payload = b"\0" * max(sizes)
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        with open(folder / f"{i}.bin", "wb") as f:
            f.write(payload[:size])
    return time.perf_counter() - started


def _zlib_ratio(path: Path) -> float:
    data = pydicom.dcmread(path).PixelData
    return len(data) / len(zlib.compress(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--site-patients", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="renkei-bench-synth-"))
    try:
        started = time.perf_counter()
        ct = synth.write_single_study(work / "ct", "CT", slices=args.slices, size=args.size, seed=1)
        ct_seconds = time.perf_counter() - started
        ct_reference = _plain_write(work / "plain-ct", [f.stat().st_size for f in ct.files])

        config = load_config(REPO / "examples" / "nagasaki.yaml")
        started = time.perf_counter()
        site = synth.generate_site(config, "hub", args.site_patients, 1, work / "hub", size=args.size)
        site_seconds = time.perf_counter() - started
        site_reference = _plain_write(work / "plain-site", [f.stat().st_size for f in site.files])

        ratios: dict[str, list[float]] = {}
        for study in site.studies:
            modality = study.info.modalities[0]
            ratios.setdefault(modality, []).extend(_zlib_ratio(f) for f in study.files[:3])
        zlib_ratio = {m: round(sum(r) / len(r), 2) for m, r in ratios.items()}
        zlib_ratio["CT"] = round(
            sum(_zlib_ratio(f) for f in ct.files[:: max(1, len(ct.files) // 10)])
            / len(ct.files[:: max(1, len(ct.files) // 10)]),
            2,
        )

        result = {
            "bench": "synth_speed",
            "ct_instances": ct.instance_count,
            "ct_size": args.size,
            "ct_seconds": round(ct_seconds, 3),
            "ct_instances_per_s": round(ct.instance_count / ct_seconds, 1),
            "ct_mb_per_s": round(ct.bytes_written / 1e6 / ct_seconds, 1),
            "ct_vs_plain_write": round(ct_seconds / ct_reference, 2),
            "site_studies": len(site.studies),
            "site_instances": site.instance_count,
            "site_mb": round(site.bytes_written / 1e6, 1),
            "site_seconds": round(site_seconds, 3),
            "site_vs_plain_write": round(site_seconds / site_reference, 2),
            "zlib_ratio": zlib_ratio,
        }
        print(
            f"CT {ct.instance_count} x {args.size}^2: {ct_seconds:.2f} s "
            f"({result['ct_instances_per_s']} instances/s, {result['ct_mb_per_s']} MB/s), "
            f"{result['ct_vs_plain_write']}x the time of writing the same bytes as plain files"
        )
        print(
            f"hub, {args.site_patients} patients: {len(site.studies)} studies, {site.instance_count} instances, "
            f"{result['site_mb']} MB in {site_seconds:.2f} s ({result['site_vs_plain_write']}x plain writes)"
        )
        print(f"zlib ratio of PixelData by modality: {zlib_ratio}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
