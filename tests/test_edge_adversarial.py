"""Attacks on a running edge (`renkei edge serve`, a real process) from the network.

Each attack asserts two things: the edge refuses it (closes, aborts, rejects or
answers with a failure status, within its deadlines and without the memory the
attacker asked for), and a legitimate workstation is served within 1 s all the
while (`EchoMonitor`: a new association and a C-ECHO every 150 ms, each
latency recorded). The attackers are raw sockets; the workstation is pynetdicom.

One edge process serves the module; an attack that leaves it wedged (or dead)
fails its own test, and the next test gets a restarted edge. The region sets
short deadlines: setup_timeout 2 s, pdu_timeout 2 s, idle_evict_after 1 s,
query_time_budget 1 s, max_pdu 64 KiB.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from tests.helpers_attack import (
    A_ABORT,
    A_ASSOCIATE_AC_TYPE,
    A_ASSOCIATE_RJ_TYPE,
    CANCEL,
    CT_IMAGE_STORAGE,
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    P_DATA_TF,
    PENDING,
    SUCCESS,
    VERIFICATION,
    Accepted,
    AttackRegion,
    EchoMonitor,
    EdgeProcess,
    MemoryWatch,
    NotAccepted,
    Pair,
    associate_rq,
    attack_region,
    c_echo_rq,
    c_store_rq,
    client_context,
    close_all,
    command_set,
    connect,
    deflate_bomb,
    fill_store,
    is_failure,
    journaled,
    monitor_for,
    p_data,
    pdu,
    pdv,
    raw_associate,
    read_reply,
    read_response,
    read_until_closed,
    release,
    send_message,
    send_quietly,
    small_image,
    ui,
    us,
    wait_closed,
)
from tests.helpers_catalog import ROOT as CATALOG_ROOT
from tests.helpers_catalog import make_batch
from tests.helpers_edge import make_instance

MIB = 1024 * 1024
MAX_PDU = 64 * 1024  # limits.max_pdu in the test region
LIMITS = {"max_pdu": MAX_PDU}
MARGIN = 1.5  # seconds beyond a deadline for the edge's timers to fire and the close to arrive
STUDIES = 150  # studies in the edge store, one small instance each
LONG_STUDIES = 12  # of which with 64-character descriptions and names (work for a wildcard matcher)
LONG_DESCRIPTION = "abcdefghij" * 6 + "abcd"
LONG_NAME = "Aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa^Bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
HIDDEN_STUDY_NO = 4242  # a clinic-a study in the catalog, which no rule shares with the hub
HIDDEN_STUDY_UID = f"{CATALOG_ROOT}.{HIDDEN_STUDY_NO}"
ATTACKER = "127.0.0.66"  # an address the configuration does not know


# ------------------------------------------------------------------ fixtures
def _write_studies(folder: Path) -> list[Path]:
    files = []
    for i in range(STUDIES):
        long = i < LONG_STUDIES
        files.append(
            make_instance(
                folder / f"{i:04d}.dcm",
                study_uid=f"1.2.826.0.1.3680043.10.543.7.{i + 1}",
                series_uid=f"1.2.826.0.1.3680043.10.543.7.{i + 1}.1",
                patient_id=f"ATK{i % 50:03d}",
                patient_name=LONG_NAME if long else f"Patient^Number{i % 50}",
                description=LONG_DESCRIPTION if long else f"study {i}",
                size=8,
                seed=i,
            )
        )
    return files


def _register_hidden_study(region: AttackRegion) -> str:
    from renkei.catalog.catalog import Catalog
    from renkei.config import Layout, load_config

    catalog = Catalog.from_layout(Layout(load_config(region.config), region.data_dir))
    try:
        batch = make_batch(HIDDEN_STUDY_NO, 2, site="clinic-a", issuer="OURA-CLINIC", patient_id="CLA1")
        catalog.register(batch, origin_site="clinic-a")
        return batch.study.study_uid
    finally:
        catalog.close()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> AttackRegion:
    folder = tmp_path_factory.mktemp("attack")
    region = attack_region(folder / "plain", limits=LIMITS)
    fill_store(region.store_dir, _write_studies(folder / "studies"))
    assert _register_hidden_study(region) == HIDDEN_STUDY_UID
    return region


@pytest.fixture(scope="module")
def edge_process(region: AttackRegion) -> Iterator[EdgeProcess]:
    process = EdgeProcess(region).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def edge(edge_process: EdgeProcess) -> EdgeProcess:
    """The module's edge, restarted when an earlier attack left it dead or unresponsive."""
    if not edge_process.alive() or not EchoMonitor(edge_process.port, timeout=3).echo_once().ok:
        edge_process.restart()
    first = EchoMonitor(edge_process.port, timeout=5).echo_once()
    assert first.ok, f"the edge does not answer a plain C-ECHO: {first.detail}\n{edge_process.log_tail()}"
    return edge_process


def _served_throughout(edge: EdgeProcess, monitor: EchoMonitor, attack: str) -> None:
    edge.assert_alive(attack)
    monitor.check(1.0)


# ------------------------------------------------------------------ 1. oversized headers
@pytest.mark.slow
def test_huge_pdu_headers_before_association_are_neither_allocated_nor_waited_for(
    edge: EdgeProcess, region: AttackRegion
) -> None:
    setup = region.limits["setup_timeout"]
    headers = [
        (0x01, 0xFFFFFFFF),
        (0x01, 0x80000000),
        (0x01, 64 * 1024 + 1),
        (0x04, 0xFFFFFFF0),
        (0x02, 0xFFFFFFFF),
        (0x07, 0xFFFFFFFF),
        (0x05, 0x7FFFFFFF),
    ]
    socks: list[socket.socket] = []
    pushed: dict[int, int] = {}
    with EchoMonitor(edge.port) as monitor, MemoryWatch(edge) as memory:
        started = time.monotonic()

        def push(index: int, sock: socket.socket) -> None:
            # after the header, 24 MiB of body: an edge that allocated and read it grows by that much
            chunk = bytes(256 * 1024)
            sent = 0
            sock.settimeout(setup + MARGIN)
            try:
                while sent < 24 * MIB:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            pushed[index] = sent

        threads = []
        for index, (pdu_type, length) in enumerate(headers):
            sock = connect(edge.port, bind=ATTACKER)
            sock.sendall(struct.pack(">BBL", pdu_type, 0, length))
            socks.append(sock)
            threads.append(threading.Thread(target=push, args=(index, sock), daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(setup + 2 * MARGIN + 5)
        replies = [read_until_closed(sock, max(0.1, setup + MARGIN - (time.monotonic() - started))) for sock in socks]
        close_all(socks)
    problems = []
    for (pdu_type, length), (got, closed) in zip(headers, replies):
        if not closed:
            problems.append(
                f"type 0x{pdu_type:02X} length {length}: still open {setup + MARGIN:.1f} s later (replies: {got})"
            )
        if got.types - {A_ASSOCIATE_RJ_TYPE, A_ABORT}:
            problems.append(f"type 0x{pdu_type:02X} length {length}: answered {got}")
    assert not problems, "; ".join(problems)
    assert memory.growth < 50 * MIB, f"{memory.describe()}; body bytes the edge took: {pushed}"
    _served_throughout(edge, monitor, "huge PDU headers")


def test_associate_rq_over_the_limit_is_refused(edge: EdgeProcess, region: AttackRegion) -> None:
    # 127 proposed contexts of 40 transfer syntaxes each: about 120 KiB, over max_associate_rq (64 KiB)
    syntaxes = [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 90)]
    contexts = [(2 * i + 1, CT_IMAGE_STORAGE, syntaxes) for i in range(127)]
    request = associate_rq("HUB_SVR", "HUB_WS1", contexts)
    assert len(request) > 64 * 1024
    setup = region.limits["setup_timeout"]
    with EchoMonitor(edge.port) as monitor:
        sock = connect(edge.port, bind="127.0.0.1")
        started = time.monotonic()
        send_quietly(sock, request)
        replies, closed = read_until_closed(sock, setup + MARGIN)
        seconds = time.monotonic() - started
        sock.close()
    kinds = str(replies)
    assert A_ASSOCIATE_AC_TYPE not in replies.types, f"a {len(request)}-byte A-ASSOCIATE-RQ was accepted: {kinds}"
    assert closed, (
        f"the connection was still open {seconds:.1f} s after a {len(request)}-byte A-ASSOCIATE-RQ (replies: {kinds})"
    )
    _served_throughout(edge, monitor, "an oversized A-ASSOCIATE-RQ")


def test_p_data_over_the_advertised_maximum_is_aborted(edge: EdgeProcess, region: AttackRegion) -> None:
    ae = AE(ae_title="HUB_WS1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", edge.port, ae_title="HUB_SVR", bind_address=("127.0.0.1", 0))
    assert assoc.is_established
    advertised = int(assoc.acceptor.maximum_length or 0)
    assoc.release()
    assert 0 < advertised <= MAX_PDU, (
        f"the edge advertises a maximum PDU length of {advertised} (limits.max_pdu is {MAX_PDU}; 0 means unlimited)"
    )
    pdu_timeout = region.limits["pdu_timeout"]
    with EchoMonitor(edge.port) as monitor, MemoryWatch(edge) as memory:
        over = raw_associate(edge.port)
        assert over.max_pdu == advertised
        data = c_echo_rq() + bytes(advertised)  # one PDV longer than the edge accepts
        started = time.monotonic()
        send_quietly(over.sock, p_data(pdv(1, 0x03, data)))
        over_replies, over_closed = read_until_closed(over.sock, pdu_timeout + MARGIN)
        over_seconds = time.monotonic() - started
        over.sock.close()

        huge = raw_associate(edge.port)
        started = time.monotonic()
        send_quietly(huge.sock, struct.pack(">BBL", P_DATA_TF, 0, 0xFFFFFFFF))
        chunk = bytes(256 * 1024)
        for _ in range(96):  # 24 MiB of body, if the edge reads it
            if not send_quietly(huge.sock, chunk):
                break
        huge_replies, huge_closed = read_until_closed(
            huge.sock, max(0.1, pdu_timeout + MARGIN - (time.monotonic() - started))
        )
        huge.sock.close()
    kinds = str(over_replies)
    assert over_closed and over_replies.types <= {A_ABORT}, (
        f"a P-DATA-TF of {len(data) + 12} bytes (maximum {advertised}): replies {kinds}, "
        f"closed {over_closed} after {over_seconds:.1f} s"
    )
    kinds = str(huge_replies)
    assert huge_closed and huge_replies.types <= {A_ABORT}, (
        f"a P-DATA-TF header announcing 4 GiB: replies {kinds}, closed {huge_closed}"
    )
    assert memory.growth < 50 * MIB, memory.describe()
    _served_throughout(edge, monitor, "P-DATA over the maximum PDU length")


# ------------------------------------------------------------------ 2. slowloris
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["one byte each, 40 addresses", "nothing, one address"])
def test_slowloris_connections_are_closed_and_do_not_delay_others(
    edge: EdgeProcess, region: AttackRegion, variant: str
) -> None:
    setup = region.limits["setup_timeout"]
    with EchoMonitor(edge.port) as monitor:
        socks = []
        for i in range(40):
            if variant.startswith("one byte"):
                sock = connect(edge.port, bind=f"127.0.1.{i + 1}")
                sock.sendall(b"\x01")
            else:
                sock = connect(edge.port, bind=ATTACKER)
            socks.append(sock)
        closed = wait_closed(socks, setup + MARGIN)
        close_all(socks)
    still_open = sum(1 for c in closed if c is None)
    slowest = max((c for c in closed if c is not None), default=0.0)
    assert still_open == 0, (
        f"{still_open} of 40 stalled connections still open {setup + MARGIN:.1f} s "
        f"later (setup_timeout {setup} s); the others closed within {slowest:.2f} s"
    )
    _served_throughout(edge, monitor, f"slowloris ({variant})")


# ------------------------------------------------------------------ 3. slot exhaustion
def _open_silent(port: int, count: int) -> tuple[list[Accepted], list[str]]:
    accepted, refused = [], []
    for _ in range(count):
        try:
            accepted.append(raw_associate(port, calling="HUB_WS1", bind="127.0.0.1", timeout=3))
        except NotAccepted as exc:
            refused.append(str(exc.reply))
        except OSError as exc:
            refused.append(f"{type(exc).__name__}")
    return accepted, refused


def _still_open(accepted: list[Accepted]) -> int:
    import select

    count = 0
    for acc in accepted:
        readable, _, _ = select.select([acc.sock], [], [], 0)
        if not readable:
            count += 1
            continue
        try:
            acc.sock.setblocking(False)
            data = acc.sock.recv(65536, socket.MSG_PEEK)
        except (BlockingIOError, OSError):
            data = b""
        if data and data[0] != A_ABORT:
            count += 1
    return count


@pytest.mark.slow
def test_idle_associations_filling_every_slot_do_not_lock_out_a_workstation(
    edge: EdgeProcess, region: AttackRegion
) -> None:
    evict_after = region.limits["idle_evict_after"]
    attackers: list[Accepted] = []
    try:
        attackers, refused = _open_silent(edge.port, 70)
        open_now = _still_open(attackers)
        time.sleep(evict_after + 0.3)  # the attackers stay silent past idle_evict_after
        stop = threading.Event()

        def keep_filling() -> None:  # the attacker keeps taking every slot it can get
            while not stop.wait(0.1):
                more, _ = _open_silent(edge.port, 1)
                attackers.extend(more)

        filler = threading.Thread(target=keep_filling, daemon=True)
        with EchoMonitor(edge.port) as monitor:
            filler.start()
            monitor_for(3.0)
            stop.set()
            filler.join(10)
    finally:
        close_all(a.sock for a in attackers)
    assert open_now <= 16, (
        f"{open_now} silent associations from one address held at once (max_per_address 16); {len(refused)} refused"
    )
    _served_throughout(edge, monitor, "70 idle associations from the workstation's own AE and address")
    after = EchoMonitor(edge.port, timeout=5).echo_once()
    assert after.ok and after.latency < 1.0, f"after the attackers left: {after}"


# ------------------------------------------------------------------ 4. TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The region CA (renkei.pki), the hub edge's site certificate, AE certificates, and another CA."""
    from renkei import pki as region_pki

    folder = tmp_path_factory.mktemp("pki")
    ca_cert, _ca_key = region_pki.create_ca(folder / "ca", "test")
    region_pki.create_ca(folder / "other-ca", "other")

    def issue(ca: str, site_id: str, ae_title: str | None = None, **kwargs) -> Pair:
        return Pair(*region_pki.issue(folder / ca, folder / ca / site_id, site_id=site_id, ae_title=ae_title, **kwargs))

    edge = issue("ca", "hub", hosts=["127.0.0.1", "localhost"], name="edge")
    return {
        "ca": ca_cert,
        "edge": edge,
        "ws1": issue("ca", "hub", "HUB_WS1", hosts=["127.0.0.1"]),
        "cla_ws": issue("ca", "clinic-a", "CLA_WS"),
        "foreign": issue("other-ca", "hub", "HUB_WS1"),
    }


@pytest.fixture(scope="module")
def tls_edge(tmp_path_factory: pytest.TempPathFactory, pki: dict) -> Iterator[EdgeProcess]:
    region = attack_region(
        tmp_path_factory.mktemp("attack-tls"),
        limits=LIMITS,
        tls={"cert": str(pki["edge"].cert), "key": str(pki["edge"].key), "ca": str(pki["ca"])},
    )
    process = EdgeProcess(region, "tls-edge").start()
    try:
        yield process
    finally:
        process.stop()


def _tls_monitor(tls_edge: EdgeProcess, pki: dict) -> EchoMonitor:
    return EchoMonitor(tls_edge.port, tls=client_context(pki["ca"], pki["ws1"]))


@pytest.mark.slow
def test_tls_connections_that_never_handshake_do_not_delay_others(tls_edge: EdgeProcess, pki: dict) -> None:
    first = _tls_monitor(tls_edge, pki).echo_once()
    assert first.ok, f"HUB_WS1 with its own certificate: {first.detail}\n{tls_edge.log_tail()}"
    setup = tls_edge.region.limits["setup_timeout"]
    with _tls_monitor(tls_edge, pki) as monitor:
        socks = [connect(tls_edge.port, bind=f"127.0.3.{i + 1}") for i in range(40)]
        closed = wait_closed(socks, setup + MARGIN)
        close_all(socks)
    still_open = sum(1 for c in closed if c is None)
    assert still_open == 0, (
        f"{still_open} of 40 connections without a TLS handshake still open "
        f"{setup + MARGIN:.1f} s later (setup_timeout {setup} s includes the handshake)"
    )
    _served_throughout(tls_edge, monitor, "TCP connections that never start TLS")


def test_tls_certificate_of_another_ae_or_another_ca_is_refused(tls_edge: EdgeProcess, pki: dict) -> None:
    cases = {
        "CLA_WS's certificate (same CA) claiming HUB_WS1": client_context(pki["ca"], pki["cla_ws"]),
        "HUB_WS1 certificate from another CA": client_context(pki["ca"], pki["foreign"]),
        "no client certificate": client_context(pki["ca"], None),
    }
    problems = []
    with _tls_monitor(tls_edge, pki) as monitor:
        for name, context in cases.items():
            try:
                acc = raw_associate(tls_edge.port, calling="HUB_WS1", tls=context, timeout=5)
            except NotAccepted as exc:
                if name.startswith("CLA_WS") and not (
                    exc.reply.kind == "pdu" and exc.reply.pdu_type == A_ASSOCIATE_RJ_TYPE
                ):
                    problems.append(f"{name}: expected an A-ASSOCIATE-RJ after the handshake, got {exc.reply}")
                continue
            except (ssl.SSLError, OSError):
                if name.startswith("CLA_WS"):
                    problems.append(f"{name}: the handshake itself failed (the CA signed it)")
                continue  # the handshake failed: refused
            problems.append(f"{name}: association accepted")
            release(acc)
    assert not problems, "; ".join(problems)
    _served_throughout(tls_edge, monitor, "certificates naming another AE or from another CA")


# ------------------------------------------------------------------ 5. who may associate
def test_ae_titles_are_accepted_only_from_their_addresses_and_for_this_edge(edge: EdgeProcess) -> None:
    cases = [  # (calling AE, called AE, source address, accepted?)
        ("HUB_WS1", "HUB_SVR", "127.0.0.1", True),
        ("HUB_WS1", "HUB_SVR", "127.0.0.2", False),
        ("HUB_WS2", "HUB_SVR", "127.0.0.3", True),  # networks: [127.0.0.3/32]
        ("HUB_WS2", "HUB_SVR", "127.0.0.4", False),
        ("CLA_SVR", "HUB_SVR", "127.0.0.1", False),  # another site's edge
        ("CLA_WS", "HUB_SVR", "127.0.0.1", False),  # another site's workstation
        ("HUB_WS1", "NOT_HUB", "127.0.0.1", False),  # wrong called AE title
        ("HUB_WS1", "CLA_SVR", "127.0.0.1", False),
    ]
    problems = []
    with EchoMonitor(edge.port) as monitor:
        for calling, called, address, expected in cases:
            # a generous ACSE timeout: on a loaded machine 5 s passed before the A-ASSOCIATE-RJ arrived,
            # and the requestor's own abort was then taken for the edge's answer
            result = EchoMonitor(edge.port, calling_ae=calling, called_ae=called, bind=address, timeout=30).echo_once()
            if result.ok != expected:
                problems.append(
                    f"{calling} -> {called} from {address}: "
                    f"{'accepted' if result.ok else result.detail}, expected "
                    f"{'accepted' if expected else 'rejected'}"
                )
            elif not expected and result.detail != "association rejected":
                problems.append(f"{calling} -> {called} from {address}: {result.detail} (expected an A-ASSOCIATE-RJ)")
    assert not problems, "; ".join(problems)
    _served_throughout(edge, monitor, "spoofed AE titles")


# ------------------------------------------------------------------ 6. wildcard bombs and C-CANCEL
def _find_ae() -> AE:
    ae = AE(ae_title="HUB_WS1")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = 5
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae


def _find(port: int, **keys: str) -> tuple[int | None, int, float]:
    """(final status, pending answers, seconds to the final status) of one STUDY level C-FIND."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    ae = _find_ae()
    assoc = ae.associate("127.0.0.1", port, ae_title="HUB_SVR", bind_address=("127.0.0.1", 0))
    assert assoc.is_established
    started = time.monotonic()
    final, pending = None, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # values over their VR's length, on purpose
            for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if status is not None and "Status" in status else None
                if code in PENDING:
                    pending += 1
                    continue
                final = code
        return final, pending, time.monotonic() - started
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


BOMB = "*?*?*?*?*?*?*?*?*X"


@pytest.mark.parametrize("keyword", ["StudyDescription", "PatientName"])
def test_wildcard_bomb_is_answered_quickly(edge: EdgeProcess, keyword: str) -> None:
    assert sum(BOMB.count(c) for c in "*?") <= 32
    with EchoMonitor(edge.port) as monitor:
        status, pending, seconds = _find(edge.port, **{keyword: BOMB})
    assert status is not None, f"{keyword}={BOMB!r}: no final C-FIND response within 5 s ({pending} answers)"
    assert seconds < 2.0, f"{keyword}={BOMB!r}: answered after {seconds:.2f} s (status 0x{status:04X})"
    assert status == SUCCESS or is_failure(status), f"{keyword}={BOMB!r}: status 0x{status:04X}"
    _served_throughout(edge, monitor, f"a wildcard bomb in {keyword}")


@pytest.mark.parametrize("case", ["33+ wildcards", "1100 characters"])
@pytest.mark.parametrize("keyword", ["StudyDescription", "PatientName"])
def test_query_over_the_wildcard_and_length_limits_is_refused(edge: EdgeProcess, keyword: str, case: str) -> None:
    value = "*?" * 17 + "X" if case.startswith("33") else "a" * 1100
    with EchoMonitor(edge.port) as monitor:
        status, pending, seconds = _find(edge.port, **{keyword: value})
    assert status is not None, f"{keyword} with {case}: no final C-FIND response within 5 s"
    assert is_failure(status), (
        f"{keyword} with {case}: status 0x{status:04X} after {pending} answers, expected a failure (A900 or Cxxx)"
    )
    assert pending == 0, f"{keyword} with {case}: {pending} answers before the refusal"
    _served_throughout(edge, monitor, f"a {case} query")


def test_c_cancel_during_a_long_query_is_honoured(edge: EdgeProcess) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientName = "*"
    query.StudyDescription = ""
    ae = _find_ae()
    with EchoMonitor(edge.port) as monitor:
        assoc = ae.associate("127.0.0.1", edge.port, ae_title="HUB_SVR", bind_address=("127.0.0.1", 0))
        assert assoc.is_established
        context_id = next(
            cx.context_id
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
        )
        final, pending, cancelled_at, seconds = None, 0, None, 0.0
        try:
            for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=77):
                code = int(status.Status) if status is not None and "Status" in status else None
                if code in PENDING:
                    pending += 1
                    if cancelled_at is None:
                        assoc.send_c_cancel(77, context_id)
                        cancelled_at = time.monotonic()
                    continue
                final = code
                seconds = time.monotonic() - (cancelled_at or time.monotonic())
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    assert cancelled_at is not None, f"the query had no answer to cancel after (final status {final})"
    assert final == CANCEL, (
        f"C-CANCEL after the first of {STUDIES} answers: final status "
        f"{'none' if final is None else hex(final)} after {pending} answers"
    )
    assert pending < STUDIES and seconds < 1.0, f"cancelled after {pending} answers, {seconds:.2f} s"
    _served_throughout(edge, monitor, "a cancelled query")


# ------------------------------------------------------------------ 7. a UID with a newline
def test_c_store_with_a_newline_in_the_sop_instance_uid_is_refused(edge: EdgeProcess, region: AttackRegion) -> None:
    study_uid, series_uid = "1.2.826.0.1.3680043.10.543.8.1", "1.2.826.0.1.3680043.10.543.8.1.1"
    bad_uid = b"1.2.3.4\n"
    good_uid = "1.2.826.0.1.3680043.10.543.8.1.1." + str(int(time.time() * 1000))
    with EchoMonitor(edge.port) as monitor:
        acc = raw_associate(edge.port, calling="HUB_WS1", contexts=[(1, CT_IMAGE_STORAGE, (EXPLICIT_LE,))])
        try:
            assert 1 in acc.contexts, f"CT Image Storage not accepted: {acc.contexts}"
            assert send_message(
                acc, 1, c_store_rq(CT_IMAGE_STORAGE, bad_uid, 1), small_image(bad_uid, study_uid, series_uid)
            ), "cut off while sending"
            bad = read_response(acc, 5)
            good = None
            if bad.status is not None:
                assert send_message(
                    acc, 1, c_store_rq(CT_IMAGE_STORAGE, good_uid, 2), small_image(good_uid, study_uid, series_uid)
                ), "cut off while sending"
                good = read_response(acc, 5)
        finally:
            release(acc)
    assert is_failure(bad.status), f"SOP Instance UID '1.2.3.4\\n': {bad}, expected a failure status"
    for uid in ("1.2.3.4\n", "1.2.3.4", "1.2.3.4 "):
        assert not journaled(region.store_dir, uid), f"{uid!r} was journaled"
    assert good is not None and good.status == SUCCESS, f"the next valid C-STORE: {good}"
    assert journaled(region.store_dir, good_uid)
    _served_throughout(edge, monitor, "a UID with a newline")


# ------------------------------------------------------------------ 8. deflate bomb
@pytest.mark.slow
def test_deflate_bomb_is_refused_without_inflating_it(edge: EdgeProcess, region: AttackRegion) -> None:
    sop_uid = "1.2.826.0.1.3680043.10.543.8.2.1.1"
    bomb = deflate_bomb(300 * MIB, "1.2.826.0.1.3680043.10.543.8.2", "1.2.826.0.1.3680043.10.543.8.2.1", sop_uid)
    assert len(bomb) < 400 * 1024, len(bomb)
    with EchoMonitor(edge.port) as monitor, MemoryWatch(edge) as memory:
        acc = raw_associate(edge.port, contexts=[(1, CT_IMAGE_STORAGE, (DEFLATED_LE,))])
        try:
            assert acc.contexts.get(1) == DEFLATED_LE, f"deflated syntax not accepted: {acc.contexts}"
            sent = send_message(acc, 1, c_store_rq(CT_IMAGE_STORAGE, sop_uid), bomb)
            response = read_response(acc, 10) if sent else None
        finally:
            release(acc)
        monitor_for(0.5)
    assert response is not None and is_failure(response.status), (
        f"a {len(bomb) // 1024} KiB dataset inflating to 300 MiB: {response or 'cut off while sending'}, "
        f"expected a failure status; {memory.describe()}"
    )
    assert memory.growth < 100 * MIB, memory.describe()
    assert not journaled(region.store_dir, sop_uid)
    _served_throughout(edge, monitor, "a deflate bomb")


# ------------------------------------------------------------------ 9. malformed P-DATA
MALFORMED = {
    "PDV item length 0xFFFFFF00": p_data(struct.pack(">LBB", 0xFFFFFF00, 1, 0x03) + c_echo_rq()),
    "PDV item length 1": p_data(struct.pack(">LB", 1, 1) + b"\x03" + c_echo_rq()),
    "PDV item longer than its PDU": pdu(P_DATA_TF, struct.pack(">LBB", len(c_echo_rq()) + 40, 1, 0x03) + c_echo_rq()),
    "command element length past the end": p_data(
        pdv(
            1,
            0x03,
            command_set([(0x0002, ui(VERIFICATION)), (0x0100, us(0x0030))])
            + struct.pack("<HHL", 0, 0x0110, 0xFFFFFFF0)
            + us(1),
        )
    ),
    "command element cut inside its header": p_data(pdv(1, 0x03, c_echo_rq() + b"\x00\x00\x10")),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_p_data_gets_an_a_abort(edge: EdgeProcess, region: AttackRegion, case: str) -> None:
    with EchoMonitor(edge.port) as monitor:
        acc = raw_associate(edge.port)
        send_quietly(acc.sock, MALFORMED[case])
        replies, closed = read_until_closed(acc.sock, region.limits["pdu_timeout"] + MARGIN)
        acc.sock.close()
    kinds = str(replies)
    assert replies and replies[0].pdu_type == A_ABORT, f"{case}: replies {kinds}, closed {closed}"
    assert closed, f"{case}: the connection stayed open after {kinds}"
    _served_throughout(edge, monitor, f"malformed P-DATA ({case})")


def test_associate_rq_without_presentation_contexts_is_rejected(edge: EdgeProcess) -> None:
    with EchoMonitor(edge.port) as monitor:
        sock = connect(edge.port, bind="127.0.0.1")
        send_quietly(sock, associate_rq("HUB_SVR", "HUB_WS1", contexts=()))
        reply = read_reply(sock, 5)
        sock.close()
    assert reply.kind == "pdu" and reply.pdu_type == A_ASSOCIATE_RJ_TYPE, f"got {reply}"
    _served_throughout(edge, monitor, "an A-ASSOCIATE-RQ without presentation contexts")


# ------------------------------------------------------------------ 10. retrieval answers leak nothing
def _c_get(port: int, study_uid: str) -> dict[str, int | None]:
    ae = AE(ae_title="HUB_WS1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="HUB_SVR",
        bind_address=("127.0.0.1", 0),
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = None
    try:
        for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status and int(status.Status) not in PENDING:
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    assert final is not None, f"C-GET {study_uid}: no final response"
    return {
        "status": int(final.Status),
        **{
            k: (int(final.get(k)) if final.get(k) is not None else None)
            for k in (
                "NumberOfRemainingSuboperations",
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            )
        },
    }


def test_c_get_of_a_study_held_elsewhere_answers_as_for_one_that_does_not_exist(
    edge: EdgeProcess, region: AttackRegion
) -> None:
    hidden = HIDDEN_STUDY_UID
    with EchoMonitor(edge.port) as monitor:
        elsewhere = _c_get(edge.port, hidden)
        nowhere = _c_get(edge.port, generate_uid())
    assert elsewhere == nowhere, (
        f"a clinic-a study the hub may not see: {elsewhere}; a UID that exists nowhere: {nowhere}"
    )
    _served_throughout(edge, monitor, "probing for other sites' studies")


# ------------------------------------------------------------------ properties of the PDU reader
def _fastnet_reader():
    from renkei.edge import fastnet

    reader = getattr(fastnet, "read_pdu", None)
    if reader is None:
        pytest.skip("edge.fastnet has no read_pdu yet")
    return fastnet, reader


def _stream(data: bytes):
    """recv(n) over bytes, recording how much was asked for at once."""
    pos = 0
    asked: list[int] = []

    def recv(n: int) -> bytes:
        nonlocal pos
        asked.append(n)
        chunk = data[pos : pos + n]
        pos += len(chunk)
        return chunk

    return recv, asked


VALID_RQ = associate_rq("HUB_SVR", "HUB_WS1", [(1, VERIFICATION, (IMPLICIT_LE, EXPLICIT_LE))])
VALID_PDATA = p_data(pdv(1, 0x03, c_echo_rq()))


def _mutated(base: bytes):
    return st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=6).map(
        lambda edits: bytes(b if i not in dict(edits) else dict(edits)[i] for i, b in enumerate(base))
    )


STREAMS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda t, n, tail: struct.pack(">BBL", t, 0, n) + tail,
        st.integers(0, 255),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=200),
    ),
    _mutated(VALID_RQ),
    _mutated(VALID_PDATA),
    st.builds(lambda cut: VALID_RQ[:cut], st.integers(0, len(VALID_RQ))),
)


@settings(max_examples=300, deadline=None, database=None)
@given(data=STREAMS, associated=st.booleans())
def test_read_pdu_never_allocates_past_its_limits(data: bytes, associated: bool) -> None:
    fastnet, read_pdu = _fastnet_reader()
    recv, asked = _stream(data)
    try:
        result = read_pdu(recv, associated=associated, max_pdu=MAX_PDU, max_associate=64 * 1024)
    except (fastnet.PDUError, EOFError):
        result = None
    assert all(n <= max(MAX_PDU, 64 * 1024) for n in asked), f"asked recv for {max(asked)} bytes at once"
    if result is not None:
        pdu_type, header, body = result
        assert 1 <= pdu_type <= 7 and len(header) == 6
        assert struct.unpack(">L", bytes(header[2:6]))[0] == len(body)
        assert bytes(header) + bytes(body) == data[: 6 + len(body)]


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.one_of(STREAMS, st.builds(lambda a, b: VALID_RQ + a + b, _mutated(VALID_PDATA), st.binary(max_size=100)))
)
def test_random_streams_never_crash_the_edge(edge: EdgeProcess, region: AttackRegion, data: bytes) -> None:
    """Whatever arrives, the edge answers with well-formed PDUs and closes once the stream ends."""
    deadline = region.limits["setup_timeout"] + MARGIN
    edge_process = edge
    sock = connect(edge_process.port, bind=ATTACKER)
    try:
        send_quietly(sock, data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        replies, closed = read_until_closed(sock, deadline)
    finally:
        sock.close()
    edge_process.assert_alive(f"the stream {data[:40]!r}...")
    assert closed, f"the edge kept the connection open {deadline:.1f} s after the stream {data[:60]!r} ended"
    assert replies.types <= {0x02, 0x03, 0x04, 0x06, 0x07}, f"replies {replies} to {data[:60]!r}"
    echo = EchoMonitor(edge_process.port, timeout=3).echo_once()
    assert echo.ok and echo.latency < 1.0, f"after {data[:60]!r}: {echo}"
