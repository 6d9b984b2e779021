"""Receiving one instance: parse, write durably, journal, decide the C-STORE status.

The sequence for a new instance (success is answered only after the last step):
1. parse the dataset (UIDs valid, framing intact), else a failure status;
2. write preamble + file meta + the received bytes to tmp/, fsync (SHA-256 on the way);
3. look the SOP Instance UID up in the journal:
   - unknown: link the file into instances/<study>/<series>/<sop>.dcm, fsync the folder,
     commit the journal record (fsynced, WAL);
   - same SHA-256: a resend, answered success, stored once;
   - other SHA-256: a conflict, both kept: the new bytes go to conflicts/<sop>/<sha256>.dcm
     and the conflict is journaled; the first instance is never replaced.
A crash between the file and the journal leaves a file the journal does not
know; `recover()` at start-up journals it (it was never acknowledged, but it is
intact and fsynced, so keeping it is harmless and saves a resend).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ImplicitVRLittleEndian

from renkei.edge.clock import wall_time
from renkei.edge.journal import Journal, JournalError
from renkei.edge.parsing import InvalidInstance, ParsedInstance, encode_file_meta, parse_dataset, split_file_meta
from renkei.edge.store import DiskFull, EdgeStoreError, FileStore, TempFile, TempWriter
from renkei.errors import RenkeiError
from renkei.uids import is_valid_uid

LOGGER = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
Received = Buffer | list[memoryview]  # a dataset whole, or its fragments in order

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one received instance, and the status to answer."""

    status: int
    kind: str  # stored | duplicate | conflict | refused | failed
    sop_instance_uid: str = ""
    study_uid: str = ""
    message: str = ""


@dataclass(frozen=True)
class RecoveryReport:
    temp_files_removed: int
    files_journaled: int
    conflicts_journaled: int
    files_unreadable: int


class Ingestor:
    """Stores received instances in a FileStore and records them in the Journal."""

    def __init__(self, store: FileStore, journal: Journal, clock: Callable[[], float] = wall_time) -> None:
        self.store = store
        self.journal = journal
        self.clock = clock  # the edge's wall clock, as journaled (a tool may journal what arrived earlier)
        self._decision_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edge-io")
        self._known_studies: set[str] = set()
        self._known_series: set[str] = set()
        self._making_spares = False

    def close(self) -> None:
        """Stop the worker threads (after the last instance)."""
        self._pool.shutdown(wait=True)
        self.store.drop_spares()

    def _keep_spares(self) -> None:
        """Have a worker make files ahead for tmp/ when few are left (see FileStore.open_temp)."""
        if self._making_spares or not self.store.spares_wanted():
            return
        self._making_spares = True
        try:
            self._pool.submit(self._make_spares)
        except RuntimeError:  # shutting down
            self._making_spares = False

    def _make_spares(self) -> None:
        try:
            self.store.make_spares()
        finally:
            self._making_spares = False

    def store_instance(
        self,
        data: bytes | bytearray | memoryview,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
        peer: str = "",
    ) -> StoreOutcome:
        """Store one instance as received; never raises, returns the outcome and status."""
        incoming = self.begin(transfer_syntax_uid, sop_class_uid, sop_instance_uid, calling_ae, peer)
        incoming.write(data)
        return incoming.finish(data)

    def begin(
        self, transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str, calling_ae: str, peer: str = ""
    ) -> Incoming:
        """Start receiving one instance: its bytes go to a temporary file as they arrive."""
        incoming = Incoming(self, transfer_syntax_uid, sop_class_uid, sop_instance_uid, calling_ae, peer)
        self._keep_spares()
        return incoming

    def _known(self, study_uid: str, series_uid: str) -> tuple[bool, bool]:
        """Whether the journal already holds this study and this series (cached once true)."""
        if len(self._known_series) > 100_000:
            self._known_studies.clear()
            self._known_series.clear()
        study = study_uid in self._known_studies or self.journal.has_study(study_uid)
        series = series_uid in self._known_series or self.journal.has_series(series_uid)
        if study:
            self._known_studies.add(study_uid)
        if series:
            self._known_series.add(series_uid)
        return study, series

    def _place(
        self,
        parsed: ParsedInstance,
        temp: TempFile,
        data: bytes | bytearray | memoryview,
        transfer_syntax_uid: str,
        calling_ae: str,
        who: str,
    ) -> StoreOutcome:
        """Put a written temporary file in its place (or recognise a resend or a conflict).

        The File Meta the edge writes depends only on the SOP Class and Instance
        UIDs and the transfer syntax, so the same dataset makes the same file
        and the file's SHA-256 identifies the instance; when the digests differ
        the stored dataset is compared byte for byte before calling it a conflict.
        """
        sop = parsed.sop_instance_uid
        with self._decision_lock:
            existing = self.journal.lookup(sop)
            if existing is None:
                final, relative = self.store.instance_location(parsed.study_uid, parsed.series_uid, sop)
                # the order is the guarantee: the file and its folder entry are durable (commit
                # fsyncs the folder) before the journal says the instance is stored, and both
                # before the C-STORE is answered; a journal record never points at a file a
                # power loss could take back
                self.store.commit(temp, final)
                try:
                    self.journal.record_instance(
                        parsed, transfer_syntax_uid, relative, temp.size, temp.sha256, calling_ae, self.clock()
                    )
                except sqlite3.IntegrityError:  # another process journaled it meanwhile
                    existing = self.journal.lookup(sop)
                    if existing is None:
                        raise JournalError(f"cannot journal {sop}: integrity error") from None
                else:
                    LOGGER.debug("stored %s (study %s) from %s", sop, parsed.study_uid, who)
                    return StoreOutcome(SUCCESS, "stored", sop, parsed.study_uid)
            if existing.sha256 == temp.sha256 or self._same_dataset(existing.path, data):
                if not existing.local:
                    final = self.store.instance_path(parsed.study_uid, parsed.series_uid, sop)
                    self.store.commit(temp, final)
                    self.journal.restore_local(sop, self.store.relative(final))
                LOGGER.debug("instance %s from %s already stored (same dataset)", sop, who)
                return StoreOutcome(SUCCESS, "duplicate", sop, parsed.study_uid)
            target = self.store.conflict_path(sop, temp.sha256)
            self.store.commit(temp, target)
            new = self.journal.record_conflict(
                parsed, existing.sha256, temp.sha256, self.store.relative(target), temp.size, calling_ae
            )
            LOGGER.warning(
                "conflict: %s sent a different instance under SOP Instance UID %s (study %s); "
                "both kept, the new one at %s%s",
                who,
                sop,
                parsed.study_uid,
                target,
                "" if new else " (seen before)",
            )
            return StoreOutcome(SUCCESS, "conflict", sop, parsed.study_uid, "conflict recorded")

    def _same_dataset(self, relative: str, data: bytes | bytearray | memoryview) -> bool:
        """Whether the stored file at `relative` holds exactly `data` after its File Meta."""
        try:
            stored = self.store.absolute(relative).read_bytes()
            _meta, offset = split_file_meta(stored)
        except (OSError, InvalidInstance, EdgeStoreError):
            return False
        return memoryview(stored)[offset:] == memoryview(data).cast("B")

    # -- start-up ---------------------------------------------------------------
    def recover(self, scan: bool = True) -> RecoveryReport:
        """Clean tmp/ and (with `scan`) journal files that a crash left without a journal record."""
        removed = self.store.clean_temp()
        if not scan:
            return RecoveryReport(removed, 0, 0, 0)
        known = self.journal.known_paths()
        journaled = conflicts = unreadable = 0
        for path in self.store.iter_instance_files():
            rel = self.store.relative(path)
            if rel in known:
                continue
            try:
                parsed, ts, temp = self._read_back(path)
                self.journal.record_instance(parsed, ts, rel, temp.size, temp.sha256, "", path.stat().st_mtime)
                journaled += 1
            except (RenkeiError, OSError, sqlite3.Error) as exc:
                LOGGER.warning("cannot recover %s: %s", path, exc)
                unreadable += 1
        for path in self.store.iter_conflict_files():
            rel = self.store.relative(path)
            if rel in known:
                continue
            try:
                parsed, ts, temp = self._read_back(path)
                existing = self.journal.lookup(parsed.sop_instance_uid)
                self.journal.record_conflict(
                    parsed, existing.sha256 if existing else "", temp.sha256, rel, temp.size, "", path.stat().st_mtime
                )
                conflicts += 1
            except (RenkeiError, OSError, sqlite3.Error) as exc:
                LOGGER.warning("cannot recover %s: %s", path, exc)
                unreadable += 1
        report = RecoveryReport(removed, journaled, conflicts, unreadable)
        if removed or journaled or conflicts or unreadable:
            LOGGER.info("recovery of %s: %s", self.store.root, report)
        return report

    def _read_back(self, path: Path):
        data = path.read_bytes()
        meta, offset = split_file_meta(data)
        ts = meta.get("TransferSyntaxUID", "")
        parsed = parse_dataset(memoryview(data)[offset:], ts)
        temp = self.store.adopt_temp(path)
        return parsed, ts, temp


class Incoming:
    """One instance being received, written to tmp/ fragment by fragment.

    `write` is called for each fragment as it arrives (the sender goes on
    sending meanwhile); `finish` then fsyncs the file in the receiving
    thread while a worker hashes and parses the dataset (fsync and hashing
    release the GIL), and puts the file in its place. Nothing is answered
    before the file and its journal record are durable.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
        peer: str,
    ) -> None:
        self.ingestor = ingestor
        self.transfer_syntax_uid = transfer_syntax_uid
        self.calling_ae = calling_ae
        self.who = f"{calling_ae}@{peer}" if peer else calling_ae
        self.sop_instance_uid = str(sop_instance_uid).rstrip("\x00 ")
        self.sop_class_uid = str(sop_class_uid).rstrip("\x00 ")
        self.outcome: StoreOutcome | None = None  # decided before the data arrived
        self.writer: TempWriter | None = None
        self.header = b""
        if not (is_valid_uid(self.sop_instance_uid) and is_valid_uid(self.sop_class_uid)):
            msg = (
                f"the request's SOP Class/Instance UID {_short(self.sop_class_uid)}/"
                f"{_short(self.sop_instance_uid)} is not valid"
            )
            LOGGER.warning("refused instance from %s: %s (status 0xA900)", self.who, msg)
            self.outcome = StoreOutcome(DATASET_DOES_NOT_MATCH_SOP_CLASS, "refused", self.sop_instance_uid, "", msg)
            return
        # no Source AE Title: the same dataset must make the same file (the journal
        # keeps who sent it)
        self.header = encode_file_meta(self.sop_class_uid, self.sop_instance_uid, transfer_syntax_uid)
        try:
            ingestor.store.check_space(len(self.header))
            self.writer = ingestor.store.open_temp()
            self.writer.write(self.header)
        except EdgeStoreError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, DiskFull):  # expected while the disk is full: the peer and the reason, no UID
            LOGGER.warning("refused an instance from %s: %s (status 0xA700)", self.who, exc)
            LOGGER.debug("refused instance: %s", self.sop_instance_uid)
        else:
            LOGGER.error("cannot store %s from %s: %s (status 0xA700)", self.sop_instance_uid, self.who, exc)
        self.outcome = StoreOutcome(OUT_OF_RESOURCES, "failed", self.sop_instance_uid, "", str(exc))
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def write(self, fragment: bytes | bytearray | memoryview) -> None:
        """Write a fragment as it arrives (a failure is remembered and surfaces in `finish`)."""
        if self.writer is not None:
            _write_quietly(self.writer, fragment)

    def abort(self) -> None:
        """The transfer broke off: remove the partial temporary file (nothing was acknowledged)."""
        if self.writer is not None:
            LOGGER.warning(
                "instance %s from %s: the association ended during its transfer; discarded",
                _short(self.sop_instance_uid),
                self.who,
            )
            self.writer.abort()
            self.writer = None

    def finish(self, data: Received | None) -> StoreOutcome:
        """Check, fsync, place and journal the instance; never raises.

        `data` is the whole dataset as received (one buffer, or the list of its
        fragments in order, joined by the worker that checks it), or None when
        the receiver kept only the file (large instances): the dataset is then
        read back from it (memory-mapped, so a big multi-frame object is never
        held twice).
        """
        if self.outcome is not None or self.writer is None:
            if self.writer is not None:
                self.writer.abort()
            return self.outcome or StoreOutcome(PROCESSING_FAILURE, "failed", self.sop_instance_uid)
        if data is None:
            return self._finish_from_file()
        writer, self.writer = self.writer, None
        # A worker hashes and checks the dataset (hashlib releases the GIL, the checks hold it)
        # while this thread fsyncs the file (without the GIL): the fsync, the longest step, starts
        # at once and its end is seen without a hand-off; the worker is done long before it.
        checking = self.ingestor._pool.submit(self._check, data)
        return self._conclude(writer, writer.sync, checking.result)

    def _check(self, data: Received) -> tuple[ParsedInstance, str, Buffer]:
        """The dataset's UIDs and attributes (checked against the request), the file's SHA-256,
        and the dataset as one buffer."""
        digest = hashlib.sha256(self.header)
        if isinstance(data, list):
            for fragment in data:
                digest.update(fragment)
            data = b"".join(data)
        else:
            digest.update(data)
        parsed = parse_dataset(data, self.transfer_syntax_uid, known=self.ingestor._known)
        if parsed.sop_instance_uid != self.sop_instance_uid:
            raise InvalidInstance(
                f"the dataset's SOP Instance UID {parsed.sop_instance_uid} differs from the "
                f"request's {self.sop_instance_uid}"
            )
        return parsed, digest.hexdigest(), data

    def _finish_from_file(self) -> StoreOutcome:
        writer, self.writer = self.writer, None
        assert writer is not None
        try:
            written = writer.sync()
            handle = open(written.path, "rb")
        except Exception as exc:
            writer.abort()
            return self._failure(exc)
        with handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mapped)
            data = view[len(self.header) :]
            try:
                return self._conclude(writer, lambda: written, lambda: self._check(data))
            finally:
                data.release()
                view.release()
                try:
                    mapped.close()
                except BufferError:  # a view still held somewhere: the mapping goes with it
                    LOGGER.debug("memory map of %s left to the garbage collector", written.path)

    def _failure(self, exc: BaseException) -> StoreOutcome:
        if isinstance(exc, EdgeStoreError | JournalError):
            LOGGER.error("cannot store %s from %s: %s (status 0xA700)", self.sop_instance_uid, self.who, exc)
            return StoreOutcome(OUT_OF_RESOURCES, "failed", self.sop_instance_uid, "", str(exc))
        LOGGER.error("unexpected failure storing %s from %s: %s", self.sop_instance_uid, self.who, exc)
        return StoreOutcome(PROCESSING_FAILURE, "failed", self.sop_instance_uid, "", str(exc))

    def _conclude(
        self,
        writer: TempWriter,
        synced: Callable[[], TempFile],
        checked: Callable[[], tuple[ParsedInstance, str, Buffer]],
    ) -> StoreOutcome:
        """Fsync the file and check the dataset, then place it; never raises.

        `synced()` fsyncs and closes the file; `checked()` returns the parsed
        dataset, the SHA-256 of the whole file (File Meta and dataset) and the
        dataset, possibly from a worker that ran meanwhile.
        """
        ingestor = self.ingestor
        temp: TempFile | None = None
        placed = False
        try:
            problem: BaseException | None = None
            written: TempFile | None = None
            try:
                written = synced()
            except Exception as exc:
                problem = exc
            try:
                parsed, sha256, data = checked()
            except Exception as exc:
                problem = exc  # what is wrong with the data is said first
            if written is not None:
                temp = TempFile(written.path, written.size, sha256 if problem is None else "")
            if problem is not None:
                try:
                    raise problem
                finally:
                    problem = None  # no reference cycle through the traceback
            assert temp is not None
            transfer_syntax_uid = self.transfer_syntax_uid
            if parsed.implicit_vr and transfer_syntax_uid != ImplicitVRLittleEndian:
                # implicit VR data sent under an explicit syntax: the bytes are kept as received,
                # the file is labelled with what they are, so that every reader decodes them
                transfer_syntax_uid = ImplicitVRLittleEndian
                LOGGER.info(
                    "instance %s from %s is implicit VR sent as %s: stored labelled implicit VR",
                    _short(self.sop_instance_uid),
                    self.who,
                    self.transfer_syntax_uid,
                )
                header = encode_file_meta(self.sop_class_uid, self.sop_instance_uid, transfer_syntax_uid)
                relabelled = ingestor.store.write_temp([header, data])
                ingestor.store.discard(temp)
                temp = relabelled
            outcome = ingestor._place(parsed, temp, data, transfer_syntax_uid, self.calling_ae, self.who)
            if outcome.kind == "stored":
                temp = None  # renamed into place: nothing left in tmp/ (no need to look)
                placed = True
            return outcome
        except InvalidInstance as exc:
            status = DATASET_DOES_NOT_MATCH_SOP_CLASS if "UID" in str(exc) else CANNOT_UNDERSTAND
            LOGGER.warning(
                "refused instance %s from %s: %s (status 0x%04X)", _short(self.sop_instance_uid), self.who, exc, status
            )
            return StoreOutcome(status, "refused", self.sop_instance_uid, "", str(exc))
        except DiskFull as exc:
            LOGGER.warning("refused an instance from %s: %s (status 0xA700)", self.who, exc)
            LOGGER.debug("refused instance: %s", self.sop_instance_uid)
            return StoreOutcome(OUT_OF_RESOURCES, "failed", self.sop_instance_uid, "", str(exc))
        except (EdgeStoreError, JournalError) as exc:
            LOGGER.error("cannot store %s from %s: %s (status 0xA700)", self.sop_instance_uid, self.who, exc)
            return StoreOutcome(OUT_OF_RESOURCES, "failed", self.sop_instance_uid, "", str(exc))
        except Exception as exc:  # never let a handler crash the association
            LOGGER.exception("unexpected failure storing %s from %s", self.sop_instance_uid, self.who)
            return StoreOutcome(PROCESSING_FAILURE, "failed", self.sop_instance_uid, "", str(exc))
        finally:
            if temp is not None:  # refused, failed, or a resend: whatever is still in tmp/ goes
                ingestor.store.discard(temp)
            elif not placed:
                writer.abort()


def _write_quietly(writer: TempWriter, fragment: bytes | bytearray | memoryview) -> None:
    try:
        writer.write(fragment)
    except EdgeStoreError:
        pass  # remembered by the writer; raised by sync()


def _short(uid: object) -> str:
    text = str(uid)
    return text if len(text) <= 64 else text[:64] + "..."
