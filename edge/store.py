"""The edge's durable file store: instances kept byte for byte as received.

Layout under the site's store folder (`Layout(config, data_dir).edge_store(site_id)`):

    journal.sqlite                                  the journal (see edge.journal)
    space-reserve                                   space held for the journal (see SpaceReserve)
    tmp/<random>.part                               files being written
    spare/<random>.part                             empty files made ahead for tmp/ (no data)
    instances/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    conflicts/<sop_instance_uid>/<sha256>.dcm       a different instance under a known SOP Instance UID

Every path component below the store folder is a validated DICOM UID (digits
and dots, no empty part) or a hex digest, so nothing received can name a file
outside the store. A file is durable once `commit` returns: it was written to
a temporary file, fsynced, renamed into place, and its directory fsynced
(and any directory created for it, with its parent).

A full disk never stops the edge: `min_free_bytes` is kept free (a C-STORE is
refused with 0xA700 before the disk is full), and a preallocated reserve file
(`space-reserve`) holds space for the journal that the edge releases when the
filesystem is nearly full anyway (another program filled it), so that the
journal can still open, migrate and write its bookkeeping; it is made again
when space is back. While the reserve is released, its size counts as used:
stores resume only when there is room for them and for the reserve.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from renkei.errors import StorageError
from renkei.uids import validate_uid

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
RESERVE_NAME = "space-reserve"
_ROOM_FOR_ONE = 64 * 1024  # below this much room for stores the edge counts as full (maintain_space)
LOGGER = logging.getLogger(__name__)


class EdgeStoreError(StorageError):
    """The edge's local store could not be written or read."""


class DiskFull(EdgeStoreError):
    """No space left for an instance: free disk space (or retention) before sending again."""


@dataclass(frozen=True)
class TempFile:
    """A fully written and fsynced temporary file, not yet in its place."""

    path: Path
    size: int
    sha256: str


class FileStore:
    """Durable files under one folder; see the module docstring for the layout."""

    def __init__(
        self,
        root: Path,
        fsync: bool = True,
        min_free_bytes: int = 0,
        reserve_bytes: int = 0,
        space: FileStore | None = None,
        spares: bool = False,
    ) -> None:
        """`space`: another store on the same filesystem whose space rules this one obeys (the edge cache).

        `spares`: keep empty temporary files made ahead (`make_spares`), for a
        store that receives C-STOREs and is cleaned at its start (`clean_temp`).
        """
        self.root = Path(root)
        self.space = space
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = self.root / "tmp"
        self.spare_dir = self.root / "spare"  # empty files made ahead (see make_spares)
        self.instances_dir = self.root / "instances"
        self.conflicts_dir = self.root / "conflicts"
        self._known_dirs: set[Path] = set()
        self.spares = spares
        self._spares: list[tuple[Path, int]] = []  # (path in spare/, open descriptor)
        self._spare_lock = threading.Lock()
        for folder in (self.root, self.tmp_dir, self.instances_dir, self.conflicts_dir):
            self._make_dir(folder)
        self.reserve = SpaceReserve(self.root / RESERVE_NAME, reserve_bytes, fsync) if reserve_bytes > 0 else None
        self._space_lock = threading.Lock()
        self._refusing = False  # C-STORE refused for want of space, since the last "space is back"
        self._refused = 0
        self._released = False  # this process released the reserve (its making again is news)

    # -- paths ---------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; raises InvalidUID for anything but valid UIDs."""
        return (
            self.instances_dir
            / validate_uid(study_uid, "Study Instance UID")
            / validate_uid(series_uid, "Series Instance UID")
            / f"{validate_uid(sop_instance_uid, 'SOP Instance UID')}.dcm"
        )

    def instance_location(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> tuple[Path, str]:
        """`instance_path` and its form in the journal (`relative`), built once per instance."""
        relative = (
            f"instances/{validate_uid(study_uid, 'Study Instance UID')}/"
            f"{validate_uid(series_uid, 'Series Instance UID')}/"
            f"{validate_uid(sop_instance_uid, 'SOP Instance UID')}.dcm"
        )
        return self.root / relative, relative

    def conflict_path(self, sop_instance_uid: str, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise EdgeStoreError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.conflicts_dir / validate_uid(sop_instance_uid, "SOP Instance UID") / f"{sha256}.dcm"

    def relative(self, path: Path) -> str:
        """The path as stored in the journal: relative to the store folder, '/'-separated."""
        return Path(path).relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise EdgeStoreError(f"journal path {relative!r} points outside the store {self.root}")
        return path

    # -- writing -------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes an ordinary process may still write on the store's filesystem."""
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def _room(self, free: int) -> int:
        """Bytes a C-STORE may use: free space less min_free_bytes and a released reserve's size."""
        held_back = self.min_free_bytes
        if self.reserve is not None and not self.reserve.held():
            held_back += self.reserve.size
        return free - held_back

    def check_space(self, size: int) -> None:
        """Raise DiskFull when writing `size` bytes would eat into min_free_bytes (or the released reserve)."""
        if self.space is not None:
            return self.space.check_space(size)
        if self.min_free_bytes <= 0 and self.reserve is None:
            return
        free = self.free_bytes()
        if self._room(free) >= size:
            return
        with self._space_lock:
            self._refused += 1
        self._now_full(free)
        raise DiskFull(
            f"only {_mib(free)} free in {self.root}, {_mib(self.min_free_bytes)} kept free"
            f"{self._reserve_note()}: free disk space"
        )

    def _now_full(self, free: int) -> None:
        """Log (once, until space is back) that C-STORE is refused for want of space."""
        with self._space_lock:
            first = not self._refusing
            self._refusing = True
        if first:
            LOGGER.warning(
                "disk nearly full: %s free on the filesystem of %s, %s kept free%s; C-STORE is "
                "refused (0xA700) until space is freed (verified studies are dropped by retention; "
                "queries and retrievals go on)",
                _mib(free),
                self.root,
                _mib(self.min_free_bytes),
                self._reserve_note(),
            )

    def _reserve_note(self) -> str:
        if self.reserve is None:
            return ""
        if self.reserve.held():
            return f" (the journal's reserve of {_mib(self.reserve.size)} held apart)"
        return f" plus the journal's reserve of {_mib(self.reserve.size)} (released: the disk is full)"

    def release_reserve(self) -> bool:
        """Give the journal the reserve's space now (the disk is full); True when something was freed."""
        if self.reserve is None:
            return False
        with self._space_lock:
            freed = self.reserve.release()
            self._released = self._released or bool(freed)
        if freed:
            LOGGER.warning(
                "disk full: released the journal's reserve of %s in %s so that the journal can "
                "still write; C-STORE is refused (0xA700) until space is freed",
                _mib(freed),
                self.root,
            )
        return bool(freed)

    def maintain_space(self) -> None:
        """Release the reserve when the disk is nearly full, make it again when space is back.

        Released below half the reserve's size free (something besides the edge
        filled the disk), made again at twice its size free. Never raises.
        """
        try:
            free = self.free_bytes()
            if self.reserve is not None:
                if self.reserve.held() and free < self.reserve.size // 2:
                    self.release_reserve()
                    free = self.free_bytes()
                elif not self.reserve.held() and free >= 2 * self.reserve.size:
                    with self._space_lock:
                        made = self.reserve.make()
                    if made and self._released:
                        LOGGER.warning(
                            "space is back: %s free in %s; the journal's reserve of %s is held again",
                            _mib(free),
                            self.root,
                            _mib(self.reserve.size),
                        )
                    elif made:
                        LOGGER.info("made the journal's reserve of %s in %s", _mib(self.reserve.size), self.root)
                    free = self.free_bytes()
            room = self._room(free)
            if room < _ROOM_FOR_ONE and (self.min_free_bytes > 0 or self.reserve is not None):
                self._now_full(free)
                return
            with self._space_lock:
                back = self._refusing
                refused = self._refused
                if back:
                    self._refusing, self._refused = False, 0
            if back:
                LOGGER.warning(
                    "space is back: %s free in %s; C-STORE is accepted again (%d instance(s) refused meanwhile)",
                    _mib(free),
                    self.root,
                    refused,
                )
        except OSError as exc:
            LOGGER.error("cannot check the free space of %s: %s", self.root, exc.strerror or exc)

    def write_temp(self, parts: Iterable[bytes | bytearray | memoryview], hash: bool = True) -> TempFile:
        """Write `parts` to a new temporary file, fsync it, and return its size and SHA-256.

        With `hash=False` the digest is left empty (the caller computes it in parallel).
        """
        path = self.tmp_dir / f"{secrets.token_hex(12)}.part"
        digest = hashlib.sha256() if hash else None
        size = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(exc, path) from None
        try:
            for part in parts:
                view = memoryview(part)
                if digest is not None:
                    digest.update(view)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(path)
            raise self._error(exc, path) from None
        os.close(fd)
        return TempFile(path, size, digest.hexdigest() if digest is not None else "")

    def open_temp(self) -> TempWriter:
        """A new temporary file to write in parts as they arrive (see TempWriter).

        A file made ahead (`make_spares`) is moved into tmp/ when there is one:
        a rename, where creating a file costs the filesystem an inode allocation
        (on ext4 a scan past every recently deleted inode of the block group,
        up to a millisecond of CPU per file after deletions), on the way from a
        C-STORE request to its answer.
        """
        path = self.tmp_dir / f"{secrets.token_hex(12)}.part"
        with self._spare_lock:
            spare = self._spares.pop() if self._spares else None
        if spare is not None:
            try:
                os.rename(spare[0], path)
                return TempWriter(self, path, spare[1])
            except OSError:
                _close_quietly(spare[1])
                _unlink(spare[0])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(exc, path) from None
        return TempWriter(self, path, fd)

    def spares_wanted(self, low: int = 4) -> bool:
        """Whether fewer than `low` files made ahead are left (time to `make_spares`)."""
        return self.spares and len(self._spares) < low

    def make_spares(self, count: int = 8) -> int:
        """Make empty files in spare/ until `count` wait for `open_temp`; returns how many were made.

        Run off the request path (a worker thread). Never raises: without
        spares `open_temp` creates its file itself. They hold no data and
        carry no durability: unused ones are removed by `drop_spares` at stop
        and, after a crash, by `clean_temp` at the next start.
        """
        made = 0
        try:
            self._make_dir(self.spare_dir)
            while len(self._spares) < count:
                path = self.spare_dir / f"{secrets.token_hex(12)}.part"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with self._spare_lock:
                    self._spares.append((path, fd))
                made += 1
        except OSError:
            pass
        return made

    def drop_spares(self) -> None:
        """Close and remove the files made ahead."""
        with self._spare_lock:
            spares, self._spares = self._spares, []
        for path, fd in spares:
            _close_quietly(fd)
            _unlink(path)

    def adopt_temp(self, path: Path) -> TempFile:
        """Take over a file written elsewhere in tmp/ (hash it, fsync it)."""
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, path) from None
        return TempFile(Path(path), size, digest.hexdigest())

    def commit(self, temp: TempFile, final: Path) -> Path:
        """Rename a temporary file into place and fsync its folder; returns `final`.

        The caller decides under its lock, from the journal, that `final` may be
        written: a file already there is one the journal does not know (left by
        a crash before its record, never acknowledged), or the same bytes.
        """
        final = Path(final)
        try:
            self._make_dir(final.parent)
            try:
                os.rename(temp.path, final)
            except FileNotFoundError:
                # a folder removed since it was created (retention): create it again
                self._known_dirs.discard(final.parent)
                self._make_dir(final.parent)
                os.rename(temp.path, final)
            # Both fsyncs stay, once per instance: the file's (TempWriter.sync, before this
            # rename) makes its data durable, and only a fsync of the folder makes a new name
            # durable (POSIX; ext4 and XFS alike, journaled or not). Renaming before the data's
            # fsync would let a power loss leave the final name on incomplete data, which
            # recovery would journal as the instance; skipping the folder's would let the
            # journal, committed next, name a file that is not there after a power loss.
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            raise self._error(exc, final) from None
        return final

    def discard(self, temp: TempFile | Path) -> None:
        _unlink(temp.path if isinstance(temp, TempFile) else Path(temp))

    def remove(self, path: Path) -> None:
        """Remove a stored file (retention); its directory is fsynced."""
        _unlink(path)
        if self.fsync and path.parent.exists():
            _fsync_dir(path.parent)

    def clean_temp(self) -> int:
        """Delete leftovers of writes interrupted by a crash; returns how many (spare files not counted)."""
        self.drop_spares()
        count = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file():
                _unlink(Path(entry.path))
                count += 1
        if self.spare_dir.is_dir():
            for entry in os.scandir(self.spare_dir):
                if entry.is_file():
                    _unlink(Path(entry.path))
        return count

    def iter_instance_files(self) -> Iterator[Path]:
        """Every file under instances/ (used to find files the journal does not know)."""
        for dirpath, _dirs, files in os.walk(self.instances_dir):
            for name in files:
                if name.endswith(".dcm"):
                    yield Path(dirpath) / name

    def iter_conflict_files(self) -> Iterator[Path]:
        for dirpath, _dirs, files in os.walk(self.conflicts_dir):
            for name in files:
                if name.endswith(".dcm"):
                    yield Path(dirpath) / name

    # -- internals -----------------------------------------------------------
    def _make_dir(self, folder: Path) -> None:
        """Create `folder` (and parents) durably: each new directory's parent is fsynced."""
        if folder in self._known_dirs:
            return
        missing: list[Path] = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)  # patient data: owner only
            except FileExistsError:
                pass
            if self.fsync:
                _fsync_dir(path.parent)
        self._known_dirs.add(folder)

    def _error(self, exc: OSError, path: Path) -> EdgeStoreError:
        if exc.errno in _FULL_ERRNOS:
            return DiskFull(f"disk full while writing {path}: free disk space in {self.root}")
        return EdgeStoreError(f"cannot write {path}: {exc.strerror or exc}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class SpaceReserve:
    """A preallocated file whose space the journal gets when the disk is full (see the module docstring)."""

    def __init__(self, path: Path, size: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.size = size
        self.fsync = fsync
        _unlink(self.path.with_name(self.path.name + ".part"))  # a creation a crash interrupted
        try:
            if self.path.stat().st_size != size:  # the configured size changed: made again at its new size
                self.release()
        except FileNotFoundError:
            pass

    def held(self) -> bool:
        return self.path.exists()

    def release(self) -> int:
        """Delete the reserve; returns the bytes freed (0 when it was not held)."""
        try:
            size = self.path.stat().st_blocks * 512
            os.unlink(self.path)
        except FileNotFoundError:
            return 0
        if self.fsync:
            _fsync_dir(self.path.parent)
        return size or self.size

    def make(self) -> bool:
        """Allocate the reserve (blocks really allocated, not a sparse file); False when there is no room."""
        part = self.path.with_name(self.path.name + ".part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                chunk = os.urandom(1 << 20)  # not zeros: a compressing filesystem would not keep them
                written = 0
                while written < self.size:
                    written += os.write(fd, chunk[: self.size - written])
            if self.fsync:
                os.fsync(fd)
        except OSError:
            os.close(fd)
            _unlink(part)
            return False
        os.close(fd)
        os.rename(part, self.path)
        if self.fsync:
            _fsync_dir(self.path.parent)
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class TempWriter:
    """A temporary file being written; `sync()` fsyncs and closes it, `abort()` removes it.

    A failed write is remembered: later writes do nothing and `sync()` raises it
    (so writes can run in another thread and the failure surfaces at the end).
    """

    def __init__(self, store: FileStore, path: Path, fd: int) -> None:
        self.store = store
        self.path = path
        self.fd: int | None = fd
        self.size = 0
        self.error: EdgeStoreError | None = None

    def write(self, part: bytes | bytearray | memoryview) -> None:
        if self.fd is None:
            if self.error is not None:
                raise self.error
            return
        view = memoryview(part)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self.abort()
            self.error = self.store._error(exc, self.path)
            raise self.error from None

    def sync(self) -> TempFile:
        """fsync and close the file; its digest is left empty (the caller hashes what it wrote)."""
        if self.error is not None:
            raise self.error
        fd = cast(int, self.fd)
        try:
            if self.store.fsync:
                os.fsync(fd)
        except OSError as exc:
            self.abort()
            raise self.store._error(exc, self.path) from None
        os.close(fd)
        self.fd = None
        return TempFile(self.path, self.size, "")

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        _unlink(self.path)
