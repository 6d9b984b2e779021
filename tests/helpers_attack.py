"""Helpers for the adversarial edge tests: a real `renkei edge serve` process, raw PDUs, a
legitimate peer that keeps measuring, memory readings and test certificates.

Everything that attacks is a raw socket (no pynetdicom threads in the test
process, so the attacker's own load does not slow the measuring peer); the
legitimate peer is pynetdicom, as a workstation would be.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from helpers_region import region_config
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification

from renkei import peers

REPO = Path(__file__).resolve().parents[1]
RENKEI = REPO / ".venv" / "bin" / "renkei"

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.543.99"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {
    1: "A-ASSOCIATE-RQ",
    2: "A-ASSOCIATE-AC",
    3: "A-ASSOCIATE-RJ",
    4: "P-DATA-TF",
    5: "A-RELEASE-RQ",
    6: "A-RELEASE-RP",
    7: "A-ABORT",
}

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00


def is_failure(status: int | None) -> bool:
    """A DIMSE failure status (PS3.7 C): the A7xx, A9xx and Cxxx families."""
    return status is not None and (status & 0xF000) in (0xA000, 0xC000)


# ------------------------------------------------------------------ the region and the edge process
@dataclass(frozen=True)
class AttackRegion:
    """The example region on free ports, written for one edge process under `folder`."""

    folder: Path
    config: Path
    data_dir: Path
    edge_port: int
    edge_ae: str
    store_dir: Path
    limits: dict[str, Any]
    tls: bool


DEFAULT_LIMITS: dict[str, Any] = {
    "setup_timeout": 2,
    "pdu_timeout": 2,
    "idle_timeout": 30,
    "idle_evict_after": 1,
    "query_time_budget": 1,
}


def attack_region(
    folder: Path,
    *,
    limits: dict[str, Any] | None = None,
    tls: dict[str, str] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> AttackRegion:
    """The example region (examples/nagasaki.yaml) with free ports and short edge deadlines.

    HUB_WS2 may also connect from 127.0.0.3 (`networks`); no rule shares a clinic's
    studies with the hub, so a clinic study in the catalog is one the hub may not see.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {**DEFAULT_LIMITS, **(limits or {})}

    def adjust(raw: dict[str, Any]) -> None:
        hub = next(s for s in raw["sites"] if s["id"] == "hub")
        hub["edge"]["limits"] = chosen
        hub["edge"]["store"] = str(folder / "hub-store")
        for ws in hub["workstations"]:
            if ws["ae_title"] == "HUB_WS2":
                ws["networks"] = ["127.0.0.3/32"]
        if tls:
            hub["edge"]["tls"] = tls
        raw["policy"]["rules"] = [r for r in raw["policy"]["rules"] if r["name"] != "clinic-studies-to-hub"]
        if edit:
            edit(raw)

    # the example's stable_age (60 s): no study completes during an attack
    path = region_config(folder, stable_age=60, edit=adjust)
    hub = next(s for s in yaml.safe_load(path.read_text(encoding="utf-8"))["sites"] if s["id"] == "hub")
    data_dir = folder / "data"
    data_dir.mkdir(exist_ok=True)
    return AttackRegion(
        folder, path, data_dir, hub["edge"]["port"], hub["edge"]["ae_title"], folder / "hub-store", chosen, bool(tls)
    )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class EdgeProcess:
    """`renkei --config CFG --data-dir DIR edge serve --site hub` in its own session."""

    def __init__(self, region: AttackRegion, name: str = "edge") -> None:
        self.region = region
        self.log = region.folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return self.region.edge_port

    def start(self, timeout: float = 60) -> EdgeProcess:
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log, "ab") as handle:
            handle.write(f"\n===== start {self.starts + 1} =====\n".encode())
            handle.flush()
            self.proc = subprocess.Popen(
                [
                    str(RENKEI),
                    "--config",
                    str(self.region.config),
                    "--data-dir",
                    str(self.region.data_dir),
                    "edge",
                    "serve",
                    "--site",
                    "hub",
                    "--trigger",
                    "off",
                ],
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.starts += 1
        try:
            peers.wait_for_port("127.0.0.1", self.port, timeout, self.proc, "renkei edge serve")
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self, after: str = "") -> None:
        assert self.alive(), (
            f"the edge process died{' after ' + after if after else ''} "
            f"(exit code {self.proc.returncode if self.proc else None})\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGINT, then SIGKILL after `timeout`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> EdgeProcess:
        self.kill()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return "--- edge log (tail) ---\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no edge log)"

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False when not possible."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return True
        except OSError:
            return False


class MemoryWatch:
    """The edge's resident memory during an attack: VmRSS before, and the peak reached.

    The peak is the larger of VmRSS sampled every 20 ms and VmHWM (reset before).
    """

    def __init__(self, edge: EdgeProcess) -> None:
        self.edge = edge
        self.before = 0
        self.after = 0
        self.peak = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.edge.memory()["VmRSS"])
            except (OSError, KeyError):
                return

    def __enter__(self) -> MemoryWatch:
        self._hwm_reset = self.edge.reset_peak()
        self.before = self.edge.memory()["VmRSS"]
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        try:
            reading = self.edge.memory()
        except OSError:
            return
        self.after = reading["VmRSS"]
        self.peak = max(self.peak, self.after, reading["VmHWM"] if self._hwm_reset else 0)

    @property
    def growth(self) -> int:
        return max(self.after, self.peak) - self.before

    def describe(self) -> str:
        mib = 1024 * 1024
        return (
            f"VmRSS before {self.before / mib:.1f} MiB, after {self.after / mib:.1f} MiB, "
            f"peak {self.peak / mib:.1f} MiB (growth {self.growth / mib:.1f} MiB)"
        )


# ------------------------------------------------------------------ the legitimate peer
@dataclass
class EchoResult:
    started: float
    latency: float
    ok: bool
    detail: str = ""


class EchoMonitor:
    """A workstation that opens an association and sends a C-ECHO every `every` seconds.

    Use as a context manager around an attack; `check()` asserts that every echo
    succeeded and none took `max_latency` or more.
    """

    def __init__(
        self,
        port: int,
        *,
        calling_ae: str = "HUB_WS1",
        called_ae: str = "HUB_SVR",
        host: str = "127.0.0.1",
        bind: str | None = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        every: float = 0.15,
        timeout: float = 5.0,
        min_echoes: int = 3,
    ) -> None:
        self.port, self.host, self.bind = port, host, bind
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.tls = tls
        self.every = every
        self.timeout = timeout
        self.min_echoes = min_echoes
        self.results: list[EchoResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-monitor", daemon=True)

    def echo_once(self) -> EchoResult:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(Verification)
        kwargs: dict[str, Any] = {"ae_title": self.called_ae}
        if self.bind:
            kwargs["bind_address"] = (self.bind, 0)
        if self.tls is not None:
            kwargs["tls_args"] = (self.tls, None)
        start = time.monotonic()
        try:
            assoc = ae.associate(self.host, self.port, **kwargs)
            if not assoc.is_established:
                how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
                return EchoResult(start, time.monotonic() - start, False, f"association {how}")
            try:
                status = assoc.send_c_echo()
            finally:
                if assoc.is_established:
                    assoc.release()
            latency = time.monotonic() - start
            code = int(status.Status) if status is not None and "Status" in status else None
            if code != SUCCESS:
                return EchoResult(start, latency, False, f"C-ECHO status {code}")
            return EchoResult(start, latency, True)
        except Exception as exc:  # the measuring peer must keep measuring
            return EchoResult(start, time.monotonic() - start, False, f"{type(exc).__name__}: {exc}")
        finally:
            ae.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            result = self.echo_once()
            self.results.append(result)
            self._stop.wait(max(0.0, self.every - result.latency) if result.ok else self.every)

    def __enter__(self) -> EchoMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + self.timeout * 3 + 5
        while len(self.results) < self.min_echoes and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)  # a short attack still gets a few measurements
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))

    def summary(self) -> str:
        if not self.results:
            return "no echo was made"
        lat = [r.latency for r in self.results]
        failures = [r for r in self.results if not r.ok]
        slow = sorted(self.results, key=lambda r: r.latency, reverse=True)[:5]
        t0 = self.results[0].started
        return (
            f"{len(self.results)} echoes over {self.results[-1].started - t0:.1f} s, max "
            f"{max(lat) * 1000:.0f} ms; slowest (ms @ s after the first): "
            f"{[(round(r.latency * 1000), round(r.started - t0, 2)) for r in slow]}; {len(failures)} failed"
            + (f" (first: {failures[0].detail} @ {failures[0].started - t0:.2f} s)" if failures else "")
        )

    def check(self, max_latency: float = 1.0, at_least: int = 3) -> None:
        assert len(self.results) >= at_least, f"the legitimate peer made too few echoes: {self.summary()}"
        failures = [r for r in self.results if not r.ok]
        assert not failures, f"the legitimate peer was refused or failed: {self.summary()}"
        worst = max(r.latency for r in self.results)
        assert worst < max_latency, f"the legitimate peer waited {worst:.2f} s: {self.summary()}"


def monitor_for(seconds: float) -> None:
    """Let the legitimate peer keep measuring for a while (the attack is running)."""
    time.sleep(seconds)


# ------------------------------------------------------------------ raw PDUs
def _ae_field(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str = "HUB_SVR",
    calling: str = "HUB_WS1",
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    max_pdu: int = 16384,
    extra_user_items: bytes = b"",
) -> bytes:
    """A complete A-ASSOCIATE-RQ PDU, encoded by hand (PS3.8 9.3.2)."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode()) + extra_user_items
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling) + bytes(32) + items
    return pdu(A_ASSOCIATE_RQ, body)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item (control: bit 0 command, bit 1 last fragment)."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*items: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(items))


RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))
ABORT = pdu(A_ABORT, bytes(4))


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (implicit VR little endian, group 0000) with its group length."""
    body = b"".join(struct.pack("<HHL", 0, elem, len(value)) + value for elem, value in sorted(elements))
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def ui(uid: str | bytes) -> bytes:
    raw = uid.encode("ascii") if isinstance(uid, str) else uid
    return raw + b"\x00" if len(raw) % 2 else raw


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        [(0x0002, ui(VERIFICATION)), (0x0100, us(0x0030)), (0x0110, us(message_id)), (0x0800, us(0x0101))]
    )


def c_store_rq(sop_class_uid: str, sop_instance_uid: str | bytes, message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, ui(sop_class_uid)),
            (0x0100, us(0x0001)),
            (0x0110, us(message_id)),
            (0x0700, us(0)),
            (0x0800, us(0x0000)),
            (0x1000, ui(sop_instance_uid)),
        ]
    )


def parse_command(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        _group, elem, length = struct.unpack_from("<HHL", raw, pos)
        out[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


_SHORT_VRS = {
    "AE",
    "AS",
    "AT",
    "CS",
    "DA",
    "DS",
    "DT",
    "FL",
    "FD",
    "IS",
    "LO",
    "LT",
    "PN",
    "SH",
    "SL",
    "SS",
    "ST",
    "TM",
    "UI",
    "UL",
    "US",
}


def explicit_element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    """One data element in explicit VR little endian (the value given already padded)."""
    if vr in _SHORT_VRS:
        return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value
    return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, len(value)) + value


def text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def image_header(sop_instance_uid: str | bytes, study_uid: str, series_uid: str, patient_id: str = "ATTACK1") -> bytes:
    """The elements of a small CT image before its pixel data (explicit VR little endian)."""
    sop = sop_instance_uid if isinstance(sop_instance_uid, bytes) else ui(sop_instance_uid)
    return b"".join(
        [
            explicit_element(0x0008, 0x0016, "UI", ui(CT_IMAGE_STORAGE)),
            explicit_element(0x0008, 0x0018, "UI", sop),
            explicit_element(0x0008, 0x0020, "DA", text("20260101")),
            explicit_element(0x0008, 0x0030, "TM", text("101500")),
            explicit_element(0x0008, 0x0050, "SH", text("ATK1")),
            explicit_element(0x0008, 0x0060, "CS", text("CT")),
            explicit_element(0x0010, 0x0010, "PN", text("Attack^Test")),
            explicit_element(0x0010, 0x0020, "LO", text(patient_id)),
            explicit_element(0x0020, 0x000D, "UI", ui(study_uid)),
            explicit_element(0x0020, 0x000E, "UI", ui(series_uid)),
            explicit_element(0x0020, 0x0013, "IS", text("1")),
            explicit_element(0x0028, 0x0002, "US", us(1)),
            explicit_element(0x0028, 0x0004, "CS", text("MONOCHROME2")),
            explicit_element(0x0028, 0x0010, "US", us(16)),
            explicit_element(0x0028, 0x0011, "US", us(16)),
            explicit_element(0x0028, 0x0100, "US", us(16)),
            explicit_element(0x0028, 0x0101, "US", us(12)),
            explicit_element(0x0028, 0x0102, "US", us(11)),
            explicit_element(0x0028, 0x0103, "US", us(0)),
        ]
    )


def small_image(sop_instance_uid: str | bytes, study_uid: str, series_uid: str) -> bytes:
    """A whole 16x16 CT image dataset (explicit VR little endian)."""
    return image_header(sop_instance_uid, study_uid, series_uid) + explicit_element(
        0x7FE0, 0x0010, "OW", bytes(16 * 16 * 2)
    )


def deflate_bomb(inflated: int, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """A Deflated Explicit VR Little Endian dataset: a valid header and an OB element of
    `inflated` zero bytes, deflated (raw deflate, wbits -15)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    header = image_header(sop_uid, study_uid, series_uid)
    out = [compressor.compress(header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated))]
    chunk = bytes(4 * 1024 * 1024)
    left = inflated
    while left:
        n = min(left, len(chunk))
        out.append(compressor.compress(chunk[:n]))
        left -= n
    out.append(compressor.flush())
    return b"".join(out)


# ------------------------------------------------------------------ raw connections
def connect(
    port: int,
    *,
    bind: str | None = None,
    host: str = "127.0.0.1",
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout, source_address=(bind, 0) if bind else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=None)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """sendall; False when the peer has closed (reset or broken pipe)."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLError, OSError):
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


@dataclass
class Reply:
    """What the edge did after we sent something: a PDU, closing, or nothing within the wait."""

    kind: str  # "pdu" | "closed" | "timeout"
    pdu_type: int | None = None
    body: bytes = b""
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.kind == "pdu":
            return f"{PDU_NAMES.get(self.pdu_type or 0, hex(self.pdu_type or 0))} after {self.seconds:.2f} s"
        return f"{self.kind} after {self.seconds:.2f} s"


def read_reply(sock: socket.socket, timeout: float, max_body: int = 64 * 1024 * 1024) -> Reply:
    """The next PDU from the edge, or 'closed' (EOF or reset), or 'timeout'."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        header = _recv_exact(sock, 6)
        if header is None:
            return Reply("closed", seconds=time.monotonic() - start)
        pdu_type, _r, length = struct.unpack(">BBL", header)
        if length > max_body:
            return Reply("pdu", pdu_type, b"", time.monotonic() - start)
        sock.settimeout(max(0.5, timeout - (time.monotonic() - start)))
        body = _recv_exact(sock, length)
        if body is None:
            return Reply("closed", seconds=time.monotonic() - start)
        return Reply("pdu", pdu_type, body, time.monotonic() - start)
    except TimeoutError:
        return Reply("timeout", seconds=time.monotonic() - start)
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError, OSError):
        return Reply("closed", seconds=time.monotonic() - start)


class Replies(list):
    """PDUs received (the first `keep`), and how many of each type in all."""

    def __init__(self, keep: int = 20) -> None:
        super().__init__()
        self.keep = keep
        self.counts: dict[int, int] = {}

    def add(self, reply: Reply) -> None:
        self.counts[reply.pdu_type or 0] = self.counts.get(reply.pdu_type or 0, 0) + 1
        if len(self) < self.keep:
            self.append(reply)

    @property
    def types(self) -> set[int]:
        return set(self.counts)

    def __str__(self) -> str:
        if not self.counts:
            return "no PDU"
        return ", ".join(f"{n} x {PDU_NAMES.get(t, hex(t))}" for t, n in self.counts.items())


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[Replies, bool]:
    """The PDUs the edge sends until it closes; (replies, closed within `timeout`)."""
    deadline = time.monotonic() + timeout
    replies = Replies()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return replies, False
        reply = read_reply(sock, left)
        if reply.kind == "closed":
            return replies, True
        if reply.kind == "timeout":
            return replies, False
        replies.add(reply)


def wait_closed(socks: Sequence[socket.socket], timeout: float) -> list[float | None]:
    """For each socket, the seconds (from now) until the edge closed it; None when it did not."""
    start = time.monotonic()
    closed: list[float | None] = [None] * len(socks)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        try:
            selector.register(sock, selectors.EVENT_READ, index)
        except (ValueError, OSError):
            closed[index] = 0.0
    open_count = sum(1 for c in closed if c is None)
    while open_count:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            break
        for key, _ in selector.select(left):
            index = key.data
            try:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                closed[index] = time.monotonic() - start
                selector.unregister(key.fileobj)
                open_count -= 1
    selector.close()
    return closed


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


@dataclass
class Accepted:
    """An association accepted on a raw socket: the contexts accepted and the edge's maximum PDU."""

    sock: socket.socket
    contexts: dict[int, str]  # context id -> transfer syntax, accepted ones only
    max_pdu: int


class NotAccepted(AssertionError):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        detail = str(reply)
        if reply.kind == "pdu" and reply.pdu_type == A_ASSOCIATE_RJ_TYPE:
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu(A_ASSOCIATE_RJ_TYPE, reply.body))
            detail += f" (result {rj.result}, source {rj.source}, reason {rj.reason_diagnostic})"
        super().__init__(f"the association was not accepted: {detail}")


def decode_ac(body: bytes) -> tuple[dict[int, str], int]:
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu(A_ASSOCIATE_AC_TYPE, body))
    contexts = {cx.context_id: str(cx.transfer_syntax) for cx in ac.presentation_context if cx.result == 0}
    return contexts, int(ac.user_information.maximum_length or 0)


def raw_associate(
    port: int,
    *,
    calling: str = "HUB_WS1",
    called: str = "HUB_SVR",
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    bind: str | None = "127.0.0.1",
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> Accepted:
    """Open an association by hand; raises NotAccepted with what the edge did instead."""
    sock = connect(port, bind=bind, timeout=timeout, tls=tls)
    if not send_quietly(sock, associate_rq(called, calling, contexts)):
        sock.close()
        raise NotAccepted(Reply("closed"))
    reply = read_reply(sock, timeout)
    if reply.kind != "pdu" or reply.pdu_type != A_ASSOCIATE_AC_TYPE:
        sock.close()
        raise NotAccepted(reply)
    accepted, max_pdu = decode_ac(reply.body)
    return Accepted(sock, accepted, max_pdu)


def send_message(acc: Accepted, context_id: int, command: bytes, dataset: bytes | None = None) -> bool:
    """Send a DIMSE message, the dataset fragmented to the edge's maximum PDU; False when cut off."""
    if not send_quietly(acc.sock, p_data(pdv(context_id, 0x03, command))):
        return False
    if dataset is None:
        return True
    limit = (acc.max_pdu or 16384) - 6  # PDV item header within the PDU
    pos = 0
    while pos < len(dataset) or not dataset:
        chunk = dataset[pos : pos + limit]
        pos += len(chunk)
        last = pos >= len(dataset)
        if not send_quietly(acc.sock, p_data(pdv(context_id, 0x02 if last else 0x00, chunk))):
            return False
        if last:
            break
    return True


@dataclass
class Response:
    """A DIMSE response read on a raw association (or what came instead)."""

    status: int | None
    command: dict[int, bytes] = field(default_factory=dict)
    reply: Reply | None = None

    def __str__(self) -> str:
        if self.status is not None:
            return f"status 0x{self.status:04X}"
        return f"no response ({self.reply})"


def read_response(acc: Accepted, timeout: float) -> Response:
    """The next command set the edge sends (its status), or what the edge did instead."""
    deadline = time.monotonic() + timeout
    fragments = b""
    while True:
        reply = read_reply(acc.sock, max(0.1, deadline - time.monotonic()))
        if reply.kind != "pdu" or reply.pdu_type != P_DATA_TF:
            return Response(None, reply=reply)
        body, pos = reply.body, 0
        while pos + 6 <= len(body):
            length = struct.unpack_from(">L", body, pos)[0]
            control = body[pos + 5]
            fragments += body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 1 and control & 2:
                command = parse_command(fragments)
                status = command.get(0x0900)
                return Response(struct.unpack("<H", status)[0] if status else None, command, reply)


def release(acc: Accepted, timeout: float = 2.0) -> None:
    send_quietly(acc.sock, RELEASE_RQ)
    read_reply(acc.sock, timeout)
    acc.sock.close()


# ------------------------------------------------------------------ the store and the catalog
def fill_store(store_dir: Path, files: Iterable[Path], calling_ae: str = "HUB_PACS") -> int:
    """Put files into an edge store before the edge starts, as its C-STORE handler would
    (no fsync: only the test reads them back)."""
    from renkei.edge.ingest import Ingestor
    from renkei.edge.journal import Journal
    from renkei.edge.store import FileStore
    from tests.helpers_region import dataset_bytes

    journal = Journal.open(store_dir)
    try:
        ingestor = Ingestor(FileStore(store_dir, fsync=False), journal)
        count = 0
        for path in files:
            data, ts, sop_class, sop_uid = dataset_bytes(path)
            outcome = ingestor.store_instance(data, ts, sop_class, sop_uid, calling_ae)
            assert outcome.status == 0, outcome
            count += 1
        ingestor.close()
        return count
    finally:
        journal.close()


def journaled(store_dir: Path, sop_instance_uid: str) -> bool:
    from renkei.edge.journal import Journal

    with Journal.open(store_dir, readonly=True) as journal:
        return journal.entry(sop_instance_uid) is not None


# ------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def client_context(ca: Path, pair: Pair | None) -> ssl.SSLContext:
    """A TLS client context that trusts `ca` and presents `pair` (no host name check: loopback)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    if pair is not None:
        context.load_cert_chain(certfile=str(pair.cert), keyfile=str(pair.key))
    return context
