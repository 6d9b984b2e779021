"""Helpers for tests and benchmarks that run a region (as `prefect.testing` is Prefect's).

The example region on free ports, and studies put into an edge exactly as its
C-STORE handler stores them. The benchmarks use these too, so they live here,
not in tests/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from renkei import peers
from renkei.config import Layout, load_config
from renkei.edge.clock import wall_time
from renkei.edge.ingest import Ingestor
from renkei.edge.journal import Journal
from renkei.edge.parsing import split_file_meta
from renkei.edge.store import FileStore

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "nagasaki.yaml"


def region_config(
    tmp_path: Path,
    stable_age: float = 1.0,
    center_url: str | None = None,
    name: str = "region.yaml",
    edit: Callable[[dict[str, Any]], None] | None = None,
    pacs_at: tuple[str, ...] | None = None,
) -> Path:
    """The example region on free ports (every edge, PACS and workstation), short stable_age.

    With `pacs_at`, only those sites keep a PACS (tests that run no PACS elsewhere).
    """
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    used: set[int] = set()

    def port() -> int:
        while (p := peers.free_port()) in used:
            pass
        used.add(p)
        return p

    for site in raw["sites"]:
        site["edge"]["port"] = port()
        site["edge"]["stable_age"] = stable_age
        if "pacs" in site:
            site["pacs"]["port"] = port()
        for ws in site["workstations"]:
            ws["port"] = port()
    if pacs_at is not None:
        for site in raw["sites"]:
            if site["id"] not in pacs_at:
                site.pop("pacs", None)
    if center_url:
        raw["center"]["storage_url"] = center_url
    if edit:
        edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def dataset_bytes(path: Path) -> tuple[bytes, str, str, str]:
    """(dataset bytes as they would arrive, transfer syntax, SOP class, SOP instance) of a DICOM file."""
    data = Path(path).read_bytes()
    meta, offset = split_file_meta(data)
    return (
        data[offset:],
        meta["TransferSyntaxUID"],
        meta["MediaStorageSOPClassUID"],
        meta["MediaStorageSOPInstanceUID"],
    )


LONG_AGO = 3600.0  # put_into_edge(received_ago=LONG_AGO): past any test's stable_age, no sleep


def put_into_edge(
    layout: Layout, site_id: str, files: Iterable[Path], calling_ae: str | None = None, received_ago: float = 0.0
) -> int:
    """Store files in a site's edge exactly as its C-STORE handler would (no network).

    `received_ago`: journal them as received that many seconds ago (on the edge's wall clock), so
    that a study is already past a short `stable_age` without the test sleeping for it.
    """
    site = layout.config.site(site_id)
    ae = calling_ae or (site.pacs.ae_title if site.pacs else "MODALITY")
    root = layout.edge_store(site_id)
    journal = Journal.open(root)
    try:
        ingestor = Ingestor(FileStore(root), journal, clock=lambda: wall_time() - received_ago)
        n = 0
        for f in files:
            data, ts, sop_class, sop_uid = dataset_bytes(f)
            outcome = ingestor.store_instance(data, ts, sop_class, sop_uid, ae)
            assert outcome.status == 0, outcome
            n += 1
        return n
    finally:
        journal.close()


def layout_of(config_path: Path, data_dir: Path) -> Layout:
    return Layout(load_config(config_path), data_dir)
