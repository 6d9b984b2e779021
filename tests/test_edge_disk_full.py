"""A real `renkei edge serve` on a small filesystem that fills up.

It refuses C-STORE (0xA700) before the disk is full, keeps a reserve for its
journal, stops cleanly (exit 0) and starts again on a full disk, serves C-ECHO,
C-FIND, C-GET and C-MOVE of everything it acknowledged (byte for byte), and
accepts stores again, without a restart, once space is freed. Needs root (it
mounts a 48 MiB tmpfs); skipped otherwise, a failure under RENKEI_REQUIRE_ALL=1.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers_wait import eventually
from pydicom import dcmread

from renkei import peers
from renkei.edge.store import RESERVE_NAME
from tests.conftest import require_part, require_program
from tests.helpers_edge import (
    Region,
    dataset_bytes,
    edge_subprocess,
    files_by_sop,
    make_study,
    meta_of,
    run,
    write_region,
)

MIB = 2**20
RESERVE = 8 * MIB
MIN_FREE = 8 * MIB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted at the end whatever happens."""
    require_part(
        os.geteuid() == 0,
        "mounting a small filesystem (root, CAP_SYS_ADMIN)",
        "run the tests as root: this test mounts a 48 MiB tmpfs and fills it",
    )
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    assert mounted.returncode == 0, f"mount -t tmpfs failed as root: {mounted.stderr}"
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def region(tmp_path: Path, small_disk: Path) -> Region:
    """The test hub with its edge store on the small disk: 8 MiB journal reserve, 8 MiB kept free."""
    region = write_region(tmp_path / "region", stable_age=1.0)
    data = yaml.safe_load(region.path.read_text())
    edge = data["sites"][0]["edge"]
    edge["store"] = str(small_disk / "store")
    edge["disk"] = {"journal_reserve": "8 MiB", "min_free": "8 MiB"}
    region.path.write_text(yaml.safe_dump(data, allow_unicode=True))
    region.store_dir = small_disk / "store"
    return region


class Edge:
    """`renkei edge serve` as a real process, started and stopped by the test."""

    def __init__(self, region: Region, data_dir: Path, log: Path) -> None:
        self.region, self.data_dir, self.log = region, data_dir, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = edge_subprocess(self.region, self.data_dir, self.log)
        try:
            peers.wait_for_port("127.0.0.1", self.region.edge_port, 60, self.proc, "renkei edge serve")
        except Exception:
            raise AssertionError(f"the edge did not come up:\n{self.text()[-4000:]}") from None

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, since: int, timeout: float = 20) -> None:
        tail = lambda: self.text()[since:][-3000:]  # noqa: E731
        eventually(lambda: needle in self.text()[since:], timeout, f"{needle!r} logged", 0.1, tail)


@pytest.fixture
def edge(region: Region, tmp_path: Path) -> Iterator[Edge]:
    process = Edge(region, tmp_path / "data", tmp_path / "edge.log")
    try:
        yield process
    finally:
        process.kill()


def _send(port: int, files: list[Path], log: Path) -> tuple[list[Path], list[str]]:
    """storescu the files; returns (the files answered Success, every other status storescu printed)."""
    done = run(["storescu", "-v", "-aet", "STORESCU", "-aec", "HUB_SVR", "127.0.0.1", port, *files], check=False)
    text = (done.stdout + done.stderr).decode(errors="replace")
    with open(log, "a") as out:
        out.write(text)
    acknowledged, others = [], []
    current: Path | None = None
    for line in text.splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        response = re.match(r"I: Received Store Response \((.+)\)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif response and current is not None:
            (acknowledged if response.group(1) == "Success" else others).append(
                current if response.group(1) == "Success" else response.group(1)
            )
            current = None
    return acknowledged, others


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(folder: Path, name: str, everything: bool = False) -> Path:
    """Take the free space of `folder`'s filesystem with one file: as much as is free now, or
    (`everything`) writing until ENOSPC, whatever is freed meanwhile."""
    path = folder / name
    target = None if everything else _free(folder)
    written = 0
    with open(path, "ab", buffering=0) as out:
        for chunk in (MIB, 64 * 1024, 4096):
            block = b"\xa5" * chunk
            try:
                while target is None or written + chunk <= target:
                    written += out.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.fsync(out.fileno())
    return path


def _find_studies(region: Region, tmp_path: Path) -> dict[str, int]:
    """C-FIND (findscu) at STUDY level: study UID -> NumberOfStudyRelatedInstances."""
    out = tmp_path / f"find-{time.monotonic_ns()}"
    out.mkdir()
    run(
        [
            "findscu",
            "-S",
            "-aet",
            "FINDSCU",
            "-aec",
            "HUB_SVR",
            "-X",
            "-od",
            out,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "-k",
            "NumberOfStudyRelatedInstances",
            "127.0.0.1",
            region.edge_port,
        ]
    )
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return {str(a.StudyInstanceUID): int(a.NumberOfStudyRelatedInstances) for a in answers}


def _check_reads(region: Region, tmp_path: Path, acknowledged: list[Path], storescp: peers.Peer) -> None:
    """C-ECHO; C-FIND lists every study with its acknowledged count; C-GET and C-MOVE return every
    acknowledged instance byte for byte."""
    run(["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])
    sent = {meta_of(f)["MediaStorageSOPInstanceUID"]: dataset_bytes(f) for f in acknowledged}
    by_study: dict[str, int] = {}
    for f in acknowledged:
        study = str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        by_study[study] = by_study.get(study, 0) + 1
    assert _find_studies(region, tmp_path) == by_study
    get_dir = tmp_path / f"get-{time.monotonic_ns()}"
    get_dir.mkdir()
    for study in by_study:
        run(
            [
                "getscu",
                "-S",
                "-aet",
                "GETSCU",
                "-aec",
                "HUB_SVR",
                "-od",
                get_dir,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study}",
                "127.0.0.1",
                region.edge_port,
            ]
        )
    got = files_by_sop(get_dir)
    assert set(got) == set(sent)
    assert all(dataset_bytes(path) == sent[sop] for sop, path in got.items())
    for old in storescp.workdir.iterdir():
        old.unlink()
    for study in by_study:
        run(
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
                f"StudyInstanceUID={study}",
                "127.0.0.1",
                region.edge_port,
            ]
        )
    moved = files_by_sop(storescp.workdir)
    assert set(moved) == set(sent)
    assert all(dataset_bytes(path) == sent[sop] for sop, path in moved.items())


def test_an_edge_on_a_full_disk_restarts_serves_what_it_holds_and_takes_stores_when_space_is_back(
    region: Region, edge: Edge, small_disk: Path, tmp_path: Path
) -> None:
    for program in ("storescu", "findscu", "getscu", "movescu", "echoscu", "storescp"):
        require_program(program, "dcmtk")
    storescp = peers.start_storescp(
        tmp_path / "moved", ae_title="STORESCP", port=region.storescp_port, extra_args=["+B"]
    )  # bit preserving: the dataset as received
    sender_log = tmp_path / "storescu.log"
    reserve = region.store_dir / RESERVE_NAME
    try:
        edge.start()
        assert reserve.stat().st_size == RESERVE  # held from the first start

        # 1. studies until the edge refuses: 0xA700 while min_free is still free, never a full disk
        acknowledged: list[Path] = []
        refusals: list[str] = []
        for n in range(40):
            _uid, files = make_study(tmp_path / f"study-{n}", 16, size=256, seed=n)  # ~2 MiB a study
            ok, others = _send(region.edge_port, files, sender_log)
            acknowledged += ok
            refusals += others
            if others:
                break
        assert refusals and set(refusals) == {"Refused: OutOfResources"}, refusals
        assert len(acknowledged) >= 100
        assert _free(small_disk) >= MIN_FREE - 2 * MIB  # refused before the disk was full
        assert reserve.exists()

        # 2. something else fills the disk: the running edge gives its journal the reserve
        mark = len(edge.text())
        filler = _fill(small_disk, "filler")
        edge.wait_log("released the journal's reserve", mark)
        assert not reserve.exists()
        _, later = make_study(tmp_path / "late", 2, size=256, seed=99)
        ok, others = _send(region.edge_port, later, sender_log)
        assert ok == [] and others == ["Refused: OutOfResources"]
        run(["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])

        # 3. stop on the full disk: exit 0; start again: it comes up and serves every acknowledged instance
        assert edge.stop() == 0, edge.text()[-3000:]
        edge.start()
        _check_reads(region, tmp_path, acknowledged, storescp)
        ok, others = _send(region.edge_port, later, sender_log)
        assert ok == [] and others == ["Refused: OutOfResources"]
        assert edge.stop() == 0, edge.text()[-3000:]

        # 4. space comes back while the edge runs: the reserve is made again, stores accepted, no restart
        edge.start()
        mark = len(edge.text())
        filler.unlink()
        edge.wait_log("C-STORE is accepted again", mark)
        assert reserve.stat().st_size == RESERVE
        ok, others = _send(region.edge_port, later, sender_log)
        assert len(ok) == 2 and others == []
        acknowledged += ok
        assert edge.stop() == 0, edge.text()[-3000:]

        # 5. the disk fills while the edge is down (its reserve held): it starts all the same
        _fill(small_disk, "filler-2", everything=True)
        assert _free(small_disk) < MIB and reserve.exists()
        mark = len(edge.text())
        edge.start()
        assert "released the journal's reserve" in edge.text()[mark:]
        _check_reads(region, tmp_path, acknowledged, storescp)
        _, more = make_study(tmp_path / "more", 2, size=256, seed=123)
        ok, others = _send(region.edge_port, more, sender_log)
        assert ok == [] and others == ["Refused: OutOfResources"]
        (small_disk / "filler-2").unlink()
        edge.wait_log("C-STORE is accepted again", mark)
        ok, others = _send(region.edge_port, more, sender_log)
        assert len(ok) == 2 and others == []
        acknowledged += ok
        _check_reads(region, tmp_path, acknowledged, storescp)
        assert edge.stop() == 0, edge.text()[-3000:]
    finally:
        storescp.stop()

    text = edge.text()
    assert "Traceback" not in text and " ERROR " not in text, text[-4000:]
    # the warnings say sizes and counts, never a patient's UIDs
    uids = set()
    for f in acknowledged:
        ds = dcmread(f, stop_before_pixels=True)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert any("disk nearly full" in line for line in warnings)
    assert not [line for line in warnings if any(uid in line for uid in uids)]


# ---------------------------------------------------------------- without root: the rules themselves
def test_disk_settings_are_sizes_with_sensible_defaults_and_clear_errors() -> None:
    from pydantic import ValidationError

    from renkei.config import EdgeDiskConfig

    assert EdgeDiskConfig().sizes_for(10**12) == (64 * MIB, 256 * MIB)  # defaults on a real disk
    assert EdgeDiskConfig().sizes_for(48 * MIB) == (3 * MIB, 3 * MIB)  # at most 1/16 of a small one
    assert EdgeDiskConfig(journal_reserve="8 MiB", min_free="1.5 GiB").sizes_for(48 * MIB) == (
        8 * MIB,
        3 * 2**29,
    )  # set values as they are
    assert EdgeDiskConfig(journal_reserve=0, min_free="500 MB").sizes_for(10**12) == (0, 500 * 10**6)
    for field, value, says in [
        ("journal_reserve", "100 KiB", "at least 1 MiB"),
        ("journal_reserve", "-1 MiB", "negative"),
        ("min_free", "lots", "is not a size"),
        ("min_free", "12 parsecs", "is not a size"),
        ("min_free", "2 TiB", "more than 1 TiB"),
        ("min_free", 1.5, "whole number"),
    ]:
        with pytest.raises(ValidationError, match=says):
            EdgeDiskConfig(**{field: value})


def test_the_reserve_is_released_when_the_disk_is_nearly_full_and_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from renkei.edge.store import DiskFull, FileStore

    store = FileStore(tmp_path / "store", min_free_bytes=2 * MIB, reserve_bytes=4 * MIB)
    free = {"now": 100 * MIB}
    monkeypatch.setattr(store, "free_bytes", lambda: free["now"])
    store.maintain_space()
    reserve = store.root / RESERVE_NAME
    assert reserve.stat().st_size == 4 * MIB and reserve.stat().st_blocks * 512 >= 4 * MIB  # not sparse
    assert reserve.stat().st_mode & 0o777 == 0o600
    store.check_space(1000)
    free["now"] = 2 * MIB + 500  # min_free reached: refused before the disk is full, the reserve kept
    with pytest.raises(DiskFull):
        store.check_space(1000)
    store.maintain_space()
    assert reserve.exists()
    free["now"] = MIB  # something else filled the disk: the journal gets the reserve
    store.maintain_space()
    assert not reserve.exists()
    free["now"] = 5 * MIB  # room for a store, not for it and the reserve: still refused
    with pytest.raises(DiskFull):
        store.check_space(1000)
    store.maintain_space()
    assert not reserve.exists()
    free["now"] = 8 * MIB  # twice the reserve: made again, stores accepted
    store.maintain_space()
    assert reserve.exists()
    store.check_space(1000)
    assert store.release_reserve() and not store.release_reserve()  # the journal's own call, once
