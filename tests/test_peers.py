"""The real-peer fixtures: each starts, takes one instance, gives it back, and stops."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from renkei import peers


def _sample() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))


def test_storescp_receives_one_instance(dcmtk, storescp: peers.Peer) -> None:
    sample = _sample()
    peers.run_dcmtk(["storescu", "-aet", "TESTSCU", "-aec", "STORESCP", storescp.host, str(storescp.port), str(sample)])
    stored = list(storescp.workdir.glob("*.dcm"))
    assert len(stored) == 1
    original = pydicom.dcmread(sample)
    received = pydicom.dcmread(stored[0])
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PixelData == original.PixelData
    storescp.stop()
    assert storescp.process.poll() is not None


def test_orthanc_receives_one_instance(dcmtk, orthanc: peers.OrthancPeer) -> None:
    sample = _sample()
    assert orthanc.instances() == []
    peers.run_dcmtk(
        ["storescu", "-aet", "TESTSCU", "-aec", orthanc.ae_title, orthanc.host, str(orthanc.port), str(sample)]
    )
    ids = orthanc.instances()
    assert len(ids) == 1
    tags = orthanc.rest("GET", f"/instances/{ids[0]}/simplified-tags")
    assert tags["SOPInstanceUID"] == pydicom.dcmread(sample).SOPInstanceUID
    # Orthanc keeps the file as received: same bytes after the file meta group
    raw = orthanc.rest("GET", f"/instances/{ids[0]}/file")
    assert pydicom.dcmread(__import__("io").BytesIO(raw)).PixelData == pydicom.dcmread(sample).PixelData
    orthanc.stop()
    assert orthanc.process.poll() is not None


def test_s3_endpoint_stores_one_object(s3_bucket: str, s3_env: peers.S3Peer) -> None:
    fs = s3_env.filesystem()
    data = _sample().read_bytes()
    key = s3_bucket[len("s3://") :] + "/one.dcm"
    fs.pipe(key, data)
    assert hashlib.sha256(fs.cat(key)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert s3_env.endpoint_url.startswith("http://127.0.0.1:")


def test_prefect_api_runs_a_real_flow(prefect_api: str) -> None:
    from prefect import flow, get_client

    @flow(name="renkei-smoke")
    def smoke(x: int) -> int:
        return x * 2

    assert smoke(21) == 42
    import anyio

    async def runs() -> list:
        async with get_client() as client:
            return await client.read_flow_runs()

    names = [r.name for r in anyio.run(runs)]
    assert names, "the flow run is recorded by the Prefect API"
    assert prefect_api.startswith("http://127.0.0.1:")


def test_dcmtk_is_found_by_identity_not_by_path_order(monkeypatch) -> None:
    """pynetdicom's storescu in the venv's bin/ comes first on PATH when the venv is activated: never used."""
    import shutil
    import sys
    from pathlib import Path

    from renkei import peers

    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "storescu").exists():
        import pytest

        pytest.skip("this interpreter's bin/ has no pynetdicom storescu to shadow dcmtk's")
    monkeypatch.setattr(peers, "_FOUND", {})
    monkeypatch.setenv("PATH", f"{venv_bin}:{shutil.os.environ['PATH']}")
    assert shutil.which("storescu") == str(venv_bin / "storescu")  # what PATH offers first
    found = peers.require_program("storescu", "dcmtk")
    assert Path(found).parent != venv_bin and Path(found).name == "storescu"
    proc = peers.run_dcmtk(["echoscu", "--version"], check=False)
    assert proc.stdout.decode().startswith("$dcmtk:")
    monkeypatch.setattr(peers, "_FOUND", {})
    monkeypatch.setenv("PATH", str(venv_bin))
    try:
        peers.require_program("storescu", "dcmtk")
    except peers.PeerError as exc:
        assert "not dcmtk's" in str(exc) and "RENKEI_DCMTK_BIN" in str(exc)
    else:
        raise AssertionError("pynetdicom's storescu was taken for dcmtk's")
