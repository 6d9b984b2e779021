"""The HL7 admission listener, run in its own process, attacked over raw sockets.

Each attack runs while a legitimate HIS sends an ADT^A01: that one must get
its AA within 1 s, and every message an attacker finishes must get an ACK.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import random
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_parts import EXAMPLE_CONFIG, REPO

from renkei import peers

IDLE_TIMEOUT = 1.5
MESSAGE_DEADLINE = 3.0
HANDSHAKE_TIMEOUT = 1.5
MAX_CONNECTIONS = 32
MAX_MESSAGE_BYTES = 1024 * 1024
LEGIT_LIMIT = 1.0  # seconds within which a legitimate sender is acknowledged, whatever else goes on

LAUNCHER = r"""
import asyncio, dataclasses, json, logging, sys
from renkei.admissions import AdmissionListener
from renkei.config import HL7Config, load_config

spec = json.loads(sys.argv[1])
logging.basicConfig(filename=spec["log"], level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
record = open(spec["record"], "a", encoding="utf-8")

def on_admission(admission):
    record.write(json.dumps(dataclasses.asdict(admission), ensure_ascii=False) + "\n")
    record.flush()
    return "recorded"

listener = AdmissionListener(load_config(spec["config"]), "hub", on_admission, port=spec["port"],
                             settings=HL7Config(**spec["hl7"]), message_deadline=spec["message_deadline"],
                             handshake_timeout=spec["handshake_timeout"])
asyncio.run(listener.serve())
"""


@dataclass
class Listener:
    port: int
    process: subprocess.Popen
    log: Path
    record: Path
    client_tls: ssl.SSLContext | None = None

    def admissions(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text("utf-8").splitlines()]

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace") if self.log.exists() else ""


def _start(folder: Path, tls: dict | None = None) -> Listener:
    folder.mkdir(parents=True, exist_ok=True)
    port = peers.free_port()
    spec = {
        "config": str(EXAMPLE_CONFIG),
        "port": port,
        "log": str(folder / "listener.log"),
        "record": str(folder / "admissions.jsonl"),
        "message_deadline": MESSAGE_DEADLINE,
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "hl7": {
            "allowed_senders": ["127.0.0.1/32"],
            "idle_timeout": IDLE_TIMEOUT,
            "max_connections": MAX_CONNECTIONS,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "tls": tls,
        },
    }
    script = folder / "launch_listener.py"
    script.write_text(LAUNCHER, "utf-8")
    stderr = open(folder / "stderr.txt", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps(spec)], cwd=folder, env=env, stdout=stderr, stderr=stderr
    )
    stderr.close()
    try:
        peers.wait_for_port("127.0.0.1", port, 30, process, "HL7 listener")
    except BaseException:
        _stop(process)
        raise
    return Listener(port, process, Path(spec["log"]), Path(spec["record"]))


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    lst = _start(tmp_path_factory.mktemp("hl7-plain"))
    try:
        yield lst
    finally:
        _stop(lst.process)
    assert lst.process.returncode is not None


@pytest.fixture
def alive(listener: Listener) -> Iterator[Listener]:
    """The listener, checked to be still running after the test."""
    yield listener
    assert listener.process.poll() is None, "the listener died: " + listener.log_text()[-2000:]


# -- a client's side of MLLP -----------------------------------------------------


def adt(control: str, event: str = "A01", pid5: str = "Yamada^Taro", msh18: str = "", extra: str = "") -> str:
    msh = f"MSH|^~\\&|HIS|NAGASAKI|RENKEI|HUB|20261129120000||ADT^{event}|{control}|P|2.5"
    if msh18:
        msh += "||||||" + msh18
    segments = [
        msh,
        f"EVN|{event}|20261129120000",
        f"PID|1||H0001234^^^NAGASAKI-HUB||{pid5}||19500101|M",
        "PV1|1|I|W3^301^1",
    ]
    if extra:
        segments.append(extra)
    return "\r".join(segments)


def framed(payload: bytes | str) -> bytes:
    return b"\x0b" + (payload.encode("utf-8") if isinstance(payload, str) else payload) + b"\x1c\x0d"


def connect(port: int, bind: str | None = None, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if bind:
        sock.bind((bind, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_blocks(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """`count` MLLP replies (without framing); fewer when the listener closed first."""
    sock.settimeout(timeout)
    data, blocks = b"", []
    while len(blocks) < count:
        while b"\x1c\x0d" in data:
            block, data = data.split(b"\x1c\x0d", 1)
            blocks.append(block[block.find(b"\x0b") + 1 :])
            if len(blocks) == count:
                return blocks
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return blocks


def read_block(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One MLLP reply (without framing), or b"" when the listener closed first."""
    blocks = read_blocks(sock, 1, timeout)
    return blocks[0] if blocks else b""


def wait_closed(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """The sockets the listener closed within `timeout`, each with what it sent before closing."""
    deadline = time.monotonic() + timeout
    received = {sock: b"" for sock in socks}
    closed: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk  # type: ignore[index]
                else:
                    closed[sock] = received[sock]  # type: ignore[index]
                    selector.unregister(sock)
    return closed


def msa(reply: bytes, encoding: str = "ascii") -> tuple[str, str, str]:
    """MSA-1, MSA-2, MSA-3 of an ACK."""
    text = reply.strip(b"\x0b\x1c\r").decode(encoding, "replace")
    for segment in text.split("\r"):
        if segment.startswith("MSA|"):
            fields = segment.split("|") + ["", "", ""]
            return fields[1], fields[2], _unescape(fields[3])
    raise AssertionError(f"no MSA segment in {reply[:200]!r}")


def _unescape(text: str) -> str:
    for escape, char in (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~"), ("\\E\\", "\\")):
        text = text.replace(escape, char)
    return text


_legit_count = iter(range(1, 1_000_000))


def legit(lst: Listener) -> float:
    """A well-behaved HIS sends one ADT^A01; assert its AA came within LEGIT_LIMIT; return the seconds."""
    control = f"LEGIT{next(_legit_count)}"
    began = time.monotonic()
    sock = connect(lst.port, timeout=5)
    try:
        if lst.client_tls is not None:
            sock = lst.client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(framed(adt(control)))
        reply = read_block(sock, 5)
    finally:
        sock.close()
    elapsed = time.monotonic() - began
    assert reply, f"legitimate message {control}: no ACK"
    assert msa(reply)[:2] == ("AA", control)
    assert elapsed < LEGIT_LIMIT, f"legitimate message {control} acknowledged after {elapsed:.2f} s"
    return elapsed


def in_background(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the listener closed on us: that is allowed
        pass


# -- attacks ------------------------------------------------------------------


def test_a_message_over_64_kib_is_acknowledged(alive: Listener) -> None:
    note = "NTE|1||" + "x" * (200 * 1024)
    big_admission = adt("BIG1", extra=note)
    big_discharge = adt("BIG2", event="A03", extra=note)
    with connect(alive.port) as sock:
        sock.sendall(framed(big_admission) + framed(big_discharge))
        legit(alive)
        first, second = read_blocks(sock, 2)
    assert msa(first)[:2] == ("AA", "BIG1")
    assert msa(second)[:2] == ("AR", "BIG2") and "not ADT^A01" in msa(second)[2]
    assert "BIG1" in {a["message_control_id"] for a in alive.admissions()}


def test_ten_megabytes_are_read_to_the_end_block_and_refused(alive: Listener) -> None:
    header = adt("HUGE1").encode()
    with connect(alive.port) as sock:
        sender = in_background(send_quietly, sock, framed(header + b"\rNTE|1||" + b"y" * (10 * 1024 * 1024)))
        legit(alive)
        reply = read_block(sock, 15)
        sender.join(15)
        assert msa(reply)[:2] == ("AR", "HUGE1")
        assert "over the limit of 1048576 bytes" in msa(reply)[2]
        sock.sendall(framed(adt("AFTER-HUGE")))  # the same connection goes on
        assert msa(read_block(sock))[:2] == ("AA", "AFTER-HUGE")
    legit(alive)


def test_a_block_that_never_ends_is_refused_and_closed(alive: Listener) -> None:
    with connect(alive.port) as sock:

        def flood() -> None:
            send_quietly(sock, b"\x0b" + adt("ENDLESS").encode() + b"\rNTE|1||")
            chunk = b"z" * (1024 * 1024)
            for _ in range(40):  # past the discard limit (16 x max_message_bytes)
                try:
                    sock.sendall(chunk)
                except OSError:
                    return

        sender = in_background(flood)
        legit(alive)
        reply = read_block(sock, 15)
        sender.join(15)
        assert msa(reply)[:2] == ("AR", "ENDLESS") and "no end block" in msa(reply)[2]
        assert sock in wait_closed([sock], 5)


def test_fifty_connections_that_send_one_byte_and_stall(alive: Listener) -> None:
    stalled = []
    try:
        for _ in range(50):
            sock = connect(alive.port)
            sock.sendall(b"\x0b")
            stalled.append(sock)
        legit(alive)
        legit(alive)
        # beyond max_connections, the connections silent the longest were closed to make room
        early = wait_closed(stalled, 0.5)
        assert len(early) >= 50 - MAX_CONNECTIONS
        legit(alive)
        # the others are closed by idle_timeout; each with an AR, since its block had begun
        rest = [sock for sock in stalled if sock not in early]
        late = wait_closed(rest, IDLE_TIMEOUT + 2)
        assert len(late) == len(rest)
        replies = [data for data in {**early, **late}.values() if data]
        assert len(replies) >= len(rest), "stalled connections closed without an AR"
        assert all(msa(data)[0] == "AR" for data in replies)
    finally:
        for sock in stalled:
            sock.close()
    legit(alive)


def test_silent_and_trickling_connections_are_closed(alive: Listener) -> None:
    idle, silent, trickle = connect(alive.port), connect(alive.port), connect(alive.port)
    stop = threading.Event()
    try:
        idle.sendall(framed(adt("IDLE1")))
        assert msa(read_block(idle))[:2] == ("AA", "IDLE1")
        silent.sendall(b"\x0b" + adt("SLOW1").encode() + b"\r")
        trickle.sendall(b"\x0b" + adt("SLOW2").encode() + b"\r")

        def drip() -> None:  # never silent for idle_timeout, never done
            while not stop.wait(IDLE_TIMEOUT / 4):
                send_quietly(trickle, b"N")

        dripper = in_background(drip)
        began = time.monotonic()
        while time.monotonic() - began < MESSAGE_DEADLINE - 0.5:
            legit(alive)
            stop.wait(0.3)
        closed = wait_closed([idle, silent], 0.1)
        assert closed.get(idle) == b""  # silent between messages: closed, nothing to answer
        reply = closed.get(silent, b"")  # silent in the middle of a message: AR, then closed
        assert msa(reply)[:2] == ("AR", "SLOW1") and "idle_timeout" in msa(reply)[2]
        reply = wait_closed([trickle], 3).get(trickle, b"")  # trickling: AR at the message deadline
        assert msa(reply)[:2] == ("AR", "SLOW2") and f"not complete within {MESSAGE_DEADLINE:g} s" in msa(reply)[2]
        assert time.monotonic() - began < MESSAGE_DEADLINE + 1.5
        stop.set()
        dripper.join(5)
    finally:
        stop.set()
        for sock in (idle, silent, trickle):
            sock.close()


def test_a_sender_not_allowed_is_closed_without_reading(alive: Listener) -> None:
    try:
        with connect(alive.port, bind="127.0.0.2") as sock:
            send_quietly(sock, framed(adt("INTRUDER1")))
            legit(alive)
            assert wait_closed([sock], 2) == {sock: b""}
    except ConnectionResetError:  # closed so fast that connect() saw it
        pass
    legit(alive)
    assert "INTRUDER1" not in {a["message_control_id"] for a in alive.admissions()}
    log = alive.log_text()
    assert "WARNING" in log and "127.0.0.2" in log and "allowed_senders" in log


@pytest.mark.parametrize(
    "msh18, codec, pid5, expected",
    [
        (
            "~ISO IR87",
            "iso2022_jp",
            "Yamada^Taro^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P",
            "Yamada^Taro=山田^太郎=やまだ^たろう",
        ),
        ("ISO 2022-1994", "iso2022_jp", "渡邊^宗太~ソウタ^ワタナベ", "=渡邊^宗太=ソウタ^ワタナベ"),
        ("JIS X 0208", "iso2022_jp", "十河^能子", "=十河^能子"),
        ("SJIS", "cp932", "髙橋^表一~タカハシ^ヒョウイチ", "=髙橋^表一=タカハシ^ヒョウイチ"),
        ("Shift_JIS", "shift_jis", "渡邊^ソウタ", "=渡邊^ソウタ"),
        ("UNICODE UTF-8", "utf-8", "﨑山^太郎", "=﨑山^太郎"),
    ],
    ids=["iso-ir87", "iso-2022-1994", "jis-x-0208", "sjis", "shift_jis", "utf-8"],
)
def test_names_are_decoded_per_msh18(alive: Listener, msh18: str, codec: str, pid5: str, expected: str) -> None:
    control = "JP-" + msh18.replace(" ", "").replace("~", "")
    payload = adt(control, pid5=pid5, msh18=msh18).encode(codec)
    with connect(alive.port) as sock:
        sock.sendall(framed(payload))
        reply = read_block(sock)
    assert msa(reply)[:2] == ("AA", control)
    names = {a["message_control_id"]: a["patient_name"] for a in alive.admissions()}
    assert names[control] == expected
    family = expected.split("=")[1].split("^")[0] if expected.startswith("=") else "山田"
    assert family not in alive.log_text() and "Yamada" not in alive.log_text()  # no patient data in the log
    legit(alive)


def test_an_unknown_or_wrong_character_set_is_refused(alive: Listener) -> None:
    with connect(alive.port) as sock:
        sock.sendall(framed(adt("CS1", msh18="EBCDIC-JP").encode()))
        unknown = read_block(sock)
        sock.sendall(framed(adt("CS2", pid5="山田^太郎", msh18="UNICODE UTF-8").encode("cp932")))
        wrong = read_block(sock)
    assert msa(unknown)[:2] == ("AR", "CS1") and "EBCDIC-JP" in msa(unknown)[2]
    assert msa(wrong)[:2] == ("AR", "CS2") and "not valid UNICODE UTF-8" in msa(wrong)[2]
    legit(alive)


def test_garbage_gets_refusals_and_the_listener_keeps_serving(alive: Listener) -> None:
    rng = random.Random(7)
    noise = bytes(b for b in rng.randbytes(20000) if b not in (0x0B, 0x1C))
    with connect(alive.port) as sock:  # framed garbage, several blocks in one write: one ACK each
        sock.sendall(framed(noise[:5000]) + framed(b"") + framed(b"MSH|") + framed(b"MSH|^~\\&|" + noise[5000:]))
        replies = read_blocks(sock, 4)
    assert [msa(r)[0] for r in replies] == ["AR"] * 4
    legit(alive)
    with connect(alive.port) as sock:  # not MLLP at all
        sock.sendall(b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n")
        reply = wait_closed([sock], 2).get(sock, b"")
    assert msa(reply)[0] == "AR" and "outside an MLLP block" in msa(reply)[2]
    with connect(alive.port) as sock:  # random bytes with a start block somewhere in them
        send_quietly(sock, rng.randbytes(30000))
        assert sock in wait_closed([sock], IDLE_TIMEOUT + 2)
    legit(alive)


# -- TLS ----------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renkei test HL7 CA")])
    ca = (
        builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hl7 {stem}")]), ca_name, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, cert, key)
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _client_tls(files: dict[str, Path], with_certificate: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(files["ca.pem"]))
    if with_certificate:
        context.load_cert_chain(str(files["client.pem"]), str(files["client.key"]))
    return context


@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listener, dict[str, Path]]]:
    folder = tmp_path_factory.mktemp("hl7-tls")
    files = _certificates(folder)
    lst = _start(
        folder / "listener",
        tls={"cert": str(files["server.pem"]), "key": str(files["server.key"]), "ca": str(files["ca.pem"])},
    )
    lst.client_tls = _client_tls(files, with_certificate=True)
    try:
        yield lst, files
    finally:
        _stop(lst.process)


def test_tls_listener_serves_tls_clients_only(tls_listener: tuple[Listener, dict[str, Path]]) -> None:
    lst, files = tls_listener
    legit(lst)
    stall = connect(lst.port)  # a TCP connection that never starts its handshake
    try:
        with connect(lst.port) as sock:  # plaintext MLLP to the TLS port
            send_quietly(sock, framed(adt("PLAIN1")))
            legit(lst)
            closed = wait_closed([sock], HANDSHAKE_TIMEOUT + 2)
        assert sock in closed and b"MSA" not in closed[sock]
        with connect(lst.port) as raw:  # TLS without a client certificate: mutual TLS refuses it
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls = _client_tls(files, with_certificate=False).wrap_socket(raw, server_hostname="127.0.0.1")
                tls.sendall(framed(adt("NOCERT1")))
                if not read_block(tls, 5):
                    raise ConnectionError("closed without an ACK")
        legit(lst)
        assert stall in wait_closed([stall], HANDSHAKE_TIMEOUT + 2)
    finally:
        stall.close()
    assert {"PLAIN1", "NOCERT1"}.isdisjoint(a["message_control_id"] for a in lst.admissions())
    log = lst.log_text()
    assert "TLS handshake failed" in log and "WRONG_VERSION_NUMBER" in log
    assert lst.process.poll() is None
