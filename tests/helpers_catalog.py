"""Shared helpers for the catalog tests: synthetic studies and the storage backends.

Rows are generated (never real patient data). `backend_url` gives a fresh
storage URL for either backend: a local folder, or a bucket on the session's
moto S3 server over HTTP on loopback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from renkei.records import InstanceInfo, StudyBatch, StudyInfo

ROOT = "1.2.826.0.1.3680043.10.543.9"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BACKENDS = ("local", "s3")


def backend_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str = "center") -> str:
    """A new, empty storage URL on `backend` ('local' or 's3')."""
    if backend == "s3":
        return request.getfixturevalue("s3_bucket") + "/" + name
    return str(tmp_path / name)


def sha_of(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def make_batch(
    study_no: int,
    n_instances: int,
    site: str = "clinic-a",
    patient_id: str = "P1",
    issuer: str = "CLA",
    series: int = 1,
    study_date: str = "20240102",
    modality: str = "CT",
    salt: str = "",
    first: int = 1,
    name: str = "Yamada^Taro=山田^太郎=やまだ^たろう",
    prefix: str = ROOT,
) -> StudyBatch:
    """A study with `n_instances` instances spread over `series` series (deterministic UIDs and checksums)."""
    study_uid = f"{prefix}.{study_no}"
    info = StudyInfo(
        study_uid=study_uid,
        origin_site=site,
        patient_id=patient_id,
        issuer_of_patient_id=issuer,
        patient_name=name,
        patient_birth_date="19500101",
        patient_sex="M",
        study_date=study_date,
        study_time="101500",
        accession_number=f"A{study_no}",
        study_description="synthetic",
        modalities=(modality,),
    )
    instances = []
    for i in range(first, first + n_instances):
        s = (i - 1) % series + 1
        sop = f"{study_uid}.{s}.{i}"
        instances.append(
            InstanceInfo(
                study_uid,
                f"{study_uid}.{s}",
                sop,
                CT_IMAGE,
                EXPLICIT_LE,
                1000 + i,
                sha_of(sop, salt),
                modality=modality,
                series_number=s,
                instance_number=i,
            )
        )
    return StudyBatch(info, tuple(instances))


def total_size(batches: Sequence[StudyBatch]) -> int:
    return sum(i.size for b in batches for i in b.instances)


def concurrent_writer(
    url: str, worker: int, n_studies: int, per_study: int, batch_studies: int, start_event, queue
) -> None:
    """One writer process of the concurrency test: registers its own studies in batches.

    Studies are numbered per worker; every other batch also re-registers the
    previous one (idempotent: nothing new). Puts (worker, new, repeated_new) on `queue`.
    """
    from renkei.catalog import Catalog

    cat = Catalog(url, writer=f"writer-{worker}")
    start_event.wait(60)
    new = repeated = 0
    previous = None
    try:
        for first in range(0, n_studies, batch_studies):
            batches = [
                make_batch(s, per_study, series=3, patient_id=f"W{worker}-{s % 7}", prefix=f"{ROOT}.{worker + 1}")
                for s in range(first + 1, min(n_studies, first + batch_studies) + 1)
            ]
            new += cat.register_many(batches).new_instances
            if previous is not None and (first // batch_studies) % 2:
                repeated += cat.register_many(previous).new_instances
            previous = batches
        queue.put((worker, new, repeated))
    finally:
        cat.close()
