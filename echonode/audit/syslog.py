"""Syslog transport for audit messages: RFC 5424 records over UDP (RFC 5426), TCP with
octet-counting framing (RFC 6587 §3.4.1) or TLS (RFC 5425, same framing).

IHE ATNA (ITI-20) conventions: facility 10 (authpriv), severity 5 (notice) so PRI is 85;
APP-NAME ``echonode``; MSGID ``IHE+RFC-3881``; the MSG is a UTF-8 BOM followed by the
XML. The RFC 5424 ``meta`` element carries ``sequenceId`` = the audit row id, so a
repository can see gaps and repeats.

Plain syslog has no acknowledgement. Before each batch the TCP/TLS connection is checked
for an orderly close by the peer (a repository that restarted), so a message is not
written into a connection that is already gone; see docs/audit.md for what remains.
"""

from __future__ import annotations

import datetime as dt
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

PRI = 10 * 8 + 5  # authpriv.notice
APP_NAME = "echonode"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
UDP_MAX = 65507


class AuditURLError(ValueError):
    pass


class MessageTooLarge(OSError):
    """The message cannot travel over this transport at all (UDP datagram limit)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # udp | tcp | tls
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``udp://host:port``, ``tcp://host:port`` or ``tls://host:port`` (default ports 514, 514, 6514)."""
    u = urlsplit(url.strip())
    scheme = (u.scheme or "").lower()
    if scheme not in ("udp", "tcp", "tls"):
        raise AuditURLError(f"scheme must be udp, tcp or tls, got {url!r}")
    if not u.hostname:
        raise AuditURLError(f"no host in {url!r}")
    try:
        port = u.port or (6514 if scheme == "tls" else 514)
    except ValueError:
        raise AuditURLError(f"bad port in {url!r}") from None
    return Endpoint(scheme, u.hostname, int(port))


def _sd_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_record(xml: str, *, seq: int, when: Optional[dt.datetime] = None, hostname: str = "",
                  procid: Optional[int] = None) -> bytes:
    """One RFC 5424 record (without transport framing)."""
    when = when or dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    ts = when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255].replace(" ", "_")
    sd = f'[meta sequenceId="{_sd_escape(str(int(seq) % 2147483647 or 1))}"]'
    head = f"<{PRI}>1 {ts} {host} {APP_NAME} {procid or os.getpid()} {MSGID} {sd} "
    return head.encode("ascii", "replace") + BOM + xml.encode("utf-8")


def frame(record: bytes, scheme: str) -> bytes:
    if scheme == "udp":
        return record
    return str(len(record)).encode("ascii") + b" " + record


class SyslogClient:
    """One connection to the audit repository; ``send`` raises OSError on any failure."""

    def __init__(self, endpoint: Endpoint, *, ca: str = "", cert: str = "", key: str = "",
                 timeout_s: float = 10.0):
        self.endpoint = endpoint
        self.ca, self.cert, self.key = ca, cert, key
        self.timeout_s = timeout_s
        self.sock: Optional[socket.socket] = None

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca:
            ctx.load_verify_locations(cafile=self.ca)
        else:
            ctx.load_default_certs()
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key or None)
        return ctx

    def connect(self) -> None:
        self.close(linger_s=0)
        ep = self.endpoint
        if ep.scheme == "udp":
            info = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(info[0], socket.SOCK_DGRAM)
            s.settimeout(self.timeout_s)
            s.connect(info[4])
            self.sock = s
            return
        s = socket.create_connection((ep.host, ep.port), timeout=self.timeout_s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if ep.scheme == "tls":
            try:
                s = self._tls_context().wrap_socket(s, server_hostname=ep.host)
            except Exception:
                s.close()
                raise
            # TLS 1.3: a server that refuses our certificate says so only after the handshake
            # returned here; wait briefly for that alert so no message goes into a refused session
            self.sock = s
            r, _, _ = select.select([s], [], [], 0.3)
            if r and not self.alive():
                self.close(linger_s=0)
                raise ConnectionRefusedError("the audit repository closed the TLS session (certificate refused?)")
            return
        self.sock = s

    def alive(self) -> bool:
        """False when the peer closed the stream (or it errored); UDP is always 'alive'."""
        if self.sock is None:
            return False
        if self.endpoint.scheme == "udp":
            return True
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return True
            if isinstance(self.sock, ssl.SSLSocket):
                if self.sock.pending():
                    return True
                self.sock.setblocking(False)
                try:
                    data = self.sock.recv(1)
                except ssl.SSLWantReadError:
                    return True
                finally:
                    self.sock.settimeout(self.timeout_s)
                return bool(data)
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return bool(data)
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False

    def ensure(self) -> None:
        if not self.alive():
            self.connect()

    def send(self, record: bytes) -> None:
        if self.sock is None:
            raise ConnectionError("not connected")
        data = frame(record, self.endpoint.scheme)
        if self.endpoint.scheme == "udp":
            if len(data) > UDP_MAX:
                raise MessageTooLarge(f"audit message of {len(data)} bytes does not fit in a UDP datagram; use tcp or tls")
            self.sock.send(data)
        else:
            self.sock.sendall(data)

    def close(self, linger_s: float = 2.0) -> None:
        """Close; a stream is shut down gracefully (TLS close_notify, then our FIN) and the
        peer's own close awaited for up to ``linger_s``, so a receiver that fails on an abrupt
        end of stream has read every record before the connection goes away."""
        if self.sock is None:
            return
        s, self.sock = self.sock, None
        try:
            if self.endpoint.scheme != "udp" and linger_s > 0:
                s.settimeout(linger_s)
                if isinstance(s, ssl.SSLSocket):
                    s = s.unwrap()
                s.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + linger_s
                while time.monotonic() < deadline and s.recv(4096):
                    pass
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass
