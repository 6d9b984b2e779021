"""pynetdicom's association machinery, tuned for throughput on one association.

pynetdicom 3.0 polls: its DUL thread sleeps 1 ms whenever it finds nothing to
do, its association thread sleeps 1 ms before each look at the message queue,
and sockets are read 4 KiB at a time and carry Nagle's algorithm. On a C-STORE
stream (request, response, request...) those sleeps add up to milliseconds per
instance. These subclasses keep pynetdicom's state machine, services and
events untouched and change how threads wait, and where C-STORE is served:

- `FastDUL` waits in `select()` on the socket and on a wake-up pipe that
  `send_pdu` writes to, so it reacts at once to incoming data and to outgoing
  responses; P-DATA values stay memoryviews of the received PDU; and with a
  `store_handler` it serves C-STORE requests itself (command parsed, dataset
  streamed to a `StoreSink` fragment by fragment, C-STORE-RSP written back),
  handing every other message to pynetdicom unchanged;
- `FastAssociation` blocks on the DIMSE message queue instead of sleeping;
- `FastSocket` reads a whole PDU with large `recv_into` calls, TCP_NODELAY on;
- `EdgeRequestHandler` / `EdgeAssociationServer` build those for every
  accepted connection (TLS handshake with TCP_NODELAY set first);
- `FastAE.associate` (as a requestor) gets the same DUL and socket;
- `send_stored` sends a C-STORE whose dataset is a stored file's bytes, and
  `paused` holds a requestor's reactor for a whole batch of them.

Everything relies on pynetdicom 3.0's internal names; `check_compatible()`
says whether they are there, and the edge falls back to plain pynetdicom when
they are not, or when RENKEI_EDGE_FAST=0 (`enabled()`): the way out for an
operator if the fast path misbehaves, and how the edge's tests run both paths.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

LOGGER = logging.getLogger(__name__)

# How long an idle thread waits before re-checking timers and flags (seconds).
IDLE_WAIT = 0.05


@lru_cache(maxsize=1)
@functools.cache
def check_compatible() -> bool:
    """True when pynetdicom has the internals these classes rely on."""
    needed = [
        (
            DULServiceProvider,
            ("_process_recv_primitive", "_is_transport_event", "send_pdu", "_run_loop_delay", "kill_dul"),
        ),
        (Association, ("_serve_request", "_reactor_checkpoint", "dimse", "acse", "_run_reactor")),
        (AssociationSocket, ("recv", "ready", "_create_socket")),
        (RequestHandler, ("_create_association",)),
    ]
    probe_assoc = None
    try:
        probe_assoc = Association(AE(), MODE_ACCEPTOR)
        for cls, names in needed:
            for name in names:
                holder = probe_assoc if cls is Association else (probe_assoc.dul if cls is DULServiceProvider else cls)
                if not hasattr(holder, name):
                    return False
        return hasattr(probe_assoc.dimse, "msg_queue")
    except Exception:
        return False


FAST_ENV = "RENKEI_EDGE_FAST"


def turned_off() -> bool:
    """RENKEI_EDGE_FAST says 0 (or false, no, off)."""
    return os.environ.get(FAST_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    """The fast path is used: pynetdicom has what it needs and RENKEI_EDGE_FAST is not 0."""
    return not turned_off() and check_compatible()


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class FastSocket(AssociationSocket):
    """An AssociationSocket that reads whole PDUs with few system calls, within a deadline.

    `deadline` (a time.monotonic() value, or None) bounds every `recv`: a peer
    that sends a PDU header and then trickles (or stops) cannot hold the
    reading thread past it. `setup_deadline` bounds the time from connect to a
    complete A-ASSOCIATE-RQ (set on accepted connections).
    """

    deadline: float | None = None
    setup_deadline: float | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        deadline = self.deadline
        try:
            while received < nr_bytes:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the peer sent {received} of {nr_bytes} bytes within the deadline")
                    sock.settimeout(remaining)
                n = sock.recv_into(view[received:], nr_bytes - received)
                if not n:
                    return buffer[:received]
                received += n
        finally:
            del view
        return buffer

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        set_nodelay(sock)
        return sock


# ------------------------------------------------------------------ PDU framing
A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07
_FIXED_LENGTH = {A_ASSOCIATE_RJ_TYPE: 4, A_RELEASE_RQ_TYPE: 4, A_RELEASE_RP_TYPE: 4, A_ABORT_TYPE: 4}
DEFAULT_MAX_PDU = 1024 * 1024
DEFAULT_MAX_ASSOCIATE = 64 * 1024


class PDUError(ValueError):
    """A PDU the peer may not send here: unknown type, or a length over the limits."""


def check_pdu_header(
    header: bytes | bytearray,
    *,
    associated: bool,
    max_pdu: int = DEFAULT_MAX_PDU,
    max_associate: int = DEFAULT_MAX_ASSOCIATE,
) -> tuple[int, int]:
    """(PDU type, body length) of a 6-byte PDU header, checked before any body is read.

    Before an association exists only association PDUs (at most `max_associate`
    bytes) may arrive; P-DATA-TF is capped at the advertised `max_pdu`; the
    release, reject and abort PDUs have their fixed length. Raises PDUError.
    """
    if len(header) != 6:
        raise PDUError(f"a PDU header has 6 bytes, not {len(header)}")
    pdu_type, _reserved, length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        raise PDUError(f"unknown PDU type 0x{pdu_type:02X}")
    fixed = _FIXED_LENGTH.get(pdu_type)
    if fixed is not None and length != fixed:
        raise PDUError(f"PDU type 0x{pdu_type:02X} has {fixed} bytes, not {length}")
    if pdu_type in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE) and length > max_associate:
        raise PDUError(f"an association PDU of {length} bytes is over the limit of {max_associate}")
    if pdu_type == P_DATA_TF_TYPE:
        if not associated:
            raise PDUError("P-DATA-TF before the association was accepted")
        if max_pdu and length > max_pdu:
            raise PDUError(f"a P-DATA-TF PDU of {length} bytes is over the advertised maximum of {max_pdu}")
    return pdu_type, length


def read_pdu(
    recv: Callable[[int], bytes | bytearray],
    *,
    associated: bool,
    max_pdu: int = DEFAULT_MAX_PDU,
    max_associate: int = DEFAULT_MAX_ASSOCIATE,
) -> tuple[int, bytes | bytearray, bytes | bytearray] | None:
    """One PDU from `recv(n)` (which returns at most n bytes, fewer at the end of the stream).

    Returns (type, header, body), or None when the stream ended cleanly before
    a header; raises PDUError for a PDU refused by `check_pdu_header` (nothing
    of its body is read or allocated) and EOFError for a truncated PDU.
    """
    header = recv(6)
    if not header:
        return None
    if len(header) < 6:
        raise EOFError(f"the connection ended inside a PDU header ({len(header)} of 6 bytes)")
    pdu_type, length = check_pdu_header(header, associated=associated, max_pdu=max_pdu, max_associate=max_associate)
    body = recv(length) if length else b""
    if len(body) != length:
        raise EOFError(f"the connection ended inside a PDU ({len(body)} of {length} bytes)")
    return pdu_type, header, body


class _PDataView:
    """A received P-DATA-TF PDU whose presentation data values are memoryviews of its body."""

    def __init__(self, body: bytearray) -> None:
        view = memoryview(body)
        items: list[tuple[int, memoryview]] = []
        offset, end = 0, len(view)
        while offset < end:
            if offset + 6 > end:
                raise ValueError("truncated presentation data value item")
            (item_length,) = struct.unpack_from(">L", view, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                raise ValueError(f"presentation data value item of {item_length} bytes does not fit")
            context_id = view[offset + 4]
            items.append((context_id, view[offset + 5 : offset + 4 + item_length]))
            offset += 4 + item_length
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # the public setter insists on bytes; memoryviews serve every reader the same
        primitive._presentation_data_value_list = cast(Any, self.items)
        return primitive


# ------------------------------------------------------------------ C-STORE fast path
KEEP_IN_MEMORY = 32 * 1024 * 1024  # datasets above this are not held in memory, only written
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATASET = 0x0101


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE request whose command has arrived (its dataset follows)."""

    assoc: Association
    context_id: int
    transfer_syntax_uid: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


class StoreSink(Protocol):
    """Receives one C-STORE dataset: each fragment as it arrives, then the whole."""

    def write(self, fragment: memoryview) -> None: ...

    def finish(self, data: bytes | memoryview | list[memoryview] | None) -> int:
        """Store the dataset, whole or as the list of its fragments in order (None: too
        large to keep, read it back from what was written); return the C-STORE
        status, only once it is durable."""
        ...

    def abort(self) -> None:
        """The association ended before the dataset did: drop what was received."""
        ...


StoreHandler = Callable[[StoreRequest], StoreSink]


def parse_command(raw: bytes | memoryview) -> dict[int, bytes]:
    """The elements of a DIMSE command set (implicit VR little endian): element number -> value."""
    view = memoryview(raw)
    out: dict[int, bytes] = {}
    pos, end = 0, len(view)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHL", view, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError("malformed command set")
        out[elem] = bytes(view[pos : pos + length])
        pos += length
    if pos != end:
        raise ValueError("malformed command set")
    return out


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def _ui(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").rstrip("\x00 ")


def _command_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _ui_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(
    context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """A whole P-DATA-TF PDU carrying a C-STORE-RSP command set."""
    body = b"".join(
        (
            _command_element(0x0002, _ui_bytes(sop_class_uid)),
            _command_element(0x0100, struct.pack("<H", C_STORE_RSP)),
            _command_element(0x0120, struct.pack("<H", message_id)),
            _command_element(0x0800, struct.pack("<H", NO_DATASET)),
            _command_element(0x0900, struct.pack("<H", status)),
            _command_element(0x1000, _ui_bytes(sop_instance_uid)),
        )
    )
    command = _command_element(0x0000, struct.pack("<L", len(body))) + body
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


class FastDUL(DULServiceProvider):
    """A DUL provider that sleeps in select() and is woken by outgoing primitives."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.daemon = True  # a stalled peer must not keep the process alive at exit
        self.store_handler: StoreHandler | None = getattr(assoc.ae, "store_handler", None)
        self._command_frags: list[tuple[int, memoryview]] = []  # command PDVs not yet complete
        self._store: dict[str, Any] | None = None  # the C-STORE whose dataset is arriving
        self._pass_dataset = False  # the current message's dataset goes to pynetdicom
        self.last_activity = time.monotonic()  # of the last PDU received (for idle eviction)
        ae = assoc.ae  # the limits the edge set on its AE
        self._max_associate = int(getattr(ae, "max_associate_rq", DEFAULT_MAX_ASSOCIATE))
        self._pdu_timeout = float(getattr(ae, "pdu_timeout", 30.0))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except (BlockingIOError, OSError):
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _idle_wait(self) -> None:
        """Wait until the socket has data, a primitive is queued, or IDLE_WAIT passes."""
        assoc_sock = self.socket
        raw = getattr(assoc_sock, "socket", None) if assoc_sock is not None else None
        connected = bool(raw is not None and getattr(assoc_sock, "_is_connected", False))
        if connected and isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        try:
            watched: list[Any] = [self._wake_r, raw] if connected else [self._wake_r]
            ready, _, _ = select.select(watched, [], [], IDLE_WAIT if connected else 0.001)
        except (OSError, ValueError):
            time.sleep(0.001)
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _check_setup_deadline(self) -> None:
        """A connection that has not sent a whole A-ASSOCIATE-RQ by its set-up deadline is closed."""
        sock = self.socket
        if not isinstance(sock, FastSocket) or sock.setup_deadline is None:
            return
        if self.state_machine.current_state != "Sta2":
            if self.state_machine.current_state not in ("Sta1", "Sta2"):
                sock.setup_deadline = None  # past set-up: the deadline no longer applies
            return
        if time.monotonic() < sock.setup_deadline:
            return
        sock.setup_deadline = None
        LOGGER.info(
            "connection from %s sent no association request within the set-up deadline: closed",
            peer_address(self.assoc),
        )
        self._close_transport(abort=False)

    def _send_abort(self) -> None:
        """Send an A-ABORT (service-provider source) straight to the socket; never raises."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            cast(AssociationSocket, self.socket).send(abort_pdu.encode())
        except Exception:
            pass

    def _close_transport(self, abort: bool) -> None:
        """End the connection from this side (after an A-ABORT when `abort`): the state machine sees it closed."""
        if abort:
            self._send_abort()
        try:
            cast(socket.socket, cast(AssociationSocket, self.socket).socket).shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
        self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        """Read one PDU within the limits; P-DATA-TF values stay views on the received buffer.

        The header is checked before the body is read (`check_pdu_header`), and
        the whole PDU must arrive within the PDU deadline (and, before the
        association, within the set-up deadline). Other PDU types go through
        pynetdicom's decoder as before.
        """
        sock = cast(AssociationSocket, self.socket)
        # what this side advertised (as acceptor or requestor); 0 is pynetdicom's "unlimited"
        local = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
        max_pdu, max_associate, pdu_timeout = int(local.maximum_length or 0), self._max_associate, self._pdu_timeout
        state = self.state_machine.current_state
        associated = state not in ("Sta1", "Sta2", "Sta3", "Sta4", "Sta5")
        if isinstance(sock, FastSocket):
            deadline = time.monotonic() + pdu_timeout
            if sock.setup_deadline is not None and not associated:
                deadline = min(deadline, sock.setup_deadline)
            sock.deadline = deadline
        try:
            pdu_read = read_pdu(sock.recv, associated=associated, max_pdu=max_pdu, max_associate=max_associate)
        except PDUError as exc:
            # the stream cannot be resynchronised (the body was never read): abort once and close
            LOGGER.warning("invalid PDU from %s, aborting: %s", peer_address(self.assoc), exc)
            self._close_transport(abort=True)
            return
        except (OSError, TimeoutError, EOFError) as exc:
            LOGGER.info("connection with %s closed: %s", peer_address(self.assoc), exc or type(exc).__name__)
            self.event_queue.put("Evt17")
            return
        finally:
            if isinstance(sock, FastSocket):
                sock.deadline = None
        if pdu_read is None:
            self.event_queue.put("Evt17")
            return
        self.last_activity = time.monotonic()
        pdu_type, header, body = pdu_read
        if pdu_type == 0x04:
            try:
                pdu: Any = _PDataView(cast(bytearray, body))
                if self.store_handler is not None and state == "Sta6":
                    pdu.items = self._route(pdu.items)
            except Exception as exc:  # malformed values, commands or a failing handler: abort, never crash
                LOGGER.warning("invalid P-DATA-TF PDU from %s, aborting: %s", peer_address(self.assoc), exc)
                self.event_queue.put("Evt19")
                return
            if pdu.items:
                self.event_queue.put("Evt10")
                self._recv_pdu.put(pdu)
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception as exc:
            LOGGER.warning("undecodable PDU from %s, aborting: %s", peer_address(self.assoc), exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _route(self, items: list[tuple[int, memoryview]]) -> list[tuple[int, memoryview]]:
        """Keep C-STORE requests for the store handler; return the PDVs pynetdicom must see.

        A message's command fragments are held until the command is complete:
        a C-STORE-RQ is then served here, in this thread, without pynetdicom's
        hand-offs between threads; any other message goes to pynetdicom whole.
        """
        passthrough: list[tuple[int, memoryview]] = []
        for context_id, pdv in items:
            control = pdv[0]
            if self._store is not None:
                if control & 1:
                    raise ValueError("a command arrived before the end of a C-STORE dataset")
                fragment = pdv[1:]
                self._store["sink"].write(fragment)
                self._store["size"] += len(fragment)
                if self._store["size"] <= KEEP_IN_MEMORY:
                    self._store["frags"].append(fragment)
                else:  # a large object: only its file keeps it
                    self._store["frags"] = None
                if control & 2:
                    store, self._store = self._store, None
                    self._serve_store(store)
                continue
            if control & 1:  # command fragment
                self._command_frags.append((context_id, pdv))
                if not control & 2:
                    continue
                frags, self._command_frags = self._command_frags, []
                raw = b"".join(bytes(f[1:]) for _cx, f in frags)
                command = parse_command(raw)
                field, data_type = _us(command.get(0x0100)), _us(command.get(0x0800))
                context = self.assoc._accepted_cx.get(context_id)
                if field == C_STORE_RQ and data_type != NO_DATASET and context is not None:
                    request = StoreRequest(
                        self.assoc,
                        context_id,
                        str(context.transfer_syntax[0]),
                        _us(command.get(0x0110)) or 0,
                        _ui(command.get(0x0002)),
                        _ui(command.get(0x1000)),
                    )
                    self._store = {
                        "request": request,
                        "frags": [],
                        "size": 0,
                        "sink": cast(StoreHandler, self.store_handler)(request),
                    }
                    continue
                passthrough.extend(frags)
                self._pass_dataset = data_type is not None and data_type != NO_DATASET
                continue
            passthrough.append((context_id, pdv))  # dataset of a message pynetdicom serves
            if control & 2:
                self._pass_dataset = False
        return passthrough

    def _serve_store(self, store: dict[str, Any]) -> None:
        frags = store["frags"]
        request: StoreRequest = store["request"]
        # the fragments as they are: joining them (a copy of the dataset) is the sink's affair, in
        # a worker while this thread fsyncs (ingest.Incoming.finish)
        data = None if frags is None else frags[0] if len(frags) == 1 else frags
        try:
            status = store["sink"].finish(data)
        except Exception:
            LOGGER.exception("the C-STORE handler failed")
            status = 0xC211
        finally:
            store["frags"] = []
        response = encode_store_response(
            request.context_id, request.message_id, request.sop_class_uid, request.sop_instance_uid, status
        )
        cast(AssociationSocket, self.socket).send(response)

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (3.0) with the idle sleep replaced by `_idle_wait`."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._idle_wait()
                if self._kill_thread:  # type: ignore[has-type]  # pynetdicom's attribute (its types are skipped)
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                self._check_setup_deadline()
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                    try:
                        event = self.event_queue.get(block=False)
                    except queue.Empty:
                        sleep = True
                        continue
                    self.state_machine.do_action(event)
                    sleep = False
                except Exception as exc:
                    LOGGER.error("DICOM upper layer failed, aborting the association: %s", exc)
                    LOGGER.debug("upper layer failure", exc_info=True)
                    self._send_abort()
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
        finally:
            if self._store is not None:  # the association ended inside a dataset
                store, self._store = self._store, None
                try:
                    store["sink"].abort()
                except Exception:
                    LOGGER.exception("abandoning a partly received C-STORE failed")
            for end in (self._wake_r, self._wake_w):
                try:
                    end.close()
                except OSError:
                    pass


class FastAssociation(Association):
    """An Association whose threads wait on queues and sockets instead of sleeping."""

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = FastDUL(self)
        # Set by EdgeAE: a callable serving C-MOVE/C-GET requests itself (see edge.server).
        self.retrieve_server: Callable[[Association, Any, Any], bool] | None = getattr(ae, "retrieve_server", None)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        server = self.retrieve_server
        if server is not None and not self._sent_release and getattr(msg, "is_valid_request", False):
            context = self._accepted_cx.get(context_id)
            if context is not None:
                self._is_paused = True
                try:
                    if server(self, msg, context):
                        return
                finally:
                    self._is_paused = False
        super()._serve_request(msg, context_id)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (3.0), blocking on the message queue instead of sleeping."""
        self._is_paused = False
        msg_queue = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = msg_queue.get(timeout=IDLE_WAIT / 5)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():  # type: ignore[has-type]
                self.acse.send_release(is_response=True)
                LOGGER.debug("association released by %s", self.requestor.ae_title)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("network timeout with %s, aborting", self.requestor.ae_title)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def peer_host(assoc: Any) -> str:
    """The requestor's IP address as its socket reports it ("?" before it is known)."""
    try:
        return str(assoc.requestor.address)
    except Exception:
        return "?"


def peer_address(assoc: Any) -> str:
    """The requestor's address and port, for logs ("?" before they are known)."""
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:
        return "?"


# ------------------------------------------------------------------ accepting connections
class PendingConnection:
    """An accepted connection whose peer has not yet been admitted (TLS, A-ASSOCIATE-RQ, checks)."""

    __slots__ = ("sock", "address", "opened_at")

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.opened_at = time.monotonic()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ConnectionGuard:
    """Bounds the connections not yet admitted, per source address and in all.

    A new connection over a limit closes the OLDEST pending one of that address
    (or of all), not the new one: a peer that completes its association request
    in milliseconds always gets in, while connections that trickle or stall are
    pushed out (and time out by themselves at the set-up deadline anyway).
    """

    def __init__(self, per_address: int = 16, total: int = 256) -> None:
        self.per_address = per_address
        self.total = total
        self._pending: list[PendingConnection] = []
        self._lock = threading.Lock()

    def opened(self, sock: socket.socket, address: str) -> PendingConnection:
        conn = PendingConnection(sock, address)
        evict: list[PendingConnection] = []
        with self._lock:
            self._pending = [c for c in self._pending if _is_open(c.sock)]
            mine = [c for c in self._pending if c.address == address]
            while len(mine) >= self.per_address:
                victim = mine.pop(0)
                evict.append(victim)
                self._pending.remove(victim)
            while len(self._pending) >= self.total:
                evict.append(self._pending.pop(0))
            self._pending.append(conn)
        for victim in evict:
            LOGGER.warning("too many connections from %s not yet associated: closing the oldest", victim.address)
            victim.close()
        return conn

    def settle(self, conn: PendingConnection | None) -> None:
        """The connection's peer was admitted (or it ended): it no longer counts as pending."""
        if conn is None:
            return
        with self._lock:
            if conn in self._pending:
                self._pending.remove(conn)


def _is_open(sock: socket.socket) -> bool:
    try:
        return sock.fileno() >= 0
    except Exception:
        return False


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the accept loop kept free and bounded.

    - the accept loop only accepts (TCP_NODELAY on) and registers the
      connection with the `ConnectionGuard`; the TLS handshake runs in the
      connection's own thread, with the set-up deadline;
    - every accepted socket gets a timeout (`pdu_timeout`), so no read or
      write on it blocks forever;
    - `setup_timeout` bounds connect-to-A-ASSOCIATE-RQ (with `acse_timeout`).
    """

    # socketserver listens with a backlog of 5: a burst of connections then drops the SYN of a
    # legitimate peer, which retries only after a second
    request_queue_size = 1024

    def __init__(
        self,
        *args: Any,
        setup_timeout: float = 10.0,
        pdu_timeout: float = 30.0,
        max_per_address: int = 16,
        max_pending: int = 256,
        **kwargs: Any,
    ) -> None:
        self.setup_timeout = setup_timeout
        self.pdu_timeout = pdu_timeout
        self.guard = ConnectionGuard(max_per_address, max_pending)
        self._local = threading.local()
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        set_nodelay(client)
        client.settimeout(self.setup_timeout)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        conn = self.guard.opened(request, address)
        started = conn.opened_at
        if self.ssl_context:
            try:
                tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                conn.sock = tls
                tls.settimeout(max(0.1, started + self.setup_timeout - time.monotonic()))
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                LOGGER.warning("TLS handshake with %s failed: %s", address, exc)
                self.guard.settle(conn)
                try:
                    conn.sock.close()
                except OSError:
                    pass
                return
            request = tls
        request.settimeout(self.pdu_timeout)
        self._local.conn = conn
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.guard.settle(conn)
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self._local.conn = None

    def current_connection(self) -> PendingConnection | None:
        """The connection being set up in this thread (read by the request handler)."""
        return getattr(self._local, "conn", None)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler that remembers the pending connection on the association."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        _attach_pending(assoc, self.server)
        return assoc


def _attach_pending(assoc: Association, server: Any) -> None:
    conn = server.current_connection() if isinstance(server, GuardedAssociationServer) else None
    assoc.renkei_pending = conn
    if conn is not None and isinstance(assoc.dul.socket, FastSocket):
        assoc.dul.socket.setup_deadline = conn.opened_at + server.setup_timeout


def settle_pending(assoc: Association) -> None:
    """The association's peer was admitted: its connection no longer counts as pending."""
    conn = getattr(assoc, "renkei_pending", None)
    server = getattr(assoc, "_server", None)
    if conn is not None and isinstance(server, GuardedAssociationServer):
        server.guard.settle(conn)


class EdgeRequestHandler(RequestHandler):
    """Builds a FastAssociation with a FastSocket for each accepted connection."""

    def _create_association(self) -> Association:
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = FastSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies the (large) supported context list for every
        # association; negotiation only reads it, so a shallow copy is enough.
        assoc.acceptor.supported_contexts = copy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        _attach_pending(assoc, self.server)
        return assoc


class EdgeAssociationServer(GuardedAssociationServer):
    """The guarded server with the fast association classes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", EdgeRequestHandler)
        super().__init__(*args, **kwargs)


class FastAE(AE):
    """An AE whose requested associations use FastDUL and FastSocket (TCP_NODELAY)."""

    retrieve_server: Callable[[Association, Any, Any], bool] | None = None
    store_handler: StoreHandler | None = None  # serves C-STORE requests in the DUL thread

    def _create_socket(self, assoc: Association, address: AddressInformation, tls_args: Any) -> AssociationSocket:
        # Called by AE.associate() before the DUL thread starts: swap in the fast DUL.
        if not isinstance(assoc.dul, FastDUL) and assoc.dul.socket is None:
            assoc.dul = FastDUL(assoc)
        sock = FastSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


# ------------------------------------------------------------------ sending files
class paused:
    """Hold an association's reactor paused while this thread exchanges DIMSE messages.

    pynetdicom pauses and resumes the reactor around every send_c_store; holding
    it paused for a whole batch avoids a reactor wake-up per instance.
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def __enter__(self) -> Association:
        self.assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + 30
        while not self.assoc._is_paused and self.assoc.is_established:
            if time.monotonic() > deadline:
                raise TimeoutError("the association reactor did not pause within 30 s")
            time.sleep(0.0001)
        return self.assoc

    def __exit__(self, *exc: object) -> None:
        self.assoc._reactor_checkpoint.set()


def send_stored(
    assoc: Association,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    path: Any = None,
    offset: int = 0,
    data: bytes | None = None,
    msg_id: int = 1,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> int:
    """Send one C-STORE whose dataset is sent as stored, never decoded; returns the status.

    Either `path` (a Part 10 file; the dataset starts at `offset`) or `data`
    (the encoded dataset) is sent under an accepted presentation context with
    exactly `transfer_syntax_uid`; raises ValueError when there is none. The
    caller holds the reactor `paused`. Returns -1 when no response came.
    """
    context = assoc._get_valid_context(sop_class_uid, transfer_syntax_uid, "scu", allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class_uid
    req.AffectedSOPInstanceUID = sop_instance_uid
    if originator_aet:
        req.MoveOriginatorApplicationEntityTitle = originator_aet
        req.MoveOriginatorMessageID = originator_id
    if data is not None:
        req.DataSet = BytesIO(data)
    else:
        req._dataset_path = (Path(path), offset)
    assoc.dimse.send_msg(req, cast(int, context.context_id))
    _cx, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        return -1
    status = getattr(rsp, "Status", None)
    return int(status) if status is not None else -1
