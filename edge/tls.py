"""TLS for the edge's DICOM port, from the configuration's `edge.tls` section."""

from __future__ import annotations

import ssl

from renkei.config import TLSConfig
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
