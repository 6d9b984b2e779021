"""HL7 v2 admission messages over MLLP: the hospital information system says a patient was admitted.

`AdmissionListener` accepts ADT^A01 (admit), ADT^A04 (register) and ADT^A08
(update) when the patient's location changed, answers every message with an
ACK (AA accepted, AR rejected with the reason, AE when the action failed), and
hands each admission to a callback (which starts the `fetch_priors` flow).
Parsing and acknowledgements use the maintained `hl7` library.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import hl7
import hl7.mllp

from renkei.config import RegionConfig

log = logging.getLogger("renkei.hl7")

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
    reps = list(field) if isinstance(field, hl7.Field) and field and isinstance(field[0], hl7.Repetition) \
        else [field]
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


class AdmissionListener:
    """An MLLP server on `host:port` that acknowledges admissions and hands them to `on_admission`.

    `on_admission` runs in a worker thread; if it raises, the ACK is AE with its message.
    """

    def __init__(
        self,
        config: RegionConfig,
        site_id: str,
        on_admission: Callable[[Admission], str | None],
        host: str = "127.0.0.1",
        port: int = 2575,
        encoding: str = "utf-8",
    ) -> None:
        config.site(site_id)
        self.config = config
        self.site_id = site_id
        self.on_admission = on_admission
        self.host = host
        self.port = port
        self.encoding = encoding
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

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
            log.error("admission %s at %s could not start fetch_priors: %s",
                      admission.message_control_id, self.site_id, exc)
            return "AE", f"could not start fetching priors: {exc}"[:200]
        log.info("admission %s (%s) at %s accepted", admission.message_control_id, admission.event, self.site_id)
        return "AA", result or "fetching prior studies"

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while not reader.at_eof():
                try:
                    block = await reader.readblock()
                except hl7.mllp.InvalidBlockError as exc:
                    log.warning("HL7 client %s sent an invalid MLLP block: %s", peer, exc)
                    break
                except asyncio.IncompleteReadError:
                    break
                text = block.decode(self.encoding, "replace")
                try:
                    message = hl7.parse(text)
                    message.segment("MSH")
                except Exception as exc:
                    log.warning("HL7 client %s sent an unparsable message: %s", peer, exc)
                    writer.writeblock(_bare_nack(text, f"unparsable HL7 message: {exc}").encode(self.encoding))
                    await writer.drain()
                    continue
                code, text_reason = await asyncio.get_running_loop().run_in_executor(None, self.handle, message)
                try:
                    ack = message.create_ack(code)
                    ack.segment("MSA").assign_field(_escape(text_reason), 3)
                    reply = str(ack)
                except Exception:  # a header too short to answer from: a bare ACK still tells the sender
                    reply = _bare_nack(text, text_reason, code)
                writer.writeblock(reply.encode(self.encoding))
                await writer.drain()
        finally:
            writer.close()

    # -- running in a background thread (tests) or in the foreground (CLI) --------
    async def serve(self, stop: asyncio.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await hl7.mllp.start_hl7_server(
            self._client, self.host, self.port, encoding=self.encoding
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        log.info("HL7 listener for %s on %s:%d", self.site_id, self.host, self.port)
        async with self._server:
            if stop is None:
                await self._server.serve_forever()
            else:
                await stop.wait()

    def start(self) -> "AdmissionListener":
        self._stop_event: asyncio.Event | None = None

        def run() -> None:
            async def main() -> None:
                self._stop_event = asyncio.Event()
                await self.serve(self._stop_event)

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name=f"hl7-{self.site_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("HL7 listener did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread:
            self._thread.join(10)


def _escape(text: str) -> str:
    return text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\").replace("~", "\\R\\")


def _bare_nack(text: str, reason: str, code: str = "AR") -> str:
    control = ""
    first = text.split("\r")[0]
    fields = first.split("|")
    if first.startswith("MSH") and len(fields) > 9:
        control = fields[9]
    return f"MSH|^~\\&|RENKEI||||||ACK|{control}|P|2.5\rMSA|{code}|{control}|{_escape(reason)}"
