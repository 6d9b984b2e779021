"""The edge's DICOM node: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET SCP.

`EdgeServer` wires pynetdicom to the store, the journal and the Q/R sources.
Handlers are plain functions with their dependencies bound as arguments (as in
pynetdicom's apps/qrscp). C-MOVE and C-GET send instances from their files as
stored, never decoded (see `RetrieveServer`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import Verification

from renkei.config import DicomPeer, RegionConfig, SiteConfig, address_in
from renkei.edge import fastnet
from renkei.edge.clock import QuietClock, heartbeat_interval
from renkei.edge.ingest import Ingestor, StoreOutcome
from renkei.edge.journal import Journal, JournalError
from renkei.edge.parsing import split_file_meta
from renkei.edge.qr import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    Access,
    AllowLocal,
    LocalSource,
    QRService,
    QRSource,
    QueryError,
    RetrieveItem,
    RetrieveTally,
)
from renkei.edge.store import EdgeStoreError, FileStore
from renkei.edge.tls import client_tls_args, server_context
from renkei.errors import PeerError
from renkei.pki import identities_of

LOGGER = logging.getLogger(__name__)

# Statuses (PS3.4 C.4, PS3.7 C)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
SUBOPERATIONS_WARNING = 0xB000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
OUT_OF_RESOURCES_SUBOPS = 0xA702
NOT_AUTHORIZED = 0x0124

# Transfer syntaxes accepted for storage, in the edge's order of preference: the
# order of dcmtk's `storescp +xa` (compressed first, then deflated, explicit little,
# explicit big, implicit), so both choose the same syntax from the same proposal
# and store the same bytes; then every other syntax pynetdicom knows.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            JPEG2000,
            JPEG2000Lossless,
            JPEGExtended12Bit,
            JPEGBaseline8Bit,
            JPEGLosslessSV1,
            JPEGLSNearLossless,
            JPEGLSLossless,
            RLELossless,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            ImplicitVRLittleEndian,
            JPEGLossless,
            *ALL_TRANSFER_SYNTAXES,
        ]
    )
)
QR_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# what uncompressed data may be re-encoded to when the peer accepted none of its own syntax
CONVERTIBLE = (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
QR_MODELS = (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET, STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET)
PENDING_EVERY = 0.5  # seconds between C-MOVE/C-GET pending responses
CLEAN_SHUTDOWN = "clean_shutdown"  # journal meta key: "1" after a clean stop


def allowed_calling_aes(config: RegionConfig, site: SiteConfig) -> list[str]:
    """Who may associate with a site's edge: its own PACS and workstations (and itself), nobody else.

    Other sites' edges are not listed: nothing in the design needs edge-to-edge
    associations (deliveries go through the center and the edge's cache), and
    accepting them let one site file another's study as its own.
    """
    titles: list[str] = [site.edge.ae_title]  # the edge itself, from its own host (`renkei edge echo`)
    if site.pacs:
        titles.append(site.pacs.ae_title)
    titles.extend(ws.ae_title for ws in site.workstations)
    return list(dict.fromkeys(titles))


def move_destinations(config: RegionConfig, site: SiteConfig) -> dict[str, DicomPeer]:
    """C-MOVE destinations by AE title: the site's own PACS and workstations only."""
    peers: dict[str, DicomPeer] = {}
    if site.pacs:
        peers[site.pacs.ae_title] = site.pacs
    for ws in site.workstations:
        peers[ws.ae_title] = ws
    return peers


# Association rejections (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def _resolve(host: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        LOGGER.warning("cannot resolve %s (%s): its AE titles are accepted from no address", host, exc)
        return []
    return list(dict.fromkeys(ipaddress.ip_network(info[4][0]) for info in infos))


class Gatekeeper:
    """Who may associate with this edge, decided when the A-ASSOCIATE-RQ arrives.

    - the called AE title must be the edge's;
    - the calling AE title must be one of the site's own nodes, connecting
      from the host (or a network) the configuration names for it;
    - with mutual TLS, the peer's certificate must name that AE title or its
      site (see `renkei.pki`);
    - at least one presentation context must be proposed;
    - associations are limited in all and per source address: at the limit,
      the longest-idle association silent for `idle_evict_after` is closed to
      let the new peer in, else the request is rejected as a local limit.
    Every refusal is logged with the AE titles and the address.
    """

    def __init__(self, site: SiteConfig, *, mutual_tls: bool = False, active: Callable[[], list[Any]] = list) -> None:
        self.site = site
        self.limits = site.edge.limits
        self.mutual_tls = mutual_tls
        self.active = active
        itself = DicomPeer(
            ae_title=site.edge.ae_title, host=site.edge.host, port=site.edge.port, networks=("127.0.0.0/8", "::1/128")
        )
        self.nodes = {p.ae_title: p for p in [itself, *([site.pacs] if site.pacs else []), *site.workstations]}
        self.networks = {
            ae: _resolve(p.host) + [ipaddress.ip_network(n, strict=False) for n in p.networks]
            for ae, p in self.nodes.items()
        }
        self._lock = threading.Lock()
        self._evicted: weakref.WeakSet[Any] = weakref.WeakSet()

    def refusal(
        self, calling_ae: str, called_ae: str, address: str, identity: Any, contexts: int
    ) -> tuple[tuple[int, int, int], str] | None:
        """Why this association must be rejected (the A-ASSOCIATE-RJ reason and a text), or None."""
        if called_ae != self.site.edge.ae_title:
            return REJECT_CALLED_AE, f"called AE title {called_ae!r} is not this edge's"
        if calling_ae not in self.nodes:
            return REJECT_CALLING_AE, f"calling AE title {calling_ae!r} is not a node of site {self.site.id}"
        if not address_in(address, self.networks[calling_ae]):
            return REJECT_CALLING_AE, (
                f"calling AE title {calling_ae!r} is not accepted from {address} "
                f"(configured host {self.nodes[calling_ae].host})"
            )
        if self.mutual_tls:
            if identity is None:
                return REJECT_CALLING_AE, "no client certificate"
            if not identity.allows(calling_ae, self.site.id):
                return REJECT_CALLING_AE, (
                    f"the client certificate names {sorted(identity.ae_titles)} / sites "
                    f"{sorted(identity.sites)}, not {calling_ae!r}"
                )
        if contexts == 0:
            return REJECT_NO_REASON, "no presentation context proposed"
        return None

    def make_room(self, assoc: Any, address: str) -> bool:
        """Within the association limits for this peer, closing the longest-idle one if needed."""
        with self._lock:
            others = [
                a
                for a in self.active()
                if a is not assoc and a.is_established and not a.is_released and a not in self._evicted
            ]
            mine = [a for a in others if fastnet.peer_host(a) == address]
            for group, limit in ((mine, self.limits.max_per_address), (others, self.limits.max_associations)):
                if len(group) < limit:
                    continue
                now = time.monotonic()
                idle = [(now - getattr(a.dul, "last_activity", now), a) for a in group]
                idle = [(t, a) for t, a in idle if t >= self.limits.idle_evict_after]
                if not idle:
                    return False
                seconds, victim = max(idle, key=lambda pair: pair[0])
                LOGGER.warning(
                    "association limit reached: closing the association of %s@%s idle for %.0f s",
                    str(victim.requestor.ae_title).strip(),
                    fastnet.peer_host(victim),
                    seconds,
                )
                self._evicted.add(victim)  # no longer counted while its abort completes
                group.remove(victim)
                threading.Thread(target=victim.abort, daemon=True).start()
            return True

    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: admit the peer or reject the association before any negotiation.

        Fails closed: an error while deciding rejects the association.
        """
        assoc = event.assoc
        calling_ae = called_ae = "?"
        address = fastnet.peer_host(assoc)
        try:
            primitive = assoc.requestor.primitive
            calling_ae = str(primitive.calling_ae_title).strip()
            called_ae = str(primitive.called_ae_title).strip()
            contexts = len(primitive.presentation_context_definition_list or [])
            identity = _peer_identity(assoc) if self.mutual_tls else None
            refused = self.refusal(calling_ae, called_ae, address, identity, contexts)
            if refused is None and not self.make_room(assoc, address):
                refused = REJECT_LOCAL_LIMIT, "association limit reached and no association is idle"
        except Exception as exc:
            LOGGER.exception("deciding on an association from %s failed", address)
            refused = REJECT_NO_REASON, f"internal error: {type(exc).__name__}"
        if refused is None:
            fastnet.settle_pending(assoc)
            return
        reason, text = refused
        LOGGER.warning("association from %s@%s to %s rejected: %s", calling_ae, address, called_ae, text)
        assoc.acse.send_reject(*reason)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def _peer_identity(assoc: Any) -> Any:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
    except (ValueError, OSError):
        return None
    if not der:
        return None
    try:
        return identities_of(der)
    except Exception as exc:
        LOGGER.warning("unreadable client certificate: %s", exc)
        return None


def _peer_of(event: Any) -> tuple[str, str]:
    return str(event.assoc.requestor.ae_title).strip(), fastnet.peer_address(event.assoc)


# ------------------------------------------------------------------ handlers
def handle_store(event: Any, ingestor: Ingestor, on_stored: Callable[[StoreOutcome, Any], None] | None) -> int:
    """EVT_C_STORE: store the dataset exactly as received; the status says whether it is durable."""
    calling_ae, address = _peer_of(event)
    req = event.request
    stream = req.DataSet
    view = stream.getbuffer() if isinstance(stream, BytesIO) else memoryview(bytes(stream or b""))
    try:
        outcome = ingestor.store_instance(
            view,
            str(event.context.transfer_syntax),
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            calling_ae,
            address,
        )
    finally:
        view.release()
    if on_stored is not None:
        try:
            on_stored(outcome, event.assoc)
        except Exception:
            LOGGER.exception("on_stored callback failed")
    return outcome.status


def handle_find(event: Any, qr: QRService) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND: answers from every source the caller may see, in the data's character set."""
    calling_ae, address = _peer_of(event)
    model = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        seen = [False]

        def cancelled() -> bool:  # pynetdicom forgets a C-CANCEL once asked: remember it here
            seen[0] = seen[0] or bool(event.is_cancelled)
            return seen[0]

        answers = qr.find(calling_ae, model, identifier, cancelled=cancelled)
        count = 0
        for answer in answers:
            if cancelled():
                yield CANCEL, None
                return
            count += 1
            yield PENDING, answer
        if cancelled():  # the search itself saw the C-CANCEL first and stopped
            yield CANCEL, None
            return
    except QueryError as exc:
        LOGGER.warning("C-FIND from %s@%s refused: %s", calling_ae, address, exc)
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return
    except Exception:
        LOGGER.exception("C-FIND from %s@%s failed", calling_ae, address)
        yield UNABLE_TO_PROCESS, None
        return
    LOGGER.info("C-FIND from %s@%s: %d match(es)", calling_ae, address, count)
    yield SUCCESS, None


def log_association(event: Any, stored_by: Callable[[Any], dict[str, int]]) -> None:
    """One log line per association event; at its end, what it stored (by outcome)."""
    calling_ae, address = _peer_of(event)
    name = event.event.name
    if name == "EVT_REJECTED":
        LOGGER.warning(
            "association from %s@%s rejected (calling AE not listed in the configuration, "
            "or nothing acceptable proposed)",
            calling_ae,
            address,
        )
    elif name == "EVT_ESTABLISHED":
        LOGGER.info("association from %s@%s established", calling_ae, address)
    elif name in ("EVT_RELEASED", "EVT_ABORTED"):
        counts = stored_by(event.assoc)
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        how = "released" if name == "EVT_RELEASED" else "aborted"
        log = LOGGER.info if how == "released" else LOGGER.warning
        log("association from %s@%s %s%s", calling_ae, address, how, f" (instances: {summary})" if summary else "")


# ------------------------------------------------------------------ retrieve
class RetrieveServer:
    """C-MOVE and C-GET SCP that sends stored files as they are (no decode/re-encode).

    Called by `fastnet.FastAssociation` for every valid request; returns False
    for anything else so pynetdicom serves it.
    """

    def __init__(
        self,
        qr: QRService,
        ae_title: str,
        destinations: dict[str, DicomPeer],
        max_pdu: int = 0,
        tls_args: Callable[[DicomPeer], Any] | None = None,
    ) -> None:
        self.qr = qr
        self.ae_title = ae_title
        self.destinations = destinations
        self.max_pdu = max_pdu
        self.tls_args = tls_args or (lambda peer: None)

    def __call__(self, assoc: Any, msg: Any, context: Any) -> bool:
        if isinstance(msg, C_MOVE):
            self._serve(assoc, msg, context, "move")
            return True
        if isinstance(msg, C_GET):
            self._serve(assoc, msg, context, "get")
            return True
        return False

    # responses
    def _respond(
        self,
        assoc: Any,
        req: Any,
        context: Any,
        kind: str,
        status: int,
        tally: RetrieveTally | None,
        failed_uids: Sequence[str] = (),
    ) -> None:
        rsp = C_MOVE() if kind == "move" else C_GET()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp.Status = status
        if tally is not None:
            if status in (PENDING, CANCEL):
                rsp.NumberOfRemainingSuboperations = tally.remaining
            rsp.NumberOfCompletedSuboperations = tally.completed
            rsp.NumberOfFailedSuboperations = tally.failed
            rsp.NumberOfWarningSuboperations = tally.warning
        if failed_uids and status != PENDING:
            ts = context.transfer_syntax[0]
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = list(failed_uids)
            rsp.Identifier = BytesIO(encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated))
        assoc.dimse.send_msg(rsp, context.context_id)

    def _serve(self, assoc: Any, req: Any, context: Any, kind: str) -> None:
        calling_ae = str(assoc.requestor.ae_title).strip()
        what = "C-MOVE" if kind == "move" else "C-GET"
        ts = context.transfer_syntax[0]
        try:
            identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            items, refused = self.qr.plan_retrieve(calling_ae, str(req.AffectedSOPClassUID), identifier)
        except QueryError as exc:
            LOGGER.warning("%s from %s refused: %s", what, calling_ae, exc)
            self._respond(assoc, req, context, kind, IDENTIFIER_DOES_NOT_MATCH, None)
            return
        except Exception:
            LOGGER.exception("%s from %s failed", what, calling_ae)
            self._respond(assoc, req, context, kind, UNABLE_TO_PROCESS, None)
            return
        if not items:
            # the same answer whether the study exists at another site or nowhere: a caller
            # learns nothing about studies it may not see (the refusal itself is audited)
            LOGGER.warning(
                "%s from %s: nothing it may retrieve (%d instance(s) not permitted)", what, calling_ae, refused
            )
            self._respond(assoc, req, context, kind, NOT_AUTHORIZED, None)
            return
        if kind == "move":
            destination_ae = str(req.MoveDestination or "").strip()
            destination = self.destinations.get(destination_ae)
            if destination is None:
                LOGGER.warning("C-MOVE from %s to %r refused: not a node of this site", calling_ae, destination_ae)
                self.qr.refuse_destination(calling_ae, destination_ae, items)
                self._respond(assoc, req, context, kind, MOVE_DESTINATION_UNKNOWN, None)
                return
            items, refused = self.qr.for_destination(calling_ae, destination_ae, items)
            if not items:
                LOGGER.warning(
                    "C-MOVE from %s: %d instance(s) not permitted at %s", calling_ae, refused, destination_ae
                )
                self._respond(assoc, req, context, kind, NOT_AUTHORIZED, None)
                return
        tally = RetrieveTally(remaining=len(items))
        if kind == "move":
            if items:
                assert destination is not None  # a C-MOVE without a known destination was refused above
                self._move(assoc, req, context, items, tally, destination, calling_ae)
        elif items:
            self._get(assoc, req, context, items, tally, calling_ae)
        if self._cancelled(assoc, req):
            status = CANCEL
        elif tally.failed or tally.warning or tally.remaining:
            status = SUBOPERATIONS_WARNING if tally.completed else OUT_OF_RESOURCES_SUBOPS
        else:
            status = SUCCESS
        unsent = [i.sop_instance_uid for i in items[len(items) - tally.remaining :]] if tally.remaining else []
        failed_uids = [] if status == SUCCESS else tally.failed_uids + unsent
        self._respond(assoc, req, context, kind, status, tally, failed_uids)
        LOGGER.info(
            "%s from %s%s: %d sent, %d failed, %d warning, %d not sent (status 0x%04X)",
            what,
            calling_ae,
            f" to {req.MoveDestination}" if kind == "move" else "",
            tally.completed,
            tally.failed,
            tally.warning,
            tally.remaining,
            status,
        )

    @staticmethod
    def _cancelled(assoc: Any, req: Any) -> bool:
        return req.MessageID in getattr(assoc.dimse, "cancel_req", {})

    def _send_items(
        self,
        store_assoc: Any,
        move_assoc: Any,
        req: Any,
        context: Any,
        kind: str,
        items: Sequence[RetrieveItem],
        tally: RetrieveTally,
        originator: str | None,
    ) -> None:
        last_pending = time.monotonic()
        msg_id = (int(req.MessageID) % 60000) + 1
        for item in items:
            if self._cancelled(move_assoc, req) or not store_assoc.is_established:
                break
            status = send_item(store_assoc, item, msg_id, originator, req.MessageID if originator else None)
            msg_id = msg_id % 65535 + 1
            tally.remaining -= 1
            if status == SUCCESS:
                tally.completed += 1
            elif status is not None and 0xB000 <= status <= 0xBFFF:
                tally.warning += 1
            else:
                tally.failed += 1
                tally.failed_uids.append(item.sop_instance_uid)
            now = time.monotonic()
            if tally.remaining and now - last_pending >= PENDING_EVERY:
                self._respond(move_assoc, req, context, kind, PENDING, tally)
                last_pending = now

    def _move(
        self,
        assoc: Any,
        req: Any,
        context: Any,
        items: list[RetrieveItem],
        tally: RetrieveTally,
        destination: DicomPeer,
        calling_ae: str,
    ) -> None:
        for batch in _batches_by_context(items):
            if self._cancelled(assoc, req):
                return
            store_ae = sender_ae(self.ae_title)
            for sop_class, syntaxes in contexts_for(batch):
                store_ae.add_requested_context(sop_class, syntaxes)
            try:
                store_assoc = store_ae.associate(
                    destination.host,
                    destination.port,
                    ae_title=destination.ae_title,
                    max_pdu=self.max_pdu,
                    tls_args=self.tls_args(destination),
                )
            except Exception as exc:
                LOGGER.error("C-MOVE to %s: cannot connect: %s", destination.ae_title, exc)
                store_assoc = None
            if store_assoc is None or not store_assoc.is_established:
                LOGGER.error(
                    "C-MOVE from %s: destination %s@%s:%s refused the association",
                    calling_ae,
                    destination.ae_title,
                    destination.host,
                    destination.port,
                )
                return
            try:
                with fastnet.paused(store_assoc):
                    self._send_items(store_assoc, assoc, req, context, "move", batch, tally, calling_ae)
            finally:
                if store_assoc.is_established:
                    store_assoc.release()

    def _get(
        self, assoc: Any, req: Any, context: Any, items: list[RetrieveItem], tally: RetrieveTally, calling_ae: str
    ) -> None:
        with fastnet.paused(assoc):
            self._send_items(assoc, assoc, req, context, "get", items, tally, None)


def _fast_path(site_id: str) -> bool:
    """Whether an edge serves on the fast path: always, unless RENKEI_EDGE_FAST=0 says otherwise.

    The defences against hostile peers that work on PDUs (size caps before the association, the
    advertised maximum, A-ABORT on malformed P-DATA, strict UIDs on the C-STORE path, read deadlines)
    live on the fast path: plain pynetdicom fails nine of tests/test_edge_adversarial.py's attacks.
    So an edge does not fall back to it silently: without the pynetdicom internals it needs, it does
    not start; with RENKEI_EDGE_FAST=0 it runs plain pynetdicom and says that it is unprotected.
    """
    if fastnet.turned_off():
        LOGGER.warning(
            "edge of %s on plain pynetdicom (%s=0): the defences against malformed, oversized and slow "
            "PDUs are off; use this only to diagnose the fast path",
            site_id,
            fastnet.FAST_ENV,
        )
        return False
    if not fastnet.check_compatible():
        raise PeerError(
            f"this pynetdicom {pynetdicom.__version__} lacks the internals the edge's network path needs "
            f"(edge/fastnet.py); install the pinned version (requirements.lock), or set {fastnet.FAST_ENV}=0 "
            "to run unprotected plain pynetdicom"
        )
    return True


def sender_ae(ae_title: str, timeout: float = 60) -> AE:
    """An AE for the edge as a client (C-STORE sender, queries): the fast path when pynetdicom allows it."""
    ae = fastnet.FastAE(ae_title=ae_title) if fastnet.enabled() else AE(ae_title=ae_title)
    ae.acse_timeout = 30
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def contexts_for(items: Sequence[RetrieveItem]) -> list[tuple[str, list[str]]]:
    """Presentation contexts to propose: each stored (SOP class, transfer syntax), and a
    fallback to uncompressed syntaxes for uncompressed data stored in another encoding."""
    pairs: dict[tuple[str, str], None] = {}
    fallback: dict[str, None] = {}
    for item in items:
        pairs[(item.sop_class_uid, item.transfer_syntax_uid)] = None
        if item.transfer_syntax_uid not in UNCOMPRESSED and not UID(item.transfer_syntax_uid).is_compressed:
            fallback[item.sop_class_uid] = None
    contexts = [(sop, [ts]) for sop, ts in pairs]
    contexts += [(sop, list(UNCOMPRESSED)) for sop in fallback]
    return contexts


def _batches_by_context(items: list[RetrieveItem], limit: int = 120) -> Iterator[list[RetrieveItem]]:
    """Split items so that each association proposes at most `limit` contexts."""
    batch: list[RetrieveItem] = []
    keys: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in keys and len(keys) >= limit // 2:
            yield batch
            batch, keys = [], set()
        keys.add(key)
        batch.append(item)
    if batch:
        yield batch


def send_item(
    assoc: Any, item: RetrieveItem, msg_id: int = 1, originator: str | None = None, originator_id: int | None = None
) -> int | None:
    """Send one stored instance over `assoc` (reactor held paused); returns the C-STORE status.

    The bytes go out as stored when the peer accepted the stored transfer
    syntax; otherwise uncompressed data is converted by pydicom (the only case
    where the edge re-encodes, because the receiver asked for it).
    """
    try:
        item = item.materialised()
    except Exception as exc:
        LOGGER.error("fetching %s from %s failed: %s", item.sop_instance_uid, item.source, exc)
        return None
    try:
        if item.path is not None:
            with open(item.path, "rb") as fh:
                head = fh.read(4096)
                _meta, offset = split_file_meta(head)
                if (os.fstat(fh.fileno()).st_size - offset) % 2:
                    # PDV fragments must have an even length (a deflated stream is
                    # padded with one null byte, PS3.5 A.5): pad as the standard says
                    fh.seek(offset)
                    return fastnet.send_stored(
                        assoc,
                        item.sop_class_uid,
                        item.sop_instance_uid,
                        item.transfer_syntax_uid,
                        data=fh.read() + b"\x00",
                        msg_id=msg_id,
                        originator_aet=originator,
                        originator_id=originator_id,
                    )
            return fastnet.send_stored(
                assoc,
                item.sop_class_uid,
                item.sop_instance_uid,
                item.transfer_syntax_uid,
                path=item.path,
                offset=offset,
                msg_id=msg_id,
                originator_aet=originator,
                originator_id=originator_id,
            )
        assert item.data is not None
        _meta, offset = split_file_meta(item.data)
        return fastnet.send_stored(
            assoc,
            item.sop_class_uid,
            item.sop_instance_uid,
            item.transfer_syntax_uid,
            data=item.data[offset:],
            msg_id=msg_id,
            originator_aet=originator,
            originator_id=originator_id,
        )
    except ValueError:
        pass  # no context with the stored transfer syntax: convert below
    except Exception as exc:
        LOGGER.error("sending %s failed: %s", item.sop_instance_uid, exc)
        return None
    try:
        if UID(item.transfer_syntax_uid).is_compressed:
            raise ValueError("compressed pixel data is only sent in its own transfer syntax")
        source = item.path if item.path is not None else BytesIO(item.data or b"")
        ds = dcmread(source)
        for syntax in CONVERTIBLE:
            try:
                context = assoc._get_valid_context(item.sop_class_uid, syntax, "scu", allow_conversion=False)
            except ValueError:
                continue
            ts = UID(syntax)
            raw = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            if raw is None:
                continue
            del context
            return fastnet.send_stored(
                assoc,
                item.sop_class_uid,
                item.sop_instance_uid,
                syntax,
                data=raw,
                msg_id=msg_id,
                originator_aet=originator,
                originator_id=originator_id,
            )
    except Exception as exc:
        LOGGER.error("sending %s (converted) failed: %s", item.sop_instance_uid, exc)
        return None
    LOGGER.warning(
        "peer accepted no transfer syntax for %s (%s)", item.sop_instance_uid, UID(item.transfer_syntax_uid).name
    )
    return None


# ------------------------------------------------------------------ the server
def edge_file_store(
    config: RegionConfig,
    site_id: str,
    store_dir: Path,
    *,
    fsync: bool = True,
    reserve_bytes: int | None = None,
    min_free_bytes: int | None = None,
) -> FileStore:
    """The edge's FileStore with its space rules (the arguments, else the site's `edge.disk`), checked once.

    Made before any journal of the store is opened: on a full disk the journal
    reserve is released first, so that the journals open and migrate.
    """
    folder = Path(store_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    stat = os.statvfs(folder)
    total = stat.f_blocks * stat.f_frsize
    default_reserve, default_min_free = config.site(site_id).edge.disk.sizes_for(total)
    reserve = default_reserve if reserve_bytes is None else reserve_bytes
    min_free = default_min_free if min_free_bytes is None else min_free_bytes
    if reserve + min_free > total // 2:
        raise EdgeStoreError(
            f"edge.disk of site {site_id}: journal_reserve ({reserve} bytes) and min_free ({min_free} bytes) "
            f"take more than half of the filesystem of {store_dir} ({total} bytes): lower them"
        )
    store = FileStore(Path(store_dir), fsync=fsync, min_free_bytes=min_free, reserve_bytes=reserve, spares=True)
    store.maintain_space()
    return store


@dataclass(frozen=True)
class ServerStats:
    stored: int
    duplicates: int
    conflicts: int
    refused: int
    failed: int


class EdgeServer:
    """A site's edge node: DICOM SCP over a durable store, plus study-completion notices.

    `sources` are the Q/R sources in order (default `["local"]`: the edge's own
    store; a callable is given the edge's journal, e.g. to build a cache source
    beside it); `access` decides what each calling AE may see and retrieve
    (default `AllowLocal`); `on_study_complete(study_uid)` is called from a
    background thread when a study has had no new instance for the site's
    `stable_age` (and again when a late instance reopened it).
    """

    def __init__(
        self,
        config: RegionConfig,
        site_id: str,
        store_dir: Path,
        *,
        sources: Sequence[QRSource | str | Callable[[Journal], QRSource]] | None = None,
        access: Access | None = None,
        on_study_complete: Callable[[str], None] | None = None,
        fsync: bool = True,
        host: str | None = None,
        port: int | None = None,
        completion_poll: float = 0.25,
        max_pdu: int | None = None,
        fast: bool | None = None,
        min_free_bytes: int | None = None,
        reserve_bytes: int | None = None,
        store: FileStore | None = None,
    ) -> None:
        self.config = config
        self.site = config.site(site_id)
        self.site_id = site_id
        self.fast = fast if fast is not None else _fast_path(site_id)  # before anything opens
        self.store_dir = Path(store_dir)
        self.host = host or self.site.edge.host
        self.port = port if port is not None else self.site.edge.port
        self.stable_age = self.site.edge.stable_age
        self.on_study_complete = on_study_complete
        self.completion_poll = completion_poll
        # a finite maximum PDU length, advertised and enforced (0, "unlimited", is never used)
        self.max_pdu = max_pdu or self.site.edge.limits.max_pdu
        self.heartbeat_interval = heartbeat_interval(self.stable_age)
        # before the journal opens: on a full disk the reserve is released, so that it opens and migrates
        self.store = store or edge_file_store(
            config, site_id, self.store_dir, fsync=fsync, reserve_bytes=reserve_bytes, min_free_bytes=min_free_bytes
        )
        self.journal = Journal(self.store_dir, synchronous="NORMAL", on_full=self.store.release_reserve)
        self.ingestor = Ingestor(self.store, self.journal)
        self.local_source = LocalSource(self.journal)
        self.sources: list[QRSource] = [self._source(s) for s in (sources or ["local"])]
        self.access: Access = access or AllowLocal()
        self.qr = QRService(
            self.sources, self.access, self.site.edge.ae_title, time_budget=self.site.edge.limits.query_time_budget
        )
        self.gatekeeper = Gatekeeper(
            self.site, mutual_tls=bool(self.site.edge.tls and self.site.edge.tls.ca), active=self.active_associations
        )
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._counts = {"stored": 0, "duplicate": 0, "conflict": 0, "refused": 0, "failed": 0}
        self._counts_lock = threading.Lock()
        self._per_assoc: dict[int, dict[str, int]] = {}
        self._client_tls: Any = None
        self._beat_failed = False

    def tls_args(self, peer: DicomPeer) -> Any:
        """TLS arguments for an association the edge opens to `peer` (None: plaintext).

        The client context (the edge's certificate and the region CA) is loaded
        once and serves every outgoing association.
        """
        if not peer.tls:
            return None
        if self._client_tls is None:
            self._client_tls = client_tls_args(self.site.edge.tls, peer)
        return self._client_tls

    def _source(self, source: QRSource | str | Callable[[Journal], QRSource]) -> QRSource:
        """ "local" is this edge's own store; a callable gets the edge's journal."""
        if source == "local":
            return self.local_source
        if isinstance(source, str):
            raise ValueError(f"unknown Q/R source {source!r}; use 'local' or a QRSource")
        if callable(source) and not hasattr(source, "find"):
            return source(self.journal)
        return source  # type: ignore[return-value]

    # -- pynetdicom set-up -------------------------------------------------------
    def _build_ae(self) -> AE:
        ae_title = self.site.edge.ae_title
        limits = self.site.edge.limits
        ae = fastnet.FastAE(ae_title=ae_title) if self.fast else AE(ae_title=ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.max_associate_rq = limits.max_associate_rq  # read by fastnet's PDU reader
        ae.pdu_timeout = limits.pdu_timeout
        # the Gatekeeper enforces the limits (with idle eviction); pynetdicom's own check is a backstop
        ae.maximum_associations = limits.max_associations + limits.max_per_address
        ae.acse_timeout = limits.setup_timeout
        ae.dimse_timeout = 120
        ae.network_timeout = limits.idle_timeout
        ae.require_calling_aet = allowed_calling_aes(self.config, self.site)
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(STORAGE_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
        ae.add_supported_context(Verification, list(QR_TRANSFER_SYNTAXES))
        for model in QR_MODELS:
            ae.add_supported_context(model, list(QR_TRANSFER_SYNTAXES))
        if self.fast:
            ae.store_handler = self._store_request
            ae.retrieve_server = RetrieveServer(
                self.qr,
                self.site.edge.ae_title,
                move_destinations(self.config, self.site),
                self.max_pdu,
                tls_args=self.tls_args,
            )
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.gatekeeper.on_requested),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, self._count]),
            (evt.EVT_C_FIND, handle_find, [self.qr]),
            (evt.EVT_C_MOVE, _fallback_move, [self]),
            (evt.EVT_C_GET, _fallback_get, [self]),
            (evt.EVT_REJECTED, log_association, [self._stored_by]),
            (evt.EVT_ESTABLISHED, log_association, [self._stored_by]),
            (evt.EVT_RELEASED, log_association, [self._stored_by]),
            (evt.EVT_ABORTED, log_association, [self._stored_by]),
        ]

    def _store_request(self, request: fastnet.StoreRequest) -> _CountingSink:
        """A C-STORE served in the DUL thread (see fastnet): its dataset streams to tmp/."""
        incoming = self.ingestor.begin(
            request.transfer_syntax_uid,
            request.sop_class_uid,
            request.sop_instance_uid,
            str(request.assoc.requestor.ae_title).strip(),
            fastnet.peer_address(request.assoc),
        )
        return _CountingSink(incoming, lambda outcome: self._count(outcome, request.assoc))

    def _count(self, outcome: StoreOutcome, assoc: Any = None) -> None:
        with self._counts_lock:
            self._counts[outcome.kind] = self._counts.get(outcome.kind, 0) + 1
            if assoc is not None:
                per = self._per_assoc.setdefault(id(assoc), {})
                per[outcome.kind] = per.get(outcome.kind, 0) + 1

    def _stored_by(self, assoc: Any) -> dict[str, int]:
        with self._counts_lock:
            return self._per_assoc.pop(id(assoc), {})

    @property
    def stats(self) -> ServerStats:
        with self._counts_lock:
            c = dict(self._counts)
        return ServerStats(c["stored"], c["duplicate"], c["conflict"], c["refused"], c["failed"])

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> EdgeServer:
        """Recover the store, then listen (non-blocking). Returns self."""
        clean = self.journal.get_meta(CLEAN_SHUTDOWN) == "1"
        self.journal.set_meta(CLEAN_SHUTDOWN, "0")
        # the quiet clock goes on from where the last run left it (see edge.clock); studies journaled
        # without a reading (an older journal) count as received now
        self.journal.quiet_clock = QuietClock(self.journal.resume_clock())
        adopted = self.journal.adopt_unclocked(self.journal.quiet_clock.now())
        if adopted:
            LOGGER.info(
                "edge %s: %d study(ies) journaled before the quiet clock now count as received at this start",
                self.site.edge.ae_title,
                adopted,
            )
        report = self.ingestor.recover(scan=not clean)
        self._beat()
        if not clean:
            LOGGER.info(
                "edge %s: store checked after an unclean stop: %d file(s) journaled again, "
                "%d conflict file(s), %d unreadable, %d temporary file(s) removed",
                self.site.edge.ae_title,
                report.files_journaled,
                report.conflicts_journaled,
                report.files_unreadable,
                report.temp_files_removed,
            )
        ae = self._build_ae()
        ssl_context = server_context(self.site.edge.tls) if self.site.edge.tls else None
        limits = self.site.edge.limits
        kwargs: dict[str, Any] = {
            "server_class": fastnet.EdgeAssociationServer if self.fast else fastnet.GuardedAssociationServer,
            "setup_timeout": limits.setup_timeout,
            "pdu_timeout": limits.pdu_timeout,
            "max_per_address": limits.max_per_address,
            "max_pending": 4 * limits.max_associations,
        }
        try:
            self._server = ae.make_server(
                (self.host, self.port), ssl_context=ssl_context, evt_handlers=self._handlers(), **kwargs
            )
        except OSError as exc:
            raise PeerError(
                f"edge {self.site.edge.ae_title} cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc}; is another edge running there?"
            ) from None
        ae._servers.append(self._server)  # as AE.start_server does; shutdown() removes it
        self.port = int(self._server.server_address[1])
        self._ae = ae
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, name=f"edge-{self.site_id}", daemon=True
        )
        self._server_thread.start()
        self._watcher = threading.Thread(
            target=self._watch_completion, name=f"edge-{self.site_id}-completion", daemon=True
        )
        self._watcher.start()
        LOGGER.info(
            "edge %s (site %s) listening on %s:%s%s, store %s, stable_age %gs",
            self.site.edge.ae_title,
            self.site_id,
            self.host,
            self.port,
            " with TLS" if ssl_context else "",
            self.store_dir,
            self.stable_age,
        )
        reserve = self.store.reserve
        LOGGER.info(
            "edge %s: %.1f MiB free for the store; C-STORE refused below %.1f MiB free; journal reserve %s",
            self.site.edge.ae_title,
            self.store.free_bytes() / 2**20,
            self.store.min_free_bytes / 2**20,
            "none"
            if reserve is None
            else f"{reserve.size / 2**20:.1f} MiB ({'held' if reserve.held() else 'released: disk nearly full'})",
        )
        return self

    def active_associations(self) -> list[Any]:
        if self._server is None:
            return []
        try:
            return list(self._server.active_associations)
        except Exception:
            return []

    def _established(self) -> list[Any]:
        return [a for a in self.active_associations() if a.is_established]

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let associations in progress finish (up to `timeout`), close."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        if self._server is not None:
            # stop accepting first, then wait for the associations in progress
            server = self._server
            shutdown = threading.Thread(target=server.shutdown, daemon=True)
            shutdown.start()
            deadline = time.monotonic() + timeout
            while self._established() and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self.active_associations():
                if assoc.is_established:
                    LOGGER.warning(
                        "aborting association with %s still open after %.0f s", assoc.requestor.ae_title, timeout
                    )
                    assoc.abort()
                else:  # a connection that never asked for an association (e.g. a port probe)
                    assoc.dul.kill_dul()
            shutdown.join(timeout=5)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._beat()  # the quiet clock stands at the stop until the next start
        if not self._established():
            try:
                self.journal.set_meta(CLEAN_SHUTDOWN, "1")
            except JournalError as exc:  # nothing is lost: the next start checks the store as after a crash
                LOGGER.warning(
                    "edge %s: the journal could not be marked cleanly closed (%s); the next start checks the store",
                    self.site.edge.ae_title,
                    exc,
                )
        self.ingestor.close()
        self.journal.close()
        self._stopped.set()
        LOGGER.info("edge %s stopped", self.site.edge.ae_title)

    def wait(self) -> None:
        """Block until stop() has completed."""
        while not self._stopped.wait(0.5):
            pass

    def __enter__(self) -> EdgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- study completion ---------------------------------------------------------
    def _watch_completion(self) -> None:
        """Every poll: completions; every heartbeat interval: the quiet clock; every second: the disk."""
        next_beat = time.monotonic() + self.heartbeat_interval
        next_disk = 0.0
        while not self._stopping.wait(self.completion_poll):
            now = time.monotonic()
            if now >= next_disk:
                self.store.maintain_space()
                next_disk = now + 1.0
            if now >= next_beat:
                self._beat()
                next_beat = now + self.heartbeat_interval
            try:
                self.check_completion()
            except Exception:
                LOGGER.exception("study completion check failed")

    def _beat(self) -> None:
        """Write the quiet clock to the journal (never raises: a full disk only delays completions)."""
        clock = self.journal.quiet_clock
        if clock is None:
            return
        try:
            self.journal.heartbeat(clock.now())
            self._beat_failed = False
        except JournalError as exc:
            if not self._beat_failed:
                LOGGER.warning(
                    "edge %s: cannot write its heartbeat to the journal (%s); completions wait",
                    self.site.edge.ae_title,
                    exc,
                )
            self._beat_failed = True

    def check_completion(self, now: float | None = None) -> list[str]:
        """Announce studies that just became complete; returns their UIDs.

        `now` is a reading of the edge's quiet clock (default: the running clock).
        """
        clock = self.journal.clock_now() if now is None else now
        done = self.journal.newly_completed(self.stable_age, clock)
        for study_uid in done:
            LOGGER.info("study complete: %s (site %s)", study_uid, self.site_id)
            if self.on_study_complete is not None:
                try:
                    self.on_study_complete(study_uid)
                except Exception:
                    LOGGER.exception("on_study_complete failed for study %s", study_uid)
            self.journal.mark_announced(study_uid, cutoff=None if clock is None else clock - self.stable_age)
        return done


class _CountingSink:
    """fastnet.StoreSink over an ingest.Incoming, counting outcomes for the server's stats."""

    def __init__(self, incoming: Any, count: Callable[[StoreOutcome], None]) -> None:
        self.incoming = incoming
        self.count = count

    def write(self, fragment: memoryview) -> None:
        self.incoming.write(fragment)

    def finish(self, data: bytes | memoryview | list[memoryview] | None) -> int:
        outcome = self.incoming.finish(data)
        self.count(outcome)
        return outcome.status

    def abort(self) -> None:
        self.incoming.abort()


def _fallback_move(event: Any, server: EdgeServer) -> Iterator[Any]:
    """Plain pynetdicom C-MOVE (only when fastnet is unavailable): datasets are decoded.

    The same decisions as `RetrieveServer`: the caller's right, then the destination's.
    """
    calling_ae, _address = _peer_of(event)
    model = str(event.request.AffectedSOPClassUID)
    destination_ae = str(event.move_destination).strip()
    destination = move_destinations(server.config, server.site).get(destination_ae)
    try:
        items, _refused = server.qr.plan_retrieve(calling_ae, model, event.identifier)
    except QueryError:
        if destination is None:
            yield None, None
            return
        yield destination.host, destination.port, {"contexts": [build_context(Verification)]}
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return
    if destination is None:
        server.qr.refuse_destination(calling_ae, destination_ae, items)
        yield None, None
        return
    items, _refused = server.qr.for_destination(calling_ae, destination_ae, items)
    contexts = [build_context(sop, syntaxes) for sop, syntaxes in contexts_for(items)][:128]
    options: dict[str, Any] = {"contexts": contexts or [build_context(Verification)]}
    tls_args = server.tls_args(destination)
    if tls_args is not None:
        options["tls_args"] = tls_args
    yield destination.host, destination.port, options
    if not items:
        yield NOT_AUTHORIZED, None
        return
    yield len(items)
    yield from _pending_datasets(event, items)


def _pending_datasets(event: Any, items: Sequence[RetrieveItem]) -> Iterator[Any]:
    """The sub-operations of a fallback C-MOVE/C-GET: each instance as a dataset, until cancelled."""
    for item in items:
        if event.is_cancelled:
            yield CANCEL, None
            return
        item = item.materialised()
        yield PENDING, dcmread(item.path if item.path else BytesIO(item.data or b""))


def _fallback_get(event: Any, server: EdgeServer) -> Iterator[Any]:
    calling_ae, _address = _peer_of(event)
    model = str(event.request.AffectedSOPClassUID)
    try:
        items, _refused = server.qr.plan_retrieve(calling_ae, model, event.identifier)
    except QueryError:
        yield 0
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return
    yield len(items)
    yield from _pending_datasets(event, items)
