"""Edge ingest and send throughput against dcmtk's storescp and Orthanc, in one run.

Receiving: one 300-instance CT study (512x512, about 0.5 MB per instance) is
sent by dcmtk's `storescu` over one association to the edge (a real
`renkei edge serve` process, durability on: fsync of every file and its
folder, journal commit, before each answer), to dcmtk's `storescp` and to
Orthanc, alternating, `--rounds` times. Each receiver starts each round empty.

Sending: the edge sends the study by C-MOVE to a `storescp` (timed around
`movescu`), alternating with `storescu` sending the same files to that storescp.

dcmtk and Orthanc run with TCP_NODELAY=1 (else ~40 ms stall per C-STORE).
Before each timed transfer the page cache is written back (`os.sync()`, not
timed), so that no receiver is timed while the disk writes back what another
one left dirty (`--no-settle` times as before 2026-12-03).
Over TLS: a second edge with mutual TLS (renkei.pki certificates) receives
the same study from `storescu +tls`, in the same rounds.

Targets: edge >= 1.5x Orthanc's and >= 0.4x storescp's instances/s; edge as a
sender >= 0.3x storescu's; edge over TLS >= 0.8x the edge in plaintext. Prints instances/s per round, the medians
and the
ratios, and ends with one JSON line.

    python bench/edge_ingest.py                # 300 instances, 5 rounds
    python bench/edge_ingest.py --rounds 9 --instances 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from renkei import peers, pki  # noqa: E402
from renkei.synth import write_single_study  # noqa: E402


def write_config(
    folder: Path,
    edge_port: int,
    storescp_port: int,
    orthanc_port: int,
    tls: dict | None = None,
    name: str = "region.yaml",
    store: str = "edge-store",
) -> Path:
    config = {
        "version": 1,
        "region": "bench",
        "sites": [
            {
                "id": "hub",
                "name": "Bench hub",
                "role": "hub",
                "edge": {
                    "ae_title": "HUB_SVR",
                    "host": "127.0.0.1",
                    "port": edge_port,
                    "stable_age": 60,
                    "store": str(folder / store),
                    **({"tls": tls} if tls else {}),
                },
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port},
                "workstations": [
                    {"ae_title": "STORESCU", "host": "127.0.0.1", "port": peers.free_port()},
                    {"ae_title": "MOVESCU", "host": "127.0.0.1", "port": peers.free_port()},
                    {"ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp_port},
                ],
            }
        ],
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


class Edge:
    """`renkei edge serve` as a process; restarted with an empty store for each round."""

    def __init__(
        self, config: Path, folder: Path, port: int, fsync: bool = True, store: str = "edge-store", name: str = "edge"
    ) -> None:
        self.config, self.folder, self.port, self.fsync = config, folder, port, fsync
        self.store, self.name = store, name
        self.proc: subprocess.Popen | None = None

    def start(self, empty: bool = True) -> None:
        store = self.folder / self.store
        if empty and store.exists():
            shutil.rmtree(store)
        cmd = [
            sys.executable,
            "-m",
            "renkei.cli.main",
            "edge",
            "serve",
            "--site",
            "hub",
            "--config",
            str(self.config),
            "--data-dir",
            str(self.folder / f"data-{self.name}"),
        ]
        if not self.fsync:
            cmd.append("--no-fsync")
        log = open(self.folder / f"{self.name}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        peers.wait_for_port("127.0.0.1", self.port, 30, self.proc, "renkei edge serve")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


SETTLE = True  # --no-settle: time each transfer without writing back first (as before 2026-12-03)


def timed(args: list[str]) -> float:
    """Seconds for one dcmtk command, after the page cache's dirty data is written back (os.sync()).

    storescp and Orthanc leave their files dirty in the page cache; the kernel
    writes them back ~30 s later (dirty_expire_centisecs), i.e. during a later
    step of the round, where the edge's fsyncs queue behind that write-back on
    the device. Syncing before each timed transfer (not timed) starts every
    receiver from the same state; each still pays for its own writes as it
    makes them (the edge its fsyncs, the others nothing).
    """
    if SETTLE:
        os.sync()
    start = time.perf_counter()
    peers.run_dcmtk(args, timeout=600)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-fsync", action="store_true", help="edge without durability (diagnosis only)")
    ap.add_argument("--dir", help="work folder (default: a temporary folder, removed)")
    ap.add_argument(
        "--no-settle",
        action="store_true",
        help="do not os.sync() before each timed transfer (how rounds were timed before 2026-12-03)",
    )
    args = ap.parse_args()
    global SETTLE
    SETTLE = not args.no_settle

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="renkei-bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    edge_port, storescp_port, send_port = peers.free_port(), peers.free_port(), peers.free_port()
    orthanc_dicom = peers.free_port()
    config = write_config(work, edge_port, send_port, orthanc_dicom)
    # the same edge over mutual TLS: a region CA, the edge's site certificate, the sender's AE certificate
    tls_port = peers.free_port()
    ca_dir = work / "pki" / "ca"
    pki.create_ca(ca_dir, "bench", force=True)
    edge_cert, edge_key = pki.issue(ca_dir, work / "pki", site_id="hub", hosts=["127.0.0.1"], name="edge")
    client_cert, client_key = pki.issue(ca_dir, work / "pki", site_id="hub", ae_title="STORESCU")
    tls_config = write_config(
        work,
        tls_port,
        send_port,
        orthanc_dicom,
        name="region-tls.yaml",
        store="edge-tls-store",
        tls={"cert": str(edge_cert), "key": str(edge_key), "ca": str(ca_dir / pki.CA_CERT)},
    )
    print(f"generating a {args.instances}-instance CT study ({args.size}x{args.size}) in {work}", flush=True)
    study = write_single_study(work / "study", "CT", slices=args.instances, size=args.size, seed=7)
    files = [str(f) for f in study.files]
    n = len(files)
    megabytes = study.bytes_written / 1e6
    print(f"{n} instances, {megabytes:.0f} MB", flush=True)

    edge = Edge(config, work, edge_port, fsync=not args.no_fsync)
    tls_edge = Edge(tls_config, work, tls_port, fsync=not args.no_fsync, store="edge-tls-store", name="edge-tls")
    storescp = peers.start_storescp(work / "storescp-recv", ae_title="STORESCP", port=storescp_port)
    orthanc = peers.start_orthanc(
        work / "orthanc",
        ae_title="ORTHANC",
        dicom_port=orthanc_dicom,
        modalities={"edge": ("HUB_SVR", "127.0.0.1", edge_port)},
    )
    sink = peers.start_storescp(work / "storescp-send", ae_title="STORESCP", port=send_port)
    results: dict[str, list[float]] = {
        "edge": [],
        "edge_tls": [],
        "storescp": [],
        "orthanc": [],
        "edge_send": [],
        "storescu_send": [],
    }
    tls_storescu = [
        "storescu",
        "+tls",
        str(client_key),
        str(client_cert),
        "+cf",
        str(ca_dir / pki.CA_CERT),
        "-aet",
        "STORESCU",
    ]
    try:
        storescu = ["storescu", "-aet", "STORESCU"]
        for round_no in range(1, args.rounds + 1):
            edge.start(empty=True)
            seconds = timed([*storescu, "-aec", "HUB_SVR", "127.0.0.1", str(edge_port), *files])
            results["edge"].append(n / seconds)
            tls_edge.start(empty=True)
            seconds = timed([*tls_storescu, "-aec", "HUB_SVR", "127.0.0.1", str(tls_port), *files])
            results["edge_tls"].append(n / seconds)
            tls_edge.stop()
            seconds = timed([*storescu, "-aec", "STORESCP", "127.0.0.1", str(storescp_port), *files])
            results["storescp"].append(n / seconds)
            for study_id in orthanc.rest("GET", "/studies"):  # type: ignore[union-attr]
                orthanc.rest("DELETE", f"/studies/{study_id}")
            seconds = timed([*storescu, "-aec", "ORTHANC", "127.0.0.1", str(orthanc_dicom), *files])
            results["orthanc"].append(n / seconds)
            # the edge as a sender (C-MOVE to storescp) against storescu to the same storescp
            seconds = timed(
                [
                    "movescu",
                    "-S",
                    "-aet",
                    "MOVESCU",
                    "-aec",
                    "HUB_SVR",
                    "-aem",
                    "STORESCP",
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={study.info.study_uid}",
                    "127.0.0.1",
                    str(edge_port),
                ]
            )
            results["edge_send"].append(n / seconds)
            seconds = timed([*storescu, "-aec", "STORESCP", "127.0.0.1", str(send_port), *files])
            results["storescu_send"].append(n / seconds)
            edge.stop()
            line = "  ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items())
            print(f"round {round_no}: {line}", flush=True)
    finally:
        edge.stop()
        tls_edge.stop()
        for peer in (storescp, orthanc, sink):
            peer.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {
        "edge_vs_orthanc": med["edge"] / med["orthanc"],
        "edge_vs_storescp": med["edge"] / med["storescp"],
        "edge_send_vs_storescu": med["edge_send"] / med["storescu_send"],
        "edge_tls_vs_plain": med["edge_tls"] / med["edge"],
    }
    print("\nmedians (instances/s): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print(f"edge / Orthanc  {ratios['edge_vs_orthanc']:.2f}  (target >= 1.5)")
    print(f"edge / storescp {ratios['edge_vs_storescp']:.2f}  (target >= 0.4)")
    print(f"edge over TLS / plaintext {ratios['edge_tls_vs_plain']:.2f}  (target >= 0.8)")
    print(f"edge send / storescu send {ratios['edge_send_vs_storescu']:.2f}  (target >= 0.3)")
    print(
        json.dumps(
            {
                "edge_ips": round(med["edge"], 1),
                "edge_tls_ips": round(med["edge_tls"], 1),
                "orthanc_ips": round(med["orthanc"], 1),
                "storescp_ips": round(med["storescp"], 1),
                "edge_send_ips": round(med["edge_send"], 1),
                "storescu_send_ips": round(med["storescu_send"], 1),
                **{k: round(v, 3) for k, v in ratios.items()},
                "instances": n,
                "megabytes": round(megabytes, 1),
                "rounds": args.rounds,
                "durable": not args.no_fsync,
                "settled": SETTLE,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
