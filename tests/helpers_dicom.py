"""A DICOM workstation for tests: C-FIND, C-MOVE and C-GET through pynetdicom, as an SCU."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)


@dataclass
class Retrieval:
    status: int
    completed: int = 0
    failed: int = 0
    received: list[bytes] = field(default_factory=list)


class Workstation:
    """One association to an edge, opened on first use, for many queries."""

    def __init__(self, ae_title: str, host: str, port: int, called_ae: str) -> None:
        self.ae_title, self.host, self.port, self.called_ae = ae_title, host, port, called_ae
        self._assoc = None
        self._received: list[bytes] = []

    def _association(self):
        if self._assoc is None or not self._assoc.is_established:
            ae = AE(ae_title=self.ae_title)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            for model in (
                PatientRootQueryRetrieveInformationModelFind,
                StudyRootQueryRetrieveInformationModelFind,
                StudyRootQueryRetrieveInformationModelMove,
                StudyRootQueryRetrieveInformationModelGet,
                PatientRootQueryRetrieveInformationModelGet,
            ):
                ae.add_requested_context(model)
            roles = []
            for cx in StoragePresentationContexts[:120]:
                ae.add_requested_context(cx.abstract_syntax)
                roles.append(build_role(cx.abstract_syntax, scp_role=True))

            def on_store(event) -> int:
                self._received.append(event.encoded_dataset())
                return 0x0000

            self._assoc = ae.associate(
                self.host, self.port, ae_title=self.called_ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
            assert self._assoc.is_established, f"{self.ae_title} could not associate with {self.called_ae}"
            # pynetdicom leaves Nagle's algorithm on: each request (command, then identifier) would wait
            # ~40 ms for a delayed ACK (docs/ENVIRONMENT: the same stall as dcmtk without TCP_NODELAY)
            self._assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._assoc

    def _ready(self):
        """The association, once its reactor thread has woken from the previous request's pause.

        pynetdicom 3.0's send_c_*() pause the reactor by waiting for `_is_paused`; right after one
        request ends, that flag is still True from its pause while the thread has not run yet, so the
        next request goes out with the reactor live, and a fast answer is taken by the reactor
        ("Received unexpected C-MOVE service message") and lost: the request waits its DIMSE timeout.
        """
        assoc = self._association()
        deadline = time.monotonic() + 5
        while assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0002)
        return assoc

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()

    def find(self, level: str, model: str = "study", **keys: str) -> list[Dataset]:
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        sop = (
            PatientRootQueryRetrieveInformationModelFind
            if model == "patient"
            else StudyRootQueryRetrieveInformationModelFind
        )
        out = []
        for status, identifier in self._ready().send_c_find(query, sop):
            assert status is not None and "Status" in status, "C-FIND got no response"
            if status.Status in (0xFF00, 0xFF01):
                out.append(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND failed: 0x{status.Status:04X}"
        return out

    def move(self, study_uid: str, destination: str) -> Retrieval:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final = None
        for status, _ in self._ready().send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove):
            if status is not None and "Status" in status:
                final = status
        assert final is not None, "C-MOVE got no response"
        return Retrieval(
            int(final.Status),
            int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            int(final.get("NumberOfFailedSuboperations", 0) or 0),
        )

    def get(self, study_uid: str) -> Retrieval:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        self._received = []
        final = None
        for status, _ in self._ready().send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                final = status
        assert final is not None, "C-GET got no response"
        return Retrieval(
            int(final.Status),
            int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            int(final.get("NumberOfFailedSuboperations", 0) or 0),
            list(self._received),
        )
