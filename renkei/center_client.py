"""A site's edge sending its studies to the center's DICOMweb service (STOW-RS), with its own credential.

The site then holds no region-wide secret: no S3 keys, no catalog path, only
its token ($RENKEI_CENTER_TOKEN). Each instance goes as one part of a STOW-RS
request with its SHA-256 in a `Content-Digest` header (RFC 9530), so the
service refuses bytes damaged on the way and nothing is read back over the
link; the service stores, registers and applies the rules, so an instance it
names in its answer is done: the journal marks it 'verified' at once (pending
-> verified; the S3 path's 'uploaded' state is the service's own business).

What the service refuses for the data itself (not authorised: a study held as
another site's; unreadable; not of the study; the catalog refusing it)
quarantines the study, as `renkei.transfer` does; bytes damaged on the way
(digest) are sent again on the next run unless the edge's own file is the
damaged one (then quarantined too). The service unreachable, or answering 5xx,
is transient: `StorageError`, the run fails and is retried. A refused credential
is a `UsageError` that says what to do.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from renkei.edge.journal import Journal, JournalEntry
from renkei.errors import StorageError, UsageError
from renkei.transfer import UploadResult, local_problem, scrub, studies_to_sync

log = logging.getLogger(__name__)

TOKEN_ENV = "RENKEI_CENTER_TOKEN"
BATCH_BYTES = 64 * 1024 * 1024  # instances per STOW-RS request: up to this many bytes (at least one)
BATCH_INSTANCES = 500
DIGEST_MISMATCH = 0x0110  # the service's status for bytes that are not the ones named (damaged on the way)
_READ = 1 << 20


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"set {TOKEN_ENV} to this site's credential (renkei center credential issue --site SITE)")
    return token


@dataclass(frozen=True)
class _Failed:
    sop_instance_uid: str
    status: int


def _parts(entries: Sequence[JournalEntry], boundary: str) -> Iterator[bytes]:
    for entry in entries:
        digest = base64.b64encode(bytes.fromhex(entry.instance.sha256)).decode("ascii")
        yield (f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Digest: sha-256=:{digest}:\r\n\r\n").encode(
            "ascii"
        )
        with open(entry.path, "rb") as handle:
            while chunk := handle.read(_READ):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _batches(entries: Sequence[JournalEntry]) -> Iterator[list[JournalEntry]]:
    batch: list[JournalEntry] = []
    size = 0
    for entry in entries:
        if batch and (size + entry.instance.size > BATCH_BYTES or len(batch) >= BATCH_INSTANCES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.instance.size
    if batch:
        yield batch


class CenterClient:
    """STOW-RS to the center's service as one site (its token), over one keep-alive connection."""

    def __init__(self, url: str, token: str, timeout: float = 300.0, verify: str | bool = True) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(timeout, connect=15.0), verify=verify
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CenterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refused(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise UsageError(
                f"the center's service refused this site's credential (HTTP {response.status_code}): "
                f"check {TOKEN_ENV}, or ask the operator for a new one (renkei center credential issue)"
            )

    def check_site(self, site_id: str) -> None:
        """The credential is valid and is this site's (a token copied from another site is refused here)."""
        base = self.url.rsplit("/dicomweb", 1)[0]
        try:
            response = self.http.get(f"{base}/identity")
        except httpx.HTTPError as exc:
            raise StorageError(f"the center's service at {self.url} is not reachable: {exc}") from None
        self._refused(response)
        if response.status_code != 200:
            raise StorageError(f"the center's service answered HTTP {response.status_code} to /identity")
        site = response.json().get("site")
        if site != site_id:
            raise UsageError(f"{TOKEN_ENV} is a credential of {site}, not of {site_id}: use this site's own credential")

    def _store(self, entries: Sequence[JournalEntry]) -> tuple[set[str], list[_Failed]]:
        """(SOP UIDs the service stored, failures) for one STOW-RS request of these instances."""
        boundary = "renkei-" + secrets.token_hex(12)
        try:
            response = self.http.post(
                f"{self.url}/studies",
                content=_parts(entries, boundary),
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            )
        except httpx.HTTPError as exc:
            raise StorageError(f"the center's service at {self.url} is not reachable: {exc}") from None
        self._refused(response)
        if response.status_code >= 500:
            raise StorageError(f"the center's service answered HTTP {response.status_code}; retried later")
        if response.status_code not in (200, 202, 409):
            raise StorageError(f"the center's service answered HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        stored = {
            item["00081155"]["Value"][0]
            for item in body.get("00081199", {}).get("Value", [])
            if "Value" in item["00081155"]
        }
        failed = [
            _Failed(
                (item.get("00081155", {}).get("Value") or [""])[0],
                int((item.get("00081197", {}).get("Value") or [0xC000])[0]),
            )
            for item in body.get("00081198", {}).get("Value", [])
        ]
        return stored, failed

    def push_study(self, journal: Journal, site_id: str, study_uid: str) -> UploadResult:
        """Send the study's instances not yet verified; mark each one the service stored 'verified'."""
        started = time.monotonic()
        if journal.is_quarantined(study_uid):
            held = next(q for q in journal.quarantined() if q.study_uid == study_uid)
            return UploadResult(study_uid, quarantined=held.reason)
        entries = [
            e for e in journal.instances(study_uid, "pending") + journal.instances(study_uid, "uploaded") if e.local
        ]
        by_uid = {e.instance.sop_instance_uid: e for e in entries}
        done = 0
        size = 0
        failures: list[str] = []
        refused: list[tuple[str, str]] = []
        for batch in _batches(entries):
            stored, failed = self._store(batch)
            journal.set_upload_state(sorted(stored), "verified")
            done += len(stored)
            size += sum(by_uid[u].instance.size for u in stored if u in by_uid)
            unnamed = [e for e in batch if e.instance.sop_instance_uid not in stored]
            for f in failed:
                entry = by_uid.get(f.sop_instance_uid)
                if f.status == DIGEST_MISMATCH or entry is None:
                    # damaged on the way, or a part the service could not name: the edge's own file decides
                    for e in [entry] if entry is not None else unnamed:
                        problem = local_problem(e)
                        if problem:
                            refused.append((e.instance.sop_instance_uid, problem))
                        else:
                            failures.append(f"{e.instance.sop_instance_uid}: damaged on the way; sent again next run")
                else:
                    refused.append((f.sop_instance_uid, f"the center refused it (status 0x{f.status:04X})"))
        reason = ""
        if refused:
            info = journal.study_info(study_uid, site_id) if journal.instances(study_uid) else None
            refused = [(uid, scrub(why, info)) for uid, why in refused]
            reason = f"upload: {len(refused)} of {len(entries)} instance(s) refused; first: {refused[0][1]}"
            reason = journal.quarantine(study_uid, reason, [uid for uid, _ in refused], step="upload").reason
            log.warning("push %s from %s: quarantined (%s)", study_uid, site_id, reason)
        log.info("push %s from %s: %d of %d instances stored", study_uid, site_id, done, len(entries))
        return UploadResult(
            study_uid,
            len(entries),
            done,
            0,
            0,
            size,
            time.monotonic() - started,
            tuple(failures),
            tuple(why for _, why in refused),
            reason,
        )

    def push_site(self, journal: Journal, site_id: str, stable_age: float) -> list[UploadResult]:
        """Every completed study of the site not yet verified, oldest first (after checking the credential)."""
        self.check_site(site_id)
        return [self.push_study(journal, site_id, uid) for uid in studies_to_sync(journal, stable_age)]
