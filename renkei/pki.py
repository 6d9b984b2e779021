"""The region's certificate authority and the certificates of its DICOM nodes (mutual TLS).

One CA per region signs every certificate. A certificate identifies ONE AE title
or ONE whole site, and says so in its subjectAltName URIs:

- an AE certificate: subject CN = the AE title; SAN URIs `urn:renkei:ae:<AE title>`
  and `urn:renkei:site:<site id>` (the site the AE belongs to);
- a site certificate (the site's edge, its worker): subject CN = `site:<site id>`;
  SAN URI `urn:renkei:site:<site id>`, plus DNS/IP entries for the hosts it serves on.

In the URIs every character a URI does not allow (space, `"` `#` `%` `<` `>` `?`
`[` `\\` `]` `^` `` ` `` `{` `|` `}`) is percent-encoded as UTF-8 with upper-case hex;
`ae_uri()` and `site_uri()` build them, `identities_of()` reads them back.
Keys are EC P-256, written unencrypted with mode 0600 (a clinic's edge starts
unattended); both extended key usages are set, as a DICOM node is client and server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import TypeAdapter, ValidationError

from renkei.config import AETitle
from renkei.errors import UsageError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "Identity",
    "ae_uri",
    "site_uri",
    "create_ca",
    "issue",
    "identities_of",
    "peer_identity",
    "load_certificate",
    "file_stem",
    "verify_issued_by",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
AE_URN = "urn:renkei:ae:"
SITE_URN = "urn:renkei:site:"
SITE_CN = "site:"
_URI_SAFE = "!$&'()*+,;=:@/"  # sub-delims, ':' '@' '/': allowed in a URN as they are
_SITE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_AE_CHECK = TypeAdapter(AETitle)
_CLOCK_SKEW = dt.timedelta(minutes=10)  # a clinic machine's clock may run a little behind


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for: AE titles (an AE certificate) or whole sites (a site certificate).

    `sites` holds only the sites the certificate speaks for as a whole, so it is
    empty for an AE certificate: a workstation's certificate never passes for the
    site's PACS. The site an AE certificate names (where its AE belongs) is in
    `ae_sites`. The whole rule is `allows()`.
    """

    ae_titles: frozenset[str] = frozenset()
    sites: frozenset[str] = frozenset()
    ae_sites: frozenset[str] = frozenset()

    @property
    def is_site_certificate(self) -> bool:
        """True when the certificate speaks for whole sites (any AE title of them)."""
        return bool(self.sites)

    def allows(self, ae_title: str, site_id: str) -> bool:
        """May the holder call (or answer) as `ae_title` of site `site_id`?

        An AE certificate: only its own AE titles, and only at its own site when it
        names one. A site certificate: any AE title of its sites.
        """
        if self.ae_titles:
            return ae_title in self.ae_titles and (not self.ae_sites or site_id in self.ae_sites)
        return site_id in self.sites


def ae_uri(ae_title: str) -> str:
    """`urn:renkei:ae:<AE title>`, percent-encoded where a URI needs it."""
    return AE_URN + quote(ae_title, safe=_URI_SAFE)


def site_uri(site_id: str) -> str:
    """`urn:renkei:site:<site id>`."""
    return SITE_URN + quote(site_id, safe=_URI_SAFE)


def file_stem(ae_title: str) -> str:
    """A file name for an AE title's certificate and key (`/` and other awkward characters encoded)."""
    return quote(ae_title, safe="!$&'()+,;=@-._~")


# --------------------------------------------------------------------- files
def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the start (a key is never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM or DER file; UsageError when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        return _parse_certificate(data)
    except ValueError:
        raise UsageError(f"{path} is not a PEM or DER certificate") from None


def _parse_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = Path(ca_dir) / CA_CERT, Path(ca_dir) / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise UsageError(
            f"no region CA in {ca_dir} (need {CA_CERT} and {CA_KEY}); create one with `renkei tls init-ca`"
        )
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot read the CA key {key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UsageError(f"{key_path} is not the key of {cert_path}; restore the pair or create a new CA")
    return cert, key


def _common_name(text: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, text[:64])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# --------------------------------------------------------------------- CA
def create_ca(directory: Path, region: str, days: int = 3650, *, force: bool = False) -> tuple[Path, Path]:
    """Create the region CA in `directory`; returns (ca.pem, ca.key).

    Refuses to replace an existing CA unless `force` (every certificate the old
    one signed stops being trusted wherever the new ca.pem is installed).
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise UsageError(
            f"a region CA already exists at {existing[0]}; keep it, or replace it with "
            "--force (then re-issue and re-install every certificate)"
        )
    if days < 1:
        raise UsageError(f"CA validity must be at least 1 day (got {days})")
    region = region.strip() or "region"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"renkei {region}"[:64]),
            _common_name(f"renkei {region} region CA"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


# --------------------------------------------------------------------- leaf certificates
def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name: x509.GeneralName = x509.DNSName(host)
        else:
            if address.is_unspecified:  # 0.0.0.0 / :: is where one listens, never whom one calls
                continue
            name = x509.IPAddress(address)
        if name not in names:
            names.append(name)
    return names


def issue(
    ca_dir: Path,
    out_dir: Path,
    *,
    site_id: str,
    ae_title: str | None = None,
    hosts: Sequence[str] = (),
    days: int = 825,
    name: str | None = None,
) -> tuple[Path, Path]:
    """Issue an AE certificate (with `ae_title`) or a site certificate (without); returns (cert, key).

    Files are `<out_dir>/<name>.pem` and `<out_dir>/<name>.key` (key mode 0600);
    `name` defaults to the AE title (see `file_stem`) or `site`. `hosts` become
    DNS or IP subjectAltNames. The validity ends no later than the CA's.
    An existing pair of that name is replaced (that is how a certificate is renewed).
    """
    if not _SITE_ID_RE.fullmatch(site_id):
        raise UsageError(f"site id {site_id!r} must be lower-case letters, digits and '-', starting with a letter")
    if ae_title is not None:
        try:
            _AE_CHECK.validate_python(ae_title)
        except ValidationError as exc:
            raise UsageError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    if days < 1:
        raise UsageError(f"certificate validity must be at least 1 day (got {days})")
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    stem = name or (file_stem(ae_title) if ae_title is not None else "site")
    if not stem or "/" in stem or stem in (".", ".."):
        raise UsageError(f"{stem!r} cannot be a file name for a certificate")

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, attr.value)
        for attr in ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    ][:1]
    subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site_id))
    subject.append(_common_name(ae_title if ae_title is not None else SITE_CN + site_id))
    san: list[x509.GeneralName] = []
    if ae_title is not None:
        san.append(x509.UniformResourceIdentifier(ae_uri(ae_title)))
    san.append(x509.UniformResourceIdentifier(site_uri(site_id)))
    san.extend(_host_names(hosts))

    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise UsageError(f"the region CA in {ca_dir} has expired; create a new one (renkei tls init-ca --force)")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


# --------------------------------------------------------------------- reading identities
def identities_of(cert: x509.Certificate | bytes) -> Identity:
    """The AE titles and sites a certificate speaks for (a Certificate, or DER/PEM bytes).

    Read from the `urn:renkei:ae:` / `urn:renkei:site:` SAN URIs. A certificate
    naming any AE title is an AE certificate (its site URIs go to `ae_sites`);
    one naming sites only is a site certificate. One with neither (not made by
    renkei) falls back to its CN: `site:<id>` is a site, anything else an AE title.
    """
    if isinstance(cert, (bytes, bytearray, memoryview)):
        cert = _parse_certificate(bytes(cert))
    ae_titles: set[str] = set()
    sites: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        lowered = uri.lower()  # the scheme and the namespace are case-insensitive, the rest is not
        if lowered.startswith(AE_URN) and len(uri) > len(AE_URN):
            ae_titles.add(unquote(uri[len(AE_URN) :]))
        elif lowered.startswith(SITE_URN) and len(uri) > len(SITE_URN):
            sites.add(unquote(uri[len(SITE_URN) :]))
    if not ae_titles and not sites:
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = str(attr.value)
            if value.startswith(SITE_CN) and len(value) > len(SITE_CN):
                sites.add(value[len(SITE_CN) :])
            elif value:
                ae_titles.add(value)
            break
    if ae_titles:  # an AE certificate: its site URI says where the AE belongs, nothing more
        return Identity(frozenset(ae_titles), frozenset(), frozenset(sites))
    return Identity(frozenset(), frozenset(sites))


def peer_identity(ssl_socket: ssl.SSLSocket | ssl.SSLObject) -> Identity | None:
    """The identity in the peer's certificate after the handshake; None when it sent none (or no TLS)."""
    getpeercert = getattr(ssl_socket, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        der = getpeercert(binary_form=True)
    except ValueError:  # handshake not done
        return None
    if not der:
        return None
    return identities_of(der)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when `ca_cert` signed `cert` (for `renkei tls show --ca`)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
