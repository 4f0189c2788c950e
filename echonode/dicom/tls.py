"""Outbound DICOM TLS (PS3.15 B.9): the context our deliveries connect with.

Whatever the destination, the PACS must prove who it is:

* its certificate chain must verify against ``tls.ca`` (or the system store when empty);
* its certificate must name the host we connect to: the DNS name, or, when the
  destination is configured by IP address, that address in the certificate's subject
  alternative names (OpenSSL checks both; there is no switch to turn this off);
* TLS 1.2 is the lowest version offered;
* with ``tls_pin_sha256`` on the destination, the SHA-256 of the certificate (DER, as
  ``openssl x509 -noout -fingerprint -sha256`` prints it) must also match: a pin narrows
  trust to one certificate, it never replaces the checks above.

A failed check fails the TLS handshake, so pynetdicom reports a failed connection and the
outbox retries the row later; the reason is logged here (no patient data is involved).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from typing import Optional

from echonode.config import Destination

log = logging.getLogger(__name__)

__all__ = ["client_context", "fingerprint_sha256"]


def fingerprint_sha256(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate (the form ``tls_pin_sha256`` is kept in)."""
    return hashlib.sha256(der).hexdigest()


class _PinnedSocket(ssl.SSLSocket):
    """An SSLSocket that, once the standard verification passed, compares the peer
    certificate with the pin of its context before any DICOM byte is exchanged."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        pin = getattr(self.context, "pin_sha256", "")
        if not pin:
            return
        der = self.getpeercert(binary_form=True) or b""
        got = fingerprint_sha256(der)
        if not hmac.compare_digest(got, pin):
            where = getattr(self.context, "destination", "destination")
            log.warning("TLS: certificate of %s has SHA-256 %s, not the configured tls_pin_sha256 %s",
                        where, got, pin)
            raise ssl.SSLCertVerificationError(f"certificate of {where} does not match tls_pin_sha256")


class _ClientContext(ssl.SSLContext):
    sslsocket_class = _PinnedSocket
    pin_sha256: str = ""
    destination: str = ""


def client_context(dest: Destination) -> Optional[tuple[ssl.SSLContext, str]]:
    """``tls_args`` for pynetdicom's ``associate`` to ``dest``, or None without TLS.

    Raises ``OSError``/``ssl.SSLError`` when the configured CA, certificate or key cannot
    be loaded (the caller records it as a delivery failure).
    """
    t = dest.tls
    if not t.enabled:
        return None
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if t.ca:
        ctx.load_verify_locations(cafile=t.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if t.cert:
        ctx.load_cert_chain(t.cert, t.key or None)
    ctx.pin_sha256 = dest.tls_pin_sha256
    ctx.destination = f"{dest.name} ({dest.host}:{dest.port})"
    return ctx, dest.host
