"""HL7 v2 admission messages over MLLP: the hospital information system says a patient was admitted.

`AdmissionListener` accepts ADT^A01 (admit), ADT^A04 (register) and ADT^A08
(update) when the patient's location changed, answers every message with an
ACK (AA accepted, AR rejected with the reason, AE when the action failed), and
hands each admission to a callback (which starts the `fetch_priors` flow).

The port faces the hospital network, so no peer is trusted: only the site's
`hl7.allowed_senders` may connect (over TLS when `hl7.tls` is set); a message
over `hl7.max_message_bytes` is read to its end block and refused (AR); a
connection silent for `hl7.idle_timeout`, or a message unfinished after
`message_deadline`, is closed (AR first when a message had begun); at
`hl7.max_connections` the connection silent the longest makes room. Text is
decoded per MSH-18 (HL7 table 0211), read from the raw header first. Framing
is renkei's own and bounded; parsing and ACKs use the maintained `hl7` library.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import hl7

from renkei.config import HL7Config, RegionConfig, address_in
from renkei.edge.tls import server_context
from renkei.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

ACCEPTED_EVENTS = ("A01", "A04", "A08")


class AdmissionRejected(Exception):
    """The message is not an admission renkei can act on; the text goes into the ACK (AR)."""


@dataclass(frozen=True)
class Admission:
    """A patient admitted at `site`, known there as `patient_id` (issuer `issuer`)."""

    site: str
    patient_id: str
    issuer: str
    event: str
    location: str
    message_control_id: str
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""


def _field(message: hl7.Message, segment: str, index: int) -> str:
    try:
        return str(message.segment(segment)(index)).strip()
    except (KeyError, IndexError):
        return ""


def parse_admission(message: hl7.Message, config: RegionConfig, site_id: str) -> Admission | None:
    """The admission a message announces, None for an A08 without a location change.

    Raises AdmissionRejected (with the reason) for anything else.
    """
    try:
        message.segment("MSH")
    except KeyError:
        raise AdmissionRejected("no MSH segment") from None
    msg_type = _field(message, "MSH", 9)
    parts = msg_type.split("^")
    if parts[0] != "ADT" or len(parts) < 2 or parts[1] not in ACCEPTED_EVENTS:
        raise AdmissionRejected(f"message type {msg_type or '(empty)'} is not ADT^A01, ADT^A04 or ADT^A08")
    event = parts[1]
    control_id = _field(message, "MSH", 10)
    try:
        pid = message.segment("PID")
    except KeyError:
        raise AdmissionRejected("no PID segment: the patient is not identified") from None
    site = config.site(site_id)
    patient_id, issuer = _pick_identifier(pid, site.issuer)
    if not patient_id:
        raise AdmissionRejected("PID-3 holds no patient identifier")
    location, prior = "", ""
    try:
        pv1 = message.segment("PV1")
        location = str(pv1(3)).strip() if len(pv1) > 3 else ""
        prior = str(pv1(6)).strip() if len(pv1) > 6 else ""
    except KeyError:
        pass
    if event == "A08" and (not location or location == prior):
        return None
    return Admission(
        site=site_id,
        patient_id=patient_id,
        issuer=issuer or site.issuer,
        event=event,
        location=location,
        message_control_id=control_id,
        patient_name=dicom_person_name(pid(5)) if len(pid) > 5 else "",
        birth_date=str(pid(7)).strip()[:8] if len(pid) > 7 else "",
        sex=str(pid(8)).strip() if len(pid) > 8 else "",
    )


def dicom_person_name(field: object) -> str:
    """PID-5 (XPN, repeated per representation) as DICOM PN text: alphabetic=ideographic=phonetic.

    XPN.8 gives the representation (A, I, P); without it, the script decides.
    """
    groups = {"A": "", "I": "", "P": ""}
    reps = list(field) if isinstance(field, hl7.Field) and field and isinstance(field[0], hl7.Repetition) else [field]
    for rep in reps:
        comps = str(rep).split("^")
        name = "^".join(c.strip() for c in comps[:2]).rstrip("^")
        code = comps[7].strip().upper() if len(comps) > 7 and comps[7].strip() else _script(name)
        if code in groups and name and not groups[code]:
            groups[code] = name
    text = "=".join([groups["A"], groups["I"], groups["P"]]).rstrip("=")
    return text


def _script(text: str) -> str:
    """'I' for ideographs, 'P' for kana only, else 'A'."""
    letters = [c for c in text if c not in "^ "]
    if any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in letters):
        return "I"
    if letters and all("\u3040" <= c <= "\u30ff" or c == "\u30fc" for c in letters):
        return "P"
    return "A"


def _pick_identifier(pid: hl7.Segment, site_issuer: str) -> tuple[str, str]:
    """PID-3's identifier assigned by this site (CX: ID^^^AssigningAuthority), else its first."""
    if len(pid) <= 3:
        return "", ""
    first: tuple[str, str] = ("", "")
    for rep in pid(3):
        text = str(rep)
        comps = text.split("^")
        ident = comps[0].strip()
        authority = comps[3].split("&")[0].strip() if len(comps) > 3 else ""
        if not ident:
            continue
        if authority and authority == site_issuer:
            return ident, authority
        if not first[0]:
            first = (ident, authority)
    return first


# -- character sets (MSH-18, HL7 table 0211) ------------------------------------


def _charset_key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).upper()


_SINGLE_CODECS: dict[str, str] = {
    "ASCII": "ascii",
    "USASCII": "ascii",
    "ISOIR6": "ascii",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "ISOIR192": "utf-8",
    # cp932 decodes all of Shift_JIS plus the vendor kanji HIS use in names (髙, 﨑)
    "SJIS": "cp932",
    "SHIFTJIS": "cp932",
    "CP932": "cp932",
    "WINDOWS31J": "cp932",
    "MS932": "cp932",
    "EUCJP": "euc_jp",
    "ISOIR13": "shift_jis",  # JIS X 0201 alone: half-width katakana in 0xA1-0xDF, as Shift_JIS has them
    "ISOIR100": "latin_1",
    **{f"8859/{n}": f"iso8859_{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"ISO8859{n}": f"iso8859_{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
# ISO 2022 code extension (JIS X 0208/0212 switched in by escape sequences), the Japanese HIS norm
_ISO2022_NAMES = frozenset(
    {
        "ISOIR87",
        "ISOIR159",
        "ISOIR14",
        "ISO20221994",
        "ISO2022IR87",
        "ISO2022IR159",
        "ISO2022IR13",
        "ISO2022IR6",
        "JISX0208",
        "JISX0212",
        "ISO2022JP",
        "JIS",
    }
)
# iso2022_jp_2 reads JIS X 0208 and 0212; iso2022_jp_ext reads JIS X 0201 katakana (ESC ( I)
_ISO2022_CODECS = ("iso2022_jp_2", "iso2022_jp_ext")
SUPPORTED_CHARSETS = (
    "ASCII, 8859/1 to 8859/9 and 8859/15, UNICODE UTF-8, SJIS (Shift_JIS), "
    "ISO IR87 / ISO 2022-1994 / JIS X 0208 (ISO-2022-JP), ISO IR159, ISO IR13, ISO IR14, EUC-JP"
)


@dataclass(frozen=True)
class Charset:
    """How a message's bytes become text: `codecs` tried in turn (strictly); ACKs use the first."""

    label: str
    codecs: tuple[str, ...]

    def decode(self, data: bytes) -> str:
        """The text, or AdmissionRejected when the bytes are not valid in this character set."""
        first_error: UnicodeDecodeError | None = None
        for codec in self.codecs:
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                first_error = first_error or exc
        position = first_error.start if first_error else 0
        raise AdmissionRejected(
            f"the message is not valid {self.label} (at byte {position}); declare its character set in MSH-18"
        )

    def encode(self, text: str) -> bytes:
        return text.encode(self.codecs[0], "replace")


def charset_for(msh18: str, default: str, repetition: str = "~") -> Charset:
    """The character set MSH-18 declares; `default` (a Python codec) when it is empty.

    The first repetition is the message's; further ones are alternates switched
    in by ISO 2022 escapes (JAHIS: `~ISO IR87`). Raises AdmissionRejected naming
    a value renkei does not know.
    """
    names = [name.strip() for name in msh18.split(repetition)] if msh18.strip() else []
    keys = []
    for name in names:
        key = _charset_key(name)
        if key and key not in _SINGLE_CODECS and key not in _ISO2022_NAMES:
            raise AdmissionRejected(
                f"MSH-18 character set {name!r} is not supported; use one of "
                f"{SUPPORTED_CHARSETS}, or leave MSH-18 empty for {default}"
            )
        keys.append(key)
    if any(key in _ISO2022_NAMES for key in keys):
        return Charset(f"ISO 2022 ({msh18.strip()})", _ISO2022_CODECS)
    first = next((key for key in keys if key), "")
    if not first:
        return Charset(f"{default}, the listener's default for an empty MSH-18", (default,))
    return Charset(msh18.strip(), (_SINGLE_CODECS[first],))


def raw_header(block: bytes) -> list[str]:
    """The MSH segment's fields read from the raw bytes (item n-1 is MSH-n from MSH-2 on), [] without MSH.

    MSH is ASCII (ISO 2022 escapes aside), so it can be read before the character set is known.
    """
    data = block.lstrip(b"\r\n\t ")
    if not data.startswith(b"MSH") or len(data) < 4:
        return []
    ends = [i for i in (data.find(b"\r"), data.find(b"\n")) if i >= 0]
    line = data[: min(ends)] if ends else data
    text = line.decode("iso2022_jp_2", "replace") if b"\x1b" in line else line.decode("latin-1")
    return text.split(text[3])


def _msh(fields: list[str], number: int) -> str:
    return fields[number - 1].strip() if len(fields) >= number >= 2 else ""


def _repetition_separator(fields: list[str]) -> str:
    return fields[1][1:2] or "~" if len(fields) > 1 else "~"


# -- MLLP framing ------------------------------------------------------------------

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_BLANK = b"\r\n\t "
HEAD_BYTES = 8192  # kept of a refused message, to answer from its header


@dataclass(frozen=True)
class Frame:
    """What the framer found: a complete `block` within the limit, or a refusal.

    `too_large`: a block over the limit, read to its end (`data` is its start);
    `overflow`: no end block within the discard limit; `junk`: bytes outside a block.
    """

    kind: str
    data: bytes
    size: int


class MLLPFramer:
    """Cuts received bytes into MLLP blocks (0x0B ... 0x1C 0x0D), never holding more than `max_bytes` of one.

    After `overflow` or `junk` it stops: the connection is to be answered AR and closed.
    """

    def __init__(self, max_bytes: int, discard_limit: int) -> None:
        self.max_bytes = max_bytes
        self.discard_limit = max(discard_limit, max_bytes)
        self.in_block = False
        self.stopped = False
        self._buf = bytearray()
        self._head = b""
        self._size = 0
        self._dropping = False
        self._fs_pending = False  # the chunk ended in 0x1C: 0x0D may follow in the next

    def head(self) -> bytes:
        """The first bytes of the block being read."""
        return self._head if self._dropping else bytes(self._buf[:HEAD_BYTES])

    @property
    def size(self) -> int:
        return self._size

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        pos, n = 0, len(data)
        while pos < n and not self.stopped:
            if not self.in_block:
                start = data.find(START_BLOCK, pos)
                outside = data[pos : n if start < 0 else start]
                if outside.strip(_BLANK):
                    frames.append(Frame("junk", outside.lstrip(_BLANK)[:HEAD_BYTES], len(outside)))
                    self.stopped = True
                    break
                if start < 0:
                    break
                self._begin()
                pos = start + 1
                continue
            if self._fs_pending and data[pos : pos + 1] == b"\r":
                self._size -= 1  # that 0x1C closed the block
                if not self._dropping:
                    del self._buf[-1:]
                frames.append(self._finish())
                pos += 1
                continue
            self._fs_pending = False
            end = data.find(END_BLOCK, pos)
            self._append(data[pos : n if end < 0 else end])
            if self._size > self.discard_limit:
                frames.append(Frame("overflow", self.head(), self._size))
                self.stopped = True
                break
            if end < 0:
                self._fs_pending = data.endswith(b"\x1c")
                break
            frames.append(self._finish())
            pos = end + 2
        return frames

    def _begin(self) -> None:
        self.in_block, self._buf, self._head, self._size = True, bytearray(), b"", 0
        self._dropping = self._fs_pending = False

    def _append(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._dropping:
            return
        if self._size <= self.max_bytes + 1:  # + 1: a trailing 0x1C may turn out to be the end block
            self._buf += chunk
            return
        head = bytes(self._buf[:HEAD_BYTES])
        self._head = head + chunk[: HEAD_BYTES - len(head)]
        self._buf = bytearray()
        self._dropping = True

    def _finish(self) -> Frame:
        if self._dropping or self._size > self.max_bytes:
            frame = Frame("too_large", self.head(), self._size)
        else:
            frame = Frame("block", bytes(self._buf), self._size)
        self.in_block, self._buf, self._head, self._size = False, bytearray(), b"", 0
        self._dropping = self._fs_pending = False
        return frame


# -- the listener ------------------------------------------------------------------

CHUNK_BYTES = 64 * 1024
WARNING_INTERVAL = 10.0  # seconds between two warnings of one kind about one peer
ACK_WORKERS = 4


@dataclass(eq=False)
class _Connection:
    address: str
    client: socket.socket
    last_activity: float
    task: asyncio.Task[None] | None = None
    running: bool = False  # its task began (a task cancelled before that never runs its cleanup)
    transport: asyncio.Transport | None = None
    framer: MLLPFramer | None = None
    busy: bool = False  # a message is being answered: never closed to make room
    evicted: bool = False


class AdmissionListener:
    """An MLLP server on `host:port` that acknowledges admissions and hands them to `on_admission`.

    Limits, allowed senders and TLS come from the site's `hl7` section
    (`settings` replaces it, e.g. in tests). `encoding` is the character set
    when MSH-18 is empty. `on_admission` runs in a worker thread, as do
    decoding and parsing; if it raises, the ACK is AE with its message.
    """

    def __init__(
        self,
        config: RegionConfig,
        site_id: str,
        on_admission: Callable[[Admission], str | None],
        host: str = "127.0.0.1",
        port: int = 2575,
        encoding: str = "utf-8",
        *,
        settings: HL7Config | None = None,
        message_deadline: float = 30.0,
        handshake_timeout: float = 10.0,
        discard_limit: int | None = None,
    ) -> None:
        site = config.site(site_id)
        try:
            ascii_compatible = "MSH|".encode(encoding) == b"MSH|"  # LookupError for rot13, base64 and the like
        except LookupError:
            ascii_compatible = False
        if not ascii_compatible:
            raise UsageError(
                f"encoding {encoding!r} is not an ASCII-compatible text encoding Python knows (e.g. utf-8, cp932)"
            )
        self.config = config
        self.site_id = site_id
        self.on_admission = on_admission
        self.host = host
        self.port = port
        self.encoding = encoding
        self.settings = settings if settings is not None else site.hl7
        self.allowed_networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.settings.allowed_senders)
        self.max_message_bytes = self.settings.max_message_bytes
        self.idle_timeout = self.settings.idle_timeout
        self.max_connections = self.settings.max_connections
        self.message_deadline = message_deadline
        self.handshake_timeout = handshake_timeout
        self.discard_limit = discard_limit if discard_limit is not None else 16 * self.max_message_bytes
        self.ssl_context: ssl.SSLContext | None = None
        if self.settings.tls is not None:
            try:
                self.ssl_context = server_context(self.settings.tls)
            except ConfigError as exc:
                raise ConfigError(f"site {site_id}, hl7.tls: {str(exc).removeprefix('edge TLS: ')}") from None
        self._connections: set[_Connection] = set()
        self._warned: dict[str, tuple[float, int]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False

    # -- answering one message (in a worker thread) ------------------------------
    def handle(self, message: hl7.Message) -> tuple[str, str]:
        """The ACK code and text for one message (AA, AR or AE)."""
        try:
            admission = parse_admission(message, self.config, self.site_id)
        except AdmissionRejected as exc:
            log.warning("HL7 message rejected: %s", exc)
            return "AR", str(exc)
        if admission is None:
            return "AA", "A08 without a location change: nothing to do"
        try:
            result = self.on_admission(admission)
        except Exception as exc:  # the sender must learn that the action failed
            log.error(
                "admission %s at %s could not start fetch_priors: %s", admission.message_control_id, self.site_id, exc
            )
            return "AE", f"could not start fetching priors: {exc}"[:200]
        log.info("admission %s (%s) at %s accepted", admission.message_control_id, admission.event, self.site_id)
        return "AA", result or "fetching prior studies"

    def respond(self, block: bytes) -> bytes:
        """The ACK (to be framed) for one MLLP block: decoded per MSH-18, parsed, handled. Never raises."""
        fields = raw_header(block)
        try:
            charset: Charset | None = None
            try:
                charset = charset_for(_msh(fields, 18), self.encoding, _repetition_separator(fields))
                text = charset.decode(block)
            except AdmissionRejected as exc:
                log.warning("HL7 message %s refused: %s", _msh(fields, 10) or "(no control ID)", exc)
                return self.refuse(block, str(exc), charset)
            try:
                message = hl7.parse(text)
                message.segment("MSH")
            except Exception as exc:
                log.warning(
                    "HL7 message %s is unparsable (%s)", _msh(fields, 10) or "(no control ID)", type(exc).__name__
                )
                return self.refuse(block, f"unparsable HL7 message: {exc}"[:200], charset)
            code, reason = self.handle(message)
            return _ack(message, fields, code, reason, charset)
        except Exception:  # a bug must not leave the sender without an answer
            log.exception("HL7 listener failed on message %s", _msh(fields, 10) or "(no control ID)")
            return _ack(None, fields, "AE", "the listener failed on this message; see its log", None)

    def refuse(self, head: bytes, reason: str, charset: Charset | None = None) -> bytes:
        """An AR built from the message's header alone."""
        return _ack(None, raw_header(head), "AR", reason, charset)

    # -- connections (on the event loop) ---------------------------------------
    def _allowed(self, address: str) -> bool:
        return address_in(address, self.allowed_networks)

    def _warn(self, key: str, message: str, *args: object) -> None:
        """A WARNING, at most one per `key` every WARNING_INTERVAL seconds: a flood must not flood the log."""
        now = time.monotonic()
        last, suppressed = self._warned.get(key, (-WARNING_INTERVAL, 0))
        if now - last < WARNING_INTERVAL:
            self._warned[key] = (last, suppressed + 1)
            return
        if len(self._warned) > 1024:
            self._warned.clear()
        self._warned[key] = (now, 0)
        if suppressed:
            message += f" ({suppressed} more like it since the last such warning)"
        log.warning(message, *args)

    def _make_room(self, address: str) -> bool:
        """At max_connections: close the connection silent the longest (not one being answered)."""
        idle = [c for c in self._connections if not c.busy]
        if not idle:
            self._warn(
                f"full:{address}",
                "HL7 connection from %s refused: all %d connections are busy (hl7.max_connections)",
                address,
                self.max_connections,
            )
            return False
        victim = min(idle, key=lambda c: c.last_activity)
        assert self._loop is not None
        self._warn(
            f"evict:{victim.address}",
            "HL7 listener at hl7.max_connections (%d): closing the connection "
            "from %s, silent for %.1f s, to accept one from %s",
            self.max_connections,
            victim.address,
            self._loop.time() - victim.last_activity,
            address,
        )
        self._close(victim)
        return True

    def _close(self, conn: _Connection) -> None:
        """Close a connection from outside its task (to make room, or when stopping); AR if a message had begun.

        Closing the transport ends the task's read; cancelling is only for a task
        not yet past the handshake (a cancel racing a finished read can be lost).
        """
        conn.evicted = True
        self._connections.discard(conn)
        if conn.transport is not None:
            if conn.framer is not None and conn.framer.in_block and not conn.transport.is_closing():
                reason = (
                    "the listener is stopping"
                    if self._stopping
                    else "connection closed to make room for another (hl7.max_connections)"
                )
                conn.transport.write(_framed(self.refuse(conn.framer.head(), reason + "; send again")))
            conn.transport.close()  # flushes that AR; a peer that never reads it is cut off below
            asyncio.get_running_loop().call_later(5.0, conn.transport.abort)
        elif conn.task is not None:
            conn.task.cancel()
        if not conn.running:
            conn.client.close()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, peer = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the connections there are
                self._warn("accept", "HL7 listener cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = str(peer[0])
            if not self._allowed(address):
                self._warn(
                    f"refused:{address}",
                    "HL7 connection from %s refused: not in the allowed senders (hl7.allowed_senders of site %s)",
                    address,
                    self.site_id,
                )
                _abort(client)
                continue
            if len(self._connections) >= self.max_connections and not self._make_room(address):
                _abort(client)
                continue
            conn = _Connection(address, client, loop.time())
            self._connections.add(conn)
            conn.task = asyncio.create_task(self._connection(conn, client))

    async def _connection(self, conn: _Connection, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.running = True
        transport: asyncio.BaseTransport | None = None
        try:
            reader = asyncio.StreamReader(limit=CHUNK_BYTES)
            protocol = asyncio.StreamReaderProtocol(reader)
            extra = {"ssl_handshake_timeout": self.handshake_timeout} if self.ssl_context else {}
            try:
                async with asyncio.timeout(self.handshake_timeout + 1):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, client, ssl=self.ssl_context, **extra
                    )
            except (OSError, TimeoutError) as exc:
                kind = getattr(exc, "reason", None) or type(exc).__name__  # a short, bounded name
                self._warn(
                    f"tls:{conn.address}:{kind}",
                    "HL7 connection from %s closed: TLS handshake failed (%s)",
                    conn.address,
                    str(exc) or kind,
                )
                return
            conn.transport = transport
            if conn.evicted:
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._converse(conn, reader, writer)
        except asyncio.CancelledError:
            if not conn.evicted:
                raise
        finally:
            self._connections.discard(conn)
            if transport is None:
                client.close()
            else:
                transport.close()  # flushes the last ACK; a peer that never reads it is cut off below
                loop.call_later(5.0, transport.abort)  # type: ignore[attr-defined]

    async def _converse(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read blocks and answer each until the peer closes, falls silent, or breaks a limit."""
        loop = asyncio.get_running_loop()
        framer = conn.framer = MLLPFramer(self.max_message_bytes, self.discard_limit)
        started: float | None = None  # when the message being read began
        while not conn.evicted:
            timeout = self.idle_timeout
            if started is not None:
                timeout = min(timeout, started + self.message_deadline - loop.time())
            try:
                if timeout <= 0:
                    raise TimeoutError
                async with asyncio.timeout(timeout):
                    data = await reader.read(CHUNK_BYTES)
            except TimeoutError:
                if conn.evicted:
                    return
                if started is None:
                    log.info("HL7 connection from %s closed after %g s of silence", conn.address, self.idle_timeout)
                    return
                silent = loop.time() - conn.last_activity >= self.idle_timeout
                reason = (
                    f"no data for {self.idle_timeout:g} s in the middle of a message (hl7.idle_timeout)"
                    if silent
                    else f"message not complete within {self.message_deadline:g} s"
                )
                self._warn(
                    f"partial:{conn.address}",
                    "HL7 connection from %s closed: %s, %d bytes read, no end block",
                    conn.address,
                    reason,
                    framer.size,
                )
                await self._send(conn, writer, [self.refuse(framer.head(), reason + ": connection closed")])
                return
            except OSError:  # reset by the peer, TLS errors
                return
            if conn.evicted:
                return
            if not data:
                if started is not None:
                    self._warn(
                        f"partial:{conn.address}",
                        "HL7 connection from %s closed by the peer in the middle of a message (%d bytes, no end block)",
                        conn.address,
                        framer.size,
                    )
                return
            conn.last_activity = loop.time()
            frames = framer.feed(data)
            if frames:
                for frame in frames:
                    if frame.kind != "block":
                        self._warn(
                            f"{frame.kind}:{conn.address}",
                            "HL7 connection from %s: %s (%d bytes)",
                            conn.address,
                            _FRAME_PROBLEMS[frame.kind],
                            frame.size,
                        )
                conn.busy = True
                try:
                    assert self._executor is not None
                    replies = await loop.run_in_executor(self._executor, self._answer, frames)
                    if not await self._send(conn, writer, replies):
                        return
                finally:
                    conn.busy = False
                conn.last_activity = loop.time()
                if framer.stopped:
                    return
            if not framer.in_block:
                started = None
            elif started is None or frames:
                started = loop.time()

    def _answer(self, frames: list[Frame]) -> list[bytes]:
        replies = []
        for frame in frames:
            if frame.kind == "block":
                replies.append(self.respond(frame.data))
            elif frame.kind == "too_large":
                replies.append(
                    self.refuse(
                        frame.data,
                        f"message of {frame.size} bytes is over the limit of "
                        f"{self.max_message_bytes} bytes (hl7.max_message_bytes)",
                    )
                )
            elif frame.kind == "overflow":
                replies.append(
                    self.refuse(
                        frame.data, f"no end block (0x1C 0x0D) within {self.discard_limit} bytes: connection closed"
                    )
                )
            else:
                replies.append(
                    self.refuse(
                        b"", "data outside an MLLP block: frame each message as 0x0B ... 0x1C 0x0D; connection closed"
                    )
                )
        return replies

    async def _send(self, conn: _Connection, writer: asyncio.StreamWriter, replies: list[bytes]) -> bool:
        """Write ACKs; False when the peer does not take them within idle_timeout."""
        for reply in replies:
            writer.write(_framed(reply))
        try:
            async with asyncio.timeout(self.idle_timeout):
                await writer.drain()
            return True
        except (TimeoutError, OSError):
            self._warn(f"ack:{conn.address}", "HL7 connection from %s closed: it does not read its ACKs", conn.address)
            return False

    # -- running in a background thread (tests) or in the foreground (CLI) --------
    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Listen until `stop` is set (or for ever); then close every connection."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            sock = _listening_socket(self.host, self.port)
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            raise
        self.port = sock.getsockname()[1]
        self._executor = ThreadPoolExecutor(max_workers=ACK_WORKERS, thread_name_prefix=f"hl7-{self.site_id}")
        accept = asyncio.create_task(self._accept(sock))
        log.info(
            "HL7 listener for %s on %s:%d%s; allowed senders %s",
            self.site_id,
            self.host,
            self.port,
            " (TLS)" if self.ssl_context else "",
            ", ".join(self.settings.allowed_senders),
        )
        self._ready.set()
        try:
            await (stop.wait() if stop is not None else asyncio.Event().wait())
        finally:
            self._stopping = True
            accept.cancel()
            tasks = [c.task for c in self._connections if c.task is not None]
            for conn in list(self._connections):
                self._close(conn)
            for task in tasks:  # those waiting for on_admission, too
                task.cancel()
            await asyncio.wait([accept, *tasks], timeout=5)
            sock.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def start(self) -> AdmissionListener:
        def run() -> None:
            async def main() -> None:
                self._stop_event = asyncio.Event()
                await self.serve(self._stop_event)

            try:
                asyncio.run(main())
            except Exception:
                if not self._ready.is_set():
                    self._ready.set()

        self._thread = threading.Thread(target=run, name=f"hl7-{self.site_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("HL7 listener did not start")
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self) -> None:
        if self._loop and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread:
            self._thread.join(10)


_FRAME_PROBLEMS = {
    "too_large": "message over hl7.max_message_bytes, refused",
    "overflow": "no end block within the discard limit, refused and closed",
    "junk": "data outside an MLLP block, refused and closed",
}


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UsageError(f"the HL7 listener cannot listen on {host}:{port}: {exc}") from None
    sock.setblocking(False)
    return sock


def _abort(sock: socket.socket) -> None:
    """Close at once (RST, nothing lingers)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _framed(reply: bytes) -> bytes:
    return START_BLOCK + reply + END_BLOCK


def _ack(message: hl7.Message | None, fields: list[str], code: str, reason: str, charset: Charset | None) -> bytes:
    """An ACK for `message` (else for the header `fields` alone), encoded in the message's character set."""
    if message is None and fields:
        try:
            message = hl7.parse("|".join(fields))
            message.segment("MSH")
        except Exception:
            message = None
    text = None
    if message is not None:
        try:
            ack = message.create_ack(code)
            ack.segment("MSA").assign_field(_escape(reason), 3)
            msh18 = _field(message, "MSH", 18)
            if charset is not None and msh18:
                ack.segment("MSH").assign_field(msh18, 18)
            text = str(ack)
        except Exception:  # a header too short to answer from: a bare ACK still tells the sender
            text = None
    if text is None:
        text = _bare_nack(_msh(fields, 10), reason, code)
    return charset.encode(text) if charset is not None else text.encode("ascii", "replace")


def _escape(text: str) -> str:
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def _bare_nack(control: str, reason: str, code: str = "AR") -> str:
    return f"MSH|^~\\&|RENKEI||||||ACK|{_escape(control)}|P|2.5\rMSA|{code}|{_escape(control)}|{_escape(reason)}"
