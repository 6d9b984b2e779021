"""TLS for the edge's DICOM port, from the configuration's `edge.tls` section."""

from __future__ import annotations

import ssl

from renkei.config import DicomPeer, TLSConfig
from renkei.errors import ConfigError


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server-side TLS context: the edge's certificate and key; with `ca`, mutual TLS.

    With a CA every peer must present a certificate signed by it (dcmtk:
    `--enable-tls KEY CERT --add-cert-file CA`); without, any TLS client may connect.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"edge TLS: cannot load certificate {tls.cert} and key {tls.key}: {exc}") from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"edge TLS: cannot load CA certificate {tls.ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client-side TLS context (for the edge calling a TLS peer); verifies with `ca` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False
    if ca is None:
        context.verify_mode = ssl.CERT_NONE
    if cert and key:
        context.load_cert_chain(certfile=cert, keyfile=key)
    return context


def client_tls_args(tls: TLSConfig | None, peer: DicomPeer) -> tuple[ssl.SSLContext, None] | None:
    """pynetdicom `tls_args` for an association the edge opens to `peer`, None for plaintext.

    A peer configured with `tls: true` is called over TLS with the edge's own
    certificate (so that the peer can check who calls) and, with the region
    CA, the peer's certificate is verified.
    """
    if not peer.tls:
        return None
    if tls is None:
        raise ConfigError(
            f"{peer.ae_title} is configured with tls: true, but this edge has no edge.tls "
            "certificate to call it with; add edge.tls (see `renkei tls issue`)"
        )
    try:
        context = client_context(ca=str(tls.ca) if tls.ca else None, cert=str(tls.cert), key=str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"edge TLS: cannot load certificate {tls.cert} and key {tls.key}: {exc}") from None
    return context, None
