"""The edge as a client of its site's PACS (and of any configured peer).

- `echo`: C-ECHO a peer.
- `send_study`: C-STORE a stored study to the PACS, bytes as stored.
- `find_studies` / `pull`: C-FIND the PACS, then C-MOVE each study to the edge
  itself, for a PACS that cannot forward on its own. The edge must be serving
  (the PACS connects back to it) and the PACS must know the edge's AE title.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from renkei.config import DicomPeer, RegionConfig, SiteConfig
from renkei.edge import fastnet
from renkei.edge.journal import Journal
from renkei.edge.qr import LocalSource, RetrieveItem
from renkei.edge.server import SUCCESS, contexts_for, send_item, sender_ae
from renkei.edge.tls import client_tls_args
from renkei.errors import PeerError, UsageError
from renkei.uids import validate_uid

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendReport:
    study_uid: str
    peer: str
    sent: int
    failed: int
    seconds: float
    failed_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullReport:
    peer: str
    studies: tuple[str, ...]
    completed: int
    failed: int
    warning: int
    seconds: float
    failures: tuple[str, ...] = field(default_factory=tuple)


def _ae(ae_title: str) -> AE:
    return sender_ae(ae_title, timeout=300)


def resolve_peer(config: RegionConfig, site_id: str, peer_ae: str | None) -> DicomPeer:
    """A peer by AE title (any node of the region), or the site's PACS when None."""
    site = config.site(site_id)
    if peer_ae is None:
        if site.pacs is None:
            raise UsageError(f"site {site_id!r} has no PACS in the configuration; name a peer AE title")
        return site.pacs
    peer = config.peer(peer_ae)
    if peer is None:
        raise UsageError(f"no DICOM node with AE title {peer_ae!r} in the configuration")
    return peer


def _associate(ae: AE, peer: DicomPeer, site: SiteConfig | None = None) -> Any:
    """An association to `peer`, over TLS when the configuration says the peer speaks it."""
    tls_args = client_tls_args(site.edge.tls if site else None, peer)
    try:
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, max_pdu=fastnet.DEFAULT_MAX_PDU, tls_args=tls_args
        )
    except Exception as exc:
        raise PeerError(f"cannot connect to {peer.ae_title} at {peer.host}:{peer.port}: {exc}") from None
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PeerError(
                f"{peer.ae_title} at {peer.host}:{peer.port} rejected the association from "
                f"{ae.ae_title}: check that it knows this AE title (and its own, {peer.ae_title})"
            )

        try:
            socket.create_connection((peer.host, peer.port), timeout=5).close()
        except OSError as exc:
            raise PeerError(
                f"nothing answers at {peer.host}:{peer.port} ({peer.ae_title}): "
                f"{exc.strerror or exc}; is it running, and are its host and port in the "
                "configuration right?"
            ) from None
        raise PeerError(
            f"{peer.ae_title} at {peer.host}:{peer.port} accepted the connection but no association "
            f"({'TLS handshake or ' if tls_args else ''}the peer aborted it): check its log"
        )
    return assoc


def echo(config: RegionConfig, site_id: str, peer_ae: str | None = None) -> float:
    """C-ECHO a peer from the site's edge AE title; returns the round trip in seconds."""
    site = config.site(site_id)
    peer = resolve_peer(config, site_id, peer_ae)
    ae = _ae(site.edge.ae_title)
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = _associate(ae, peer, site)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if getattr(status, "Status", None) != SUCCESS:
        raise PeerError(f"C-ECHO to {peer.ae_title} failed: status {getattr(status, 'Status', 'none')}")
    return time.perf_counter() - start


def send_items(
    ae_title: str, peer: DicomPeer, items: Sequence[RetrieveItem], site: SiteConfig | None = None
) -> tuple[int, list[str]]:
    """C-STORE `items` to `peer` over one association (bytes as stored); (sent, failed UIDs).

    `site` is the sending edge's site (its TLS certificate, for a peer configured with TLS)."""
    if not items:
        return 0, []
    ae = _ae(ae_title)
    for sop_class, syntaxes in contexts_for(items):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, peer, site)
    sent = 0
    failed: list[str] = []
    try:
        with fastnet.paused(assoc):
            for i, item in enumerate(items):
                if not assoc.is_established:
                    failed.extend(x.sop_instance_uid for x in items[i:])
                    break
                status = send_item(assoc, item, msg_id=i % 65535 + 1)
                if status is not None and (status == SUCCESS or 0xB000 <= status <= 0xBFFF):
                    sent += 1
                else:
                    failed.append(item.sop_instance_uid)
    finally:
        if assoc.is_established:
            assoc.release()
    return sent, failed


def send_study(
    config: RegionConfig, site_id: str, store_dir: Path, study_uid: str, peer_ae: str | None = None
) -> SendReport:
    """Send a study of the edge's store to the site PACS (or `peer_ae`)."""
    validate_uid(study_uid, "Study Instance UID")
    site = config.site(site_id)
    peer = resolve_peer(config, site_id, peer_ae)
    with Journal.open(store_dir) as journal:
        items = list(LocalSource(journal).instance_paths(study_uid))
    if not items:
        raise UsageError(f"study {study_uid} has no local instances at the edge of site {site_id!r}")
    start = time.perf_counter()
    sent, failed = send_items(site.edge.ae_title, peer, items, site)
    seconds = time.perf_counter() - start
    LOGGER.info(
        "sent study %s to %s: %d instance(s), %d failed, %.2f s", study_uid, peer.ae_title, sent, len(failed), seconds
    )
    return SendReport(study_uid, peer.ae_title, sent, len(failed), seconds, tuple(failed))


def find_studies(
    config: RegionConfig,
    site_id: str,
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    peer_ae: str | None = None,
) -> list[str]:
    """Study Instance UIDs the PACS holds for a study UID, a patient ID or a date range."""
    if not (study_uid or patient_id or date_from or date_to):
        raise UsageError("pull needs --study-uid, --patient-id or a date range (--date-from/--date-to)")
    site = config.site(site_id)
    peer = resolve_peer(config, site_id, peer_ae)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = validate_uid(study_uid, "Study Instance UID") if study_uid else ""
    query.PatientID = patient_id or ""
    query.StudyDate = f"{date_from or ''}-{date_to or ''}" if (date_from or date_to) else ""
    ae = _ae(site.edge.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, site)
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "")).strip()
                if uid and uid not in found:
                    found.append(uid)
            elif code is not None and code != SUCCESS:
                raise PeerError(f"C-FIND at {peer.ae_title} failed: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def study_instance_count(config: RegionConfig, site_id: str, study_uid: str, peer_ae: str | None = None) -> int:
    """How many instances of a study the PACS (or `peer_ae`) holds: C-FIND NumberOfStudyRelatedInstances."""
    site = config.site(site_id)
    peer = resolve_peer(config, site_id, peer_ae)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = validate_uid(study_uid, "Study Instance UID")
    query.NumberOfStudyRelatedInstances = ""
    ae = _ae(site.edge.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, site)
    count = 0
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                count = max(count, int(identifier.get("NumberOfStudyRelatedInstances", 0) or 0))
            elif code is not None and code != SUCCESS:
                raise PeerError(f"C-FIND at {peer.ae_title} failed: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return count


def pull(
    config: RegionConfig,
    site_id: str,
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    peer_ae: str | None = None,
) -> PullReport:
    """C-FIND the PACS, then C-MOVE each study found to this edge (which must be serving)."""
    site = config.site(site_id)
    peer = resolve_peer(config, site_id, peer_ae)
    start = time.perf_counter()
    studies = find_studies(
        config,
        site_id,
        study_uid=study_uid,
        patient_id=patient_id,
        date_from=date_from,
        date_to=date_to,
        peer_ae=peer_ae,
    )
    completed = failed = warning = 0
    failures: list[str] = []
    if studies:
        ae = _ae(site.edge.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, peer, site)
        try:
            for uid in studies:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = uid
                final = None
                for status, _identifier in assoc.send_c_move(
                    query, site.edge.ae_title, StudyRootQueryRetrieveInformationModelMove
                ):
                    if status is not None and "Status" in status:
                        final = status
                code = getattr(final, "Status", None)
                c = int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
                f = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
                w = int(getattr(final, "NumberOfWarningSuboperations", 0) or 0)
                completed, failed, warning = completed + c, failed + f, warning + w
                if code != SUCCESS:
                    failures.append(f"{uid}: status 0x{code:04X}" if code is not None else f"{uid}: no response")
        finally:
            if assoc.is_established:
                assoc.release()
    seconds = time.perf_counter() - start
    LOGGER.info(
        "pulled %d study(ies) from %s: %d instance(s), %d failed, %.2f s",
        len(studies),
        peer.ae_title,
        completed,
        failed,
        seconds,
    )
    return PullReport(peer.ae_title, tuple(studies), completed, failed, warning, seconds, tuple(failures))
