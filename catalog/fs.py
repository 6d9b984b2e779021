"""One way to reach center storage: a local folder or s3://bucket/prefix, through fsspec.

`open_filesystem(url)` returns the filesystem and the root path every other
module joins keys onto. The two write primitives the catalog and the object
store need are here too, because they differ per backend:

- `atomic_write`: the file appears complete or not at all (local: temporary
  file in the same folder, fsync, `os.replace`; S3: one PUT).
- `exclusive_write`: like `atomic_write`, but fails with FileExistsError when
  the path already exists (local: `os.link` of a complete temporary file;
  S3: conditional PUT `If-None-Match: *`). This is what serialises catalog
  commits between processes and machines.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from renkei.errors import StorageError

S3_ENDPOINT_ENV = "RENKEI_S3_ENDPOINT_URL"
TEMP_PREFIX = ".tmp-"  # never listed, never referenced; swept by ObjectStore.sweep_temp


@dataclass(frozen=True)
class S3Settings:
    """Connection options for s3:// URLs (secrets come from the standard AWS variables)."""

    endpoint_url: str | None = None
    region: str | None = None


def _s3_settings(s3_options: Any) -> S3Settings:
    if s3_options is None:
        return S3Settings()
    if isinstance(s3_options, S3Settings):
        return s3_options
    if isinstance(s3_options, Mapping):
        return S3Settings(s3_options.get("endpoint_url"), s3_options.get("region"))
    return S3Settings(getattr(s3_options, "endpoint_url", None), getattr(s3_options, "region", None))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocol


def open_filesystem(url: str, s3_options: Any = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and its root path (no trailing slash).

    `url` is a local folder (created if missing), `file://...`, `memory://...`
    or `s3://bucket/prefix`. For S3 the endpoint is `s3_options.endpoint_url`
    (e.g. `config.center.s3`), else $RENKEI_S3_ENDPOINT_URL, else AWS's own;
    credentials are read by botocore from the AWS_* environment variables.
    """
    if url.startswith("s3://"):
        # lazy: s3fs (aiobotocore, ~0.35 s) only for a center on S3; local folders never pay for it
        import s3fs

        opts = _s3_settings(s3_options)
        endpoint = opts.endpoint_url or os.environ.get(S3_ENDPOINT_ENV) or None
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # region_name='us-east-1' breaks bucket creation on some servers: pass it only if asked.
        if opts.region and opts.region != "us-east-1":
            client_kwargs["region_name"] = opts.region
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False)
        root = url[len("s3://") :].rstrip("/")
        if not root:
            raise StorageError("s3:// URL needs a bucket name: s3://bucket/prefix")
        return fs, root
    if url.startswith("memory://"):
        return fsspec.filesystem("memory"), url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    root = os.path.abspath(os.path.expanduser(url))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the storage folder {root}: {exc}") from None
    return fsspec.filesystem("file"), root


def join(root: str, key: str) -> str:
    return f"{root}/{key.lstrip('/')}" if key else root


def temp_sibling(path: str) -> str:
    """A temporary name in the same folder as `path` (same filesystem, so rename is atomic)."""
    head, _, tail = path.rpartition("/")
    return f"{head}/{TEMP_PREFIX}{uuid.uuid4().hex}-{tail}"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, fsync: bool = True) -> None:
    """Write `data` at `path` so that readers see the old file, or the complete new one."""
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if fsync:
            _fsync_dir(folder)
        return
    fs.pipe_file(path, data)


def exclusive_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create `path` holding `data`, complete, unless it exists: then raise FileExistsError."""
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # atomic, and fails if `path` exists
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(folder)
        return
    if is_s3(fs):
        fs.pipe_file(path, data, mode="create")  # If-None-Match: * -> FileExistsError
        return
    # Other filesystems (memory://, for single-process use): best effort.
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    if is_local(fs):
        with open(path, "rb") as handle:
            return handle.read()
    return bytes(fs.cat_file(path))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    if is_local(fs):
        return os.path.exists(path)
    return bool(fs.exists(path))


def listdir_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Base names directly under `path` (files and folders); [] when it does not exist."""
    if is_local(fs):
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []
    try:
        entries = fs.ls(path, detail=False, refresh=True) if is_s3(fs) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return [e.rstrip("/").rpartition("/")[2] for e in entries]


def _hash_stream(handle: Any, chunk: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while True:
        block = handle.read(chunk)
        if not block:
            return digest.hexdigest(), size
        digest.update(block)
        size += len(block)


def sha256_file(path: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(SHA-256 hex, size) of a local file."""
    with open(path, "rb") as handle:
        return _hash_stream(handle, chunk)


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(SHA-256 hex, size) of a file on any backend, streamed."""
    if is_local(fs):
        return sha256_file(path, chunk)
    with fs.open(path, "rb", block_size=chunk) as handle:
        return _hash_stream(handle, chunk)


def copy_file(
    src_fs: fsspec.AbstractFileSystem, src: str, dst_fs: fsspec.AbstractFileSystem, dst: str, chunk: int = 8 << 20
) -> tuple[str, int]:
    """Copy one file between backends (streamed, atomic at the destination); returns (SHA-256, size)."""
    digest = hashlib.sha256()
    size = 0
    if is_local(dst_fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = temp_sibling(dst)
        try:
            with (
                open(src, "rb") if is_local(src_fs) else src_fs.open(src, "rb", block_size=chunk) as inp,
                open(tmp, "wb") as out,
            ):
                while True:
                    block = inp.read(chunk)
                    if not block:
                        break
                    digest.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest.hexdigest(), size
    data = read_bytes(src_fs, src)
    dst_fs.pipe_file(dst, data)
    return hashlib.sha256(data).hexdigest(), len(data)
