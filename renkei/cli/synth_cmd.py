"""`renkei synth`: write synthetic DICOM studies for a site (tests, benchmarks, the demo)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from renkei.cli.common import config_of, print_json, print_table
from renkei.errors import UsageError

ORDER = 80


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "synth",
        parents=[common],
        help="write synthetic DICOM studies (CT, MR, CR/DX) for a site's patients",
        description="Write realistic synthetic DICOM studies for a site: Japanese patient names "
        "(ISO 2022 IR 87 or ISO_IR 192), the site's own Patient IDs, priors over past years, "
        "hub exams ordered by clinics. The same seed writes the same bytes; with five or more "
        "patients the hub and every clinic share at least one person. Files go to "
        "OUT/<study_uid>/<series_uid>/<sop_instance_uid>.dcm (with --site all: OUT/<site>/...).",
    )
    parser.add_argument("--site", required=True, metavar="ID", help="site id from the configuration, or 'all'")
    parser.add_argument("--patients", type=int, default=5, metavar="N", help="patients per site (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    parser.add_argument("--ct-slices", type=int, default=100, metavar="N", help="slices per CT series (default 100)")
    parser.add_argument(
        "--mr-slices",
        type=int,
        default=None,
        metavar="N",
        help="slices per MR series (default: CT slices / 4, at least 3)",
    )
    parser.add_argument(
        "--size", type=int, default=512, metavar="N", help="CT matrix N x N (default 512; MR N/2, radiographs up to 4N)"
    )
    parser.add_argument(
        "--modalities",
        default="CT,MR,CR",
        metavar="LIST",
        help="comma-separated modalities among CT, MR, CR, DX (default CT,MR,CR)",
    )
    parser.add_argument("--json", action="store_true", help="print the studies written as JSON")
    parser.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (synth imports pydicom, numpy and Pillow, ~0.25 s)
    from renkei import synth

    if args.patients < 1:
        raise UsageError(f"--patients must be at least 1 (got {args.patients})")
    if args.ct_slices < 1:
        raise UsageError(f"--ct-slices must be at least 1 (got {args.ct_slices})")
    if args.mr_slices is not None and args.mr_slices < 1:
        raise UsageError(f"--mr-slices must be at least 1 (got {args.mr_slices})")
    if not 16 <= args.size <= 4096:
        raise UsageError(f"--size must be between 16 and 4096 (got {args.size})")
    modalities = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    unknown = [m for m in modalities if m not in synth.MODALITIES]
    if unknown or not modalities:
        raise UsageError(
            f"--modalities {args.modalities!r}: use a comma-separated list of {', '.join(synth.MODALITIES)}"
        )
    config = config_of(args)
    site_ids = list(config.site_ids) if args.site == "all" else [config.site(args.site).id]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")

    started = time.monotonic()
    results = []
    for site_id in site_ids:
        target = out / site_id if args.site == "all" else out
        results.append(
            synth.generate_site(
                config,
                site_id,
                args.patients,
                args.seed,
                target,
                ct_slices=args.ct_slices,
                mr_slices=args.mr_slices,
                size=args.size,
                modalities=modalities,
            )
        )
    elapsed = time.monotonic() - started

    if args.json:
        print_json(
            [
                {
                    "site": r.site_id,
                    "out_dir": str(r.out_dir),
                    "studies": [
                        {
                            **s.info.to_dict(),
                            "series": s.series_count,
                            "instances": s.instance_count,
                            "bytes": s.bytes_written,
                            "directory": str(s.directory),
                        }
                        for s in r.studies
                    ],
                }
                for r in results
            ]
        )
        return 0
    rows = [
        {
            "site": r.site_id,
            "patient_id": s.info.patient_id,
            "date": s.info.study_date,
            "modality": ",".join(s.info.modalities),
            "accession": s.info.accession_number,
            "requesting": s.info.requesting_service,
            "series": s.series_count,
            "instances": s.instance_count,
            "MB": s.bytes_written / 1e6,
        }
        for r in results
        for s in r.studies
    ]
    print_table(rows)
    studies = sum(len(r.studies) for r in results)
    series = sum(r.series_count for r in results)
    instances = sum(r.instance_count for r in results)
    megabytes = sum(r.bytes_written for r in results) / 1e6
    print(
        f"\nwrote {studies} studies, {series} series, {instances} instances ({megabytes:.1f} MB) "
        f"for {len(results)} site(s), {args.patients} patients each, seed {args.seed}, "
        f"into {out} in {elapsed:.1f} s"
    )
    return 0
