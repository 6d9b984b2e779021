"""An edge wired into its region keeps receiving and answering its own studies when the center is down."""

from __future__ import annotations

from helpers_dicom import Workstation
from helpers_parts import require_program
from helpers_region import layout_of, region_config

from renkei import peers, synth
from renkei.regional_edge import RegionalEdge


def test_center_unreachable_edge_still_stores_and_answers_its_own(tmp_path, data_dir, monkeypatch) -> None:
    require_program("storescu", "dcmtk")
    dead = peers.free_port()  # nothing listens there: the center's S3 endpoint is down
    monkeypatch.setenv("RENKEI_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    config_path = region_config(tmp_path, stable_age=1, center_url="s3://down-bucket/renkei", pacs_at=())
    lay = layout_of(config_path, data_dir)
    site = lay.config.site("clinic-b")
    study = synth.write_single_study(tmp_path / "s", "CT", slices=3, size=32, seed=5)
    edge = RegionalEdge(lay, "clinic-b").start()
    try:
        peers.run_dcmtk(
            [
                "storescu",
                "-aet",
                site.workstations[0].ae_title,
                "-aec",
                site.edge.ae_title,
                site.edge.host,
                str(site.edge.port),
                *map(str, study.files),
            ]
        )
        ws = Workstation(site.workstations[0].ae_title, site.edge.host, site.edge.port, site.edge.ae_title)
        try:
            found = ws.find("STUDY", StudyInstanceUID="")
            got = ws.get(study.info.study_uid)
        finally:
            ws.close()
    finally:
        edge.stop()
    assert [d.StudyInstanceUID for d in found] == [study.info.study_uid]
    assert got.status == 0 and len(got.received) == len(study.files)
