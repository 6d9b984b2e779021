"""Who is asking the center service: per-site credentials, kept at the center, hashed.

Each site's edge and worker gets a credential of its own: a bearer token
(`renkei center credential issue --site clinic-a` prints it once). The center
keeps only its SHA-256 (a token is 32 random bytes: no dictionary to guess
from, so a fast hash is enough) with the site, a name and its dates, in one
JSON file in center storage (`service/credentials.json`): every replica of
the service reads the same file, so a revocation holds on all of them at
once on local storage (each request checks the file's inode, size and
mtime) and within `CACHE_S` seconds on S3. Why tokens rather than client certificates is in
docs/architecture.md ("The center service").

`Credentials.identify(header)` turns an Authorization header into an
`Identity` or raises `NotAuthenticated`; nothing else in the service decides
who the caller is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from renkei.catalog import fs as cfs
from renkei.catalog.keys import validate_site
from renkei.errors import RenkeiError, UsageError

CREDENTIALS_KEY = "service/credentials.json"
TOKEN_PREFIX = "rk1_"  # recognisable in a leaked log or a config file (secret scanners match on it)
CACHE_S = 5.0  # how old a replica's view of the credentials may be (a revocation's delay)
RELOAD_UNKNOWN_S = 0.2  # an unknown token reads the credentials again, at most 5 times a second
_TOKEN_BYTES = 32


class NotAuthenticated(RenkeiError):
    """No credential, an unknown one, or a revoked one."""


@dataclass(frozen=True)
class Identity:
    """The caller, as the center knows it: a site's machine (edge, worker) for now; people next."""

    kind: str  # "site"
    site: str
    name: str  # which credential (e.g. "edge", "worker"): audited as the actor

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.site}/{self.name}"


@dataclass(frozen=True)
class Credential:
    id: str
    site: str
    name: str
    sha256: str
    created_at: str
    revoked_at: str = ""

    @property
    def active(self) -> bool:
        return not self.revoked_at


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Credentials:
    """The region's site credentials in center storage (local folder or s3://)."""

    def __init__(self, center_url: str, s3_options: Any = None, cache_s: float = CACHE_S) -> None:
        self.fs, root = cfs.open_filesystem(center_url, s3_options)
        self.path = cfs.join(root, CREDENTIALS_KEY)
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._loaded_at = -1e9
        self._by_digest: dict[str, Credential] = {}
        self._loaded_stamp: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ storage
    def _read(self) -> list[Credential]:
        try:
            raw = cfs.read_bytes(self.fs, self.path)
        except FileNotFoundError:
            return []
        data = json.loads(raw.decode("utf-8"))
        return [Credential(**entry) for entry in data.get("credentials", [])]

    def _write(self, creds: list[Credential]) -> None:
        body = json.dumps({"credentials": [asdict(c) for c in creds]}, indent=1, sort_keys=True).encode("utf-8")
        cfs.atomic_write(self.fs, self.path, body)
        with self._lock:
            self._loaded_at = -1e9

    def all(self) -> list[Credential]:
        return self._read()

    def issue(self, site: str, name: str = "edge") -> tuple[Credential, str]:
        """A new credential for `site`; returns it and the token (shown once, never stored)."""
        validate_site(site)
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"credential name {name!r}: letters, digits, '-' and '_', at most 64")
        token = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
        cred = Credential(secrets.token_hex(6), site, name, _digest(token), _now())
        self._write([*self._read(), cred])
        return cred, token

    def revoke(self, site: str | None = None, credential_id: str | None = None) -> list[Credential]:
        """Revoke one credential (by id) or every credential of a site; returns those revoked."""
        if not site and not credential_id:
            raise UsageError("name the credential (--id) or the site (--site) to revoke")
        creds, revoked = [], []
        for c in self._read():
            if c.active and (c.id == credential_id or (site and not credential_id and c.site == site)):
                c = Credential(c.id, c.site, c.name, c.sha256, c.created_at, _now())
                revoked.append(c)
            creds.append(c)
        if revoked:
            self._write(creds)
        return revoked

    # ------------------------------------------------------------------ checking
    def _stamp(self) -> tuple[Any, ...] | None:
        """What changes when the credentials file is rewritten: (inode, size, mtime) of a local file."""
        if not cfs.is_local(self.fs):
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _current(self, max_age: float | None = None) -> dict[str, Credential]:
        with self._lock:
            fresh = time.monotonic() - self._loaded_at < (self.cache_s if max_age is None else max_age)
            # local storage: a stat per request sees an issue or revocation at once; S3: the cache time
            if fresh and self._stamp() in (None, self._loaded_stamp):
                return self._by_digest
        stamp = self._stamp()
        creds = {c.sha256: c for c in self._read() if c.active}
        with self._lock:
            self._by_digest, self._loaded_at, self._loaded_stamp = creds, time.monotonic(), stamp
        return creds

    def identify(self, authorization: str | None) -> Identity:
        """The identity an `Authorization: Bearer <token>` header proves, or NotAuthenticated."""
        if not authorization:
            raise NotAuthenticated("no credential: send Authorization: Bearer <the site's token>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise NotAuthenticated("the credential is not a renkei bearer token")
        digest = _digest(token)
        # a token not in the view is looked up again (a credential issued a moment ago works at once):
        # on local storage as soon as the file changed (one stat per unknown token), on S3 at most 5
        # times a second however many unknown tokens arrive
        for view in (self._current(), self._current(max_age=RELOAD_UNKNOWN_S)):
            for known, cred in view.items():
                if hmac.compare_digest(known, digest):
                    return Identity("site", cred.site, cred.name)
        raise NotAuthenticated("unknown or revoked credential")
