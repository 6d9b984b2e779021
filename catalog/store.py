"""The center's object store: instance bytes by key, over a local folder or S3.

Why a class of its own: every copy the center serves out must be the bytes
that were acknowledged, so writes never expose a half-written object under its
final key and reads always check the SHA-256 recorded for the key.

- Local folder: bytes go to a temporary name in the same folder (`.tmp-...`,
  never listed), are fsync'ed, checked, then hard-linked to the final name
  (which fails instead of overwriting a different object).
- S3: one PUT, or a multipart upload completed only after the bytes hashed to
  the expected SHA-256 (an interrupted upload is never visible); conditional
  `If-None-Match: *` so an existing object is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from renkei.catalog import fs as cfs
from renkei.errors import IntegrityError, StorageError

READ_BUFFER = 8 * 1024 * 1024  # large reads: the nightly verification must run near disk speed
SPOOL_IN_MEMORY = 64 * 1024 * 1024


class ObjectMissing(StorageError):
    """No object is stored under the key."""


class ObjectConflict(StorageError):
    """Different bytes already exist under the key.

    Keep the new ones under keys.object_key(..., conflict_sha256=...).
    """

    def __init__(self, key: str, existing_sha256: str, new_sha256: str) -> None:
        super().__init__(
            f"object {key} already exists with SHA-256 {existing_sha256[:12]}..., not {new_sha256[:12]}...; "
            "store the new bytes under the conflict key (catalog.keys.object_key(..., conflict_sha256=...)) "
            "and record the conflict"
        )
        self.key = key
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256


@dataclass(frozen=True)
class ObjectInfo:
    """What is stored under a key: its size and SHA-256; `created` is False when it was already there."""

    key: str
    size: int
    sha256: str
    created: bool = True


def _sha256_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class ObjectStore:
    """Instance bytes by key (see catalog.keys) under `url`: a folder or s3://bucket/prefix."""

    def __init__(
        self, url: str, s3_options: Any = None, filesystem: tuple[fsspec.AbstractFileSystem, str] | None = None
    ) -> None:
        self.url = url
        self.fs, self.root = filesystem or cfs.open_filesystem(url, s3_options)
        self.local = cfs.is_local(self.fs)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or cfs.TEMP_PREFIX in key:
            raise StorageError(f"{key!r} is not a valid object key")
        return cfs.join(self.root, key)

    # ----------------------------------------------------------------- writes
    def put_file(self, local_path: str | os.PathLike[str], key: str, expected_sha256: str | None = None) -> ObjectInfo:
        """Store the file at `local_path` under `key`; returns its ObjectInfo.

        Raises IntegrityError when the bytes do not hash to `expected_sha256`
        (nothing is left under the key), ObjectConflict when other bytes are
        already stored there. Storing the same bytes again returns created=False.
        """
        local_path = os.fspath(local_path)
        if expected_sha256 is None:
            expected_sha256, _ = _sha256_file(local_path)
        with open(local_path, "rb", buffering=0) as handle:
            return self._put_stream(handle, key, expected_sha256)

    def adopt_file(self, local_path: str | os.PathLike[str], key: str, sha256: str) -> ObjectInfo:
        """Store a file the caller wrote and hashed itself (a received part), moving it rather than copying
        when it lies on the store's own filesystem (`spool_folder()`); same answers as put_file.

        `sha256` is trusted: the caller computed it from the bytes as it wrote them. The file is gone
        afterwards when it was moved (kept when it was copied).
        """
        local_path = os.fspath(local_path)
        if not self.local:
            return self.put_file(local_path, key, sha256)
        final = self.path(key)
        existing = self._existing(final, key, sha256.lower())
        if existing is not None:
            return existing
        with open(local_path, "rb", buffering=0) as handle:
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.link(local_path, final)
        except FileExistsError:
            existing = self._existing(final, key, sha256.lower())
            assert existing is not None
            return existing
        except OSError:  # another filesystem: copy (and hash again)
            return self.put_file(local_path, key, sha256)
        os.unlink(local_path)
        cfs._fsync_dir(os.path.dirname(final))
        return ObjectInfo(key, size, sha256.lower(), True)

    def spool_folder(self) -> str | None:
        """A folder on the store's own filesystem for files to adopt (never listed, swept), or None (S3)."""
        if not self.local:
            return None
        return cfs.join(self.root, cfs.TEMP_PREFIX + "spool")

    def put_bytes(self, data: bytes, key: str, expected_sha256: str | None = None) -> ObjectInfo:
        """Store `data` under `key` (same guarantees as put_file)."""
        if expected_sha256 is None:
            expected_sha256 = hashlib.sha256(data).hexdigest()
        return self._put_stream(io.BytesIO(data), key, expected_sha256)

    def _put_stream(self, source: IO[bytes], key: str, expected_sha256: str) -> ObjectInfo:
        final = self.path(key)
        expected_sha256 = expected_sha256.lower()
        existing = self._existing(final, key, expected_sha256)
        if existing is not None:
            return existing
        digest = hashlib.sha256()
        size = 0
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = cfs.temp_sibling(final)
            try:
                with open(tmp, "wb") as out:
                    while chunk := source.read(READ_BUFFER):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                got = digest.hexdigest()
                if got != expected_sha256:
                    raise IntegrityError(
                        f"{key}: the bytes hash to {got[:12]}..., not the expected {expected_sha256[:12]}...; "
                        "the source is damaged: fetch it again from the edge"
                    )
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    existing = self._existing(final, key, expected_sha256)
                    assert existing is not None
                    return existing
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            cfs._fsync_dir(os.path.dirname(final))
            return ObjectInfo(key, size, expected_sha256, True)
        # S3: exclusive create; a multipart upload only becomes visible on completion.
        handle = self.fs.open(final, "xb", block_size=16 * 1024 * 1024, Metadata={"sha256": expected_sha256})
        try:
            while chunk := source.read(READ_BUFFER):
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
            got = digest.hexdigest()
            if got != expected_sha256:
                handle.discard()
                handle.closed = True  # discarded: nothing to complete
                raise IntegrityError(
                    f"{key}: the bytes hash to {got[:12]}..., not the expected {expected_sha256[:12]}...; "
                    "the source is damaged: fetch it again from the edge"
                )
            try:
                handle.close()
            except FileExistsError:
                existing = self._existing(final, key, expected_sha256)
                assert existing is not None
                return existing
        except BaseException:
            if not handle.closed:
                handle.discard()
                handle.closed = True
            raise
        return ObjectInfo(key, size, expected_sha256, True)

    def _existing(self, final: str, key: str, expected_sha256: str) -> ObjectInfo | None:
        """ObjectInfo(created=False) when the same bytes are already stored; ObjectConflict if others are."""
        if not cfs.exists(self.fs, final):
            return None
        stored = None if self.local else self._metadata_sha(final)
        if stored is None:
            stored, size = self._hash_path(final)
        else:
            size = self.size(key)
        if stored != expected_sha256:
            raise ObjectConflict(key, stored, expected_sha256)
        return ObjectInfo(key, size, stored, False)

    def _metadata_sha(self, final: str) -> str | None:
        try:
            meta = self.fs.metadata(final, refresh=True)
        except Exception:
            return None
        return meta.get("sha256") if isinstance(meta, dict) else None

    # ------------------------------------------------------------------ reads
    def _hash_path(self, path: str) -> tuple[str, int]:
        if self.local:
            return _sha256_file(path)
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(path, "rb", block_size=READ_BUFFER, cache_type="none") as handle:
            while chunk := handle.read(READ_BUFFER):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def sha256_of(self, key: str) -> str:
        """The SHA-256 of the stored bytes, read in full (large buffered reads)."""
        try:
            return self._hash_path(self.path(key))[0]
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None

    def open_verified(self, key: str, sha256: str) -> IO[bytes]:
        """A readable file of the object, returned only once its bytes hashed to `sha256`.

        The bytes are checked before the first byte is served (spooled to memory,
        or to a temporary file past 64 MiB); raises IntegrityError on mismatch.
        """
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        digest = hashlib.sha256()
        try:
            path = self.path(key)
            opener = (
                open(path, "rb", buffering=0)
                if self.local
                else self.fs.open(path, "rb", block_size=READ_BUFFER, cache_type="none")
            )
            with opener as handle:
                while chunk := handle.read(READ_BUFFER):
                    digest.update(chunk)
                    spool.write(chunk)
        except FileNotFoundError:
            spool.close()
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None
        got = digest.hexdigest()
        if got != sha256.lower():
            spool.close()
            raise IntegrityError(
                f"object {key} hashes to {got[:12]}..., not the recorded {sha256[:12]}...: "
                "it is corrupt; restore it from an edge copy (renkei verify) before serving it"
            )
        spool.seek(0)
        return spool

    def read_verified(self, key: str, sha256: str) -> bytes:
        """The object's bytes, or IntegrityError when they do not hash to `sha256` (one copy in memory:
        the whole object is read, hashed and returned; for objects of any size use open_verified)."""
        try:
            path = self.path(key)
            if self.local:
                with open(path, "rb", buffering=0) as handle:
                    data = handle.read()
            else:
                data = bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha256.lower():
            raise IntegrityError(
                f"object {key} hashes to {got[:12]}..., not the recorded {sha256[:12]}...: "
                "it is corrupt; restore it from an edge copy (renkei verify) before serving it"
            )
        return data

    def get_file(self, key: str, sha256: str, local_path: str | os.PathLike[str]) -> int:
        """Copy the verified object to `local_path` (atomically); returns its size."""
        local_path = os.fspath(local_path)
        tmp = cfs.temp_sibling(local_path)
        with self.open_verified(key, sha256) as src, open(tmp, "wb") as out:
            while chunk := src.read(READ_BUFFER):
                out.write(chunk)
            size = out.tell()
        os.replace(tmp, local_path)
        return size

    def size(self, key: str) -> int:
        try:
            if self.local:
                return os.path.getsize(self.path(key))
            return int(self.fs.info(self.path(key))["size"])
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None

    def exists(self, key: str) -> bool:
        return cfs.exists(self.fs, self.path(key))

    def delete(self, key: str) -> bool:
        """Remove the object; returns False when it was not there."""
        path = self.path(key)
        try:
            if self.local:
                os.unlink(path)
            else:
                if not self.fs.exists(path):
                    return False
                self.fs.rm_file(path)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix`, sorted; temporary and in-progress objects are never listed."""
        base = cfs.join(self.root, prefix.strip("/")) if prefix else self.root
        if self.local:
            found: list[str] = []
            for folder, dirs, files in os.walk(base):
                dirs[:] = [d for d in dirs if not d.startswith(cfs.TEMP_PREFIX)]
                for name in files:
                    if not name.startswith(cfs.TEMP_PREFIX):
                        found.append(os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/"))
            yield from sorted(found)
            return
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return
        root = self.root.rstrip("/") + "/"
        for path in sorted(paths):
            name = path.rpartition("/")[2]
            if path.startswith(root) and not name.startswith(cfs.TEMP_PREFIX):
                yield path[len(root) :]

    def sweep_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove what interrupted writers left (temp files; incomplete S3 uploads); returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        if self.local:
            for folder, _dirs, files in os.walk(self.root):
                for name in files:
                    if name.startswith(cfs.TEMP_PREFIX):
                        path = os.path.join(folder, name)
                        try:
                            if os.path.getmtime(path) < cutoff:
                                os.unlink(path)
                                removed += 1
                        except FileNotFoundError:
                            pass
            return removed
        bucket, _, prefix = self.root.partition("/")
        client_uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for upload in client_uploads.get("Uploads", []):
            initiated = upload.get("Initiated")
            if initiated is not None and initiated.timestamp() < cutoff:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                removed += 1
        return removed
