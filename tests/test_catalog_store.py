"""The center's object store, on a local folder and on S3 (moto over HTTP on loopback)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers_catalog import BACKENDS, backend_url
from helpers_wait import eventually

from renkei.catalog import Catalog, keys
from renkei.catalog.store import ObjectConflict, ObjectStore
from renkei.errors import IntegrityError, InvalidUID, StorageError, UsageError

REPO = Path(__file__).resolve().parents[1]
KEY = keys.object_key("clinic-a", "1.2.3", "1.2.3.1", "1.2.3.1.7")


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return ObjectStore(backend_url(request, request.param, tmp_path))


def test_keys_derive_from_site_and_validated_uids() -> None:
    assert KEY == "objects/clinic-a/1.2.3/1.2.3.1/1.2.3.1.7.dcm"
    sha = "a" * 64
    conflict = keys.object_key("clinic-a", "1.2.3", "1.2.3.1", "1.2.3.1.7", conflict_sha256=sha)
    assert conflict == f"objects/clinic-a/1.2.3/1.2.3.1/1.2.3.1.7.{sha}.dcm"
    assert keys.parse_object_key(conflict) == ("clinic-a", "1.2.3", "1.2.3.1", "1.2.3.1.7")
    with pytest.raises(InvalidUID):
        keys.object_key("clinic-a", "1.2.3/../../etc", "1.2", "1.2.3")
    with pytest.raises(UsageError):
        keys.object_key("../hub", "1.2.3", "1.2", "1.2.3")


def test_put_read_verify_and_idempotent(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    info = store.put_file(src, KEY, sha)
    assert (info.size, info.sha256, info.created) == (len(data), sha, True)
    again = store.put_file(src, KEY, sha)
    assert again.created is False and again.sha256 == sha
    assert store.read_verified(KEY, sha) == data
    with store.open_verified(KEY, sha) as handle:
        assert handle.read(10) == data[:10]
    assert store.sha256_of(KEY) == sha
    assert store.size(KEY) == len(data)
    assert store.exists(KEY)
    assert list(store.list("objects/clinic-a")) == [KEY]
    out = tmp_path / "out.dcm"
    assert store.get_file(KEY, sha, out) == len(data) and out.read_bytes() == data
    assert store.delete(KEY) and not store.exists(KEY) and not store.delete(KEY)


def test_wrong_checksum_never_lands(store: ObjectStore) -> None:
    with pytest.raises(IntegrityError):
        store.put_bytes(b"the real bytes", KEY, hashlib.sha256(b"other bytes").hexdigest())
    assert not store.exists(KEY)
    assert list(store.list()) == []


def test_different_bytes_under_a_key_are_a_conflict(store: ObjectStore) -> None:
    store.put_bytes(b"first", KEY)
    with pytest.raises(ObjectConflict) as err:
        store.put_bytes(b"second", KEY)
    assert err.value.existing_sha256 == hashlib.sha256(b"first").hexdigest()
    assert store.read_verified(KEY, hashlib.sha256(b"first").hexdigest()) == b"first"
    conflict_key = keys.object_key("clinic-a", "1.2.3", "1.2.3.1", "1.2.3.1.7", conflict_sha256=err.value.new_sha256)
    store.put_bytes(b"second", conflict_key)
    assert sorted(store.list()) == sorted([KEY, conflict_key])


def test_corrupt_object_is_never_served(store: ObjectStore) -> None:
    info = store.put_bytes(b"x" * 5000, KEY)
    # damage the stored bytes behind the store's back
    path = store.path(KEY)
    if store.local:
        with open(path, "r+b") as handle:
            handle.seek(100)
            handle.write(b"y")
    else:
        store.fs.pipe_file(path, b"x" * 100 + b"y" + b"x" * 4899)
    with pytest.raises(IntegrityError):
        store.read_verified(KEY, info.sha256)
    with pytest.raises(IntegrityError):
        store.open_verified(KEY, info.sha256)
    assert store.sha256_of(KEY) != info.sha256
    with pytest.raises(StorageError):
        store.read_verified("objects/clinic-a/9.9/9.9.9/9.9.9.9.dcm", info.sha256)


_KILL_WRITER = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectStore
from helpers_catalog import make_batch
store = ObjectStore({url!r})
info = store.put_file({fifo!r}, {key!r}, {sha!r})
# as the pipeline does: the copy is registered only once the upload is complete
batch = make_batch(7, 1, prefix="1.2")
Catalog({url!r} + "/catalog").register(batch)
print("finished", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_writer_killed_mid_upload_leaves_nothing_visible(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = backend_url(request, backend, tmp_path)
    store = ObjectStore(url)
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    chunk = os.urandom(1024 * 1024)
    total = 64  # MiB promised; only 40 are sent before the kill
    digest = hashlib.sha256()
    for _ in range(total):
        digest.update(chunk)
    code = _KILL_WRITER.format(
        repo=str(REPO), tests=str(REPO / "tests"), url=url, fifo=str(fifo), key=KEY, sha=digest.hexdigest()
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=subprocess.PIPE)
    sent = threading.Event()
    holder: dict[str, int] = {}

    def feed() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        holder["fd"] = fd
        try:
            for _ in range(40):
                os.write(fd, chunk)
        except BrokenPipeError:
            pass
        sent.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert sent.wait(60), "the writer did not read its input"
        # wait until the upload is really under way (bytes stored somewhere), then kill it
        eventually(lambda: _upload_in_progress(store), 60, "the writer storing bytes")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if "fd" in holder:
            os.close(holder["fd"])
    assert b"finished" not in (child.stdout.read() if child.stdout else b"")
    assert not store.exists(KEY)
    assert list(store.list()) == []
    with pytest.raises(StorageError):
        store.read_verified(KEY, digest.hexdigest())
    catalog = Catalog(url + "/catalog")
    try:
        assert catalog.locations("1.2.7") == [] and catalog.study("1.2.7") is None
        assert catalog.totals() == []
    finally:
        catalog.close()
    # what the killed writer left is swept away, and a retry stores the object whole
    assert store.sweep_temp(older_than_s=0) >= 1
    assert not _upload_in_progress(store)
    src = tmp_path / "whole.bin"
    with open(src, "wb") as handle:
        for _ in range(total):
            handle.write(chunk)
    assert store.put_file(src, KEY, digest.hexdigest()).created
    assert store.sha256_of(KEY) == digest.hexdigest()


def _upload_in_progress(store: ObjectStore) -> bool:
    if store.local:
        for folder, _dirs, files in os.walk(store.root):
            for name in files:
                if name.startswith(".tmp-") and os.path.getsize(os.path.join(folder, name)) > 0:
                    return True
        return False
    bucket, _, prefix = store.root.partition("/")
    uploads = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for upload in uploads:
        parts = store.fs.call_s3("list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        if parts.get("Parts"):
            return True
    return False
