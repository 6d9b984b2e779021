"""The center's DICOMweb service against Orthanc's DICOMweb plugin, same study, same client, one run.

One 300-instance CT study (512x512, about 0.5 MB per instance) is stored by
STOW-RS (one request, the study's files as parts) into a real `renkei center
serve` process (a fresh center folder each round: durable object store, catalog
commit, rules) and into Orthanc with Debian's DICOMweb plugin (the study
deleted before each round), alternating, `--rounds` times; then retrieved by
WADO-RS (the whole study as multipart/related) from each, twice:

- *warm*: at once, from the processes that have just stored it (Orthanc then
  serves much of it from its own in-memory storage cache, 128 MB by default);
- *later* (the ratio with the target): after both processes restarted, as when a
  radiologist opens the study hours after it arrived; both read their files
  from the page cache.

The client is the same for both: `requests` for STOW-RS, curl for WADO-RS (a Python
client reading at ~0.9-1 GB/s was the limit of both servers).
The page cache is written back (os.sync(), not timed) before each timed transfer.

Targets (issue 15): WADO-RS >= 1.5x Orthanc's throughput, STOW-RS >= 1.2x.
Prints MB/s per round, the medians and ratios, and ends with one JSON line.

    python bench/center_dicomweb.py               # 300 instances, 5 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from renkei import peers  # noqa: E402
from renkei.center.dicomweb import new_boundary, part_header  # noqa: E402
from renkei.center.identity import Credentials  # noqa: E402
from renkei.synth import write_single_study  # noqa: E402
from renkei.testing import layout_of, region_config  # noqa: E402


def stow_body(files: list[Path], boundary: str) -> bytes:
    chunks = []
    for f in files:
        chunks += [part_header("application/dicom", boundary), f.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def timed_stow(url: str, body: bytes, boundary: str, headers: dict[str, str]) -> float:
    os.sync()
    start = time.perf_counter()
    got = requests.post(
        url,
        data=body,
        headers={**headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=600,
    )
    seconds = time.perf_counter() - start
    if got.status_code != 200:
        raise SystemExit(f"STOW-RS to {url}: HTTP {got.status_code} {got.text[:300]}")
    return seconds


def timed_wado(url: str, headers: dict[str, str]) -> tuple[float, int]:
    """Seconds and bytes of one WADO-RS answer, received by curl (C: the client is never the limit)."""
    os.sync()
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}"]
    for name, value in {**headers, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}.items():
        cmd += ["-H", f"{name}: {value}"]
    start = time.perf_counter()
    got = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if got.returncode != 0:
        raise SystemExit(f"WADO-RS {url}: {got.stderr[:300]}")
    return seconds, int(got.stdout)


class Service:
    """`renkei center serve` over a fresh data folder, with a hub credential."""

    def __init__(self, work: Path, n: int) -> None:
        folder = work / f"round-{n}"
        folder.mkdir()
        self.config = region_config(folder, pacs_at=())
        self.layout = layout_of(self.config, folder / "data")
        _cred, token = Credentials(self.layout.center_url, None).issue("hub", "bench")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.folder = folder
        self.port = peers.free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicomweb"
        self.start()

    def start(self) -> None:
        folder = self.folder
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "renkei.cli.main", "--config", str(self.config), "--data-dir", str(folder / "data")]
            + ["center", "serve", "--port", str(self.port)],
            cwd=REPO,
            stdout=open(folder / "center.log", "ab"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        port = self.port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise SystemExit("renkei center serve did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="renkei-bench-dicomweb-"))
    try:
        print(f"generating a {args.instances}-instance CT study ({args.size}x{args.size}) in {work}", flush=True)
        study = write_single_study(work / "study", "CT", slices=args.instances, size=args.size, seed=7)
        files = list(study.files)
        megabytes = study.bytes_written / 1e6
        print(f"{len(files)} instances, {megabytes:.0f} MB", flush=True)
        boundary = new_boundary()
        body = stow_body(files, boundary)
        orthanc = peers.start_orthanc(work / "orthanc", dicomweb={}, http_port=(orthanc_http := peers.free_port()))
        results: dict[str, list[float]] = {
            "renkei_stow": [],
            "orthanc_stow": [],
            "renkei_wado_warm": [],
            "orthanc_wado_warm": [],
            "renkei_wado": [],
            "orthanc_wado": [],
        }
        uid = study.info.study_uid
        try:
            for n in range(1, args.rounds + 1):
                service = Service(work, n)
                try:
                    results["renkei_stow"].append(
                        megabytes / timed_stow(service.url + "/studies", body, boundary, service.headers)
                    )
                    for found in orthanc.rest("GET", "/studies") or []:  # type: ignore[union-attr]
                        orthanc.rest("DELETE", f"/studies/{found}")
                    results["orthanc_stow"].append(
                        megabytes / timed_stow(orthanc.url + "/dicom-web/studies", body, boundary, {})
                    )
                    seconds, size = timed_wado(f"{service.url}/studies/{uid}", service.headers)
                    results["renkei_wado_warm"].append(size / 1e6 / seconds)
                    seconds, size = timed_wado(f"{orthanc.url}/dicom-web/studies/{uid}", {})
                    results["orthanc_wado_warm"].append(size / 1e6 / seconds)
                    # later: both restarted (no process holds the study in memory)
                    service.restart()
                    orthanc.stop()
                    orthanc = peers.start_orthanc(work / "orthanc", dicomweb={}, http_port=orthanc_http)
                    seconds, size = timed_wado(f"{service.url}/studies/{uid}", service.headers)
                    results["renkei_wado"].append(size / 1e6 / seconds)
                    seconds, size = timed_wado(f"{orthanc.url}/dicom-web/studies/{uid}", {})
                    results["orthanc_wado"].append(size / 1e6 / seconds)
                finally:
                    service.stop()
                print(f"round {n}: " + "  ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in results.items()), flush=True)
        finally:
            orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {
        "wado_vs_orthanc": med["renkei_wado"] / med["orthanc_wado"],
        "wado_warm_vs_orthanc": med["renkei_wado_warm"] / med["orthanc_wado_warm"],
        "stow_vs_orthanc": med["renkei_stow"] / med["orthanc_stow"],
    }
    print("\nmedians (MB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print(f"WADO-RS renkei / Orthanc {ratios['wado_vs_orthanc']:.2f}  (target >= 1.5)")
    print(f"WADO-RS at once after storing, renkei / Orthanc {ratios['wado_warm_vs_orthanc']:.2f}")
    print(f"STOW-RS renkei / Orthanc {ratios['stow_vs_orthanc']:.2f}  (target >= 1.2)")
    print(json.dumps({**{k: round(v, 1) for k, v in med.items()}, **{k: round(v, 3) for k, v in ratios.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
