"""The DICOM SCP: C-ECHO and C-STORE for echo-lab storage classes (pynetdicom).

Transport (pynetdicom AE, optional mutual TLS) is kept apart from policy
(:class:`AssociationPolicy`: calling-AE allow-list with optional host binding,
called-AE check, concurrency cap) and from storage (:class:`echonode.dicom.spool.Spool`).

Only the SOP classes in :data:`STORAGE_SOP_CLASSES` (+ Verification) are accepted;
every other abstract syntax is refused at presentation-context negotiation
(PS3.8 §9.3.3.2 result 0x03 "abstract syntax not supported"), never acknowledged
and dropped. Datasets are stored in the transfer syntax they arrive in.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pynetdicom import AE, _config, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid

from echonode import audit
from echonode.config import NodeSettings, Settings
from echonode.dicom.spool import PROCESSING_FAILURE, Spool

LOG = logging.getLogger("echonode.scp")

# pynetdicom knows the retired US classes only as generic UIDs: register them as storage.
for _uid, _kw in (("1.2.840.10008.5.1.4.1.1.6", "UltrasoundImageStorageRetired"),
                  ("1.2.840.10008.5.1.4.1.1.3", "UltrasoundMultiFrameImageStorageRetired")):
    try:
        from pynetdicom.sop_class import uid_to_service_class
        if uid_to_service_class(_uid) is not StorageServiceClass:
            register_uid(_uid, _kw, StorageServiceClass)
    except Exception:  # pragma: no cover - already registered
        pass


def _install_fast_recv() -> None:
    """pynetdicom's ``AssociationSocket.recv`` reads 4 KiB per ``socket.recv`` call and
    appends to a bytearray: for multi-MB clips that is hundreds of Python-level calls per
    instance. Replace it with ``recv_into`` a preallocated buffer (same contract: returns
    a bytearray of at most ``nr_bytes``, shorter only when the peer closed). Plain and TLS
    sockets both support ``recv_into``."""
    from pynetdicom.transport import AssociationSocket

    if getattr(AssociationSocket.recv, "_echonode_fast", False):
        return

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                del view
                return buf[:got]
            got += n
        del view
        return buf

    recv._echonode_fast = True  # type: ignore[attr-defined]
    AssociationSocket.recv = recv


_install_fast_recv()

# Never let pynetdicom log identifiers (patient names/IDs) of requests/responses.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR Storage",
}

TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.1.98": "Encapsulated Uncompressed Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}

VERIFICATION_TS = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 §9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LIMIT = (0x02, 0x03, 0x02)


@dataclass(frozen=True)
class PolicyDecision:
    accept: bool
    reason: str = ""
    reject: tuple[int, int, int] = REJECT_CALLING_AE


def _host_matches(peer: str, allowed: str) -> bool:
    """``allowed`` may be an IP, a CIDR network, or a host name (resolved now)."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer == allowed
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    try:
        return addr in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(allowed, None)
    except OSError:
        return False
    return any(ipaddress.ip_address(i[4][0]) == addr for i in infos)


class AssociationPolicy:
    """Who may associate. Pure logic over :class:`NodeSettings`; no sockets.

    * ``allow_any_calling_ae=true`` and no ``allowed`` entries: any calling AE (the
      embedded laptop default). With entries, only those AEs (default deny).
    * ``allow_any_calling_ae=false``: only ``allowed`` entries (an empty list denies all).
    * an entry with ``hosts`` binds the AE title to those addresses/networks/host names.
    * ``require_called_ae``: the called AE title must be ``ae_title``.
    """

    def __init__(self, node: NodeSettings):
        self.node = node
        self.allowed = {}
        for peer in node.allowed:
            self.allowed.setdefault(peer.ae_title.strip(), []).extend(peer.hosts)

    @property
    def default_open(self) -> bool:
        return self.node.allow_any_calling_ae and not self.allowed

    def check(self, calling_ae: str, called_ae: str, peer_host: str) -> PolicyDecision:
        calling_ae = (calling_ae or "").strip()
        called_ae = (called_ae or "").strip()
        if self.node.require_called_ae and called_ae != self.node.ae_title.strip():
            return PolicyDecision(False, f"called AE {called_ae!r} is not {self.node.ae_title!r}", REJECT_CALLED_AE)
        if self.default_open:
            return PolicyDecision(True, "any calling AE accepted (node.allow_any_calling_ae)")
        if calling_ae not in self.allowed:
            return PolicyDecision(False, f"calling AE {calling_ae!r} not in node.allowed", REJECT_CALLING_AE)
        hosts = self.allowed[calling_ae]
        if hosts and not any(_host_matches(peer_host, h) for h in hosts):
            return PolicyDecision(False, f"calling AE {calling_ae!r} not allowed from {peer_host}", REJECT_CALLING_AE)
        return PolicyDecision(True, "allow-listed")


def make_ssl_context(node: NodeSettings) -> Optional[ssl.SSLContext]:
    """Server-side TLS context (TLS ≥ 1.2, BCP 195); mutual TLS when ``require_client_cert``."""
    tls = node.tls
    if not tls.enabled:
        return None
    from echonode.config import ConfigError

    if not tls.cert or not tls.key:
        raise ConfigError("node.tls.enabled needs node.tls.cert and node.tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            ctx.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate/key/CA: {exc}") from None
    if tls.require_client_cert:
        if not tls.ca:
            raise ConfigError("node.tls.require_client_cert needs node.tls.ca (trusted CA bundle)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE
    return ctx


@dataclass
class _AssocStats:
    calling_ae: str = ""
    peer: str = ""
    stored: int = 0
    duplicates: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)
    statuses: dict = field(default_factory=dict)
    outcome: str = "closed"
    store_s: float = 0.0  # time spent in the spool (write, fsync, parse, SQL)


class EchoSCP:
    """The running SCP. ``start()`` listens in background threads; ``stop()`` drains."""

    def __init__(self, settings: Settings, spool: Spool, policy: Optional[AssociationPolicy] = None):
        self.settings = settings
        self.node = settings.node
        self.spool = spool
        self.policy = policy or AssociationPolicy(settings.node)
        self.ae = AE(ae_title=self.node.ae_title)
        self.ae.maximum_associations = max(1, int(self.node.max_associations))
        self.ae.maximum_pdu_size = int(self.node.max_pdu)
        self.ae.dimse_timeout = self.node.dimse_timeout_s
        self.ae.network_timeout = self.node.network_timeout_s
        self.ae.acse_timeout = self.node.acse_timeout_s
        # policy is ours (EVT_REQUESTED); pynetdicom's own called-AE check stays off
        self.ae.require_called_aet = False
        for uid in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification, VERIFICATION_TS)
        # Storage Commitment reports (N-EVENT-REPORT) for results we delivered (results area)
        from echonode.dicom.scu import STORAGE_COMMITMENT_PUSH
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self._server = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.totals = {"associations": 0, "rejected": 0, "stored": 0, "failures": 0}

    # ------------------------------------------------------------------ handlers
    def _peer(self, assoc) -> str:
        try:
            return str(assoc.requestor.address)
        except Exception:
            return "?"

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        peer = self._peer(assoc)
        decision = self.policy.check(calling, called, peer)
        if not decision.accept:
            with self._lock:
                self.totals["rejected"] += 1
            LOG.warning("association rejected: calling AE %r from %s: %s", calling, peer, decision.reason)
            audit.record(self.spool.sessions, audit.association(calling, called, peer, assoc.requestor.port, accepted=False, reason=decision.reason, tls_subject=audit.tls_subject(assoc)))
            assoc.acse.send_reject(*decision.reject)

    def _on_established(self, event) -> None:
        assoc = event.assoc
        with self._lock:
            self.totals["associations"] += 1
            self._stats[id(assoc)] = _AssocStats(calling_ae=str(assoc.requestor.ae_title).strip(),
                                                 peer=f"{self._peer(assoc)}:{assoc.requestor.port}")
        audit.record(self.spool.sessions, audit.association(str(assoc.requestor.ae_title).strip(), str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip(), self._peer(assoc), assoc.requestor.port, accepted=True, tls_subject=audit.tls_subject(assoc)))
        rejected = [cx.abstract_syntax for cx in assoc.rejected_contexts]
        if rejected:
            LOG.info("association from %r: refused %d presentation context(s) at negotiation: %s",
                     str(assoc.requestor.ae_title).strip(), len(rejected),
                     ", ".join(sorted(set(str(r) for r in rejected)))[:300])

    def _on_close(self, event) -> None:
        st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        audit.record(self.spool.sessions, audit.association_closed(st.calling_ae, self.node.ae_title, st.peer, stored=st.stored, duplicates=st.duplicates, failures=st.failures, aborted=event.assoc.is_aborted, statuses=st.statuses, tls_subject=audit.tls_subject(event.assoc)))
        LOG.info("association %s: calling AE %r peer %s stored %d (duplicates %d) failures %d in %.1fs "
                 "(%.1fs storing)%s",
                 "aborted" if event.assoc.is_aborted else "released", st.calling_ae, st.peer, st.stored,
                 st.duplicates, st.failures, time.monotonic() - st.started, st.store_s,
                 (" statuses " + ",".join(f"0x{k:04X}x{v}" for k, v in sorted(st.statuses.items())))
                 if st.statuses else "")

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        st = self._stats.get(id(event.assoc)) or _AssocStats()
        result = None
        t0 = time.monotonic()
        try:
            req = event.request
            # the dataset bytes exactly as received (no decoding, no copy)
            data = req.DataSet.getbuffer() if req.DataSet is not None else memoryview(b"")
            try:
                result = self.spool.store(
                    sop_class_uid=str(req.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    data=data, calling_ae=st.calling_ae, peer=st.peer)
            finally:
                try:
                    data.release()
                except BufferError:
                    pass
            status = result.status
        except Exception as exc:  # never let an exception leave a C-STORE unanswered
            LOG.error("C-STORE handler failed: %s: %s", type(exc).__name__, str(exc)[:200])
            status = PROCESSING_FAILURE
        audit.record(self.spool.sessions, audit.instance_received(result, status=status, calling_ae=st.calling_ae, peer=st.peer, called_ae=self.node.ae_title, sop_class_uid=str(getattr(event.request, "AffectedSOPClassUID", "") or ""), sop_instance_uid=str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")))
        with self._lock:
            st.store_s += time.monotonic() - t0
            if status == 0x0000:
                st.stored += 1
                self.totals["stored"] += 1
                if result is not None and result.duplicate:
                    st.duplicates += 1
            else:
                st.failures += 1
                self.totals["failures"] += 1
                st.statuses[status] = st.statuses.get(status, 0) + 1
        return status

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if getattr(self.spool, "sessions", None) is not None:
            from echonode.dicom.scu import commitment_report_handler
            handlers.append((evt.EVT_N_EVENT_REPORT, commitment_report_handler(self.settings, self.spool.sessions)))
        ctx = make_ssl_context(self.node)
        self._server = self.ae.start_server((self.node.host, int(self.node.port)), block=False,
                                            evt_handlers=handlers, ssl_context=ctx)
        audit.watch_tls_handshakes(self._server, self.spool.sessions)
        LOG.info("SCP %s listening on %s:%d%s; calling AEs: %s", self.node.ae_title, self.node.host, self.port,
                 " (DICOM TLS%s)" % (", mutual" if self.node.tls.require_client_cert else "") if ctx else "",
                 "any (node.allow_any_calling_ae)" if self.policy.default_open
                 else ", ".join(sorted(self.policy.allowed)) or "none")

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return int(self.node.port)

    def active(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop listening, let in-flight associations finish for ``drain_s``, then abort the rest."""
        if self._server is not None:
            try:
                self._server.shutdown()
            except Exception:
                pass
            self._server = None
        deadline = time.monotonic() + drain_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            LOG.warning("aborting %d association(s) still active after %.0fs", len(self.ae.active_associations), drain_s)
        self.ae.shutdown()
